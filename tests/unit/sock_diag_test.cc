// socketOwnerUid() (NETLINK_SOCK_DIAG exact lookup) and tcpSmoothedRtt(), on real loopback
// connections made here.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/sock_diag.h"
#include "common/socket_util.h"

namespace dmm::net {
namespace {

using namespace std::chrono_literals;

constexpr std::uint32_t kNobody = 65534;

bool waitReadable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

UniqueFd acceptOne(int listener) {
  if (!waitReadable(listener, 2000)) return {};
  return UniqueFd(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
}

// A listener and one established connection to it, all on this thread.
struct Loopback {
  UniqueFd listener;
  UniqueFd client;
  UniqueFd server;
  SocketAddress server_address;  // the listener's
  SocketAddress client_address;  // the client's local end
};

Loopback connectLoopback(const char* listen_at, bool client_dual_stack = false) {
  Loopback c;
  ListenOptions options;
  options.reuse_port = false;
  auto listener = listenTcp(*SocketAddress::parse(listen_at, true), options);
  EXPECT_TRUE(listener) << std::strerror(listener.error().code);
  if (!listener) return c;
  c.listener = std::move(*listener);
  c.server_address = *localAddress(c.listener.get());

  SocketAddress target = c.server_address;
  int family = target.family();
  if (client_dual_stack) {
    // An application's AF_INET6 socket that reaches an IPv4 server as ::ffff:a.b.c.d.
    in6_addr mapped{};
    mapped.s6_addr[10] = 0xff;
    mapped.s6_addr[11] = 0xff;
    std::memcpy(&mapped.s6_addr[12], target.ip().bytes(), 4);
    target = SocketAddress(IpAddress::v6(mapped), target.port());
    family = AF_INET6;
  }
  c.client.reset(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (client_dual_stack) {
    int off = 0;
    EXPECT_EQ(::setsockopt(c.client.get(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off), 0);
  }
  sockaddr_storage ss{};
  socklen_t len = target.toSockaddr(ss);
  EXPECT_EQ(::connect(c.client.get(), reinterpret_cast<sockaddr*>(&ss), len), 0)
      << std::strerror(errno);
  c.server = acceptOne(c.listener.get());
  EXPECT_TRUE(c.server);
  // What the sidecar sees: the accepted socket's peer is the application's local end.
  c.client_address = *peerAddress(c.server.get());
  return c;
}

TEST(SocketOwnerUid, FindsTheOwnerOfAnIpv4Connection) {
  Loopback c = connectLoopback("127.0.0.1:0");
  ASSERT_TRUE(c.server);
  EXPECT_TRUE(c.client_address.ip().isV4());
  EXPECT_EQ(socketOwnerUid(c.client_address, c.server_address), geteuid());
  // The accepted end is a socket of this process too, with the tuple the other way round.
  EXPECT_EQ(socketOwnerUid(c.server_address, c.client_address), geteuid());
  // Per-thread socket reused: a second lookup on this thread answers the same.
  EXPECT_EQ(socketOwnerUid(c.client_address, c.server_address), geteuid());
}

TEST(SocketOwnerUid, FindsTheOwnerOfAnIpv6Connection) {
  Loopback c = connectLoopback("[::1]:0");
  ASSERT_TRUE(c.server);
  EXPECT_TRUE(c.client_address.ip().isV6());
  EXPECT_EQ(socketOwnerUid(c.client_address, c.server_address), geteuid());
}

TEST(SocketOwnerUid, FindsADualStackSocketByItsIpv4Tuple) {
  // The kernel reports this socket as AF_INET6 with mapped addresses; the caller only knows the
  // IPv4 addresses its IPv4 listener saw.
  Loopback c = connectLoopback("127.0.0.1:0", /*client_dual_stack=*/true);
  ASSERT_TRUE(c.server);
  EXPECT_TRUE(c.client_address.ip().isV4());
  EXPECT_EQ(socketOwnerUid(c.client_address, c.server_address), geteuid());
}

TEST(SocketOwnerUid, NoSocketWithTheTupleGivesNullopt) {
  Loopback c = connectLoopback("127.0.0.1:0");
  ASSERT_TRUE(c.server);
  SocketAddress elsewhere(*IpAddress::parse("127.0.0.1"), 1);
  // Nothing at all with this tuple.
  EXPECT_EQ(socketOwnerUid(SocketAddress(c.client_address.ip(), 2), elsewhere), std::nullopt);
  // The right client port but the wrong remote port.
  EXPECT_EQ(socketOwnerUid(c.client_address, elsewhere), std::nullopt);
  // The kernel's lookup falls back to a listener on the local end; that is not the socket asked
  // for (and it would report the listener's owner).
  EXPECT_EQ(socketOwnerUid(c.server_address, elsewhere), std::nullopt);
  // Mixed families cannot name one socket.
  EXPECT_EQ(socketOwnerUid(c.client_address, *SocketAddress::parse("[::1]:80")), std::nullopt);
}

TEST(SocketOwnerUid, ATimeWaitRemnantHasNoOwner) {
  // The kernel reports uid 0 for TIME_WAIT sockets; that must not read as "owned by root".
  Loopback c = connectLoopback("127.0.0.1:0");
  ASSERT_TRUE(c.server);
  ASSERT_EQ(socketOwnerUid(c.client_address, c.server_address), geteuid());
  c.client.reset();  // active close: the client's end goes to TIME_WAIT once the server closes
  char byte = 0;
  ASSERT_TRUE(waitReadable(c.server.get(), 2000));
  ASSERT_EQ(::read(c.server.get(), &byte, 1), 0);
  c.server.reset();
  std::optional<std::uint32_t> uid = geteuid();
  for (int i = 0; i < 200 && uid; ++i) {
    std::this_thread::sleep_for(5ms);
    uid = socketOwnerUid(c.client_address, c.server_address);
  }
  EXPECT_EQ(uid, std::nullopt);
}

TEST(SocketOwnerUid, ReportsTheOwnerNotTheCaller) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to make a socket owned by another user";
  Loopback c = connectLoopback("127.0.0.1:0");
  ASSERT_TRUE(c.server);
  c.server.reset();
  c.client.reset();

  int ready[2];
  int hold[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(hold, O_CLOEXEC), 0);
  sockaddr_storage ss{};
  socklen_t len = c.server_address.toSockaddr(ss);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Only async-signal-safe calls from here: the parent may have threads.
    ::close(ready[0]);
    ::close(hold[1]);
    if (::setresuid(kNobody, kNobody, kNobody) != 0) ::_exit(2);
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ::connect(s, reinterpret_cast<sockaddr*>(&ss), len) != 0) ::_exit(3);
    char x = 'x';
    if (::write(ready[1], &x, 1) != 1) ::_exit(4);
    while (::read(hold[0], &x, 1) > 0) {
    }
    ::_exit(0);
  }
  ::close(ready[1]);
  ::close(hold[0]);
  UniqueFd ready_read(ready[0]);
  UniqueFd hold_write(hold[1]);

  char x = 0;
  bool child_ready = waitReadable(ready_read.get(), 5000) && ::read(ready_read.get(), &x, 1) == 1;
  UniqueFd accepted = child_ready ? acceptOne(c.listener.get()) : UniqueFd();
  std::optional<SocketAddress> child_address;
  if (accepted) child_address = peerAddress(accepted.get());
  std::optional<std::uint32_t> uid;
  if (child_address) uid = socketOwnerUid(*child_address, c.server_address);
  std::optional<std::uint32_t> accepted_uid;
  if (child_address) accepted_uid = socketOwnerUid(c.server_address, *child_address);

  hold_write.reset();  // lets the child exit
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  ASSERT_TRUE(child_ready);
  ASSERT_TRUE(child_address);
  EXPECT_EQ(uid, kNobody);
  EXPECT_EQ(accepted_uid, geteuid());  // our accepted end is still ours
}

TEST(TcpSmoothedRtt, IsMeasuredOnALoopbackConnection) {
  Loopback c = connectLoopback("127.0.0.1:0");
  ASSERT_TRUE(c.server);
  for (int i = 0; i < 4; ++i) {
    char buf[4];
    ASSERT_EQ(::write(c.client.get(), "ping", 4), 4);
    ASSERT_EQ(::read(c.server.get(), buf, 4), 4);
    ASSERT_EQ(::write(c.server.get(), "pong", 4), 4);
    ASSERT_EQ(::read(c.client.get(), buf, 4), 4);
  }
  auto rtt = tcpSmoothedRtt(c.client.get());
  ASSERT_TRUE(rtt);
  EXPECT_GT(rtt->count(), 0);
  EXPECT_LT(*rtt, 1s);
  auto server_rtt = tcpSmoothedRtt(c.server.get());
  ASSERT_TRUE(server_rtt);
  EXPECT_LT(*server_rtt, 1s);
}

TEST(TcpSmoothedRtt, NulloptWithoutATcpConnection) {
  EXPECT_EQ(tcpSmoothedRtt(-1), std::nullopt);
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd a(pair[0]);
  UniqueFd b(pair[1]);
  EXPECT_EQ(tcpSmoothedRtt(a.get()), std::nullopt);
  // A TCP socket that never connected has sampled no RTT.
  UniqueFd unconnected(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(tcpSmoothedRtt(unconnected.get()), std::nullopt);
}

}  // namespace
}  // namespace dmm::net
