// libFuzzer target for the handshake codec: the bytes a peer (or anyone reaching the tunnel
// port) sends. The first input byte picks what the rest is:
//   0  a whole frame, decoded as a HELLO and as a REPLY (what arrives off the wire);
//   1  the TLVs of a HELLO, sealed with the right key (so the fuzzer gets past the MAC into the
//      value checks, where the interesting code is);
//   2  the same for a REPLY.
// Checks more than "no crash": what decodes re-encodes to a frame that decodes to the same, and
// a second encoding is byte-identical to the first.
//
//   build/tests/fuzz/handshake_fuzz -max_total_time=60 build/tests/fuzz/corpus/handshake \
//     tests/fuzz/corpus/handshake

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string_view>
#include <vector>

#include "proxy/handshake_codec.h"

namespace hs = dmm::proxy::handshake;

namespace {

constexpr std::uint8_t kKey[32] = {1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16,
                                   17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
constexpr std::size_t kMaxBody = 65536;
const hs::Nonce kNonce{9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6};

std::span<const std::uint8_t> keyFor(std::string_view) {
  return kKey;
}

void checkHello(const hs::Hello& h) {
  auto once = hs::encodeHello(h, kKey);
  auto back = hs::decodeHello(once, keyFor, kMaxBody);
  if (back.error != hs::RejectReason::kNone) std::abort();
  if (hs::encodeHello(back.hello, kKey) != once) std::abort();
}

void checkReply(const hs::Reply& r) {
  auto once = hs::encodeReply(r, kKey, kNonce);
  auto back = hs::decodeReply(once, kKey, kNonce, kMaxBody);
  if (back.error != hs::RejectReason::kNone) std::abort();
  if (hs::encodeReply(back.reply, kKey, kNonce) != once) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  std::span<const std::uint8_t> rest(data + 1, size - 1);
  switch (data[0] % 3) {
    case 0: {
      auto h = hs::decodeHello(rest, keyFor, kMaxBody);
      if (h.error == hs::RejectReason::kNone) checkHello(h.hello);
      auto r = hs::decodeReply(rest, kKey, kNonce, kMaxBody);
      if (r.error == hs::RejectReason::kNone) checkReply(r.reply);
      if (rest.size() >= hs::kPrefixSize) {
        hs::Prefix p;
        (void)hs::parsePrefix(rest.first<hs::kPrefixSize>(), hs::MessageType::kHello, kMaxBody, p);
      }
      break;
    }
    case 1: {
      auto frame = hs::seal(hs::MessageType::kHello, rest, kKey, {});
      auto h = hs::decodeHello(frame, keyFor, kMaxBody);
      if (h.error == hs::RejectReason::kNone) checkHello(h.hello);
      break;
    }
    case 2: {
      auto frame = hs::seal(hs::MessageType::kReply, rest, kKey, kNonce);
      auto r = hs::decodeReply(frame, kKey, kNonce, kMaxBody);
      if (r.error == hs::RejectReason::kNone) checkReply(r.reply);
      break;
    }
  }
  return 0;
}
