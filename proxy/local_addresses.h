#pragma once
// LocalAddresses: the IP addresses of this host (getifaddrs), refreshed at most every
// `refresh` so that an address added at run time is soon allowed. One instance per worker:
// no locks, and a refresh costs one netlink dump per worker per interval at most.

#include <chrono>
#include <vector>

#include "common/socket_address.h"

namespace dmm::proxy {

class LocalAddresses {
 public:
  using Clock = std::chrono::steady_clock;
  explicit LocalAddresses(Clock::duration refresh = std::chrono::seconds(2)) : refresh_(refresh) {}

  bool isLocal(const IpAddress& ip, Clock::time_point now);

 private:
  void reload();
  Clock::duration refresh_;
  Clock::time_point loaded_at_{};
  bool loaded_ = false;
  std::vector<IpAddress> addresses_;
};

}  // namespace dmm::proxy
