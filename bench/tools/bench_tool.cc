// dmm-bench-tool: the small load generators and servers the benchmark needs that Debian does not
// ship in the form we need. One binary, one subcommand per role:
//
//   echo [HOST] PORT                echo server on HOST:PORT, default 127.0.0.1 (epoll, one
//                                   thread, any number of connections)
//   rr HOST PORT SIZE SECONDS [poll]
//                                   ping-pong of SIZE bytes on one connection:
//                                   prints "tps=… p50_us=… p99_us=… p999_us=…"; with "poll" the
//                                   socket is non-blocking and every read waits in poll() for
//                                   POLLIN first, every write that meets EAGAIN for POLLOUT (the
//                                   event-loop form: a different wake-up path than a blocking read)
//   crr HOST PORT SIZE SECONDS      connect, send SIZE bytes, read them back, close, again:
//                                   prints "cps=… p50_us=… p99_us=…"
//   idle HOST PORT N SECONDS        opens N connections, echoes one byte on each so every hop is
//                                   established, prints "READY n=N", then holds them SECONDS
//
// Every client bounds its run time; errors go to stderr with a non-zero exit.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "dmm-bench-tool: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

sockaddr_in address(const char* host, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
    std::fprintf(stderr, "dmm-bench-tool: bad IPv4 address %s\n", host);
    std::exit(2);
  }
  return a;
}

int connectTo(const sockaddr_in& a) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) die("connect");
  return fd;
}

bool writeAll(int fd, const char* p, std::size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

bool readAll(int fd, char* p, std::size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  auto k = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

void raiseFdLimit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

int echoServer(const char* host, int port) {
  raiseFdLimit();
  int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (lfd < 0) die("socket");
  int one = 1;
  ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  auto a = address(host, port);
  if (::bind(lfd, reinterpret_cast<const sockaddr*>(&a), sizeof a) != 0) die("bind");
  if (::listen(lfd, 8192) != 0) die("listen");
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = lfd;
  ::epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
  std::vector<epoll_event> events(256);
  std::vector<char> buf(64 * 1024);
  for (;;) {
    int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("epoll_wait");
    for (int i = 0; i < n; ++i) {
      int fd = events[static_cast<std::size_t>(i)].data.fd;
      if (fd == lfd) {
        for (;;) {
          int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);  // blocking writes: simple echo
          if (c < 0) break;
          ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          epoll_event cev{};
          cev.events = EPOLLIN;
          cev.data.fd = c;
          ::epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
        }  // the listener is non-blocking: the loop ends at EAGAIN
        continue;
      }
      ssize_t r = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
      if (r > 0) {
        if (!writeAll(fd, buf.data(), static_cast<std::size_t>(r))) {
          ::close(fd);
        }
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        ::close(fd);  // closing removes it from the epoll set
      }
    }
  }
}

// Waits until fd is ready for `events` (a non-blocking socket, the event-loop form).
bool waitFor(int fd, short events) {
  pollfd p{fd, events, 0};
  int n;
  do {
    n = ::poll(&p, 1, -1);
  } while (n < 0 && errno == EINTR);
  return n > 0;  // POLLHUP/POLLERR too: the read or write that follows reports them
}

bool writeAllPolled(int fd, const char* p, std::size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!waitFor(fd, POLLOUT)) return false;
      continue;
    }
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

