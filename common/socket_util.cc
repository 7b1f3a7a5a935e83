#include "common/socket_util.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>

namespace dmm::net {

namespace {

Status setInt(int fd, int level, int name, int value, const char* reason) {
  if (::setsockopt(fd, level, name, &value, sizeof value) != 0) return Error{errno, reason};
  return {};
}

}  // namespace

Result<UniqueFd> listenTcp(const SocketAddress& addr, const ListenOptions& options) {
  UniqueFd fd(::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP));
  if (!fd) return Error{errno, "socket"};
  if (auto s = setInt(fd.get(), SOL_SOCKET, SO_REUSEADDR, 1, "so_reuseaddr"); !s) return s.error();
  if (options.reuse_port) {
    if (auto s = setInt(fd.get(), SOL_SOCKET, SO_REUSEPORT, 1, "so_reuseport"); !s)
      return s.error();
  }
  if (addr.family() == AF_INET6) {
    if (auto s = setInt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, options.v6_only ? 1 : 0, "v6only"); !s)
      return s.error();
  }
  sockaddr_storage ss{};
  socklen_t len = addr.toSockaddr(ss);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return Error{errno, "bind"};
  if (::listen(fd.get(), options.backlog) != 0) return Error{errno, "listen"};
  return fd;
}

Result<UniqueFd> connectTcp(const SocketAddress& remote, std::uint32_t mark) {
  return connectTcp(remote, mark, std::nullopt, {});
}

Result<UniqueFd> connectTcp(const SocketAddress& remote, std::uint32_t mark,
                            const std::optional<IpAddress>& source,
                            const std::function<Status(int)>& prepare) {
  UniqueFd fd(::socket(remote.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP));
  if (!fd) return Error{errno, "socket"};
  if (mark != 0) {
    if (auto s = setInt(fd.get(), SOL_SOCKET, SO_MARK, static_cast<int>(mark), "so_mark"); !s)
      return s.error();
  }
  if (source && source->family() == remote.family()) {
    // The port is picked at connect() time, against the full 4-tuple, not at bind().
    if (auto s = setInt(fd.get(), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1, "bind_no_port"); !s)
      return s.error();
    sockaddr_storage local{};
    socklen_t local_len = SocketAddress(*source, 0).toSockaddr(local);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&local), local_len) != 0)
      return Error{errno, "bind"};
  }
  if (prepare) {
    if (auto s = prepare(fd.get()); !s) return s.error();
  }
  sockaddr_storage ss{};
  socklen_t len = remote.toSockaddr(ss);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0 && errno != EINPROGRESS) {
    return Error{errno, "connect"};
  }
  return fd;
}

int socketError(int fd) {
  int err = 0;
  socklen_t len = sizeof err;
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
  return err;
}

std::optional<SocketAddress> localAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return std::nullopt;
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

std::optional<SocketAddress> peerAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return std::nullopt;
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

Status setNoDelay(int fd, bool on) {
  return setInt(fd, IPPROTO_TCP, TCP_NODELAY, on ? 1 : 0, "tcp_nodelay");
}

Status setAbortOnClose(int fd, bool abort) {
  linger l{abort ? 1 : 0, 0};
  if (::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l) != 0) return Error{errno, "so_linger"};
  return {};
}

std::optional<std::chrono::microseconds> tcpSmoothedRtt(int fd) {
  tcp_info info{};
  socklen_t len = sizeof info;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return std::nullopt;
  // A kernel older than our headers may fill less; tcpi_rtt must be inside what it filled.
  if (len < offsetof(tcp_info, tcpi_rtt) + sizeof info.tcpi_rtt) return std::nullopt;
  if (info.tcpi_rtt == 0) return std::nullopt;
  return std::chrono::microseconds(info.tcpi_rtt);
}

std::uint64_t setFileLimit(std::uint64_t wanted) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  rlim_t target = wanted == 0 ? rl.rlim_max : std::min<rlim_t>(wanted, rl.rlim_max);
  if (rl.rlim_cur != target) {
    rl.rlim_cur = target;
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) (void)::getrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

}  // namespace dmm::net
