#pragma once
// The facts the policy classifies a connection by, gathered from what this sidecar knows: the
// destination, the client socket's owner (sock_diag), and the peer facts of PeerTable.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/socket_address.h"
#include "policy/policy.h"
#include "proxy/context.h"

namespace dmm::proxy {

// The facts a relay keeps of its classification, compactly (a relay lives as long as its
// connection; policy::Facts holds strings and a vector). The destination and role are the
// relay's own. The process name (known for connections the preload shim handed over) is kept
// as the kernel's comm: at most 15 characters, in a fixed buffer rather than a string.
struct ClassifiedFacts {
  std::optional<std::uint32_t> uid;
  std::array<char, 16> app{};  // NUL-terminated; empty: unknown
  std::optional<std::uint8_t> qos;
  policy::PeerSidecar peer = policy::PeerSidecar::kUnknown;
  policy::RttClass rtt = policy::RttClass::kUnknown;
  std::uint32_t peer_kinds = 0;  // PeerFacts::kinds bits

  static ClassifiedFacts of(const policy::Facts& f);
  std::string_view appName() const { return std::string_view(app.data()); }
  policy::Facts expand(policy::Role role, const SocketAddress& dst) const;
};

// The kind names of a PeerFacts::kinds mask, in StackKind order.
std::vector<std::string> stackKindNames(std::uint32_t mask);
// The PeerFacts::kinds bit of a kind name (0 for kinds the handshake has no number for).
std::uint32_t stackKindBit(std::string_view kind);

// Facts of an outbound connection to `dst`: the peer facts come from ctx.peers. `peer_kinds`,
// if given, gets the peer's PeerFacts::kinds mask (what facts.peer_stacks names).
policy::Facts outboundFacts(SidecarContext& ctx, const SocketAddress& dst,
                            std::optional<std::uint32_t> uid, std::uint32_t* peer_kinds = nullptr);

}  // namespace dmm::proxy
