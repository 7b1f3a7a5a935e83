// The handshake codec: round trips, authentication, and every way a frame can be wrong.
//
// Hand-made frames come from RawFrame below, an encoder written from docs/handshake.md rather
// than from the codec's own writer, so that these tests check the wire format and not merely
// that the codec agrees with itself.

#include "proxy/handshake_codec.h"
#include "proxy/tunnel_framing.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dmm::proxy::handshake {
namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr std::size_t kMaxBody = 4096;

Bytes key(const std::string& s) {
  return Bytes(s.begin(), s.end());
}

const Bytes kKey = key("unit-test-key-0123456789abcdef");

KeyLookup lookup(const Bytes& k, const std::string& id = "default") {
  return [k, id](std::string_view key_id) -> std::span<const std::uint8_t> {
    if (key_id == id) return k;
    return {};
  };
}

Nonce makeNonce(std::uint8_t seed) {
  Nonce n{};
  for (std::size_t i = 0; i < n.size(); ++i)
    n[i] = static_cast<std::uint8_t>(seed + i * 13);
  return n;
}

Hello sampleHello() {
  Hello h;
  h.nonce = makeNonce(1);
  h.timestamp_ms = 1'795'000'000'123;
  h.original_dst = *SocketAddress::parse("10.1.2.3:8080");
  h.offers.push_back({StackKind::kDpdk, "dpdk0", {1, 2, 3, 4}});
  h.offers.push_back({StackKind::kKernel, "kernel", {}});
  h.qos = 7;
  h.connection_id = 0x0001'0000'0000'002aULL;
  return h;
}

// ---- an independent encoder ------------------------------------------------------------------

class RawFrame {
 public:
  explicit RawFrame(std::uint8_t type, std::uint8_t version = 1) {
    put32(0x444D4D48);
    bytes_.push_back(version);
    bytes_.push_back(type);
    put16(0);
    put32(0);  // body length, set by finish()
  }
  RawFrame& tlv(std::uint16_t type, const Bytes& value) {
    put16(type);
    put16(static_cast<std::uint16_t>(value.size()));
    bytes_.insert(bytes_.end(), value.begin(), value.end());
    return *this;
  }
  // Appends AUTH = HMAC-SHA256(key, frame so far (length already final) || extra).
  Bytes finish(const Bytes& k, const Bytes& extra = {}) {
    std::size_t body = bytes_.size() - 12 + 4 + 32;
    bytes_[8] = static_cast<std::uint8_t>(body >> 24);
    bytes_[9] = static_cast<std::uint8_t>(body >> 16);
    bytes_[10] = static_cast<std::uint8_t>(body >> 8);
    bytes_[11] = static_cast<std::uint8_t>(body);
    Bytes input = bytes_;
    input.insert(input.end(), extra.begin(), extra.end());
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    HMAC(EVP_sha256(), k.data(), static_cast<int>(k.size()), input.data(), input.size(), mac, &len);
    put16(0x00FF);
    put16(32);
    bytes_.insert(bytes_.end(), mac, mac + 32);
    return bytes_;
  }

 private:
  void put16(std::uint16_t v) {
    bytes_.push_back(static_cast<std::uint8_t>(v >> 8));
    bytes_.push_back(static_cast<std::uint8_t>(v));
  }
  void put32(std::uint32_t v) {
    put16(static_cast<std::uint16_t>(v >> 16));
    put16(static_cast<std::uint16_t>(v));
  }
  Bytes bytes_;
};

Bytes u64(std::uint64_t v) {
  Bytes out;
  for (int shift = 56; shift >= 0; shift -= 8)
    out.push_back(static_cast<std::uint8_t>(v >> shift));
  return out;
}

Bytes nonceBytes(const Nonce& n) {
  return Bytes(n.begin(), n.end());
}

Bytes dst4(std::uint8_t a, std::uint8_t b, std::uint8_t c, std::uint8_t d, std::uint16_t port) {
  return {4, static_cast<std::uint8_t>(port >> 8), static_cast<std::uint8_t>(port), a, b, c, d};
}

Bytes offer(std::uint8_t kind, const std::string& name, const Bytes& params = {}) {
  Bytes out{kind, static_cast<std::uint8_t>(name.size())};
  // Loops rather than insert(): GCC 12 warns (-Warray-bounds) on inserting an empty range.
  for (char c : name)
    out.push_back(static_cast<std::uint8_t>(c));
  for (std::uint8_t b : params)
    out.push_back(b);
  return out;
}

