// libFuzzer target for the tunnel framing decoder (proxy/tunnel_framing.h): the bytes a peer
// sidecar sends on a framed session, which the relay decodes in place as they arrive, in
// whatever pieces the socket hands over. The first input byte picks framing v1 or v2 (raw
// header allowed) and how the rest is cut into reads.
//
// Checks more than "no crash": the payload decoded piece by piece equals what a plain
// whole-buffer reading of the same frames gives; the decoder stops right after an end frame
// and reports the rest as not consumed; after a raw header everything is payload; an error is
// reported exactly where the reference finds a bad length.
//
//   build/tests/fuzz/tunnel_framing_fuzz -max_total_time=60 DIR tests/fuzz/corpus/tunnel_framing

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "proxy/tunnel_framing.h"

namespace fr = dmm::proxy::framing;

namespace {

struct Reference {
  std::vector<std::byte> payload;
  std::size_t consumed = 0;  // input bytes up to and including an end frame (or all)
  bool end = false;
  bool raw = false;
  bool error = false;
};

// The frames read straight from the whole buffer.
Reference reference(std::span<const std::byte> in, bool allow_raw) {
  Reference r;
  std::size_t at = 0;
  while (at < in.size()) {
    if (in.size() - at < fr::kHeaderSize) {  // a header cut short: nothing more decodes yet
      at = in.size();
      break;
    }
    std::uint32_t length = 0;
    for (std::size_t i = 0; i < fr::kHeaderSize; ++i)
      length = length << 8 | static_cast<std::uint32_t>(in[at + i]);
    at += fr::kHeaderSize;
    if (length == fr::kRawHeader && allow_raw) {
      r.raw = true;
      r.payload.insert(r.payload.end(), in.begin() + static_cast<std::ptrdiff_t>(at), in.end());
      at = in.size();
      break;
    }
    if (length > fr::kMaxPayload) {
      r.error = true;
      break;
    }
    if (length == 0) {
      r.end = true;
      break;
    }
    std::size_t take = std::min<std::size_t>(length, in.size() - at);
    r.payload.insert(r.payload.end(), in.begin() + static_cast<std::ptrdiff_t>(at),
                     in.begin() + static_cast<std::ptrdiff_t>(at + take));
    at += take;
  }
  r.consumed = at;
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const bool allow_raw = (data[0] & 1) != 0;
  const std::size_t piece = 1 + data[1] % 64;  // the socket hands over at most this at a time
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data + 2), size - 2);
  Reference want = reference(in, allow_raw);

  fr::Decoder d(allow_raw);
  std::vector<std::byte> got;
  std::size_t fed = 0;
  bool error = false;
  while (fed < in.size() && !d.ended() && !error) {
    std::size_t n = std::min(piece, in.size() - fed);
    std::vector<std::byte> buf(in.begin() + static_cast<std::ptrdiff_t>(fed),
                               in.begin() + static_cast<std::ptrdiff_t>(fed + n));
    auto r = d.decodeInPlace(buf);
    if (r.payload > n || r.consumed > n) std::abort();
    if (r.error) {
      error = true;
      break;
    }
    got.insert(got.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(r.payload));
    if (r.raw && !allow_raw) std::abort();
    // Only an end frame leaves input unconsumed, and then the decoder has ended.
    if (r.consumed < n && !r.end) std::abort();
    if (r.end != d.ended()) std::abort();
    fed += r.consumed;
    if (r.end) break;
  }
  if (error != want.error) std::abort();
  if (error) return 0;  // where the bad length sits, the reference agrees it is one
  if (got != want.payload) std::abort();
  if (d.ended() != want.end || d.raw() != want.raw) std::abort();
  if (want.end && fed != want.consumed) std::abort();
  return 0;
}
