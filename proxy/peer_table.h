#pragma once
// PeerTable: what this sidecar has learned about peer hosts, shared by all workers. For now one
// fact: "no sidecar answered there until <time>", so that later connections to that host go
// direct at once instead of paying the probe again. Bounded in size.

#include <chrono>
#include <mutex>
#include <unordered_map>

#include "common/socket_address.h"

namespace dmm::proxy {

class PeerTable {
 public:
  using Clock = std::chrono::steady_clock;
  explicit PeerTable(std::size_t max_entries = 65536) : max_entries_(max_entries) {}

  // Remembers that `peer` has no usable sidecar for `ttl`.
  void markNoSidecar(const IpAddress& peer, Clock::duration ttl, Clock::time_point now);
  // Forgets that (a sidecar answered).
  void markSidecar(const IpAddress& peer);
  // True while a no-sidecar mark for `peer` is fresh.
  bool knownNoSidecar(const IpAddress& peer, Clock::time_point now);
  std::size_t size();

 private:
  struct Hash {
    std::size_t operator()(const IpAddress& ip) const;
  };
  std::mutex mutex_;
  std::unordered_map<IpAddress, Clock::time_point, Hash> no_sidecar_until_;
  std::size_t max_entries_;
};

}  // namespace dmm::proxy
