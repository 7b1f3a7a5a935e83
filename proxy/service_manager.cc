#include "proxy/service_manager.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "common/socket_util.h"

namespace dmm::proxy {

namespace {

bool isListeningTcp(int fd) {
  int type = 0;
  int listening = 0;
  int protocol = 0;
  socklen_t len = sizeof type;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return false;
  len = sizeof listening;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening == 0)
    return false;
  len = sizeof protocol;
  return ::getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) == 0 && protocol == IPPROTO_TCP;
}

const char* capabilityName(int cap) {
  switch (cap) {
    case CAP_NET_ADMIN:
      return "CAP_NET_ADMIN";
    case CAP_NET_RAW:
      return "CAP_NET_RAW";
    case CAP_NET_BIND_SERVICE:
      return "CAP_NET_BIND_SERVICE";
    case CAP_IPC_LOCK:
      return "CAP_IPC_LOCK";
    default:
      return "CAP_?";
  }
}

}  // namespace

ServiceManager::ServiceManager() {
  supervised_ = std::getenv("NOTIFY_SOCKET") != nullptr;
  int n = sd_listen_fds(1);  // unsets LISTEN_* so that nothing we start inherits them
  if (n < 0) {
    spdlog::warn("systemd passed file descriptors that cannot be read: {}", std::strerror(-n));
    return;
  }
  for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; ++fd) {
    UniqueFd owned(fd);
    if (!isListeningTcp(fd)) {
      spdlog::warn("systemd passed fd {} that is not a listening TCP socket; closing it", fd);
      continue;
    }
    auto local = net::localAddress(fd);
    if (!local) continue;
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    listeners_[*local].push_back(std::move(owned));
    ++inherited_;
  }
}

UniqueFd ServiceManager::takeListener(const SocketAddress& address) {
  auto it = listeners_.find(address);
  if (it == listeners_.end() || it->second.empty()) return {};
  UniqueFd fd = std::move(it->second.back());
  it->second.pop_back();
  return fd;
}

std::size_t ServiceManager::closeUntaken() {
  std::size_t closed = 0;
  for (auto& [address, fds] : listeners_) {
    if (!fds.empty()) {
      spdlog::info("closing {} inherited listener(s) on {}: no longer configured", fds.size(),
                   address.toString());
    }
    closed += fds.size();
    fds.clear();
  }
  listeners_.clear();
  return closed;
}

std::string ServiceManager::storeListeners(const std::vector<int>& fds) {
  if (!supervised_) return {};
  // The names are for `systemctl show -p FileDescriptorStore...`; a stale set (listeners of
  // an older config) goes first, then the current one is stored. The sockets stay open in
  // this process in between.
  (void)sd_notify(0, "FDSTOREREMOVE=1\nFDNAME=listener");
  if (fds.empty()) return {};
  int r = sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=listener", fds.data(),
                                 static_cast<unsigned>(fds.size()));
  if (r < 0) return std::strerror(-r);
  if (r == 0) return "no service manager socket";
  return {};
}

void ServiceManager::notify(const std::string& message) {
  if (!supervised_) return;
  int r = sd_notify(0, message.c_str());
  if (r < 0) spdlog::debug("sd_notify: {}", std::strerror(-r));
}

void ServiceManager::ready(std::string_view status) {
  notify("READY=1\nSTATUS=" + std::string(status));
}

void ServiceManager::reloading() {
  notify("RELOADING=1\nSTATUS=reloading");
}

void ServiceManager::stopping(std::string_view status) {
  notify("STOPPING=1\nSTATUS=" + std::string(status));
}

void ServiceManager::status(std::string_view status) {
  notify("STATUS=" + std::string(status));
}

std::vector<std::string> missingCapabilities(const std::vector<int>& wanted) {
  __user_cap_header_struct header{};
  header.version = _LINUX_CAPABILITY_VERSION_3;
  header.pid = 0;
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  std::vector<std::string> missing;
  if (::syscall(SYS_capget, &header, data) != 0) return missing;  // cannot tell: let it fail later
  for (int cap : wanted) {
    auto word = static_cast<std::size_t>(cap / 32);
    auto bit = 1u << static_cast<unsigned>(cap % 32);
    if ((data[word].effective & bit) == 0) missing.emplace_back(capabilityName(cap));
  }
  return missing;
}

}  // namespace dmm::proxy
