#include "proxy/handshake_codec.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>

#include <algorithm>

#include <cstring>

namespace dmm::proxy::handshake {

namespace {

// TLV types. The high bit marks a TLV a receiver must understand (unknown => malformed).
enum Tlv : std::uint16_t {
  kTlvNonce = 0x0001,
  kTlvTimestamp = 0x0002,
  kTlvOriginalDst = 0x0003,
  kTlvStackOffer = 0x0004,
  kTlvQos = 0x0005,
  kTlvKeyId = 0x0006,
  kTlvConnectionId = 0x0007,
  kTlvFraming = 0x0008,  // HELLO and REPLY: the data is framed and the connection reusable
  kTlvResult = 0x0010,
  kTlvChosen = 0x0011,
  kTlvSessionToken = 0x0012,
  kTlvStackKinds = 0x0013,    // REPLY: the stack kinds the responder runs (peer facts)
  kTlvChosenParams = 0x0014,  // REPLY: the chosen instance's connect parameters (its kind's)
  kTlvAuth = 0x00FF,
};
constexpr std::uint16_t kCritical = 0x8000;
constexpr std::size_t kTlvHeader = 4;

// ---- encoding --------------------------------------------------------------------------------

class Writer {
 public:
  explicit Writer(std::size_t reserve) { out_.reserve(reserve); }
  void u8(std::uint8_t v) { out_.push_back(v); }
  void u16(std::uint16_t v) {
    u8(static_cast<std::uint8_t>(v >> 8));
    u8(static_cast<std::uint8_t>(v));
  }
  void u32(std::uint32_t v) {
    u16(static_cast<std::uint16_t>(v >> 16));
    u16(static_cast<std::uint16_t>(v));
  }
  void u64(std::uint64_t v) {
    u32(static_cast<std::uint32_t>(v >> 32));
    u32(static_cast<std::uint32_t>(v));
  }
  void bytes(const void* data, std::size_t n) {
    const auto* p = static_cast<const std::uint8_t*>(data);
    out_.insert(out_.end(), p, p + n);
  }
  // Starts a TLV; returns the position of its length field, fixed by endTlv().
  std::size_t beginTlv(std::uint16_t type) {
    u16(type);
    std::size_t at = out_.size();
    u16(0);
    return at;
  }
  void endTlv(std::size_t at) {
    auto len = static_cast<std::uint16_t>(out_.size() - at - 2);
    out_[at] = static_cast<std::uint8_t>(len >> 8);
    out_[at + 1] = static_cast<std::uint8_t>(len);
  }
  void prefix(MessageType type) {
    u32(kMagic);
    u8(kVersion);
    u8(static_cast<std::uint8_t>(type));
    u16(0);  // flags
    u32(0);  // body length, fixed by finish()
  }
  // Fixes the body length (AUTH included) and appends AUTH = HMAC(key, frame so far || extra).
  std::vector<std::uint8_t> finish(std::span<const std::uint8_t> key,
                                   std::span<const std::uint8_t> extra) {
    std::size_t body = out_.size() - kPrefixSize + kTlvHeader + kMacSize;
    out_[8] = static_cast<std::uint8_t>(body >> 24);
    out_[9] = static_cast<std::uint8_t>(body >> 16);
    out_[10] = static_cast<std::uint8_t>(body >> 8);
    out_[11] = static_cast<std::uint8_t>(body);
    u16(kTlvAuth);
    u16(static_cast<std::uint16_t>(kMacSize));
    std::size_t covered = out_.size() - kTlvHeader;
    std::size_t mac_at = out_.size();
    out_.resize(out_.size() + kMacSize);
    // The MAC covers the frame up to the AUTH TLV header, then `extra`.
    std::uint8_t mac[EVP_MAX_MD_SIZE];
    (void)computeMac(key, std::span(out_.data(), covered), extra, mac);  // zeros: peer rejects
    std::memcpy(out_.data() + mac_at, mac, kMacSize);
    return std::move(out_);
  }

