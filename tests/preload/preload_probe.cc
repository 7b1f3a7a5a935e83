// preload_probe: an ordinary program that the shim's tests run under LD_PRELOAD. Each scenario
// makes plain libc calls on sockets and checks what an application would see; it knows
// nothing of the shim beyond its public header. Prints "FAIL: ..." lines and exits 1 when a
// check fails, exits 0 otherwise; prints nothing else unless a scenario says so, so that the
// tests can tell whether the shim itself wrote anything.
//
//   preload_probe SCENARIO DST_IP PORT [ARG]
//
// The peer at DST_IP:PORT (through the sidecar or directly) echoes what it receives.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "preload/dmm_preload.h"

namespace {

int g_failures = 0;
const char* g_ip = nullptr;
std::uint16_t g_port = 0;
const char* g_arg = nullptr;

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::printf("FAIL: %s:%d: %s (errno %d %s)\n", __FILE__, __LINE__, #cond, errno, \
                  std::strerror(errno));                                               \
      std::fflush(stdout);                                                             \
      ++g_failures;                                                                    \
    }                                                                                  \
  } while (0)

sockaddr_storage destination(socklen_t& len, const char* ip = g_ip, std::uint16_t port = g_port) {
  sockaddr_storage ss{};
  if (std::strchr(ip, ':') != nullptr) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    ::inet_pton(AF_INET6, ip, &in6->sin6_addr);
    len = sizeof(sockaddr_in6);
  } else {
    auto* in = reinterpret_cast<sockaddr_in*>(&ss);
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    ::inet_pton(AF_INET, ip, &in->sin_addr);
    len = sizeof(sockaddr_in);
  }
  return ss;
}

int family() {
  return std::strchr(g_ip, ':') != nullptr ? AF_INET6 : AF_INET;
}

