// shm_client: an ordinary program that preload_shm_test.cc runs under LD_PRELOAD with
// DMM_PRELOAD_SHM=1, against real sidecars, to check the shim's shared-memory data path (stage
// 2) with what an application can see: bytes, poll/epoll readiness, errors, timeouts, threads,
// fork, close_range. It knows nothing of the shim beyond what the kernel shows any process:
// a connection on shared memory has the sidecar's memfd "dmm-preload-shm" mapped, which
// /proc/self/maps lists, so every scenario checks that its connections really use it.
//
//   shm_client SCENARIO DST_IP PORT [ARG...]
//
// Prints "FAIL: ..." lines and exits 1 when a check fails; a watchdog (SIGALRM) ends a
// scenario that hangs with "FAIL: watchdog" and exit status 3. Other output is one line per
// scenario of figures the test may check ("name value" pairs).
//
// The byte streams are a pattern that depends on the position (patternByte), so the receiver
// checks every byte where it lands and reports the first wrong offset.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "preload/shm_pattern.h"

namespace {

std::atomic<int> g_failures{0};
const char* g_ip = nullptr;
std::uint16_t g_port = 0;
const char* volatile g_step = "start";  // for the watchdog's message

#define CHECK(cond)                                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::printf("FAIL: %s:%d: %s (errno %d %s) [step %s]\n", __FILE__, __LINE__, #cond, errno, \
                  std::strerror(errno), g_step);                                                 \
      std::fflush(stdout);                                                                       \
      g_failures.fetch_add(1);                                                                   \
    }                                                                                            \
  } while (0)

void onAlarm(int) {
  char buf[256];
  int n = std::snprintf(buf, sizeof buf, "FAIL: watchdog: still in step %s\n", g_step);
  if (n > 0) {
    ssize_t ignored = ::write(STDOUT_FILENO, buf, static_cast<std::size_t>(n));
    (void)ignored;
  }
  ::_exit(3);
}

double nowMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

using dmm::shmtest::fillPattern;
using dmm::shmtest::firstMismatch;
using dmm::shmtest::patternByte;

// ---- what the kernel shows of the shim's shared memory -----------------------------------------

// Mappings of the sidecar's memfd in this process: one per connection on shared memory.
int shmMappings() {
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (f == nullptr) return -1;
  char line[1024];
  int n = 0;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::strstr(line, "dmm-preload-shm") != nullptr) ++n;
  }
  std::fclose(f);
  return n;
}

// The fd numbers of this process that are eventfds (the shim's hidden fds; this program makes
// none of its own).
std::vector<int> eventfds() {
  std::vector<int> out;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char path[300];
    char target[256] = {};
    std::snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    ssize_t n = ::readlink(path, target, sizeof target - 1);
    if (n > 0 && std::strstr(target, "eventfd") != nullptr) out.push_back(std::atoi(e->d_name));
  }
  ::closedir(d);
  return out;
}

// ---- connections -----------------------------------------------------------------------------

sockaddr_in destination() {
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(g_port);
  ::inet_pton(AF_INET, g_ip, &in.sin_addr);
  return in;
}

// A connection to the destination, FD_CLOEXEC (what stage 2 asks for) unless told otherwise;
// a non-blocking one is returned once poll() says it is writable. `shm`: whether it must be on
// shared memory (a new memfd mapping appears), -1 to check nothing.
int connectTo(bool nonblocking, int shm = 1, bool cloexec = true) {
  int before = shmMappings();
  int type = SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0) | (cloexec ? SOCK_CLOEXEC : 0);
  int fd = ::socket(AF_INET, type, 0);
  CHECK(fd >= 0);
  sockaddr_in dst = destination();
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst);
  if (nonblocking) {
    CHECK(rc == -1 && errno == EINPROGRESS);
    pollfd p{fd, POLLOUT, 0};
    CHECK(::poll(&p, 1, 10000) == 1 && (p.revents & POLLOUT) != 0);
    int err = -1;
    socklen_t len = sizeof err;
    CHECK(::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0);
  } else {
    CHECK(rc == 0);
  }
  if (shm == 1) CHECK(shmMappings() == before + 1);
  if (shm == 0) CHECK(shmMappings() == before);
  return fd;
}

void setTimeout(int fd, int opt, int ms) {
  timeval tv{ms / 1000, (ms % 1000) * 1000};
  CHECK(::setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv) == 0);
}

bool writeAll(int fd, const void* data, std::size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<std::size_t>(k);
  }
  return true;
}

// Reads exactly n bytes (blocking fd); false on an early end or error.
bool readFull(int fd, void* data, std::size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::read(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<std::size_t>(k);
  }
  return true;
}

std::string readLine(int fd) {
  std::string out;
  char c = 0;
  while (out.size() < 256 && ::read(fd, &c, 1) == 1 && c != '\n')
    out += c;
  return out;
}

// Writes and reads varied sizes: 1 byte, odd sizes, the ring's size and beyond, so that the
// copies wrap around the ring at every offset.
constexpr std::size_t kWriteSizes[] = {1, 7, 100, 4096, 65536, 131071, 262144, 300001, 1 << 20};
constexpr std::size_t kReadSizes[] = {1, 13, 4096, 65536, 262149, 1 << 20, 777};

