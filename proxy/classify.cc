#include "proxy/classify.h"

#include <algorithm>
#include <chrono>

#include "proxy/handshake_codec.h"

namespace dmm::proxy {

std::vector<std::string> stackKindNames(std::uint32_t mask) {
  std::vector<std::string> out;
  for (std::uint32_t k = 1; k < 32; ++k) {
    if ((mask & (1u << k)) == 0) continue;
    const char* name = handshake::stackKindName(static_cast<handshake::StackKind>(k));
    if (std::string_view(name) != "unknown") out.emplace_back(name);
  }
  return out;
}

std::uint32_t stackKindBit(std::string_view kind) {
  auto k = handshake::stackKindFromName(kind);
  return k ? 1u << static_cast<unsigned>(*k) : 0;
}

ClassifiedFacts ClassifiedFacts::of(const policy::Facts& f) {
  ClassifiedFacts c;
  c.uid = f.uid;
  // Longer names (not from comm) are cut: a rule can only name what the kernel reports.
  f.app.copy(c.app.data(), std::min(f.app.size(), c.app.size() - 1));
  c.qos = f.qos;
  c.peer = f.peer;
  c.rtt = f.rtt;
  for (const auto& k : f.peer_stacks)
    c.peer_kinds |= stackKindBit(k);
  return c;
}

policy::Facts ClassifiedFacts::expand(policy::Role role, const SocketAddress& dst) const {
  policy::Facts f;
  f.role = role;
  f.dst = dst;
  f.uid = uid;
  f.app = std::string(appName());
  f.qos = qos;
  f.peer = peer;
  f.rtt = rtt;
  f.peer_stacks = stackKindNames(peer_kinds);
  return f;
}

policy::Facts outboundFacts(SidecarContext& ctx, const SocketAddress& dst,
                            std::optional<std::uint32_t> uid, std::uint32_t* peer_kinds) {
  policy::Facts f;
  f.role = policy::Role::kOutbound;
  f.dst = dst;
  f.uid = uid;
  auto peer = ctx.peers.facts(dst.ip(), std::chrono::steady_clock::now());
  f.peer = peer.sidecar;
  f.peer_stacks = stackKindNames(peer.kinds);
  if (peer_kinds != nullptr) *peer_kinds = peer.kinds;
  f.rtt = ctx.config.rtt.classify(peer.rtt);
  return f;
}

}  // namespace dmm::proxy