// A blocking connect to the destination; -1 on failure.
int connectBlocking(int flags = 0) {
  int fd = ::socket(family(), SOCK_STREAM | flags, 0);
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void setTimeouts(int fd) {
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// Writes `msg`, reads the same number of bytes back (the peer echoes), true when equal.
bool echo(int fd, const std::string& msg) {
  bool nonblocking = (::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
  std::size_t sent = 0;
  std::string got;
  for (int rounds = 0; rounds < 5000 && got.size() < msg.size(); ++rounds) {
    pollfd p{fd, static_cast<short>(POLLIN | (sent < msg.size() ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 5000) <= 0) return false;
    if (sent < msg.size() && (p.revents & POLLOUT) != 0) {
      ssize_t n = ::send(fd, msg.data() + sent, msg.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) return false;
      if (n > 0) sent += static_cast<std::size_t>(n);
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      char buf[65536];
      ssize_t n = ::recv(fd, buf, sizeof(buf), nonblocking ? MSG_DONTWAIT : 0);
      if (n == 0) return false;
      if (n < 0 && errno != EAGAIN) return false;
      if (n > 0) got.append(buf, static_cast<std::size_t>(n));
    }
  }
  return got == msg;
}

bool peerIsDestination(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return false;
  socklen_t want_len = 0;
  sockaddr_storage want = destination(want_len);
  return len == want_len && std::memcmp(&ss, &want, want_len) == 0;
}

int intOption(int fd, int level, int name) {
  int v = -1;
  socklen_t len = sizeof(v);
  if (::getsockopt(fd, level, name, &v, &len) != 0) return -100 - errno;
  return v;
}

// Non-blocking connect; returns the fd once connect() said EINPROGRESS (or 0), -1 otherwise.
int startNonblocking(bool* in_progress) {
  int fd = ::socket(family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&ss), len);
  *in_progress = rc == -1 && errno == EINPROGRESS;
  if (rc != 0 && !*in_progress) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void finishNonblocking(int fd) {
  CHECK(intOption(fd, SOL_SOCKET, SO_ERROR) == 0);
  CHECK(peerIsDestination(fd));
  CHECK(echo(fd, "nonblocking hello"));
  // connect() again, as some applications check completion: Linux TCP answers 0 the first
  // time after an EINPROGRESS, EISCONN from then on.
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == -1 && errno == EISCONN);
  ::close(fd);
}

// ---- scenarios -------------------------------------------------------------------------------

void flags() {
  bool in_progress = false;
  int fd = startNonblocking(&in_progress);
  CHECK(fd >= 0);
  CHECK(in_progress);
  CHECK((::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
  CHECK(intOption(fd, SOL_SOCKET, SO_TYPE) == SOCK_STREAM);
  CHECK(intOption(fd, SOL_SOCKET, SO_DOMAIN) == family());
  CHECK(intOption(fd, SOL_SOCKET, SO_PROTOCOL) == IPPROTO_TCP);
  finishNonblocking(fd);

  int b = connectBlocking();
  CHECK(b >= 0);
  CHECK((::fcntl(b, F_GETFL) & O_NONBLOCK) == 0);
  CHECK((::fcntl(b, F_GETFD) & FD_CLOEXEC) == 0);
  setTimeouts(b);
  CHECK(echo(b, "blocking hello"));
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(b, reinterpret_cast<sockaddr*>(&ss), len) == -1 && errno == EISCONN);
  // Flags changed after the capture act on the socket that is there now.
  CHECK(::fcntl(b, F_SETFL, O_NONBLOCK) == 0);
  char c = 0;
  CHECK(::recv(b, &c, 1, 0) == -1 && errno == EAGAIN);
  ::close(b);
}

void nonblockPoll() {
  bool in_progress = false;
  int fd = startNonblocking(&in_progress);
  CHECK(fd >= 0 && in_progress);
  pollfd p{fd, POLLOUT, 0};
  CHECK(::poll(&p, 1, 5000) == 1);
  CHECK((p.revents & POLLOUT) != 0);
  finishNonblocking(fd);
}

void nonblockSelect() {
  bool in_progress = false;
  int fd = startNonblocking(&in_progress);
  CHECK(fd >= 0 && in_progress && fd < FD_SETSIZE);
  fd_set w;
  FD_ZERO(&w);
  FD_SET(fd, &w);
  timeval tv{5, 0};
  CHECK(::select(fd + 1, nullptr, &w, nullptr, &tv) == 1);
  CHECK(FD_ISSET(fd, &w));
  finishNonblocking(fd);
}

void waitEpollOut(int ep, int fd, std::uint64_t tag) {
  epoll_event ev{};
  int n = ::epoll_wait(ep, &ev, 1, 5000);
  CHECK(n == 1);
  CHECK((ev.events & EPOLLOUT) != 0);
  CHECK(ev.data.u64 == tag);
  (void)fd;
}

void nonblockEpoll() {
  // The usual order: connect, then register.
  bool in_progress = false;
  int fd = startNonblocking(&in_progress);
  CHECK(fd >= 0 && in_progress);
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLOUT | EPOLLET;
  ev.data.u64 = 41;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0);
  waitEpollOut(ep, fd, 41);
  finishNonblocking(fd);

  // Registered before connect(): the registration must follow the fd to its new socket.
  int early = ::socket(family(), SOCK_STREAM | SOCK_NONBLOCK, 0);
  ev.events = EPOLLIN;
  ev.data.u64 = 42;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, early, &ev) == 0);
  ev.events = EPOLLOUT | EPOLLET;  // and modified, as event loops do
  CHECK(::epoll_ctl(ep, EPOLL_CTL_MOD, early, &ev) == 0);
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(early, reinterpret_cast<sockaddr*>(&ss), len) == -1 && errno == EINPROGRESS);
  waitEpollOut(ep, early, 42);
  ev.events = EPOLLIN;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_MOD, early, &ev) == 0);  // it is registered, on the new socket
  finishNonblocking(early);
  ::close(ep);
}