// The receiving side of a checked stream: every byte checked against the pattern.
struct Checker {
  std::uint32_t seed;
  std::uint64_t received = 0;
  bool bad = false;
  void take(const unsigned char* buf, std::size_t n) {
    if (bad) return;
    std::size_t at = firstMismatch(buf, n, received, seed);
    if (at != n) {
      std::printf("FAIL: byte %llu differs from what was sent (seed %u) [step %s]\n",
                  static_cast<unsigned long long>(received + at), seed, g_step);
      g_failures.fetch_add(1);
      bad = true;
    }
    received += n;
  }
};

// ---- scenario: bulk ------------------------------------------------------------------------

// Blocking: a writer thread sends `total` bytes (write, send, writev in turn) and half-closes;
// this thread reads (read, recv, readv in turn) and checks every byte, to the end of stream.
void bulkBlocking(int fd, std::uint64_t total) {
  setTimeout(fd, SO_RCVTIMEO, 20000);
  setTimeout(fd, SO_SNDTIMEO, 20000);
  std::thread writer([fd, total] {
    std::vector<unsigned char> buf(1 << 20);
    std::uint64_t sent = 0;
    for (std::size_t i = 0; sent < total; ++i) {
      std::size_t n = kWriteSizes[i % std::size(kWriteSizes)];
      if (n > total - sent) n = static_cast<std::size_t>(total - sent);
      fillPattern(buf.data(), n, sent, 1);
      ssize_t k;
      if (i % 3 == 0) {
        k = ::write(fd, buf.data(), n);
      } else if (i % 3 == 1) {
        k = ::send(fd, buf.data(), n, MSG_NOSIGNAL);
      } else {
        std::size_t half = n / 2;
        iovec v[2] = {{buf.data(), half}, {buf.data() + half, n - half}};
        k = ::writev(fd, v, 2);
      }
      if (k <= 0) {
        CHECK(k > 0);
        return;
      }
      sent += static_cast<std::uint64_t>(k);  // blocking: all of it, unless a timeout hit
    }
    CHECK(::shutdown(fd, SHUT_WR) == 0);
  });
  std::vector<unsigned char> buf(1 << 20);
  Checker in{1};
  for (std::size_t i = 0;; ++i) {
    std::size_t n = kReadSizes[i % std::size(kReadSizes)];
    ssize_t k;
    if (i % 3 == 0) {
      k = ::read(fd, buf.data(), n);
    } else if (i % 3 == 1) {
      k = ::recv(fd, buf.data(), n, 0);
    } else {
      std::size_t third = n / 3;
      iovec v[3] = {{buf.data(), third},
                    {buf.data() + third, third},
                    {buf.data() + 2 * third, n - 2 * third}};
      k = ::readv(fd, v, 3);
    }
    if (k == 0) break;
    if (k < 0) {
      CHECK(k >= 0);
      break;
    }
    in.take(buf.data(), static_cast<std::size_t>(k));
  }
  writer.join();
  CHECK(in.received == total);
  std::printf("bulk blocking received %llu\n", static_cast<unsigned long long>(in.received));
}

// Non-blocking, one thread, poll(): reads and writes as readiness says. Counts the wake-ups
// that found nothing to do (readiness that was not true).
void bulkPoll(int fd, std::uint64_t total) {
  std::vector<unsigned char> out(1 << 20);
  std::vector<unsigned char> buf(1 << 20);
  Checker in{1};
  std::uint64_t sent = 0;
  std::size_t wi = 0;
  std::size_t ri = 0;
  long wakeups = 0, false_out = 0, false_in = 0;
  bool shut = false;
  for (;;) {
    pollfd p{fd, static_cast<short>(POLLIN | (shut ? 0 : POLLOUT)), 0};
    int rc = ::poll(&p, 1, 10000);
    if (rc != 1) {
      std::printf("FAIL: poll returned %d: stalled at %llu sent, %llu received\n", rc,
                  static_cast<unsigned long long>(sent),
                  static_cast<unsigned long long>(in.received));
      g_failures.fetch_add(1);
      return;
    }
    ++wakeups;
    if ((p.revents & POLLOUT) != 0 && !shut) {
      std::size_t n = kWriteSizes[wi % std::size(kWriteSizes)];
      if (n > total - sent) n = static_cast<std::size_t>(total - sent);
      fillPattern(out.data(), n, sent, 1);
      ssize_t k = ::send(fd, out.data(), n, MSG_NOSIGNAL);
      if (k > 0) {
        sent += static_cast<std::uint64_t>(k);
        ++wi;
      } else if (k < 0 && errno == EAGAIN) {
        ++false_out;
      } else {
        CHECK(k > 0);
        return;
      }
      if (sent == total) {
        CHECK(::shutdown(fd, SHUT_WR) == 0);
        shut = true;
      }
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      std::size_t n = kReadSizes[ri++ % std::size(kReadSizes)];
      ssize_t k = ::recv(fd, buf.data(), n, 0);
      if (k > 0) {
        in.take(buf.data(), static_cast<std::size_t>(k));
      } else if (k == 0) {
        break;
      } else if (errno == EAGAIN) {
        ++false_in;
      } else {
        CHECK(k >= 0);
        return;
      }
    }
  }
  CHECK(shut);
  CHECK(in.received == total);
  std::printf("bulk poll received %llu wakeups %ld false_pollout %ld false_pollin %ld\n",
              static_cast<unsigned long long>(in.received), wakeups, false_out, false_in);
}