// The mandatory TLVs of a HELLO, for tests that add or change one thing.
RawFrame minimalHello(const Nonce& n = makeNonce(9)) {
  RawFrame f(1);
  f.tlv(0x0001, nonceBytes(n)).tlv(0x0002, u64(1000)).tlv(0x0003, dst4(10, 0, 0, 1, 80));
  f.tlv(0x0004, offer(1, "kernel"));
  return f;
}

// ---- HELLO -----------------------------------------------------------------------------------

TEST(HandshakeHello, RoundTripsEveryField) {
  Hello h = sampleHello();
  auto frame = encodeHello(h, kKey);
  auto r = decodeHello(frame, lookup(kKey), kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone) << reasonName(r.error);
  EXPECT_EQ(r.hello.nonce, h.nonce);
  EXPECT_EQ(r.hello.timestamp_ms, h.timestamp_ms);
  EXPECT_EQ(r.hello.original_dst, h.original_dst);
  ASSERT_EQ(r.hello.offers.size(), 2u);
  EXPECT_EQ(r.hello.offers[0].kind, StackKind::kDpdk);
  EXPECT_EQ(r.hello.offers[0].name, "dpdk0");
  EXPECT_EQ(r.hello.offers[0].params, (Bytes{1, 2, 3, 4}));
  EXPECT_EQ(r.hello.offers[1].kind, StackKind::kKernel);
  EXPECT_TRUE(r.hello.offers[1].params.empty());
  EXPECT_EQ(r.hello.qos, 7);
  EXPECT_EQ(r.hello.key_id, "default");
  EXPECT_EQ(r.hello.connection_id, h.connection_id);
}

TEST(HandshakeHello, RoundTripsIpv6AndAKeyId) {
  Hello h = sampleHello();
  h.original_dst = *SocketAddress::parse("[fd00:201::2]:443");
  h.key_id = "mesh-2026";
  auto frame = encodeHello(h, kKey);
  auto r = decodeHello(frame, lookup(kKey, "mesh-2026"), kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone) << reasonName(r.error);
  EXPECT_EQ(r.hello.original_dst, h.original_dst);
  EXPECT_EQ(r.hello.key_id, "mesh-2026");
  // The same frame under a key id the receiver does not know: no key, no trust.
  EXPECT_EQ(decodeHello(frame, lookup(kKey), kMaxBody).error, RejectReason::kAuthFailed);
}

TEST(HandshakeHello, MatchesTheDocumentedLayout) {
  // The codec's output and the independent encoder's must be byte-identical.
  Hello h;
  h.nonce = makeNonce(9);
  h.timestamp_ms = 1000;
  h.original_dst = *SocketAddress::parse("10.0.0.1:80");
  h.offers.push_back({StackKind::kKernel, "kernel", {}});
  h.key_id = "default";
  auto mine = minimalHello().tlv(0x0006, key("default")).finish(kKey);
  EXPECT_EQ(encodeHello(h, kKey), mine);
  // Prefix: "DMMH", version 1, type 1 (HELLO), flags 0, body length.
  ASSERT_GE(mine.size(), 12u);
  EXPECT_EQ(Bytes(mine.begin(), mine.begin() + 8), (Bytes{'D', 'M', 'M', 'H', 1, 1, 0, 0}));
}

TEST(HandshakeHello, WrongKeyIsAnAuthFailure) {
  auto frame = encodeHello(sampleHello(), kKey);
  EXPECT_EQ(decodeHello(frame, lookup(key("another-key-0123456789")), kMaxBody).error,
            RejectReason::kAuthFailed);
  EXPECT_EQ(decodeHello(frame, lookup(Bytes{}), kMaxBody).error, RejectReason::kAuthFailed);
}

TEST(HandshakeHello, EveryFlippedByteIsRefused) {
  auto frame = encodeHello(sampleHello(), kKey);
  for (std::size_t i = 0; i < frame.size(); ++i) {
    for (std::uint8_t bit : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      auto bad = frame;
      bad[i] ^= bit;
      auto r = decodeHello(bad, lookup(kKey), kMaxBody);
      EXPECT_NE(r.error, RejectReason::kNone) << "byte " << i << " bit " << int(bit);
    }
  }
}

