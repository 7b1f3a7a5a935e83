#include "common/sock_diag.h"

#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <spdlog/spdlog.h>

#include "common/unique_fd.h"

namespace dmm::net {

namespace {

using Addr16 = std::array<std::uint8_t, 16>;

constexpr auto kTimeout = std::chrono::milliseconds(100);
// TCP states (include/net/tcp_states.h) whose diag reply carries uid 0 instead of an owner:
// a listener (never our 4-tuple anyway), a TIME_WAIT remnant and a request socket.
constexpr std::uint8_t kStateTimeWait = 6;
constexpr std::uint8_t kStateListen = 10;
constexpr std::uint8_t kStateNewSynRecv = 12;

struct Request {
  nlmsghdr header;
  inet_diag_req_v2 body;
};

// Every address as 16 bytes, IPv4 as IPv4-mapped IPv6, so that a request in one family can be
// compared with a reply in the other (a dual-stack socket is reported as AF_INET6).
Addr16 canonical(int family, const std::uint8_t* bytes) {
  Addr16 a{};
  if (family == AF_INET) {
    a[10] = 0xff;
    a[11] = 0xff;
    std::memcpy(a.data() + 12, bytes, 4);
  } else {
    std::memcpy(a.data(), bytes, 16);
  }
  return a;
}

bool isV4Mapped(const Addr16& a) {
  for (std::size_t i = 0; i < 10; ++i) {
    if (a[i] != 0) return false;
  }
  return a[10] == 0xff && a[11] == 0xff;
}

// The request's family and address words from a canonical address.
void fillAddress(std::uint8_t family, const Addr16& a, __be32 (&out)[4]) {
  std::memset(out, 0, sizeof out);
  if (family == AF_INET) {
    std::memcpy(out, a.data() + 12, 4);
  } else {
    std::memcpy(out, a.data(), 16);
  }
}

// Failures other than "no such socket" mean the lookup itself is broken (no sock_diag in the
// kernel, a seccomp filter, a timeout): say so once at warning level, then only at debug.
void lookupFailed(const char* what, int err) {
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true)) {
    spdlog::warn("sock_diag lookup of a socket's owner failed: {}: {} (further failures at debug)",
                 what, std::strerror(err));
  } else {
    spdlog::debug("sock_diag lookup failed: {}: {}", what, std::strerror(err));
  }
}

// The calling thread's netlink socket, opened on first use. Blocking with a receive timeout so
// that a lookup never hangs.
int diagSocket(UniqueFd& fd) {
  if (fd) return fd.get();
  UniqueFd s(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!s) {
    lookupFailed("socket(NETLINK_SOCK_DIAG)", errno);
    return -1;
  }
  timeval tv{0, std::chrono::duration_cast<std::chrono::microseconds>(kTimeout).count()};
  if (::setsockopt(s.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) {
    lookupFailed("SO_RCVTIMEO", errno);
    return -1;
  }
  fd = std::move(s);
  return fd.get();
}

}  // namespace