// Non-blocking, epoll edge-triggered: each edge is followed by reads (or writes) until EAGAIN,
// as EPOLLET requires; a missing edge stalls the loop, which the timeout catches.
void bulkEpollEt(int fd, std::uint64_t total) {
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.fd = fd;
  CHECK(::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0);
  std::vector<unsigned char> out(1 << 20);
  std::vector<unsigned char> buf(1 << 20);
  Checker in{1};
  std::uint64_t sent = 0;
  std::size_t wi = 0;
  std::size_t ri = 0;
  long wakeups = 0;
  bool shut = false, eof = false;
  while (!eof) {
    epoll_event got{};
    int rc = ::epoll_wait(ep, &got, 1, 10000);
    if (rc != 1) {
      std::printf("FAIL: epoll_wait returned %d: stalled at %llu sent, %llu received\n", rc,
                  static_cast<unsigned long long>(sent),
                  static_cast<unsigned long long>(in.received));
      g_failures.fetch_add(1);
      break;
    }
    ++wakeups;
    if ((got.events & EPOLLOUT) != 0) {
      while (!shut) {
        std::size_t n = kWriteSizes[wi % std::size(kWriteSizes)];
        if (n > total - sent) n = static_cast<std::size_t>(total - sent);
        fillPattern(out.data(), n, sent, 1);
        ssize_t k = ::write(fd, out.data(), n);
        if (k < 0 && errno == EAGAIN) break;
        if (k <= 0) {
          CHECK(k > 0);
          eof = true;
          break;
        }
        sent += static_cast<std::uint64_t>(k);
        ++wi;
        if (sent == total) {
          CHECK(::shutdown(fd, SHUT_WR) == 0);
          shut = true;
        }
      }
    }
    if ((got.events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) {
      for (;;) {
        std::size_t n = kReadSizes[ri++ % std::size(kReadSizes)];
        ssize_t k = ::read(fd, buf.data(), n);
        if (k > 0) {
          in.take(buf.data(), static_cast<std::size_t>(k));
          continue;
        }
        if (k == 0) {
          eof = true;
        } else if (errno != EAGAIN) {
          CHECK(k >= 0);
          eof = true;
        }
        break;
      }
    }
  }
  ::close(ep);
  CHECK(shut);
  CHECK(in.received == total);
  std::printf("bulk epollet received %llu wakeups %ld\n",
              static_cast<unsigned long long>(in.received), wakeups);
}

void bulk(const char* mode, std::uint64_t total) {
  g_step = mode;
  int before = shmMappings();
  bool blocking = std::strcmp(mode, "blocking") == 0;
  int fd = connectTo(!blocking);
  if (blocking) {
    bulkBlocking(fd, total);
  } else if (std::strcmp(mode, "poll") == 0) {
    bulkPoll(fd, total);
  } else if (std::strcmp(mode, "epollet") == 0) {
    bulkEpollEt(fd, total);
  } else {
    CHECK(!"unknown bulk mode");
  }
  std::size_t hidden = eventfds().size();
  CHECK(::close(fd) == 0);
  // The channel goes with the last fd: its mapping and its hidden eventfd.
  CHECK(shmMappings() == before);
  CHECK(eventfds().size() + 1 == hidden);
}

// ---- scenario: pollout ------------------------------------------------------------------------

// The server does not read for a while. Non-blocking writes, with poll(POLLOUT, 200 ms) after
// each EAGAIN, fill everything up to it; then every poll must time out while the server
// stalls (no busy loop), and say writable once it reads; then every byte must arrive (the
// server checks them and answers "bytes first-bad-offset"). Throughout, a POLLOUT must be
// followed by a write that takes bytes, as on TCP: `false_pollout` counts those that did not.
void pollout(std::uint64_t total) {
  g_step = "pollout fill";
  int fd = connectTo(true);
  double start = nowMs();
  std::vector<unsigned char> out(1 << 16);
  std::uint64_t sent = 0;
  std::uint64_t stalled_at = 0;  // bytes sent when the first poll timed out
  std::size_t i = 0;
  int timeouts = 0, false_out = 0, false_before_stall = 0, wakeups = 0;
  double stalled_ms = -1, writable_ms = -1;
  bool after_poll = false;  // the last poll said writable
  while (sent < total) {
    if (nowMs() - start > 30000) {
      CHECK(!"pollout: no progress for 30 s");
      return;
    }
    std::size_t n = kWriteSizes[i % std::size(kWriteSizes)];
    if (n > out.size()) n = out.size();
    if (n > total - sent) n = static_cast<std::size_t>(total - sent);
    fillPattern(out.data(), n, sent, 1);
    ssize_t k = ::send(fd, out.data(), n, MSG_NOSIGNAL);
    if (k > 0) {
      sent += static_cast<std::uint64_t>(k);
      ++i;
      after_poll = false;
      continue;
    }
    if (k < 0 && errno != EAGAIN) {
      CHECK(k > 0);
      return;
    }
    if (after_poll) {
      ++false_out;
      if (stalled_ms < 0) ++false_before_stall;
    }
    // EAGAIN: wait for writability, as an event loop does.
    for (;;) {
      pollfd p{fd, POLLOUT, 0};
      int rc = ::poll(&p, 1, 200);
      ++wakeups;
      CHECK(rc >= 0);
      CHECK((p.revents & (POLLERR | POLLHUP)) == 0);
      if (rc == 1) {
        if (stalled_ms >= 0 && writable_ms < 0) {
          writable_ms = nowMs() - start;
          g_step = "pollout draining";
        }
        after_poll = true;
        break;
      }
      if (stalled_ms < 0) {
        stalled_ms = nowMs() - start;
        stalled_at = sent;
        g_step = "pollout stalled";
      }
      if (writable_ms < 0) ++timeouts;
      if (nowMs() - start > 30000) break;
    }
  }
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  g_step = "pollout answer";
  int fl = ::fcntl(fd, F_GETFL);
  CHECK(::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0);
  setTimeout(fd, SO_RCVTIMEO, 20000);
  std::string answer = readLine(fd);
  std::string want = std::to_string(total) + " -1";
  CHECK(answer == want);
  if (answer != want) std::printf("server answered '%s'\n", answer.c_str());
  ::close(fd);
  std::printf(
      "pollout stalled_after %llu stalled_at_ms %.0f writable_at_ms %.0f stalled_timeouts %d "
      "false_pollout %d false_pollout_before_stall %d wakeups %d\n",
      static_cast<unsigned long long>(stalled_at), stalled_ms, writable_ms, timeouts, false_out,
      false_before_stall, wakeups);
}

// ---- scenario: pollin ------------------------------------------------------------------------

// The server (host B) answers each 8-byte request {u32 count, u32 pieces} (network order) with
// `count` bytes of the pattern (seed 2, continuing across requests) in `pieces` writes 20 ms
// apart.
void request(int fd, std::uint32_t count, std::uint32_t pieces) {
  std::uint32_t req[2] = {htonl(count), htonl(pieces)};
  CHECK(writeAll(fd, req, sizeof req));
}

int fionread(int fd) {
  int n = -1;
  CHECK(::ioctl(fd, FIONREAD, &n) == 0);
  return n;
}

// Waits (bounded) until FIONREAD says `n`: the sidecar may put a message in the ring in parts.
bool waitFionread(int fd, int n) {
  for (int i = 0; i < 500; ++i) {
    if (fionread(fd) >= n) return fionread(fd) == n;
    pollfd p{fd, POLLIN, 0};
    ::poll(&p, 1, 10);
  }
  return false;
}

void pollinOneByOne(int fd, Checker& in, int count, std::uint32_t pieces, const char* how) {
  g_step = how;
  request(fd, static_cast<std::uint32_t>(count), pieces);
  for (int i = 0; i < count; ++i) {
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, 5000);
    CHECK(rc == 1 && (p.revents & POLLIN) != 0);
    if (rc != 1) return;
    unsigned char c = 0;
    ssize_t k = ::read(fd, &c, 1);  // a blocking fd has SO_RCVTIMEO: a hang shows as EAGAIN
    CHECK(k == 1);
    if (k != 1) return;
    in.take(&c, 1);
  }
  // All read: the fd must not poll readable any more.
  pollfd p{fd, POLLIN, 0};
  CHECK(::poll(&p, 1, 300) == 0);
  CHECK(fionread(fd) == 0);
}

