#pragma once
// Thin, errno-preserving wrappers around the kernel socket calls the proxy and the kernel stack
// share. All sockets are created non-blocking and close-on-exec.

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>

#include "common/result.h"
#include "common/socket_address.h"
#include "common/unique_fd.h"

namespace dmm::net {

struct ListenOptions {
  int backlog = 4096;
  bool reuse_port = true;  // one listener per worker on the same address (SO_REUSEPORT)
  bool v6_only = true;     // an IPv6 listener takes IPv6 only; IPv4 gets its own socket
};

// socket + SO_REUSEADDR/SO_REUSEPORT + bind + listen.
Result<UniqueFd> listenTcp(const SocketAddress& addr, const ListenOptions& options);

// Starts a non-blocking connect. `mark` (if non-zero) becomes the socket's SO_MARK so that the
// capture rules skip the sidecar's own connections. On success the connect may still be in
// progress: wait for writability, then check connectError().
Result<UniqueFd> connectTcp(const SocketAddress& remote, std::uint32_t mark);
// The same, leaving from `source` (any port) when it is of the remote's family, and calling
// `prepare` on the socket before the SYN goes out (options that must precede it: buffer sizes
// that set the window scale, the congestion control).
Result<UniqueFd> connectTcp(const SocketAddress& remote, std::uint32_t mark,
                            const std::optional<IpAddress>& source,
                            const std::function<Status(int)>& prepare);

// The pending error of a socket (SO_ERROR), 0 when none.
int socketError(int fd);

std::optional<SocketAddress> localAddress(int fd);
std::optional<SocketAddress> peerAddress(int fd);

// TCP_NODELAY on or off.
Status setNoDelay(int fd, bool on);
// SO_LINGER with a zero timeout (close() sends RST) or off (close() sends FIN after the data).
Status setAbortOnClose(int fd, bool abort);

// The kernel's smoothed round-trip time of a connected TCP socket (TCP_INFO tcpi_rtt); nullopt
// when getsockopt fails or no RTT has been sampled yet (tcpi_rtt 0).
std::optional<std::chrono::microseconds> tcpSmoothedRtt(int fd);

// Sets the soft RLIMIT_NOFILE to `wanted` (at most the hard limit), or with 0 raises it to the
// hard limit; returns the soft limit now in force.
std::uint64_t setFileLimit(std::uint64_t wanted);

}  // namespace dmm::net