std::optional<std::uint32_t> socketOwnerUid(const SocketAddress& local,
                                            const SocketAddress& remote) {
  if (!local.valid() || !remote.valid()) return std::nullopt;
  const Addr16 src = canonical(local.family(), local.ip().bytes());
  const Addr16 dst = canonical(remote.family(), remote.ip().bytes());
  std::uint8_t family = 0;
  if (isV4Mapped(src) && isV4Mapped(dst)) {
    family = AF_INET;
  } else if (!isV4Mapped(src) && !isV4Mapped(dst)) {
    family = AF_INET6;
  } else {
    return std::nullopt;  // an IPv4 end and a (non-mapped) IPv6 end: no socket has both
  }

  thread_local UniqueFd fd;
  thread_local std::uint32_t sequence = 0;
  const int s = diagSocket(fd);
  if (s < 0) return std::nullopt;

  Request request{};
  request.header.nlmsg_len = sizeof request;
  request.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  request.header.nlmsg_flags = NLM_F_REQUEST;  // no NLM_F_DUMP: the one socket with this tuple
  request.header.nlmsg_seq = ++sequence;
  request.body.sdiag_family = family;
  request.body.sdiag_protocol = IPPROTO_TCP;
  request.body.idiag_states = ~0U;
  request.body.id.idiag_sport = htons(local.port());
  request.body.id.idiag_dport = htons(remote.port());
  fillAddress(family, src, request.body.id.idiag_src);
  fillAddress(family, dst, request.body.id.idiag_dst);
  request.body.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
  request.body.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(s, &request, sizeof request, 0, reinterpret_cast<sockaddr*>(&kernel),
               sizeof kernel) < 0) {
    lookupFailed("send", errno);
    fd.reset();
    return std::nullopt;
  }

  // The kernel handles a netlink request inside sendto(), so the reply is normally queued before
  // recvmsg() is called and the timeout only bounds a pathological case; a worker's loop does
  // not stall here. The reply is one message (a few hundred bytes). Replies to earlier requests
  // that timed out would carry older sequence numbers; they are skipped, within the same overall
  // deadline.
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  alignas(nlmsghdr) std::array<std::uint8_t, 8192> buffer;
  while (std::chrono::steady_clock::now() < deadline) {
    sockaddr_nl from{};
    iovec iov{buffer.data(), buffer.size()};
    msghdr msg{};
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    const ssize_t n = ::recvmsg(s, &msg, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      lookupFailed(errno == EAGAIN ? "no reply within 100ms" : "receive",
                   errno == EAGAIN ? ETIMEDOUT : errno);
      fd.reset();  // a late reply must not sit in the socket
      return std::nullopt;
    }
    if ((msg.msg_flags & MSG_TRUNC) != 0) {
      lookupFailed("reply truncated", EMSGSIZE);
      fd.reset();
      return std::nullopt;
    }
    if (from.nl_pid != 0) continue;  // only the kernel answers; ignore anything else

    std::size_t offset = 0;
    const auto size = static_cast<std::size_t>(n);
    while (size - offset >= sizeof(nlmsghdr)) {
      nlmsghdr header;
      std::memcpy(&header, buffer.data() + offset, sizeof header);
      if (header.nlmsg_len < sizeof header || header.nlmsg_len > size - offset) break;
      const std::uint8_t* payload = buffer.data() + offset + sizeof header;
      const std::size_t payload_size = header.nlmsg_len - sizeof header;
      offset += NLMSG_ALIGN(header.nlmsg_len);
      if (header.nlmsg_seq != sequence) continue;

      if (header.nlmsg_type == NLMSG_ERROR) {
        nlmsgerr err{};
        if (payload_size >= sizeof err) std::memcpy(&err, payload, sizeof err);
        // ENOENT: no socket has this tuple, the ordinary "not ours / already gone" answer.
        if (err.error != -ENOENT) lookupFailed("kernel error", -err.error);
        return std::nullopt;
      }
      if (header.nlmsg_type == NLMSG_DONE) return std::nullopt;
      if (header.nlmsg_type != SOCK_DIAG_BY_FAMILY || payload_size < sizeof(inet_diag_msg)) {
        continue;
      }
      inet_diag_msg reply;
      std::memcpy(&reply, payload, sizeof reply);
      if (reply.idiag_state == kStateTimeWait || reply.idiag_state == kStateListen ||
          reply.idiag_state == kStateNewSynRecv) {
        return std::nullopt;
      }
      // The kernel's lookup falls back to a listener on the local address; only the very
      // tuple asked for counts.
      if (reply.id.idiag_sport != request.body.id.idiag_sport ||
          reply.id.idiag_dport != request.body.id.idiag_dport ||
          (reply.idiag_family != AF_INET && reply.idiag_family != AF_INET6)) {
        return std::nullopt;
      }
      Addr16 reply_src{};
      Addr16 reply_dst{};
      std::uint8_t raw[16];
      std::memcpy(raw, reply.id.idiag_src, sizeof raw);
      reply_src = canonical(reply.idiag_family, raw);
      std::memcpy(raw, reply.id.idiag_dst, sizeof raw);
      reply_dst = canonical(reply.idiag_family, raw);
      if (reply_src != src || reply_dst != dst) return std::nullopt;
      return reply.idiag_uid;
    }
  }
  lookupFailed("no reply within 100ms", ETIMEDOUT);
  fd.reset();
  return std::nullopt;
}

}  // namespace dmm::net
