#include "proxy/local_addresses.h"

#include <ifaddrs.h>

#include <algorithm>

namespace dmm::proxy {

bool LocalAddresses::isLocal(const IpAddress& ip, Clock::time_point now) {
  if (ip.isLoopback()) return true;
  if (!loaded_ || now - loaded_at_ >= refresh_) {
    reload();
    loaded_at_ = now;
    loaded_ = true;
  }
  return std::find(addresses_.begin(), addresses_.end(), ip) != addresses_.end();
}

void LocalAddresses::reload() {
  addresses_.clear();
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return;
  for (ifaddrs* it = list; it != nullptr; it = it->ifa_next) {
    if (it->ifa_addr == nullptr) continue;
    socklen_t len =
        it->ifa_addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    if (auto addr = SocketAddress::fromSockaddr(it->ifa_addr, len))
      addresses_.push_back(addr->ip());
  }
  freeifaddrs(list);
}

}  // namespace dmm::proxy