void names() {
  // ARG: the local address the route to the destination uses.
  int fd = connectBlocking();
  CHECK(fd >= 0);
  CHECK(peerIsDestination(fd));
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  CHECK(::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0);
  CHECK(ss.ss_family == family());
  char ip[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, ip, sizeof(ip));
    CHECK(len == sizeof(sockaddr_in));
  } else {
    ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, ip, sizeof(ip));
    CHECK(len == sizeof(sockaddr_in6));
  }
  CHECK(g_arg != nullptr && std::strcmp(ip, g_arg) == 0);
  // A short buffer is truncated, and the full size reported, as the kernel does.
  sockaddr_storage small{};
  socklen_t small_len = 4;
  CHECK(::getpeername(fd, reinterpret_cast<sockaddr*>(&small), &small_len) == 0);
  CHECK(small_len == (family() == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6)));
  ::close(fd);

  // Bound before connect(): getsockname reports the bound address and port.
  int bound = ::socket(family(), SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(bound, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t local_len = 0;
  sockaddr_storage local = destination(local_len, g_arg, 0);
  CHECK(::bind(bound, reinterpret_cast<sockaddr*>(&local), local_len) == 0);
  sockaddr_storage before{};
  socklen_t before_len = sizeof(before);
  CHECK(::getsockname(bound, reinterpret_cast<sockaddr*>(&before), &before_len) == 0);
  socklen_t dlen = 0;
  sockaddr_storage dst = destination(dlen);
  CHECK(::connect(bound, reinterpret_cast<sockaddr*>(&dst), dlen) == 0);
  sockaddr_storage after{};
  socklen_t after_len = sizeof(after);
  CHECK(::getsockname(bound, reinterpret_cast<sockaddr*>(&after), &after_len) == 0);
  CHECK(after_len == before_len && std::memcmp(&after, &before, before_len) == 0);
  ::close(bound);
}

void options() {
  int fd = ::socket(family(), SOCK_STREAM, 0);
  int one = 1;
  CHECK(::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0);  // before connect
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0);
  CHECK(intOption(fd, IPPROTO_TCP, TCP_NODELAY) == 1);  // what was set before reads back
  CHECK(intOption(fd, SOL_SOCKET, SO_KEEPALIVE) == 0);
  CHECK(::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) == 0);
  CHECK(intOption(fd, SOL_SOCKET, SO_KEEPALIVE) == 1);
  int idle = 37;
  CHECK(::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) == 0);
  CHECK(intOption(fd, IPPROTO_TCP, TCP_KEEPIDLE) == 37);
  int zero = 0;
  CHECK(::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &zero, sizeof(zero)) == 0);
  CHECK(intOption(fd, IPPROTO_TCP, TCP_NODELAY) == 0);
  int tos = IPTOS_LOWDELAY;
  CHECK(::setsockopt(fd, IPPROTO_IP, IP_TOS, &tos, sizeof(tos)) == 0);
  tcp_info ti{};
  socklen_t ti_len = sizeof(ti);
  CHECK(::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &ti_len) == 0);
  CHECK(ti.tcpi_state == TCP_ESTABLISHED);
  CHECK(intOption(fd, SOL_SOCKET, SO_ERROR) == 0);
  // Options a Unix socket has are the kernel's.
  int buf = 256 * 1024;
  CHECK(::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf)) == 0);
  CHECK(intOption(fd, SOL_SOCKET, SO_SNDBUF) >= buf);
  setTimeouts(fd);
  CHECK(echo(fd, "options"));
  ::close(fd);
}

void qos() {
  // ARG: the class to set ("" sets none).
  int fd = ::socket(family(), SOCK_STREAM, 0);
  CHECK(::setsockopt(fd, SOL_DMM, DMM_SO_QOS, "fast", 4) == -1 && errno == EINVAL);
  if (g_arg != nullptr && *g_arg != '\0') {
    CHECK(::setsockopt(fd, SOL_DMM, DMM_SO_QOS, g_arg,
                       static_cast<socklen_t>(std::strlen(g_arg) + 1)) == 0);
    char got[64] = {};
    socklen_t got_len = sizeof(got);
    CHECK(::getsockopt(fd, SOL_DMM, DMM_SO_QOS, got, &got_len) == 0);
    CHECK(got_len == std::strlen(g_arg) && std::strcmp(got, g_arg) == 0);
  }
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0);
  CHECK(::setsockopt(fd, SOL_DMM, DMM_SO_QOS, "bulk", 4) == -1 && errno == EISCONN);
  setTimeouts(fd);
  CHECK(echo(fd, "qos"));
  ::close(fd);
  int udp = ::socket(AF_INET, SOCK_DGRAM, 0);
  CHECK(::setsockopt(udp, SOL_DMM, DMM_SO_QOS, "bulk", 4) == -1 && errno == ENOPROTOOPT);
  ::close(udp);
}