void pollin() {
  for (bool nonblocking : {false, true}) {
    int fd = connectTo(nonblocking);
    setTimeout(fd, SO_RCVTIMEO, 3000);
    setTimeout(fd, SO_SNDTIMEO, 3000);
    Checker in{2};
    // Nothing sent yet: not readable, and a non-blocking read says EAGAIN.
    pollfd p{fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 200) == 0);
    if (nonblocking) {
      char c = 0;
      CHECK(::read(fd, &c, 1) == -1 && errno == EAGAIN);
    }
    pollinOneByOne(fd, in, 64, 1, nonblocking ? "pollin 1-by-1 nonblocking" : "pollin 1-by-1");
    // The same, the message arriving in pieces.
    pollinOneByOne(fd, in, 64, 8, "pollin 1-by-1, 8 pieces");

    // MSG_PEEK does not consume; FIONREAD counts the ring's bytes.
    g_step = "peek";
    request(fd, 100, 1);
    p = {fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 5000) == 1);
    CHECK(waitFionread(fd, 100));
    unsigned char buf[4096];
    unsigned char peeked[200];
    CHECK(::recv(fd, peeked, 10, MSG_PEEK) == 10);
    CHECK(firstMismatch(peeked, 10, in.received, 2) == 10);
    CHECK(::recv(fd, peeked, sizeof peeked, MSG_PEEK | MSG_DONTWAIT) == 100);
    CHECK(firstMismatch(peeked, 100, in.received, 2) == 100);
    CHECK(fionread(fd) == 100);
    p = {fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 0) == 1);  // still readable after peeking
    // readv across iovecs takes the 100 bytes in three parts.
    g_step = "readv";
    iovec v[3] = {{buf, 7}, {buf + 7, 13}, {buf + 20, 1000}};
    CHECK(::readv(fd, v, 3) == 100);
    CHECK(std::memcmp(buf, peeked, 100) == 0);
    in.take(buf, 100);
    CHECK(fionread(fd) == 0);
    p = {fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 300) == 0);

    // MSG_WAITALL waits for every byte of a message that comes in pieces.
    g_step = "waitall";
    if (!nonblocking) {
      request(fd, 3000, 6);
      CHECK(::recv(fd, buf, 3000, MSG_WAITALL) == 3000);
      in.take(buf, 3000);
      // recvmsg across iovecs, with MSG_WAITALL.
      request(fd, 2500, 5);
      iovec mv[4] = {{buf, 1}, {buf + 1, 999}, {buf + 1000, 500}, {buf + 1500, 1000}};
      msghdr m{};
      m.msg_iov = mv;
      m.msg_iovlen = 4;
      CHECK(::recvmsg(fd, &m, MSG_WAITALL) == 2500);
      in.take(buf, 2500);
      // A peek that has to wait for the bytes.
      g_step = "blocking peek";
      request(fd, 50, 1);
      CHECK(::recv(fd, peeked, 50, MSG_PEEK) > 0);
      p = {fd, POLLIN, 0};
      CHECK(::poll(&p, 1, 1000) == 1);  // the bytes peeked at are still there to read
      CHECK(waitFionread(fd, 50));
      CHECK(::recv(fd, buf, sizeof buf, 0) == 50);
      in.take(buf, 50);
    } else {
      // Non-blocking: MSG_WAITALL takes what is there.
      request(fd, 3000, 1);
      p = {fd, POLLIN, 0};
      CHECK(::poll(&p, 1, 5000) == 1);
      CHECK(waitFionread(fd, 3000));
      CHECK(::recv(fd, buf, 4000, MSG_WAITALL) == 3000);
      in.take(buf, 3000);
      CHECK(::recv(fd, buf, 1, MSG_PEEK) == -1 && errno == EAGAIN);
    }
    p = {fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 300) == 0);
    // recvmsg with MSG_DONTWAIT on nothing: EAGAIN, and no address or control data claimed.
    g_step = "recvmsg empty";
    iovec one{buf, 10};
    msghdr m{};
    m.msg_iov = &one;
    m.msg_iovlen = 1;
    CHECK(::recvmsg(fd, &m, MSG_DONTWAIT) == -1 && errno == EAGAIN);

    // Many small messages in pieces, read as they come with poll before each read: a read
    // after POLLIN must never block (SO_RCVTIMEO would make a hang an EAGAIN).
    g_step = "small messages";
    for (int round = 0; round < 200; ++round) {
      std::uint32_t count = 1 + static_cast<std::uint32_t>(round * 37 % 200);
      request(fd, count, 1 + static_cast<std::uint32_t>(round % 3));
      std::uint32_t got = 0;
      while (got < count) {
        p = {fd, POLLIN, 0};
        int rc = ::poll(&p, 1, 5000);
        CHECK(rc == 1);
        if (rc != 1) break;
        ssize_t k = ::read(fd, buf, sizeof buf);
        CHECK(k > 0);
        if (k <= 0) break;
        in.take(buf, static_cast<std::size_t>(k));
        got += static_cast<std::uint32_t>(k);
      }
      CHECK(got == count);
      if (g_failures > 0) break;
    }
    p = {fd, POLLIN, 0};
    CHECK(::poll(&p, 1, 200) == 0);
    ::close(fd);
    std::printf("pollin %s received %llu\n", nonblocking ? "nonblocking" : "blocking",
                static_cast<unsigned long long>(in.received));
  }
}

