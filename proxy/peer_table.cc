#include "proxy/peer_table.h"

#include <string_view>

namespace dmm::proxy {

std::size_t PeerTable::Hash::operator()(const IpAddress& ip) const {
  return std::hash<std::string_view>()(
      std::string_view(reinterpret_cast<const char*>(ip.bytes()), ip.size()));
}

void PeerTable::markNoSidecar(const IpAddress& peer, Clock::duration ttl, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  if (no_sidecar_until_.size() >= max_entries_) {
    std::erase_if(no_sidecar_until_, [now](const auto& e) { return e.second <= now; });
    // Still full: forget everything rather than grow; the cost is a few extra probes.
    if (no_sidecar_until_.size() >= max_entries_) no_sidecar_until_.clear();
  }
  no_sidecar_until_[peer] = now + ttl;
}

void PeerTable::markSidecar(const IpAddress& peer) {
  std::lock_guard lock(mutex_);
  no_sidecar_until_.erase(peer);
}

bool PeerTable::knownNoSidecar(const IpAddress& peer, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  auto it = no_sidecar_until_.find(peer);
  if (it == no_sidecar_until_.end()) return false;
  if (it->second <= now) {
    no_sidecar_until_.erase(it);
    return false;
  }
  return true;
}

std::size_t PeerTable::size() {
  std::lock_guard lock(mutex_);
  return no_sidecar_until_.size();
}

}  // namespace dmm::proxy
