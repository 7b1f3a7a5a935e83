#pragma once
// The sidecar-to-sidecar handshake, v1: HELLO (initiator -> responder) and REPLY, encoded,
// decoded and authenticated. Bytes only: no sockets, no clocks, no replay cache; the caller
// checks the timestamp window and the nonce. The wire format is documented in
// docs/handshake.md.
//
// Frame = 12-byte prefix (magic "DMMH", version, type, flags, body length) + body of TLVs
// (type u16, length u16, value), big-endian. The last TLV is AUTH, an HMAC-SHA256 over
// everything before it (a REPLY's also covers the HELLO's nonce). Decoding checks structure
// first, then the MAC, and only then interprets values.

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/socket_address.h"

namespace dmm::proxy::handshake {

inline constexpr std::uint32_t kMagic = 0x444D4D48;  // "DMMH"
inline constexpr std::uint8_t kVersion = 1;
inline constexpr std::size_t kPrefixSize = 12;
inline constexpr std::size_t kNonceSize = 16;
inline constexpr std::size_t kMacSize = 32;
inline constexpr std::size_t kTokenSize = 16;
inline constexpr std::size_t kMaxOffers = 16;
inline constexpr std::size_t kMaxNameSize = 64;
inline constexpr std::size_t kMaxParamsSize = 1024;

enum class MessageType : std::uint8_t { kHello = 1, kReply = 2 };
enum class StackKind : std::uint8_t { kKernel = 1, kDpdk = 2, kRdma = 3 };

enum class RejectReason : std::uint16_t {
  kNone = 0,
  kMalformed = 1,
  kUnsupportedVersion = 2,
  kAuthFailed = 3,
  kStale = 4,
  kReplayed = 5,
  kDestinationNotAllowed = 6,
  kDestinationUnreachable = 7,
  kNoCommonStack = 8,
  kOverloaded = 9,
  kTooLarge = 10,
};
// Stable lowercase names (metric label values); "unknown" for values we do not know.
const char* reasonName(RejectReason r);

std::optional<StackKind> stackKindFromName(std::string_view kind);  // "kernel" -> kKernel
const char* stackKindName(StackKind k);                             // "unknown" for others

using Nonce = std::array<std::uint8_t, kNonceSize>;
using Token = std::array<std::uint8_t, kTokenSize>;

struct StackOffer {
  StackKind kind = StackKind::kKernel;
  std::string name;                  // the initiator's instance name
  std::vector<std::uint8_t> params;  // opaque connect parameters of that kind
};

struct Hello {
  Nonce nonce{};
  std::uint64_t timestamp_ms = 0;  // Unix epoch milliseconds
  SocketAddress original_dst;
  std::vector<StackOffer> offers;  // in the initiator's order of preference
  std::uint8_t qos = 0;
  std::string key_id = "default";
  std::uint64_t connection_id = 0;  // the initiator's id, for log correlation
  // kFramingV1: the initiator frames this connection's data (tunnel_framing.h) and may reuse
  // the connection for later sessions; 0: plain bytes, one session per connection.
  std::uint8_t framing = 0;
};

inline constexpr std::uint8_t kFramingV1 = 1;
// kFramingV2: v1, and either side may end the framing of the direction it sends with a raw
// header (tunnel_framing.h: kRawHeader), after which that direction is plain bytes ending with
// the TCP FIN and the connection is not reused. A responder answers the lower of the HELLO's
// version and its own; versions above 2 are answered as 2.
inline constexpr std::uint8_t kFramingV2 = 2;

struct Reply {
  bool accepted = false;
  RejectReason reason = RejectReason::kNone;
  std::uint8_t chosen_index = 0;  // index into the HELLO's offers
  std::string chosen_name;        // the responder's instance name
  std::optional<Token> token;     // for stacks that open a data connection of their own
  // Accepted: the responder's instance's connect parameters (kind-specific, at most
  // kMaxParamsSize bytes), for stacks that open a data connection of their own.
  std::vector<std::uint8_t> chosen_params;
  std::uint8_t framing = 0;  // accepted: the HELLO's framing, if the responder frames too
  // The StackKind values the responder runs (at most kMaxOffers): what the initiator learns
  // of the peer for its policy's `peer_stacks`. Values it does not know are kept as they are.
  std::vector<std::uint8_t> stack_kinds;
};

struct Prefix {
  std::uint8_t version = 0;
  MessageType type = MessageType::kHello;
  std::uint16_t flags = 0;
  std::uint32_t body_length = 0;
};

enum class PrefixError { kNone, kBadMagic, kUnsupportedVersion, kMalformed, kTooLarge };

// Checks the 12-byte prefix of a frame of type `expected` with a body of at most `max_body`.
PrefixError parsePrefix(std::span<const std::uint8_t, kPrefixSize> bytes, MessageType expected,
                        std::size_t max_body, Prefix& out);

// The key for a key id; an empty span when the id is unknown.
using KeyLookup = std::function<std::span<const std::uint8_t>(std::string_view key_id)>;

std::vector<std::uint8_t> encodeHello(const Hello& hello, std::span<const std::uint8_t> key);

struct HelloResult {
  RejectReason error = RejectReason::kNone;
  Hello hello;
};
// `frame` is a whole frame (prefix + body).
HelloResult decodeHello(std::span<const std::uint8_t> frame, const KeyLookup& keys,
                        std::size_t max_body);

std::vector<std::uint8_t> encodeReply(const Reply& reply, std::span<const std::uint8_t> key,
                                      const Nonce& request_nonce);

struct ReplyResult {
  RejectReason error = RejectReason::kNone;
  Reply reply;
};
ReplyResult decodeReply(std::span<const std::uint8_t> frame, std::span<const std::uint8_t> key,
                        const Nonce& request_nonce, std::size_t max_body);

// A frame of `type` from raw TLV bytes: the prefix, `tlvs` as given, then AUTH (HMAC with `key`
// over the frame so far, then `extra`: the request's nonce for a REPLY, nothing for a HELLO).
// The encoders build their TLVs themselves; this is for tests and the fuzzer, which must reach
// what lies behind the MAC check.
std::vector<std::uint8_t> seal(MessageType type, std::span<const std::uint8_t> tlvs,
                               std::span<const std::uint8_t> key,
                               std::span<const std::uint8_t> extra);

}  // namespace dmm::proxy::handshake