  // False (and an all-zero MAC) if OpenSSL failed.
  static bool computeMac(std::span<const std::uint8_t> key, std::span<const std::uint8_t> data,
                         std::span<const std::uint8_t> extra, std::uint8_t* mac) {
    // HMAC() fetches the algorithm from the provider (locks, name lookups) and re-derives the
    // key pads on every call. One keyed context per thread, re-initialised with the same key
    // (EVP_MAC_init with no key keeps it), costs neither; a different key rekeys it.
    struct Cached {
      EVP_MAC* alg = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
      EVP_MAC_CTX* ctx = alg != nullptr ? EVP_MAC_CTX_new(alg) : nullptr;
      std::vector<std::uint8_t> key;
      bool keyed = false;
      ~Cached() {
        EVP_MAC_CTX_free(ctx);
        EVP_MAC_free(alg);
        OPENSSL_cleanse(key.data(), key.size());
      }
    };
    thread_local Cached c;
    bool ok = c.ctx != nullptr;
    if (ok && c.keyed && std::equal(key.begin(), key.end(), c.key.begin(), c.key.end())) {
      ok = EVP_MAC_init(c.ctx, nullptr, 0, nullptr) == 1;
    } else if (ok) {
      char digest[] = "SHA256";
      OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", digest, 0),
                             OSSL_PARAM_construct_end()};
      static const std::uint8_t kEmpty = 0;
      ok = EVP_MAC_init(c.ctx, key.empty() ? &kEmpty : key.data(), key.size(), params) == 1;
      OPENSSL_cleanse(c.key.data(), c.key.size());
      c.key.assign(key.begin(), key.end());
      c.keyed = ok;
    }
    std::size_t len = 0;
    ok = ok && EVP_MAC_update(c.ctx, data.data(), data.size()) == 1 &&
         (extra.empty() || EVP_MAC_update(c.ctx, extra.data(), extra.size()) == 1) &&
         EVP_MAC_final(c.ctx, mac, &len, kMacSize) == 1 && len == kMacSize;
    if (!ok) {
      c.keyed = false;
      std::memset(mac, 0, kMacSize);
    }
    return ok;
  }

 private:
  std::vector<std::uint8_t> out_;
};

// ---- decoding --------------------------------------------------------------------------------

std::uint16_t be16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}
std::uint32_t be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         p[3];
}
std::uint64_t be64(const std::uint8_t* p) {
  return (std::uint64_t{be32(p)} << 32) | be32(p + 4);
}

struct TlvView {
  std::uint16_t type = 0;
  std::span<const std::uint8_t> value;
};

// Splits the body into TLVs. AUTH must be the last one and be kMacSize long; its offset (from
// the frame start) is returned in auth_at. Unknown critical types are malformed.
bool splitTlvs(std::span<const std::uint8_t> frame, const std::uint16_t* known,
               std::size_t known_count, std::vector<TlvView>& out, std::size_t& auth_at,
               std::span<const std::uint8_t>& mac) {
  std::size_t pos = kPrefixSize;
  bool have_auth = false;
  while (pos < frame.size()) {
    if (have_auth) return false;  // anything after AUTH
    if (frame.size() - pos < kTlvHeader) return false;
    std::uint16_t type = be16(frame.data() + pos);
    std::size_t len = be16(frame.data() + pos + 2);
    if (frame.size() - pos - kTlvHeader < len) return false;
    auto value = frame.subspan(pos + kTlvHeader, len);
    if (type == kTlvAuth) {
      if (len != kMacSize) return false;
      have_auth = true;
      auth_at = pos;
      mac = value;
    } else {
      bool is_known = false;
      for (std::size_t i = 0; i < known_count; ++i)
        is_known = is_known || known[i] == type;
      if (is_known) {
        out.push_back({type, value});
      } else if ((type & kCritical) != 0) {
        return false;
      }  // an unknown, non-critical TLV: skipped
    }
    pos += kTlvHeader + len;
  }
  return have_auth;
}