// ---- scenarios: half-close, peer close, reset -------------------------------------------------

// The server reads to our end of stream, then answers "got N\n" and 1 MiB of the pattern (seed
// 3), and closes.
void halfclose() {
  g_step = "halfclose";
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 10000);
  std::vector<unsigned char> buf(300000);
  fillPattern(buf.data(), buf.size(), 0, 1);
  CHECK(writeAll(fd, buf.data(), buf.size()));
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  // Our direction is shut: writing fails (EPIPE), reading goes on.
  CHECK(::send(fd, "x", 1, MSG_NOSIGNAL) == -1 && errno == EPIPE);
  std::string line = readLine(fd);
  CHECK(line == "got 300000 ok");
  Checker in{3};
  std::uint64_t total = 0;
  for (;;) {
    ssize_t k = ::read(fd, buf.data(), buf.size());
    if (k <= 0) {
      CHECK(k == 0);
      break;
    }
    in.take(buf.data(), static_cast<std::size_t>(k));
    total += static_cast<std::uint64_t>(k);
  }
  CHECK(total == 1 << 20);
  CHECK(::read(fd, buf.data(), 1) == 0);  // and again
  pollfd p{fd, POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0);
  ::close(fd);
  std::printf("halfclose received %llu\n", static_cast<unsigned long long>(total));
}

// The server sends 100 KiB and closes at once; we read late, all of it, then the end.
void peerclose() {
  g_step = "peerclose";
  for (bool nonblocking : {false, true}) {
    int fd = connectTo(nonblocking);
    setTimeout(fd, SO_RCVTIMEO, 10000);
    ::usleep(300000);
    std::vector<unsigned char> buf(8192);
    Checker in{3};
    for (;;) {
      pollfd p{fd, POLLIN, 0};
      CHECK(::poll(&p, 1, 5000) == 1);
      ssize_t k = ::read(fd, buf.data(), buf.size());
      if (k == 0) break;
      if (k < 0) {
        CHECK(k >= 0);
        break;
      }
      in.take(buf.data(), static_cast<std::size_t>(k));
    }
    CHECK(in.received == 100 * 1024);
    CHECK(::read(fd, buf.data(), 1) == 0);
    ::close(fd);
    std::printf("peerclose %s received %llu\n", nonblocking ? "nonblocking" : "blocking",
                static_cast<unsigned long long>(in.received));
  }
}

