#include "proxy/peer_table.h"

#include <string_view>

namespace dmm::proxy {

std::size_t PeerTable::Hash::operator()(const IpAddress& ip) const {
  return std::hash<std::string_view>()(
      std::string_view(reinterpret_cast<const char*>(ip.bytes()), ip.size()));
}

PeerTable::Entry& PeerTable::entry(const IpAddress& peer, Clock::time_point now) {
  auto it = peers_.find(peer);
  if (it != peers_.end()) return it->second;
  if (peers_.size() >= max_entries_) {
    // Forget what is least worth keeping first: expired no-sidecar marks with nothing else.
    std::erase_if(peers_, [now](const auto& e) {
      return !e.second.sidecar && e.second.no_sidecar_until <= now && e.second.breakers.empty();
    });
    // Still full: forget everything rather than grow; the cost is a few extra probes.
    if (peers_.size() >= max_entries_) peers_.clear();
  }
  return peers_[peer];
}

void PeerTable::markNoSidecar(const IpAddress& peer, Clock::duration ttl, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  auto& e = entry(peer, now);
  e.no_sidecar_until = now + ttl;
  e.sidecar = false;
}

void PeerTable::markSidecar(const IpAddress& peer, std::uint32_t kinds,
                            std::optional<std::chrono::microseconds> rtt) {
  std::lock_guard lock(mutex_);
  auto& e = entry(peer, Clock::now());
  e.no_sidecar_until = {};
  e.sidecar = true;
  if (kinds != 0) e.kinds = kinds;
  if (rtt) {
    // The same smoothing as TCP's own SRTT (RFC 6298): 7/8 old, 1/8 new.
    auto sample = static_cast<std::int64_t>(rtt->count());
    e.rtt_us = e.rtt_us < 0 ? sample : (7 * e.rtt_us + sample) / 8;
  }
}

bool PeerTable::knownNoSidecar(const IpAddress& peer, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  auto it = peers_.find(peer);
  return it != peers_.end() && it->second.no_sidecar_until > now;
}

PeerFacts PeerTable::facts(const IpAddress& peer, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  PeerFacts f;
  auto it = peers_.find(peer);
  if (it == peers_.end()) return f;
  const auto& e = it->second;
  if (e.no_sidecar_until > now) {
    f.sidecar = policy::PeerSidecar::kNo;
  } else if (e.sidecar) {
    f.sidecar = policy::PeerSidecar::kYes;
  }
  f.kinds = e.kinds;
  if (e.rtt_us >= 0) f.rtt = std::chrono::microseconds(e.rtt_us);
  return f;
}

PeerTable::Verdict PeerTable::breakerCheck(const IpAddress& peer, std::size_t stack,
                                           Clock::time_point now, Transition* transition) {
  if (transition != nullptr) *transition = Transition::kNone;
  std::lock_guard lock(mutex_);
  auto it = peers_.find(peer);
  if (it == peers_.end() || stack >= it->second.breakers.size()) return Verdict::kAllow;
  auto& b = it->second.breakers[stack];
  if (!b.open) return Verdict::kAllow;
  if (b.probing || now < b.until) return Verdict::kSkip;
  b.probing = true;
  // A probe handed back unstarted (breakerAbandon) leaves the breaker half-open: the next grant
  // is not another transition.
  if (!b.half_open && transition != nullptr) *transition = Transition::kHalfOpened;
  b.half_open = true;
  return Verdict::kProbe;
}

PeerTable::Transition PeerTable::breakerResult(const IpAddress& peer, std::size_t stack, bool ok,
                                               const BreakerPolicy& policy, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  auto& e = entry(peer, now);
  if (stack >= e.breakers.size()) {
    if (ok) return Transition::kNone;  // nothing to remember about a healthy instance
    e.breakers.resize(stack + 1);
  }
  auto& b = e.breakers[stack];
  if (ok) {
    bool was_open = b.open;
    b = Breaker{};
    return was_open ? Transition::kClosed : Transition::kNone;
  }
  ++b.failures;
  if (b.open) {
    // A failed probe (or a late failure of an attempt started before it opened): open again.
    bool reopened = b.probing;
    b.probing = false;
    if (reopened) b.half_open = false;
    b.until = now + policy.open_for;
    return reopened ? Transition::kOpened : Transition::kNone;
  }
  if (b.failures >= policy.failures) {
    b.open = true;
    b.until = now + policy.open_for;
    return Transition::kOpened;
  }
  return Transition::kNone;
}

void PeerTable::breakerAbandon(const IpAddress& peer, std::size_t stack) {
  std::lock_guard lock(mutex_);
  auto it = peers_.find(peer);
  if (it != peers_.end() && stack < it->second.breakers.size())
    it->second.breakers[stack].probing = false;
}

std::vector<PeerTable::OpenBreaker> PeerTable::openBreakers() {
  std::lock_guard lock(mutex_);
  std::vector<OpenBreaker> out;
  for (const auto& [ip, e] : peers_) {
    for (std::size_t i = 0; i < e.breakers.size(); ++i) {
      const auto& b = e.breakers[i];
      if (b.open) out.push_back({ip, i, b.failures, b.probing, b.until});
    }
  }
  return out;
}

std::size_t PeerTable::size() {
  std::lock_guard lock(mutex_);
  return peers_.size();
}

}  // namespace dmm::proxy