void dups() {
  int fd = connectBlocking();
  CHECK(fd >= 0);
  int a = ::dup(fd);
  CHECK(::dup2(fd, 100) == 100);
  CHECK(::dup3(fd, 101, O_CLOEXEC) == 101);
  int b = ::fcntl(fd, F_DUPFD_CLOEXEC, 200);
  CHECK(b >= 200);
  CHECK((::fcntl(101, F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(100, F_GETFD) & FD_CLOEXEC) == 0);
  ::close(fd);  // the copies live on
  for (int d : {a, 100, 101, b})
    CHECK(peerIsDestination(d));
  setTimeouts(a);
  CHECK(echo(a, "through a dup"));
  // An fd number taken over by another socket forgets the capture.
  int other = ::socket(AF_INET, SOCK_DGRAM, 0);
  CHECK(::dup2(other, 100) == 100);
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  CHECK(::getpeername(100, reinterpret_cast<sockaddr*>(&ss), &len) == -1 && errno == ENOTCONN);
  int one = 1;
  CHECK(::setsockopt(100, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == -1);  // UDP: no
  for (int d : {a, 100, 101, b, other})
    ::close(d);
}

void forked() {
  int fd = connectBlocking();
  CHECK(fd >= 0);
  setTimeouts(fd);
  pid_t child = ::fork();
  if (child == 0) {
    // The child uses the connection (and the table it inherited) on its own.
    CHECK(peerIsDestination(fd));
    CHECK(echo(fd, "from the child"));
    ::_exit(g_failures == 0 ? 0 : 1);
  }
  int status = -1;
  CHECK(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(peerIsDestination(fd));
  CHECK(echo(fd, "from the parent, after"));
  ::close(fd);
}

void execed(char** argv) {
  int fd = connectBlocking();  // no FD_CLOEXEC: it survives exec
  CHECK(fd >= 0);
  std::string fd_text = std::to_string(fd);
  char* args[] = {
      argv[0], const_cast<char*>("exec-child"), const_cast<char*>(g_ip), argv[3], fd_text.data(),
      nullptr};
  pid_t child = ::fork();
  if (child == 0) {
    ::execv("/proc/self/exe", args);
    ::_exit(127);
  }
  int status = -1;
  CHECK(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ::close(fd);
}

void execChild() {
  // After exec the shim's table is gone: the fd is the Unix stream it really is.
  int fd = std::atoi(g_arg);
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  CHECK(::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0);
  CHECK(ss.ss_family == AF_UNIX);
  setTimeouts(fd);
  CHECK(echo(fd, "after exec"));
}

void refused() {
  int fd = ::socket(family(), SOCK_STREAM, 0);
  socklen_t len = 0;
  sockaddr_storage ss = destination(len);
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == -1 && errno == ECONNREFUSED);
  ::close(fd);
  int nb = ::socket(family(), SOCK_STREAM | SOCK_NONBLOCK, 0);
  CHECK(::connect(nb, reinterpret_cast<sockaddr*>(&ss), len) == -1 && errno == ECONNREFUSED);
  ::close(nb);
}

void direct() {
  // The sidecar is not there: the TCP socket connects directly, and is a real TCP socket.
  int fd = connectBlocking();
  CHECK(fd >= 0);
  setTimeouts(fd);
  CHECK(peerIsDestination(fd));
  tcp_info ti{};
  socklen_t ti_len = sizeof(ti);
  CHECK(::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &ti_len) == 0);
  CHECK(ti.tcpi_state == TCP_ESTABLISHED && ti.tcpi_rtt > 0);  // a real one measures an RTT
  CHECK(echo(fd, "direct"));
  ::close(fd);
  bool in_progress = false;
  int nb = startNonblocking(&in_progress);
  CHECK(nb >= 0);
  pollfd p{nb, POLLOUT, 0};
  CHECK(::poll(&p, 1, 5000) == 1);
  finishNonblocking(nb);
}

void loopback() {
  // ARG: a loopback port something listens on; never captured.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  socklen_t len = 0;
  sockaddr_storage ss = destination(len, "127.0.0.1", static_cast<std::uint16_t>(std::atoi(g_arg)));
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0);
  tcp_info ti{};
  socklen_t ti_len = sizeof(ti);
  CHECK(::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &ti_len) == 0);
  CHECK(ti.tcpi_state == TCP_ESTABLISHED);
  ::close(fd);
}