// The server resets the connection (SO_LINGER 0): ARG "after" (it sent "bye" and reset while
// we were not reading) or "during" (we are blocked in read() when the reset comes).
void reset(const char* when) {
  g_step = when;
  ::signal(SIGPIPE, SIG_IGN);
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 10000);
  char buf[64] = {};
  double start = nowMs();
  if (std::strcmp(when, "after") == 0) {
    CHECK(writeAll(fd, "hello", 5));
    ::usleep(500000);  // the server answered and reset meanwhile
    ssize_t k = ::read(fd, buf, sizeof buf);
    CHECK(k == 3 && std::memcmp(buf, "bye", 3) == 0);
  }
  errno = 0;
  ssize_t k = ::read(fd, buf, sizeof buf);
  int read_errno = errno;
  double read_ms = nowMs() - start;
  // Stage 2 passes the reset on as TCP does: ECONNRESET (stage 1's Unix socket says 0).
  CHECK(k == -1 && read_errno == ECONNRESET);
  errno = 0;
  ssize_t w = ::send(fd, "x", 1, MSG_NOSIGNAL);
  int write_errno = errno;
  CHECK(w == -1 && write_errno == EPIPE);
  // write() without MSG_NOSIGNAL: SIGPIPE (ignored here) and EPIPE.
  errno = 0;
  CHECK(::write(fd, "x", 1) == -1 && errno == EPIPE);
  ::close(fd);
  std::printf("reset %s read %zd %s write %zd %s read_ms %.0f\n", when, k,
              read_errno ? std::strerror(read_errno) : "-", w,
              write_errno ? std::strerror(write_errno) : "-", read_ms);
}

// ---- scenarios: timeouts ---------------------------------------------------------------------

// The server (the request server) sends nothing unless asked.
void rcvtimeo() {
  g_step = "rcvtimeo set after connect";
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 300);
  char buf[16];
  double t0 = nowMs();
  CHECK(::read(fd, buf, sizeof buf) == -1 && errno == EAGAIN);
  double after = nowMs() - t0;
  CHECK(after >= 250 && after < 2000);
  t0 = nowMs();
  CHECK(::recv(fd, buf, sizeof buf, MSG_WAITALL) == -1 && errno == EAGAIN);
  double waitall = nowMs() - t0;
  CHECK(waitall >= 250 && waitall < 2000);
  // The connection still works after a timeout.
  request(fd, 10, 1);
  setTimeout(fd, SO_RCVTIMEO, 5000);
  Checker in{2};
  unsigned char got[10];
  CHECK(readFull(fd, got, 10));
  in.take(got, 10);
  ::close(fd);

  g_step = "rcvtimeo set before connect";
  int before = shmMappings();
  fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  setTimeout(fd, SO_RCVTIMEO, 300);
  sockaddr_in dst = destination();
  CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst) == 0);
  CHECK(shmMappings() == before + 1);
  t0 = nowMs();
  CHECK(::read(fd, buf, sizeof buf) == -1 && errno == EAGAIN);
  double carried = nowMs() - t0;
  CHECK(carried >= 250 && carried < 2000);
  ::close(fd);
  std::printf("rcvtimeo after_connect_ms %.0f waitall_ms %.0f before_connect_ms %.0f\n", after,
              waitall, carried);
}

// The server stalls (does not read) for a few seconds. A blocking write larger than everything
// in between returns a partial count after about SO_SNDTIMEO; the next one EAGAIN after about
// as long. Then the server reads and checks everything, and answers "bytes first-bad-offset".
void sndtimeo() {
  g_step = "sndtimeo";
  const std::size_t big = 256u << 20;
  std::vector<unsigned char> buf(big);
  fillPattern(buf.data(), big, 0, 1);  // before connecting: the server's stall starts then
  int fd = connectTo(false);
  setTimeout(fd, SO_SNDTIMEO, 300);
  double t0 = nowMs();
  ssize_t k = ::write(fd, buf.data(), big);
  double first_ms = nowMs() - t0;
  CHECK(k > 0 && static_cast<std::size_t>(k) < big);
  CHECK(first_ms >= 250 && first_ms < 3000);
  std::uint64_t sent = k > 0 ? static_cast<std::uint64_t>(k) : 0;
  t0 = nowMs();
  errno = 0;
  ssize_t k2 = ::write(fd, buf.data() + sent, 4096);
  double second_ms = nowMs() - t0;
  CHECK(k2 == -1 && errno == EAGAIN);
  CHECK(second_ms >= 250 && second_ms < 2000);
  // The rest goes once the server reads (a long timeout now).
  g_step = "sndtimeo rest";
  setTimeout(fd, SO_SNDTIMEO, 20000);
  std::uint64_t total = sent + (8u << 20);
  CHECK(total <= big);
  if (total > big) return;
  CHECK(writeAll(fd, buf.data() + sent, static_cast<std::size_t>(total - sent)));
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  setTimeout(fd, SO_RCVTIMEO, 20000);
  std::string answer = readLine(fd);
  std::string want = std::to_string(total) + " -1";
  CHECK(answer == want);
  if (answer != want) std::printf("server answered '%s'\n", answer.c_str());
  ::close(fd);
  std::printf("sndtimeo partial %zd first_ms %.0f second_ms %.0f total %llu\n", k, first_ms,
              second_ms, static_cast<unsigned long long>(total));
}

// ---- scenarios: threads and fork ---------------------------------------------------------------

// Two writer threads on one fd, each with its own stream told apart by the top bit of every
// byte (thread 0: 0xxxxxxx, thread 1: 1xxxxxxx). The echo is split back by that bit: each
// stream must come back whole and in order, whatever the interleaving. With `readers` == 1 the
// reader checks every byte; with 2, two threads read the same fd and the bytes are counted
// and summed per stream (the order across readers is unknown).
unsigned char streamByte(int t, std::uint64_t pos) {
  return static_cast<unsigned char>((patternByte(pos, 10 + static_cast<std::uint32_t>(t)) & 0x7f) |
                                    (t << 7));
}

