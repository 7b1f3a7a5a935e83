#pragma once
// socketOwnerUid(): which user owns a local TCP socket, asked of the kernel through
// NETLINK_SOCK_DIAG (the interface `ss` uses) with an exact lookup of one socket by its 4-tuple:
// one request, one reply, no dump of the socket table and no scan of /proc.
//
// Use: the sidecar accepts a connection that iptables REDIRECTed. The application's socket has
// local end = the accepted socket's peer address and remote end = the original destination, so
// the caller passes (client address, original destination).

#include <cstdint>
#include <optional>

#include "common/socket_address.h"

namespace dmm::net {

// The uid owning the TCP socket of this host whose local end is `local` and remote end is
// `remote` (IPv4, IPv6, or IPv4-mapped IPv6: an application's dual-stack socket is found by its
// IPv4 tuple too). nullopt when there is no such connected socket, when the socket is only a
// listener, a half-open request or a TIME_WAIT remnant (the kernel reports uid 0 for those,
// which must not read as root), or when the lookup fails or takes longer than 100 ms.
// Uses a netlink socket kept per calling thread; any thread; blocks for at most ~100 ms.
std::optional<std::uint32_t> socketOwnerUid(const SocketAddress& local,
                                            const SocketAddress& remote);

}  // namespace dmm::net