TEST(HandshakeHello, EveryTruncationIsMalformed) {
  auto frame = encodeHello(sampleHello(), kKey);
  for (std::size_t n = 0; n < frame.size(); ++n) {
    Bytes cut(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_EQ(decodeHello(cut, lookup(kKey), kMaxBody).error, RejectReason::kMalformed) << n;
  }
  auto longer = frame;
  longer.push_back(0);
  EXPECT_EQ(decodeHello(longer, lookup(kKey), kMaxBody).error, RejectReason::kMalformed);
}

TEST(HandshakeHello, PrefixErrors) {
  auto frame = encodeHello(sampleHello(), kKey);
  auto v2 = frame;
  v2[4] = 2;
  EXPECT_EQ(decodeHello(v2, lookup(kKey), kMaxBody).error, RejectReason::kUnsupportedVersion);
  auto reply_type = frame;
  reply_type[5] = 2;
  EXPECT_EQ(decodeHello(reply_type, lookup(kKey), kMaxBody).error, RejectReason::kMalformed);
  EXPECT_EQ(decodeHello(frame, lookup(kKey), frame.size() - 13).error, RejectReason::kTooLarge);
  EXPECT_EQ(decodeHello(frame, lookup(kKey), frame.size() - 12).error, RejectReason::kNone);

  Prefix p;
  std::array<std::uint8_t, kPrefixSize> raw{'D', 'M', 'M', 'X', 1, 1, 0, 0, 0, 0, 0, 64};
  EXPECT_EQ(parsePrefix(raw, MessageType::kHello, kMaxBody, p), PrefixError::kBadMagic);
  raw[3] = 'H';
  EXPECT_EQ(parsePrefix(raw, MessageType::kHello, kMaxBody, p), PrefixError::kNone);
  EXPECT_EQ(p.body_length, 64u);
  raw[11] = 35;  // shorter than an AUTH TLV alone
  EXPECT_EQ(parsePrefix(raw, MessageType::kHello, kMaxBody, p), PrefixError::kMalformed);
  raw[9] = 0x01;  // 65571 bytes
  EXPECT_EQ(parsePrefix(raw, MessageType::kHello, kMaxBody, p), PrefixError::kTooLarge);
  raw[6] = 0xff;  // unknown flag bits are ignored
  raw[9] = 0;
  raw[11] = 64;
  EXPECT_EQ(parsePrefix(raw, MessageType::kHello, kMaxBody, p), PrefixError::kNone);
}

TEST(HandshakeHello, UnknownNonCriticalTlvIsSkippedButAuthenticated) {
  auto frame = minimalHello().tlv(0x0042, Bytes{9, 9, 9}).finish(kKey);
  auto r = decodeHello(frame, lookup(kKey), kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone) << reasonName(r.error);
  EXPECT_EQ(r.hello.original_dst.toString(), "10.0.0.1:80");
  // The skipped TLV is still covered by the MAC.
  auto tampered = frame;
  tampered[frame.size() - 32 - 4 - 1] ^= 1;  // last byte of the unknown TLV's value
  EXPECT_EQ(decodeHello(tampered, lookup(kKey), kMaxBody).error, RejectReason::kAuthFailed);
}

TEST(HandshakeHello, UnknownCriticalTlvIsMalformed) {
  auto frame = minimalHello().tlv(0x8042, Bytes{1}).finish(kKey);
  EXPECT_EQ(decodeHello(frame, lookup(kKey), kMaxBody).error, RejectReason::kMalformed);
}

TEST(HandshakeHello, StructuralErrorsAreMalformed) {
  struct Case {
    const char* what;
    Bytes frame;
  };
  std::vector<Case> cases;
  cases.push_back({"no offer", RawFrame(1)
                                   .tlv(0x0001, nonceBytes(makeNonce(1)))
                                   .tlv(0x0002, u64(1))
                                   .tlv(0x0003, dst4(10, 0, 0, 1, 80))
                                   .finish(kKey)});
  cases.push_back({"no nonce", RawFrame(1)
                                   .tlv(0x0002, u64(1))
                                   .tlv(0x0003, dst4(10, 0, 0, 1, 80))
                                   .tlv(0x0004, offer(1, "kernel"))
                                   .finish(kKey)});
  cases.push_back({"no destination", RawFrame(1)
                                         .tlv(0x0001, nonceBytes(makeNonce(1)))
                                         .tlv(0x0002, u64(1))
                                         .tlv(0x0004, offer(1, "kernel"))
                                         .finish(kKey)});
  cases.push_back(
      {"two nonces", minimalHello().tlv(0x0001, nonceBytes(makeNonce(2))).finish(kKey)});
  cases.push_back({"short nonce", RawFrame(1)
                                      .tlv(0x0001, Bytes(15, 1))
                                      .tlv(0x0002, u64(1))
                                      .tlv(0x0003, dst4(10, 0, 0, 1, 80))
                                      .tlv(0x0004, offer(1, "kernel"))
                                      .finish(kKey)});
  cases.push_back({"port 0", RawFrame(1)
                                 .tlv(0x0001, nonceBytes(makeNonce(1)))
                                 .tlv(0x0002, u64(1))
                                 .tlv(0x0003, dst4(10, 0, 0, 1, 0))
                                 .tlv(0x0004, offer(1, "kernel"))
                                 .finish(kKey)});
  Bytes bad_family = dst4(10, 0, 0, 1, 80);
  bad_family[0] = 6;  // says IPv6, carries 4 bytes
  cases.push_back({"family/length mismatch", RawFrame(1)
                                                 .tlv(0x0001, nonceBytes(makeNonce(1)))
                                                 .tlv(0x0002, u64(1))
                                                 .tlv(0x0003, bad_family)
                                                 .tlv(0x0004, offer(1, "kernel"))
                                                 .finish(kKey)});
  cases.push_back(
      {"offer name with a space", minimalHello().tlv(0x0004, offer(1, "ker nel")).finish(kKey)});
  cases.push_back({"offer name empty", minimalHello().tlv(0x0004, offer(1, "")).finish(kKey)});
  Bytes long_name = {1, 200};  // claims a 200-byte name in a 2-byte value
  cases.push_back({"offer name overruns", minimalHello().tlv(0x0004, long_name).finish(kKey)});
  cases.push_back(
      {"offer params too large",
       minimalHello().tlv(0x0004, offer(2, "dpdk0", Bytes(kMaxParamsSize + 1, 0))).finish(kKey)});
  cases.push_back(
      {"key id not printable", minimalHello().tlv(0x0006, Bytes{'a', '\n'}).finish(kKey)});
  {
    RawFrame f = minimalHello();
    for (std::size_t i = 0; i < kMaxOffers; ++i)
      f.tlv(0x0004, offer(1, "k" + std::to_string(i)));
    cases.push_back({"more than kMaxOffers offers", f.finish(kKey)});
  }
  {
    // A TLV after AUTH.
    Bytes frame = minimalHello().finish(kKey);
    Bytes extra{0x00, 0x05, 0x00, 0x01, 0x01};
    frame.insert(frame.end(), extra.begin(), extra.end());
    std::size_t body = frame.size() - 12;
    frame[11] = static_cast<std::uint8_t>(body);
    frame[10] = static_cast<std::uint8_t>(body >> 8);
    cases.push_back({"TLV after AUTH", frame});
  }
  for (const auto& c : cases) {
    auto r = decodeHello(c.frame, lookup(kKey), kMaxBody);
    EXPECT_EQ(r.error, RejectReason::kMalformed) << c.what << ": " << reasonName(r.error);
  }
  // The control: the same building blocks, correctly assembled, decode.
  EXPECT_EQ(decodeHello(minimalHello().finish(kKey), lookup(kKey), kMaxBody).error,
            RejectReason::kNone);
}

TEST(HandshakeHello, UnknownStackKindIsKeptForTheReceiverToSkip) {
  auto frame = minimalHello().tlv(0x0004, offer(77, "quantum")).finish(kKey);
  auto r = decodeHello(frame, lookup(kKey), kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone);
  ASSERT_EQ(r.hello.offers.size(), 2u);
  EXPECT_STREQ(stackKindName(r.hello.offers[1].kind), "unknown");
}

// ---- REPLY -----------------------------------------------------------------------------------

TEST(HandshakeReply, AcceptedRoundTripsWithAToken) {
  Reply reply;
  reply.accepted = true;
  reply.chosen_index = 1;
  reply.chosen_name = "kernel-b";
  Token t{};
  for (std::size_t i = 0; i < t.size(); ++i)
    t[i] = static_cast<std::uint8_t>(0xA0 + i);
  reply.token = t;
  auto nonce = makeNonce(5);
  auto frame = encodeReply(reply, kKey, nonce);
  auto r = decodeReply(frame, kKey, nonce, kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone) << reasonName(r.error);
  EXPECT_TRUE(r.reply.accepted);
  EXPECT_EQ(r.reply.reason, RejectReason::kNone);
  EXPECT_EQ(r.reply.chosen_index, 1);
  EXPECT_EQ(r.reply.chosen_name, "kernel-b");
  ASSERT_TRUE(r.reply.token);
  EXPECT_EQ(*r.reply.token, t);
}

TEST(HandshakeReply, ChosenParamsCarryTheRespondersEndpoint) {
  // A stack with a data connection of its own (dpdk): the responder's connect parameters.
  Reply reply;
  reply.accepted = true;
  reply.chosen_name = "dp0";
  reply.token = Token{};
  reply.chosen_params = {1, 4, 10, 202, 0, 2, 0x1c, 0x85};
  auto nonce = makeNonce(6);
  auto frame = encodeReply(reply, kKey, nonce);
  auto r = decodeReply(frame, kKey, nonce, kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone) << reasonName(r.error);
  EXPECT_EQ(r.reply.chosen_params, reply.chosen_params);
  // TLV 0x0014, non-critical: an initiator that predates it skips it (and never offered a
  // kind that needs it).
  const Bytes tlv{0x00, 0x14, 0x00, 0x08, 1, 4, 10, 202};
  EXPECT_NE(std::search(frame.begin(), frame.end(), tlv.begin(), tlv.end()), frame.end());
  // Not sent without params; twice, with a reject, or over 1024 bytes: malformed.
  reply.chosen_params.clear();
  auto none = encodeReply(reply, kKey, nonce);
  EXPECT_TRUE(decodeReply(none, kKey, nonce, kMaxBody).reply.chosen_params.empty());
  auto n = nonceBytes(nonce);
  auto twice = RawFrame(2)
                   .tlv(0x0010, Bytes{0, 0, 0})
                   .tlv(0x0011, Bytes{0, 1, 'd'})
                   .tlv(0x0014, Bytes{1})
                   .tlv(0x0014, Bytes{1})
                   .finish(kKey, n);
  EXPECT_EQ(decodeReply(twice, kKey, nonce, kMaxBody).error, RejectReason::kMalformed);
  auto rejected = RawFrame(2).tlv(0x0010, Bytes{1, 0, 8}).tlv(0x0014, Bytes{1}).finish(kKey, n);
  EXPECT_EQ(decodeReply(rejected, kKey, nonce, kMaxBody).error, RejectReason::kMalformed);
  auto big = RawFrame(2)
                 .tlv(0x0010, Bytes{0, 0, 0})
                 .tlv(0x0011, Bytes{0, 1, 'd'})
                 .tlv(0x0014, Bytes(1025, 7))
                 .finish(kKey, n);
  EXPECT_EQ(decodeReply(big, kKey, nonce, 4096).error, RejectReason::kMalformed);
}

TEST(HandshakeFraming, IsOfferedAndAcceptedWithItsOwnTlv) {
  Hello h = sampleHello();
  EXPECT_EQ(decodeHello(encodeHello(h, kKey), lookup(kKey), kMaxBody).hello.framing, 0);
  h.framing = kFramingV1;
  auto frame = encodeHello(h, kKey);
  auto r = decodeHello(frame, lookup(kKey), kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone);
  EXPECT_EQ(r.hello.framing, kFramingV1);
  // TLV 0x0008, one byte, before AUTH; non-critical, so a v1 responder that predates it
  // skips it and answers without framing.
  const Bytes tlv{0x00, 0x08, 0x00, 0x01, 0x01};
  EXPECT_NE(std::search(frame.begin(), frame.end(), tlv.begin(), tlv.end()), frame.end());

  Reply reply;
  reply.accepted = true;
  reply.chosen_name = "kernel";
  auto nonce = makeNonce(5);
  EXPECT_EQ(decodeReply(encodeReply(reply, kKey, nonce), kKey, nonce, kMaxBody).reply.framing, 0);
  reply.framing = kFramingV1;
  auto rr = decodeReply(encodeReply(reply, kKey, nonce), kKey, nonce, kMaxBody);
  ASSERT_EQ(rr.error, RejectReason::kNone);
  EXPECT_EQ(rr.reply.framing, kFramingV1);
  // Twice, or of the wrong size: malformed.
  auto twice = RawFrame(2)
                   .tlv(0x0010, Bytes{0, 0, 0})
                   .tlv(0x0011, Bytes{0, 6, 'k', 'e', 'r', 'n', 'e', 'l'})
                   .tlv(0x0008, Bytes{1})
                   .tlv(0x0008, Bytes{1})
                   .finish(kKey, nonceBytes(nonce));
  EXPECT_EQ(decodeReply(twice, kKey, nonce, kMaxBody).error, RejectReason::kMalformed);
  auto wide = RawFrame(2)
                  .tlv(0x0010, Bytes{0, 0, 0})
                  .tlv(0x0011, Bytes{0, 6, 'k', 'e', 'r', 'n', 'e', 'l'})
                  .tlv(0x0008, Bytes{0, 1})
                  .finish(kKey, nonceBytes(nonce));
  EXPECT_EQ(decodeReply(wide, kKey, nonce, kMaxBody).error, RejectReason::kMalformed);
}

TEST(HandshakeReply, RejectCarriesItsReason) {
  for (auto reason : {RejectReason::kAuthFailed, RejectReason::kStale, RejectReason::kReplayed,
                      RejectReason::kDestinationNotAllowed, RejectReason::kNoCommonStack}) {
    Reply reply;
    reply.reason = reason;
    auto nonce = makeNonce(3);
    auto r = decodeReply(encodeReply(reply, kKey, nonce), kKey, nonce, kMaxBody);
    ASSERT_EQ(r.error, RejectReason::kNone);
    EXPECT_FALSE(r.reply.accepted);
    EXPECT_EQ(r.reply.reason, reason);
  }
}

TEST(HandshakeReply, IsBoundToTheHelloNonce) {
  Reply reply;
  reply.accepted = true;
  reply.chosen_name = "kernel";
  auto frame = encodeReply(reply, kKey, makeNonce(1));
  // A reply recorded for one HELLO cannot answer another.
  EXPECT_EQ(decodeReply(frame, kKey, makeNonce(2), kMaxBody).error, RejectReason::kAuthFailed);
  EXPECT_EQ(decodeReply(frame, key("other-key-0123456789"), makeNonce(1), kMaxBody).error,
            RejectReason::kAuthFailed);
  // The MAC input is the frame before AUTH followed by the nonce.
  auto nonce = makeNonce(1);
  auto mine = RawFrame(2)
                  .tlv(0x0010, Bytes{0, 0, 0})
                  .tlv(0x0011, Bytes{0, 6, 'k', 'e', 'r', 'n', 'e', 'l'})
                  .finish(kKey, nonceBytes(nonce));
  EXPECT_EQ(frame, mine);
}

TEST(HandshakeReply, InconsistentRepliesAreMalformed) {
  auto nonce = makeNonce(4);
  auto n = nonceBytes(nonce);
  struct Case {
    const char* what;
    Bytes frame;
  };
  std::vector<Case> cases = {
      {"accepted without a choice", RawFrame(2).tlv(0x0010, Bytes{0, 0, 0}).finish(kKey, n)},
      {"rejected with a choice",
       RawFrame(2).tlv(0x0010, Bytes{1, 0, 3}).tlv(0x0011, Bytes{0, 1, 'k'}).finish(kKey, n)},
      {"accepted with a reason",
       RawFrame(2).tlv(0x0010, Bytes{0, 0, 3}).tlv(0x0011, Bytes{0, 1, 'k'}).finish(kKey, n)},
      {"unknown status", RawFrame(2).tlv(0x0010, Bytes{2, 0, 0}).finish(kKey, n)},
      {"no result", RawFrame(2).tlv(0x0011, Bytes{0, 1, 'k'}).finish(kKey, n)},
      {"two results",
       RawFrame(2).tlv(0x0010, Bytes{1, 0, 3}).tlv(0x0010, Bytes{1, 0, 3}).finish(kKey, n)},
      {"short token", RawFrame(2)
                          .tlv(0x0010, Bytes{0, 0, 0})
                          .tlv(0x0011, Bytes{0, 1, 'k'})
                          .tlv(0x0012, Bytes(8, 1))
                          .finish(kKey, n)},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(decodeReply(c.frame, kKey, nonce, kMaxBody).error, RejectReason::kMalformed)
        << c.what;
  }
  // A HELLO is not a REPLY.
  EXPECT_EQ(decodeReply(encodeHello(sampleHello(), kKey), kKey, nonce, kMaxBody).error,
            RejectReason::kMalformed);
}

TEST(HandshakeReply, AReasonThisVersionDoesNotKnowIsPassedThrough) {
  // A newer peer may reject for a reason we have no name for: still a valid, verified reject.
  auto nonce = makeNonce(6);
  auto frame = RawFrame(2).tlv(0x0010, Bytes{1, 0x01, 0x00}).finish(kKey, nonceBytes(nonce));
  auto r = decodeReply(frame, kKey, nonce, kMaxBody);
  ASSERT_EQ(r.error, RejectReason::kNone);
  EXPECT_FALSE(r.reply.accepted);
  EXPECT_STREQ(reasonName(r.reply.reason), "unknown");
}

// The worked example of docs/handshake.md, byte for byte: the documentation is a test vector.
Bytes fromHex(const std::string& hex) {
  Bytes out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<std::uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

TEST(HandshakeWorkedExample, MatchesTheDocumentation) {
  const Bytes doc_key = key("0123456789abcdef");
  Hello h;
  for (std::size_t i = 0; i < h.nonce.size(); ++i)
    h.nonce[i] = static_cast<std::uint8_t>(i);
  h.timestamp_ms = 1'700'000'000'000;
  h.original_dst = *SocketAddress::parse("10.0.0.2:80");
  h.offers.push_back({StackKind::kKernel, "kernel", {}});
  h.connection_id = 1;
  EXPECT_EQ(encodeHello(h, doc_key),
            fromHex("444d4d4801010000000000720001001000010203040506070809"
                    "0a0b0c0d0e0f00020008000001"
                    "8bcfe56800000300070400500a00000200040008"
                    "01066b65726e656c00060007"
                    "64656661756c7400070008000000000000000100ff0020e7eb7c45e542d9f5fab40799"
                    "fc54c04e65bc21ad9f9f39e39b88c82a486fbfc5"));
  Reply accept;
  accept.accepted = true;
  accept.chosen_name = "kernel";
  EXPECT_EQ(encodeReply(accept, doc_key, h.nonce),
            fromHex("444d4d4801020000000000370010000300000000110008"
                    "00066b65726e656c00ff0020a04d3ad997ddf2a72bf8121c"
                    "bb4dd488a2178da65fb102bd0d4011549ff34f55"));
  Reply reject;
  reject.reason = RejectReason::kDestinationNotAllowed;
  EXPECT_EQ(encodeReply(reject, doc_key, h.nonce),
            fromHex("444d4d48010200000000002b00100003010006"
                    "00ff00201e210f3db5041381e2a40307"
                    "22050901169f712f66805e4b06e1ed0464f98acb"));
}

TEST(HandshakeNames, AreStable) {
  // These are metric label values and documented codes: changing one is a breaking change.
  EXPECT_STREQ(reasonName(RejectReason::kMalformed), "malformed");
  EXPECT_STREQ(reasonName(RejectReason::kDestinationNotAllowed), "destination_not_allowed");
  EXPECT_STREQ(reasonName(RejectReason::kTooLarge), "too_large");
  EXPECT_EQ(static_cast<int>(RejectReason::kAuthFailed), 3);
  EXPECT_EQ(static_cast<int>(RejectReason::kTooLarge), 10);
  EXPECT_EQ(stackKindFromName("kernel"), StackKind::kKernel);
  EXPECT_EQ(stackKindFromName("rdma"), StackKind::kRdma);
  EXPECT_FALSE(stackKindFromName("warp"));
}

}  // namespace
}  // namespace dmm::proxy::handshake