void threadsOnce(std::uint64_t per_thread, int readers) {
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 20000);
  setTimeout(fd, SO_SNDTIMEO, 20000);
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; ++t) {
    writers.emplace_back([fd, t, per_thread] {
      std::vector<unsigned char> buf(1 << 18);
      std::uint64_t sent = 0;
      for (std::size_t i = static_cast<std::size_t>(t); sent < per_thread; ++i) {
        std::size_t n = kWriteSizes[i % std::size(kWriteSizes)];
        if (n > buf.size()) n = buf.size();
        if (n > per_thread - sent) n = static_cast<std::size_t>(per_thread - sent);
        for (std::size_t j = 0; j < n; ++j)
          buf[j] = streamByte(t, sent + j);
        ssize_t k = i % 2 ? ::write(fd, buf.data(), n) : ::send(fd, buf.data(), n, MSG_NOSIGNAL);
        if (k <= 0) {
          CHECK(k > 0);
          return;
        }
        sent += static_cast<std::uint64_t>(k);
      }
    });
  }
  std::atomic<std::uint64_t> count[2] = {0, 0};
  std::atomic<std::uint64_t> sum[2] = {0, 0};
  std::atomic<bool> bad{false};
  auto reader = [&](bool exact) {
    std::vector<unsigned char> buf(1 << 16);
    std::uint64_t pos[2] = {0, 0};
    std::uint64_t c[2] = {0, 0}, s[2] = {0, 0};
    for (;;) {
      ssize_t k = ::read(fd, buf.data(), buf.size());
      if (k == 0) break;
      if (k < 0) {
        CHECK(k >= 0);
        break;
      }
      for (ssize_t j = 0; j < k; ++j) {
        unsigned char b = buf[static_cast<std::size_t>(j)];
        int t = b >> 7;
        ++c[t];
        s[t] += b;
        if (exact && !bad && b != streamByte(t, pos[t])) {
          std::printf("FAIL: stream %d byte %llu is wrong\n", t,
                      static_cast<unsigned long long>(pos[t]));
          g_failures.fetch_add(1);
          bad = true;
        }
        ++pos[t];
      }
    }
    for (int t = 0; t < 2; ++t) {
      count[t] += c[t];
      sum[t] += s[t];
    }
  };
  std::vector<std::thread> rs;
  for (int r = 0; r < readers; ++r)
    rs.emplace_back(reader, readers == 1);
  for (auto& w : writers)
    w.join();
  CHECK(::shutdown(fd, SHUT_WR) == 0);  // the echo server half-closes after echoing all
  for (auto& r : rs)
    r.join();
  for (int t = 0; t < 2; ++t) {
    std::uint64_t want_sum = 0;
    for (std::uint64_t p = 0; p < per_thread; ++p)
      want_sum += streamByte(t, p);
    CHECK(count[t] == per_thread);
    CHECK(sum[t] == want_sum);
  }
  ::close(fd);
  std::printf("threads readers %d stream0 %llu stream1 %llu\n", readers,
              static_cast<unsigned long long>(count[0].load()),
              static_cast<unsigned long long>(count[1].load()));
}

void threads(std::uint64_t per_thread) {
  g_step = "threads, one reader";
  threadsOnce(per_thread, 1);
  g_step = "threads, two readers";
  threadsOnce(per_thread, 2);
}

// fork() after connect: the child writes the stream and half-closes, the parent reads the echo.
void forked(std::uint64_t total) {
  g_step = "fork";
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 20000);
  setTimeout(fd, SO_SNDTIMEO, 20000);
  pid_t child = ::fork();
  if (child == 0) {
    g_step = "fork child";
    std::vector<unsigned char> buf(1 << 20);
    std::uint64_t sent = 0;
    for (std::size_t i = 0; sent < total; ++i) {
      std::size_t n = kWriteSizes[i % std::size(kWriteSizes)];
      if (n > total - sent) n = static_cast<std::size_t>(total - sent);
      fillPattern(buf.data(), n, sent, 1);
      if (!writeAll(fd, buf.data(), n)) {
        CHECK(!"child write failed");
        ::_exit(1);
      }
      sent += n;
    }
    CHECK(::shutdown(fd, SHUT_WR) == 0);
    ::_exit(g_failures == 0 ? 0 : 1);
  }
  std::vector<unsigned char> buf(1 << 16);
  Checker in{1};
  for (;;) {
    ssize_t k = ::read(fd, buf.data(), buf.size());
    if (k == 0) break;
    if (k < 0) {
      CHECK(k >= 0);
      break;
    }
    in.take(buf.data(), static_cast<std::size_t>(k));
  }
  int status = -1;
  CHECK(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(in.received == total);
  ::close(fd);
  std::printf("fork received %llu\n", static_cast<unsigned long long>(in.received));
}

// ---- scenario: close_range, closefrom, close of the hidden fd -----------------------------------