bool validName(std::span<const std::uint8_t> s) {
  if (s.empty() || s.size() > kMaxNameSize) return false;
  for (std::uint8_t c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

bool printable(std::span<const std::uint8_t> s) {
  if (s.empty() || s.size() > kMaxNameSize) return false;
  for (std::uint8_t c : s) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

std::string str(std::span<const std::uint8_t> s) {
  return std::string(reinterpret_cast<const char*>(s.data()), s.size());
}

bool macMatches(std::span<const std::uint8_t> key, std::span<const std::uint8_t> frame,
                std::size_t auth_at, std::span<const std::uint8_t> extra,
                std::span<const std::uint8_t> mac) {
  if (key.empty()) return false;
  std::uint8_t expected[EVP_MAX_MD_SIZE];
  if (!Writer::computeMac(key, frame.first(auth_at), extra, expected)) return false;
  return CRYPTO_memcmp(expected, mac.data(), kMacSize) == 0;
}

// Checks the prefix and that the frame is exactly prefix + body.
RejectReason checkFrame(std::span<const std::uint8_t> frame, MessageType type,
                        std::size_t max_body) {
  if (frame.size() < kPrefixSize) return RejectReason::kMalformed;
  Prefix prefix;
  switch (parsePrefix(frame.first<kPrefixSize>(), type, max_body, prefix)) {
    case PrefixError::kNone:
      break;
    case PrefixError::kUnsupportedVersion:
      return RejectReason::kUnsupportedVersion;
    case PrefixError::kTooLarge:
      return RejectReason::kTooLarge;
    default:
      return RejectReason::kMalformed;
  }
  if (frame.size() != kPrefixSize + prefix.body_length) return RejectReason::kMalformed;
  return RejectReason::kNone;
}

}  // namespace

const char* reasonName(RejectReason r) {
  switch (r) {
    case RejectReason::kNone:
      return "none";
    case RejectReason::kMalformed:
      return "malformed";
    case RejectReason::kUnsupportedVersion:
      return "unsupported_version";
    case RejectReason::kAuthFailed:
      return "auth_failed";
    case RejectReason::kStale:
      return "stale";
    case RejectReason::kReplayed:
      return "replayed";
    case RejectReason::kDestinationNotAllowed:
      return "destination_not_allowed";
    case RejectReason::kDestinationUnreachable:
      return "destination_unreachable";
    case RejectReason::kNoCommonStack:
      return "no_common_stack";
    case RejectReason::kOverloaded:
      return "overloaded";
    case RejectReason::kTooLarge:
      return "too_large";
  }
  return "unknown";
}

std::optional<StackKind> stackKindFromName(std::string_view kind) {
  if (kind == "kernel") return StackKind::kKernel;
  if (kind == "dpdk") return StackKind::kDpdk;
  if (kind == "rdma") return StackKind::kRdma;
  return std::nullopt;
}

const char* stackKindName(StackKind k) {
  switch (k) {
    case StackKind::kKernel:
      return "kernel";
    case StackKind::kDpdk:
      return "dpdk";
    case StackKind::kRdma:
      return "rdma";
  }
  return "unknown";
}

PrefixError parsePrefix(std::span<const std::uint8_t, kPrefixSize> bytes, MessageType expected,
                        std::size_t max_body, Prefix& out) {
  if (be32(bytes.data()) != kMagic) return PrefixError::kBadMagic;
  out.version = bytes[4];
  out.type = static_cast<MessageType>(bytes[5]);
  out.flags = be16(bytes.data() + 6);  // unknown flag bits are ignored
  out.body_length = be32(bytes.data() + 8);
  if (out.version != kVersion) return PrefixError::kUnsupportedVersion;
  if (bytes[5] != static_cast<std::uint8_t>(expected)) return PrefixError::kMalformed;
  if (out.body_length > max_body) return PrefixError::kTooLarge;
  if (out.body_length < kTlvHeader + kMacSize) return PrefixError::kMalformed;
  return PrefixError::kNone;
}

std::vector<std::uint8_t> seal(MessageType type, std::span<const std::uint8_t> tlvs,
                               std::span<const std::uint8_t> key,
                               std::span<const std::uint8_t> extra) {
  Writer w(kPrefixSize + tlvs.size() + kTlvHeader + kMacSize);
  w.prefix(type);
  w.bytes(tlvs.data(), tlvs.size());
  return w.finish(key, extra);
}

std::vector<std::uint8_t> encodeHello(const Hello& hello, std::span<const std::uint8_t> key) {
  Writer w(256);
  w.prefix(MessageType::kHello);
  auto at = w.beginTlv(kTlvNonce);
  w.bytes(hello.nonce.data(), hello.nonce.size());
  w.endTlv(at);
  at = w.beginTlv(kTlvTimestamp);
  w.u64(hello.timestamp_ms);
  w.endTlv(at);
  at = w.beginTlv(kTlvOriginalDst);
  const auto& ip = hello.original_dst.ip();
  w.u8(ip.isV4() ? 4 : 6);
  w.u16(hello.original_dst.port());
  w.bytes(ip.bytes(), ip.size());
  w.endTlv(at);
  for (const auto& offer : hello.offers) {
    at = w.beginTlv(kTlvStackOffer);
    w.u8(static_cast<std::uint8_t>(offer.kind));
    w.u8(static_cast<std::uint8_t>(offer.name.size()));
    w.bytes(offer.name.data(), offer.name.size());
    w.bytes(offer.params.data(), offer.params.size());
    w.endTlv(at);
  }
  if (hello.qos != 0) {
    at = w.beginTlv(kTlvQos);
    w.u8(hello.qos);
    w.endTlv(at);
  }
  at = w.beginTlv(kTlvKeyId);
  w.bytes(hello.key_id.data(), hello.key_id.size());
  w.endTlv(at);
  if (hello.connection_id != 0) {
    at = w.beginTlv(kTlvConnectionId);
    w.u64(hello.connection_id);
    w.endTlv(at);
  }
  if (hello.framing != 0) {
    at = w.beginTlv(kTlvFraming);
    w.u8(hello.framing);
    w.endTlv(at);
  }
  return w.finish(key, {});
}

HelloResult decodeHello(std::span<const std::uint8_t> frame, const KeyLookup& keys,
                        std::size_t max_body) {
  HelloResult result;
  if (auto e = checkFrame(frame, MessageType::kHello, max_body); e != RejectReason::kNone) {
    result.error = e;
    return result;
  }
  static constexpr std::uint16_t kKnown[] = {kTlvNonce,        kTlvTimestamp, kTlvOriginalDst,
                                             kTlvStackOffer,   kTlvQos,       kTlvKeyId,
                                             kTlvConnectionId, kTlvFraming};
  std::vector<TlvView> tlvs;
  tlvs.reserve(8);
  std::size_t auth_at = 0;
  std::span<const std::uint8_t> mac;
  if (!splitTlvs(frame, kKnown, std::size(kKnown), tlvs, auth_at, mac)) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  // Structure: sizes, counts, duplicates.
  const TlvView* nonce = nullptr;
  const TlvView* timestamp = nullptr;
  const TlvView* dst = nullptr;
  const TlvView* qos = nullptr;
  const TlvView* key_id = nullptr;
  const TlvView* conn_id = nullptr;
  const TlvView* framing = nullptr;
  std::size_t offers = 0;
  auto once = [](const TlvView*& slot, const TlvView& t, std::size_t size) {
    if (slot != nullptr || (size != 0 && t.value.size() != size)) return false;
    slot = &t;
    return true;
  };
  for (const auto& t : tlvs) {
    bool ok = true;
    switch (t.type) {
      case kTlvNonce:
        ok = once(nonce, t, kNonceSize);
        break;
      case kTlvTimestamp:
        ok = once(timestamp, t, 8);
        break;
      case kTlvOriginalDst:
        ok = once(dst, t, 0) && (t.value.size() == 7 || t.value.size() == 19);
        break;
      case kTlvStackOffer:
        ok = ++offers <= kMaxOffers && t.value.size() >= 2 && t.value.size() >= 2u + t.value[1] &&
             t.value.size() - 2u - t.value[1] <= kMaxParamsSize;
        break;
      case kTlvQos:
        ok = once(qos, t, 1);
        break;
      case kTlvKeyId:
        ok = once(key_id, t, 0);
        break;
      case kTlvConnectionId:
        ok = once(conn_id, t, 8);
        break;
      case kTlvFraming:
        ok = once(framing, t, 1);
        break;
      default:
        break;
    }
    if (!ok) {
      result.error = RejectReason::kMalformed;
      return result;
    }
  }
  if (nonce == nullptr || timestamp == nullptr || dst == nullptr || offers == 0) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  // The key id selects the key, so it is checked as structure: a garbled id is malformed, not
  // an authentication failure.
  if (key_id != nullptr && !printable(key_id->value)) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  // Authenticity, before any value is believed.
  std::string key_name = key_id != nullptr ? str(key_id->value) : std::string("default");
  if (!macMatches(keys(key_name), frame, auth_at, {}, mac)) {
    result.error = RejectReason::kAuthFailed;
    return result;
  }
  // Values.
  Hello& h = result.hello;
  std::memcpy(h.nonce.data(), nonce->value.data(), kNonceSize);
  h.timestamp_ms = be64(timestamp->value.data());
  const std::uint8_t* d = dst->value.data();
  std::uint16_t port = be16(d + 1);
  if (port == 0 ||
      !((d[0] == 4 && dst->value.size() == 7) || (d[0] == 6 && dst->value.size() == 19))) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  if (d[0] == 4) {
    in_addr a{};
    std::memcpy(&a, d + 3, 4);
    h.original_dst = SocketAddress(IpAddress::v4(a), port);
  } else {
    in6_addr a{};
    std::memcpy(&a, d + 3, 16);
    h.original_dst = SocketAddress(IpAddress::v6(a), port);
  }
  if (qos != nullptr) h.qos = qos->value[0];
  if (key_id != nullptr) h.key_id = key_name;
  if (conn_id != nullptr) h.connection_id = be64(conn_id->value.data());
  if (framing != nullptr) h.framing = framing->value[0];
  for (const auto& t : tlvs) {
    if (t.type != kTlvStackOffer) continue;
    auto name = t.value.subspan(2, t.value[1]);
    if (!validName(name)) {
      result.error = RejectReason::kMalformed;
      return result;
    }
    StackOffer offer;
    offer.kind = static_cast<StackKind>(t.value[0]);  // unknown kinds kept: never chosen
    offer.name = str(name);
    auto params = t.value.subspan(2u + t.value[1]);
    offer.params.assign(params.begin(), params.end());
    h.offers.push_back(std::move(offer));
  }
  return result;
}

std::vector<std::uint8_t> encodeReply(const Reply& reply, std::span<const std::uint8_t> key,
                                      const Nonce& request_nonce) {
  Writer w(128);
  w.prefix(MessageType::kReply);
  auto at = w.beginTlv(kTlvResult);
  w.u8(reply.accepted ? 0 : 1);
  w.u16(static_cast<std::uint16_t>(reply.accepted ? RejectReason::kNone : reply.reason));
  w.endTlv(at);
  if (reply.accepted) {
    at = w.beginTlv(kTlvChosen);
    w.u8(reply.chosen_index);
    w.u8(static_cast<std::uint8_t>(reply.chosen_name.size()));
    w.bytes(reply.chosen_name.data(), reply.chosen_name.size());
    w.endTlv(at);
  }
  if (reply.token) {
    at = w.beginTlv(kTlvSessionToken);
    w.bytes(reply.token->data(), reply.token->size());
    w.endTlv(at);
  }
  if (reply.accepted && !reply.chosen_params.empty()) {
    at = w.beginTlv(kTlvChosenParams);
    w.bytes(reply.chosen_params.data(), std::min(reply.chosen_params.size(), kMaxParamsSize));
    w.endTlv(at);
  }
  if (reply.framing != 0) {
    at = w.beginTlv(kTlvFraming);
    w.u8(reply.framing);
    w.endTlv(at);
  }
  if (!reply.stack_kinds.empty()) {
    at = w.beginTlv(kTlvStackKinds);
    for (std::size_t i = 0; i < reply.stack_kinds.size() && i < kMaxOffers; ++i)
      w.u8(reply.stack_kinds[i]);
    w.endTlv(at);
  }
  return w.finish(key, request_nonce);
}

ReplyResult decodeReply(std::span<const std::uint8_t> frame, std::span<const std::uint8_t> key,
                        const Nonce& request_nonce, std::size_t max_body) {
  ReplyResult result;
  if (auto e = checkFrame(frame, MessageType::kReply, max_body); e != RejectReason::kNone) {
    result.error = e;
    return result;
  }
  static constexpr std::uint16_t kKnown[] = {kTlvResult,  kTlvChosen,     kTlvSessionToken,
                                             kTlvFraming, kTlvStackKinds, kTlvChosenParams};
  std::vector<TlvView> tlvs;
  std::size_t auth_at = 0;
  std::span<const std::uint8_t> mac;
  if (!splitTlvs(frame, kKnown, std::size(kKnown), tlvs, auth_at, mac)) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  const TlvView* res = nullptr;
  const TlvView* chosen = nullptr;
  const TlvView* token = nullptr;
  const TlvView* framing = nullptr;
  const TlvView* kinds = nullptr;
  const TlvView* params = nullptr;
  for (const auto& t : tlvs) {
    const TlvView** slot = t.type == kTlvResult         ? &res
                           : t.type == kTlvChosen       ? &chosen
                           : t.type == kTlvFraming      ? &framing
                           : t.type == kTlvStackKinds   ? &kinds
                           : t.type == kTlvChosenParams ? &params
                                                        : &token;
    if (*slot != nullptr) {
      result.error = RejectReason::kMalformed;
      return result;
    }
    *slot = &t;
  }
  bool sizes_ok = res != nullptr && res->value.size() == 3 &&
                  (chosen == nullptr ||
                   (chosen->value.size() >= 2 && chosen->value.size() == 2u + chosen->value[1])) &&
                  (token == nullptr || token->value.size() == kTokenSize) &&
                  (framing == nullptr || framing->value.size() == 1) &&
                  (kinds == nullptr || kinds->value.size() <= kMaxOffers) &&
                  (params == nullptr || params->value.size() <= kMaxParamsSize);
  if (!sizes_ok) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  if (!macMatches(key, frame, auth_at, request_nonce, mac)) {
    result.error = RejectReason::kAuthFailed;
    return result;
  }
  Reply& r = result.reply;
  std::uint8_t status = res->value[0];
  if (status > 1) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  r.accepted = status == 0;
  r.reason = static_cast<RejectReason>(be16(res->value.data() + 1));
  // Accepted needs a choice; a reject carries none.
  if (r.accepted != (chosen != nullptr) || (r.accepted && r.reason != RejectReason::kNone) ||
      (params != nullptr && !r.accepted)) {
    result.error = RejectReason::kMalformed;
    return result;
  }
  if (chosen != nullptr) {
    auto name = chosen->value.subspan(2);
    if (!validName(name)) {
      result.error = RejectReason::kMalformed;
      return result;
    }
    r.chosen_index = chosen->value[0];
    r.chosen_name = str(name);
  }
  if (token != nullptr) {
    Token t{};
    std::memcpy(t.data(), token->value.data(), kTokenSize);
    r.token = t;
  }
  if (framing != nullptr) r.framing = framing->value[0];
  if (kinds != nullptr) r.stack_kinds.assign(kinds->value.begin(), kinds->value.end());
  if (params != nullptr) r.chosen_params.assign(params->value.begin(), params->value.end());
  return result;
}

}  // namespace dmm::proxy::handshake