namespace dmm::proxy::framing {
namespace {

std::vector<std::byte> frames(const std::vector<std::string>& payloads, bool end) {
  std::vector<std::byte> out;
  auto add = [&out](const std::string& p) {
    std::byte h[kHeaderSize];
    putHeader(h, static_cast<std::uint32_t>(p.size()));
    out.insert(out.end(), h, h + kHeaderSize);
    for (char c : p)
      out.push_back(static_cast<std::byte>(c));
  };
  for (const auto& p : payloads)
    add(p);
  if (end) add("");
  return out;
}

std::string text(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

TEST(TunnelFraming, DecodesAcrossEverySplitAndStopsAtTheEnd) {
  // The session's frames, its end, then the first bytes of the next session's HELLO.
  auto stream = frames({"hello", "x", std::string(300, 'y')}, true);
  const std::string next = "NEXT-HELLO";
  for (char c : next)
    stream.push_back(static_cast<std::byte>(c));
  for (std::size_t split = 0; split <= stream.size(); ++split) {
    for (std::size_t split2 = split; split2 <= stream.size(); split2 += 7) {
      Decoder d;
      std::string payload;
      std::string rest;
      std::size_t cuts[] = {0, split, split2, stream.size()};
      for (int i = 0; i < 3; ++i) {
        std::vector<std::byte> part(stream.begin() + static_cast<std::ptrdiff_t>(cuts[i]),
                                    stream.begin() + static_cast<std::ptrdiff_t>(cuts[i + 1]));
        if (d.ended()) {
          rest += text(part);
          continue;
        }
        auto r = d.decodeInPlace(part);
        ASSERT_FALSE(r.error);
        payload += text(std::span(part).first(r.payload));
        rest += text(std::span(part).subspan(r.consumed));
      }
      ASSERT_TRUE(d.ended()) << split << "/" << split2;
      EXPECT_EQ(payload, "hellox" + std::string(300, 'y')) << split << "/" << split2;
      EXPECT_EQ(rest, next) << split << "/" << split2;
    }
  }
}

TEST(TunnelFraming, SpliceTakesPayloadOnlyWithinTheFrame) {
  Decoder d;
  auto head = frames({std::string(10, 'a')}, false);
  head.resize(kHeaderSize + 3);  // the header and 3 payload bytes arrive first
  auto r = d.decodeInPlace(head);
  EXPECT_EQ(r.payload, 3u);
  EXPECT_EQ(d.frameLeft(), 7u);
  d.took(7);  // spliced straight from the socket
  EXPECT_EQ(d.frameLeft(), 0u);
  auto end = frames({}, true);
  EXPECT_TRUE(d.decodeInPlace(end).end);
}

TEST(TunnelFraming, ALengthAboveTheMaximumIsAnError) {
  std::vector<std::byte> bad{std::byte{0x80}, std::byte{0}, std::byte{0}, std::byte{1}};
  Decoder d;
  EXPECT_TRUE(d.decodeInPlace(bad).error);
  // The raw header is one too, unless framing v2 allows it.
  std::vector<std::byte> raw(kHeaderSize);
  putHeader(raw.data(), kRawHeader);
  Decoder v1;
  EXPECT_TRUE(v1.decodeInPlace(raw).error);
}

TEST(TunnelFraming, AfterTheRawHeaderEverythingIsPayloadAcrossEverySplit) {
  // Framed bytes, the raw header, then plain bytes (which may look like headers: all zeros).
  auto stream = frames({"framed", "more"}, false);
  std::size_t raw_at = stream.size();
  stream.resize(raw_at + kHeaderSize);
  putHeader(stream.data() + raw_at, kRawHeader);
  const std::string plain = std::string(8, '\0') + "plain bytes";
  for (char c : plain)
    stream.push_back(static_cast<std::byte>(c));
  for (std::size_t split = 0; split <= stream.size(); ++split) {
    Decoder d(/*allow_raw=*/true);
    std::string payload;
    for (auto [from, to] : {std::pair{std::size_t{0}, split}, std::pair{split, stream.size()}}) {
      std::vector<std::byte> part(stream.begin() + static_cast<std::ptrdiff_t>(from),
                                  stream.begin() + static_cast<std::ptrdiff_t>(to));
      auto r = d.decodeInPlace(part);
      ASSERT_FALSE(r.error) << split;
      ASSERT_FALSE(r.end) << split;
      EXPECT_EQ(r.consumed, part.size()) << split;
      payload += text(std::span(part).first(r.payload));
    }
    EXPECT_TRUE(d.raw()) << split;
    EXPECT_EQ(payload, "framedmore" + plain) << split;
  }
}

}  // namespace
}  // namespace dmm::proxy::framing