// Sends `n` bytes of the pattern and reads the echo back (blocking, one connection).
bool echoRound(int fd, std::size_t n, std::uint64_t& pos) {
  std::vector<unsigned char> buf(n);
  fillPattern(buf.data(), n, pos, 1);
  std::thread w([&] { CHECK(writeAll(fd, buf.data(), n)); });
  std::vector<unsigned char> got(n);
  bool ok = readFull(fd, got.data(), n);
  w.join();
  CHECK(ok);
  std::size_t at = firstMismatch(got.data(), n, pos, 1);
  CHECK(at == n);
  pos += n;
  return ok && at == n;
}

void closeRange() {
  g_step = "close_range";
  std::vector<int> before = eventfds();
  int fd = connectTo(false);
  setTimeout(fd, SO_RCVTIMEO, 10000);
  setTimeout(fd, SO_SNDTIMEO, 10000);
  std::vector<int> after = eventfds();
  CHECK(after.size() == before.size() + 1);
  int hidden = -1;
  for (int e : after) {
    bool old = false;
    for (int b : before)
      old = old || b == e;
    if (!old) hidden = e;
  }
  CHECK(hidden > fd);  // so the calls below would close it
  std::uint64_t pos = 0;
  CHECK(echoRound(fd, 1 << 20, pos));
  CHECK(::close_range(static_cast<unsigned>(fd) + 1, ~0U, 0) == 0);
  CHECK(::fcntl(hidden, F_GETFD) >= 0);  // still open
  CHECK(echoRound(fd, 4 << 20, pos));
  g_step = "closefrom";
  ::closefrom(fd + 1);
  CHECK(::fcntl(hidden, F_GETFD) >= 0);
  CHECK(echoRound(fd, 4 << 20, pos));
  g_step = "close hidden";
  CHECK(::close(hidden) == 0);
  CHECK(::fcntl(hidden, F_GETFD) >= 0);
  CHECK(echoRound(fd, 4 << 20, pos));
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  char c;
  CHECK(::read(fd, &c, 1) == 0);
  ::close(fd);
  CHECK(::fcntl(hidden, F_GETFD) == -1 && errno == EBADF);  // it went with the connection
  std::printf("close_range echoed %llu\n", static_cast<unsigned long long>(pos));
}

// ---- scenarios: fallbacks ----------------------------------------------------------------------

// ARG: "noshm" (the sidecar answers 'U': no connection gets shared memory) or "nocloexec" (an
// fd without FD_CLOEXEC does not ask; one with it, made after, does).
void fallback(const char* what) {
  g_step = what;
  bool noshm = std::strcmp(what, "noshm") == 0;
  int fd = connectTo(false, 0, /*cloexec=*/noshm);
  setTimeout(fd, SO_RCVTIMEO, 10000);
  setTimeout(fd, SO_SNDTIMEO, 10000);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) == (noshm ? FD_CLOEXEC : 0));
  std::uint64_t pos = 0;
  CHECK(echoRound(fd, 4 << 20, pos));
  CHECK(::shutdown(fd, SHUT_WR) == 0);
  char c;
  CHECK(::read(fd, &c, 1) == 0);
  ::close(fd);
  if (!noshm) {
    int with = connectTo(false, 1, true);
    setTimeout(with, SO_RCVTIMEO, 10000);
    std::uint64_t p2 = 0;
    CHECK(echoRound(with, 1 << 20, p2));
    ::close(with);
  }
  std::printf("fallback %s echoed %llu\n", what, static_cast<unsigned long long>(pos));
}

// ARG connections at once, each echoing; prints how many had shared memory.
void limit(int n) {
  g_step = "limit";
  std::vector<int> fds;
  int before = shmMappings();
  for (int i = 0; i < n; ++i) {
    fds.push_back(connectTo(false, -1));
    setTimeout(fds.back(), SO_RCVTIMEO, 10000);
  }
  int with_shm = shmMappings() - before;
  for (int fd : fds) {
    std::uint64_t pos = 0;
    CHECK(echoRound(fd, 1 << 20, pos));
  }
  for (int fd : fds)
    ::close(fd);
  CHECK(shmMappings() == before);
  std::printf("limit connections %d shm %d\n", n, with_shm);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s SCENARIO DST_IP PORT [ARG...]\n", argv[0]);
    return 2;
  }
  std::string s = argv[1];
  g_ip = argv[2];
  g_port = static_cast<std::uint16_t>(std::atoi(argv[3]));
  const char* arg = argc > 4 ? argv[4] : "";
  const char* arg2 = argc > 5 ? argv[5] : "";
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  ::signal(SIGALRM, onAlarm);
  ::alarm(90);
  if (s == "bulk") {
    bulk(arg, std::strtoull(arg2, nullptr, 10));
  } else if (s == "pollout") {
    pollout(std::strtoull(arg, nullptr, 10));
  } else if (s == "pollin") {
    pollin();
  } else if (s == "halfclose") {
    halfclose();
  } else if (s == "peerclose") {
    peerclose();
  } else if (s == "reset") {
    reset(arg);
  } else if (s == "rcvtimeo") {
    rcvtimeo();
  } else if (s == "sndtimeo") {
    sndtimeo();
  } else if (s == "threads") {
    threads(std::strtoull(arg, nullptr, 10));
  } else if (s == "fork") {
    forked(std::strtoull(arg, nullptr, 10));
  } else if (s == "close-range") {
    closeRange();
  } else if (s == "fallback") {
    fallback(arg);
  } else if (s == "limit") {
    limit(std::atoi(arg));
  } else {
    std::printf("FAIL: unknown scenario %s\n", s.c_str());
    return 2;
  }
  return g_failures == 0 ? 0 : 1;
}