bool readAllPolled(int fd, char* p, std::size_t n) {
  while (n > 0) {
    if (!waitFor(fd, POLLIN)) return false;
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

int pingPong(const char* host, int port, std::size_t size, double seconds, bool polled) {
  auto a = address(host, port);
  int fd = connectTo(a);
  if (polled) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) die("fcntl O_NONBLOCK");
  }
  std::vector<char> out(size, 'x');
  std::vector<char> in(size);
  std::vector<double> lat;
  lat.reserve(1 << 20);
  auto start = Clock::now();
  auto end = start + std::chrono::duration<double>(seconds);
  Clock::time_point now = start;
  while (now < end) {
    auto t0 = now;
    bool ok = polled ? writeAllPolled(fd, out.data(), size) && readAllPolled(fd, in.data(), size)
                     : writeAll(fd, out.data(), size) && readAll(fd, in.data(), size);
    if (!ok) die("ping-pong");
    now = Clock::now();
    lat.push_back(std::chrono::duration<double, std::micro>(now - t0).count());
  }
  double elapsed = std::chrono::duration<double>(now - start).count();
  double tps = static_cast<double>(lat.size()) / elapsed;
  double p50 = percentile(lat, 0.50);
  double p99 = percentile(lat, 0.99);
  double p999 = percentile(lat, 0.999);
  std::printf("tps=%.0f p50_us=%.1f p99_us=%.1f p999_us=%.1f n=%zu\n", tps, p50, p99, p999,
              lat.size());
  ::close(fd);
  return 0;
}

int connectLoop(const char* host, int port, std::size_t size, double seconds) {
  auto a = address(host, port);
  std::vector<char> out(size, 'x');
  std::vector<char> in(size);
  std::vector<double> lat;
  auto start = Clock::now();
  auto end = start + std::chrono::duration<double>(seconds);
  Clock::time_point now = start;
  std::size_t errors = 0;
  while (now < end) {
    auto t0 = now;
    int fd = connectTo(a);
    bool ok = writeAll(fd, out.data(), size) && readAll(fd, in.data(), size);
    ::close(fd);
    now = Clock::now();
    if (!ok) {
      ++errors;
      continue;
    }
    lat.push_back(std::chrono::duration<double, std::micro>(now - t0).count());
  }
  double elapsed = std::chrono::duration<double>(now - start).count();
  std::printf("cps=%.0f p50_us=%.1f p99_us=%.1f errors=%zu\n",
              static_cast<double>(lat.size()) / elapsed, percentile(lat, 0.5),
              percentile(lat, 0.99), errors);
  return errors == 0 ? 0 : 1;
}

int holdIdle(const char* host, int port, int count, double seconds) {
  raiseFdLimit();
  auto a = address(host, port);
  std::vector<int> fds;
  fds.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    int fd = connectTo(a);
    char c = 'x';
    if (!writeAll(fd, &c, 1) || !readAll(fd, &c, 1)) die("idle echo");
    fds.push_back(fd);
  }
  std::printf("READY n=%d\n", count);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  for (int fd : fds)
    ::close(fd);
  return 0;
}

void usage() {
  std::fprintf(stderr,
               "usage: dmm-bench-tool echo [HOST] PORT\n"
               "       dmm-bench-tool rr HOST PORT SIZE SECONDS [poll]\n"
               "       dmm-bench-tool crr HOST PORT SIZE SECONDS\n"
               "       dmm-bench-tool idle HOST PORT N SECONDS\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage();
  std::string cmd = argv[1];
  if (cmd == "echo" && argc == 3) return echoServer("127.0.0.1", std::atoi(argv[2]));
  if (cmd == "echo" && argc == 4) return echoServer(argv[2], std::atoi(argv[3]));
  bool polled = cmd == "rr" && argc == 7 && std::string(argv[6]) == "poll";
  if ((cmd == "rr" || cmd == "crr") && (argc == 6 || polled)) {
    auto size = static_cast<std::size_t>(std::atol(argv[4]));
    double seconds = std::atof(argv[5]);
    if (size == 0 || seconds <= 0) usage();
    return cmd == "rr" ? pingPong(argv[2], std::atoi(argv[3]), size, seconds, polled)
                       : connectLoop(argv[2], std::atoi(argv[3]), size, seconds);
  }
  if (cmd == "idle" && argc == 6)
    return holdIdle(argv[2], std::atoi(argv[3]), std::atoi(argv[4]), std::atof(argv[5]));
  usage();
}