void ownSocket() {
  // This process listens on the socket the shim is configured with, as the sidecar does: the
  // shim finds out (SO_PEERCRED) and leaves its connections alone, so they go direct.
  const char* path = std::getenv("DMM_PRELOAD_SOCKET");
  CHECK(path != nullptr);
  int l = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
  CHECK(::bind(l, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) == 0);
  CHECK(::listen(l, 8) == 0);
  for (int i = 0; i < 2; ++i)
    direct();
  ::close(l);
  ::unlink(path);
}

void threads() {
  // ARG: threads x connections each.
  int n_threads = 8;
  int per_thread = 25;
  std::atomic<int> good{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < n_threads; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        bool in_progress = false;
        int fd = (i % 2 == 0) ? connectBlocking() : startNonblocking(&in_progress);
        if (fd < 0) continue;
        if (i % 2 == 1) {
          pollfd p{fd, POLLOUT, 0};
          if (::poll(&p, 1, 5000) != 1) {
            ::close(fd);
            continue;
          }
        }
        setTimeouts(fd);
        std::string msg = "thread " + std::to_string(t) + " conn " + std::to_string(i);
        if (peerIsDestination(fd) && echo(fd, msg)) good.fetch_add(1);
        ::close(fd);
      }
    });
  }
  for (auto& th : ts)
    th.join();
  CHECK(good.load() == n_threads * per_thread);
  std::printf("connections %d\n", good.load());
}

void silent() {
  // Captured, then the same with a bad file and environment: nothing may be printed.
  int fd = connectBlocking();
  CHECK(fd >= 0);
  setTimeouts(fd);
  CHECK(echo(fd, "quiet"));
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s SCENARIO DST_IP PORT [ARG]\n", argv[0]);
    return 2;
  }
  std::string s = argv[1];
  g_ip = argv[2];
  g_port = static_cast<std::uint16_t>(std::atoi(argv[3]));
  g_arg = argc > 4 ? argv[4] : nullptr;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (s == "flags") {
    flags();
  } else if (s == "nonblock-poll") {
    nonblockPoll();
  } else if (s == "nonblock-select") {
    nonblockSelect();
  } else if (s == "nonblock-epoll") {
    nonblockEpoll();
  } else if (s == "names") {
    names();
  } else if (s == "options") {
    options();
  } else if (s == "qos") {
    qos();
  } else if (s == "dup") {
    dups();
  } else if (s == "fork") {
    forked();
  } else if (s == "exec") {
    execed(argv);
  } else if (s == "exec-child") {
    execChild();
  } else if (s == "refused") {
    refused();
  } else if (s == "direct") {
    direct();
  } else if (s == "loopback") {
    loopback();
  } else if (s == "threads") {
    threads();
  } else if (s == "own-socket") {
    ownSocket();
  } else if (s == "silent") {
    silent();
  } else if (s == "clearenv") {
    // Programs that replace their environment before connecting (nginx's workers): the shim
    // read its configuration when it was loaded.
    ::clearenv();
    silent();
  } else {
    std::printf("FAIL: unknown scenario %s\n", s.c_str());
    return 2;
  }
  return g_failures == 0 ? 0 : 1;
}
