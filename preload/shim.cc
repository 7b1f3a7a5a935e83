// libdmm-preload.so: routes an application's outgoing TCP connections through the local
// sidecar's Unix socket, without iptables. See preload/README.md for the design and
// docs/preload.md for how to use it.
//
// Every exported function is an interposer: it resolves the real libc function once
// (dlsym(RTLD_NEXT)), does its bit of bookkeeping in the fd table, and otherwise behaves
// exactly like the function it replaces. Nothing here throws (no exception may cross into a C
// program), nothing on the connect path allocates, and nothing is printed unless
// DMM_PRELOAD_DEBUG asks for it.

#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "preload/dmm_preload.h"
#include "preload/fd_table.h"
#include "preload/preamble.h"
#include "preload/shim_config.h"
#include "preload/shim_shm.h"

#define DMM_EXPORT extern "C" __attribute__((visibility("default")))

namespace dmm::preload {
namespace {

// ---- the real functions ------------------------------------------------------------------------

struct RealFunctions {
  int (*connect)(int, const sockaddr*, socklen_t);
  int (*close)(int);
  int (*dup)(int);
  int (*dup2)(int, int);
  int (*dup3)(int, int, int);
  int (*fcntl)(int, int, ...);
  int (*fcntl64)(int, int, ...);
  int (*socket)(int, int, int);
  int (*getpeername)(int, sockaddr*, socklen_t*);
  int (*getsockname)(int, sockaddr*, socklen_t*);
  int (*setsockopt)(int, int, int, const void*, socklen_t);
  int (*getsockopt)(int, int, int, void*, socklen_t*);
  int (*epoll_ctl)(int, int, int, epoll_event*);
  int (*close_range)(unsigned, unsigned, int);
  void (*closefrom)(int);
  ssize_t (*read)(int, void*, size_t);
  ssize_t (*write)(int, const void*, size_t);
  ssize_t (*readv)(int, const iovec*, int);
  ssize_t (*writev)(int, const iovec*, int);
  ssize_t (*recv)(int, void*, size_t, int);
  ssize_t (*send)(int, const void*, size_t, int);
  ssize_t (*recvfrom)(int, void*, size_t, int, sockaddr*, socklen_t*);
  ssize_t (*sendto)(int, const void*, size_t, int, const sockaddr*, socklen_t);
  ssize_t (*recvmsg)(int, msghdr*, int);
  ssize_t (*sendmsg)(int, const msghdr*, int);
  ssize_t (*sendfile)(int, int, off_t*, size_t);
  ssize_t (*splice)(int, loff_t*, int, loff_t*, size_t, unsigned);
  int (*fclose)(FILE*);
  int (*shutdown)(int, int);
};

// Raw system calls: what real() gives while the real functions are being resolved (dlsym may
// call back into an interposed function on the same thread) and for any symbol dlsym lacks.
namespace raw {
int connect(int fd, const sockaddr* a, socklen_t l) {
  return static_cast<int>(::syscall(SYS_connect, fd, a, l));
}
int close(int fd) {
  return static_cast<int>(::syscall(SYS_close, fd));
}
int dup(int fd) {
  return static_cast<int>(::syscall(SYS_dup, fd));
}
int dup2(int from, int to) {
  if (from == to) return static_cast<int>(::syscall(SYS_fcntl, from, F_GETFD)) < 0 ? -1 : to;
  return static_cast<int>(::syscall(SYS_dup3, from, to, 0));
}
int dup3(int from, int to, int flags) {
  return static_cast<int>(::syscall(SYS_dup3, from, to, flags));
}
int fcntl(int fd, int cmd, ...) {
  std::va_list ap;
  va_start(ap, cmd);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  return static_cast<int>(::syscall(SYS_fcntl, fd, cmd, arg));
}
int socket(int d, int t, int p) {
  return static_cast<int>(::syscall(SYS_socket, d, t, p));
}
int getpeername(int fd, sockaddr* a, socklen_t* l) {
  return static_cast<int>(::syscall(SYS_getpeername, fd, a, l));
}
int getsockname(int fd, sockaddr* a, socklen_t* l) {
  return static_cast<int>(::syscall(SYS_getsockname, fd, a, l));
}
int setsockopt(int fd, int level, int name, const void* v, socklen_t l) {
  return static_cast<int>(::syscall(SYS_setsockopt, fd, level, name, v, l));
}
int getsockopt(int fd, int level, int name, void* v, socklen_t* l) {
  return static_cast<int>(::syscall(SYS_getsockopt, fd, level, name, v, l));
}
int epoll_ctl(int epfd, int op, int fd, epoll_event* ev) {
  return static_cast<int>(::syscall(SYS_epoll_ctl, epfd, op, fd, ev));
}
int close_range(unsigned first, unsigned last, int flags) {
  return static_cast<int>(::syscall(SYS_close_range, first, last, flags));
}
void closefrom(int low) {
  ::syscall(SYS_close_range, static_cast<unsigned>(low), ~0u, 0);
}
ssize_t read(int fd, void* b, size_t n) {
  return ::syscall(SYS_read, fd, b, n);
}
ssize_t write(int fd, const void* b, size_t n) {
  return ::syscall(SYS_write, fd, b, n);
}
ssize_t readv(int fd, const iovec* v, int n) {
  return ::syscall(SYS_readv, fd, v, n);
}
ssize_t writev(int fd, const iovec* v, int n) {
  return ::syscall(SYS_writev, fd, v, n);
}
ssize_t recvfrom(int fd, void* b, size_t n, int f, sockaddr* a, socklen_t* l) {
  return ::syscall(SYS_recvfrom, fd, b, n, f, a, l);
}
ssize_t sendto(int fd, const void* b, size_t n, int f, const sockaddr* a, socklen_t l) {
  return ::syscall(SYS_sendto, fd, b, n, f, a, l);
}
ssize_t recv(int fd, void* b, size_t n, int f) {
  return recvfrom(fd, b, n, f, nullptr, nullptr);
}
ssize_t send(int fd, const void* b, size_t n, int f) {
  return sendto(fd, b, n, f, nullptr, 0);
}
ssize_t recvmsg(int fd, msghdr* m, int f) {
  return ::syscall(SYS_recvmsg, fd, m, f);
}
ssize_t sendmsg(int fd, const msghdr* m, int f) {
  return ::syscall(SYS_sendmsg, fd, m, f);
}
ssize_t sendfile(int out, int in, off_t* off, size_t n) {
  return ::syscall(SYS_sendfile, out, in, off, n);
}
ssize_t splice(int in, loff_t* oin, int out, loff_t* oout, size_t n, unsigned f) {
  return ::syscall(SYS_splice, in, oin, out, oout, n, f);
}
int fclose(FILE*) {
  errno = ENOSYS;  // only while resolving: no stdio stream is closed from inside dlsym
  return EOF;
}
int shutdown(int fd, int how) {
  return static_cast<int>(::syscall(SYS_shutdown, fd, how));
}
}  // namespace raw

constexpr RealFunctions kRawFunctions = {
    raw::connect,    raw::close,      raw::dup,       raw::dup2,        raw::dup3,
    raw::fcntl,      raw::fcntl,      raw::socket,    raw::getpeername, raw::getsockname,
    raw::setsockopt, raw::getsockopt, raw::epoll_ctl, raw::close_range, raw::closefrom,
    raw::read,       raw::write,      raw::readv,     raw::writev,      raw::recv,
    raw::send,       raw::recvfrom,   raw::sendto,    raw::recvmsg,     raw::sendmsg,
    raw::sendfile,   raw::splice,     raw::fclose,    raw::shutdown};

// constinit: no dynamic initialiser may run after our constructor and undo its work.
constinit RealFunctions g_real = kRawFunctions;
constinit std::atomic<bool> g_resolved{false};
pthread_once_t g_real_once = PTHREAD_ONCE_INIT;
thread_local bool t_resolving = false;

template <typename Fn>
void resolve(Fn& slot, const char* name) {
  // dlsym returns void*; what RTLD_NEXT finds under a libc function's name is that function.
  if (void* f = ::dlsym(RTLD_NEXT, name)) slot = reinterpret_cast<Fn>(f);
}

void resolveReal() {
  RealFunctions r = kRawFunctions;
  resolve(r.connect, "connect");
  resolve(r.close, "close");
  resolve(r.dup, "dup");
  resolve(r.dup2, "dup2");
  resolve(r.dup3, "dup3");
  resolve(r.fcntl, "fcntl");
  r.fcntl64 = r.fcntl;  // glibc before 2.28 has no fcntl64
  resolve(r.fcntl64, "fcntl64");
  resolve(r.socket, "socket");
  resolve(r.getpeername, "getpeername");
  resolve(r.getsockname, "getsockname");
  resolve(r.setsockopt, "setsockopt");
  resolve(r.getsockopt, "getsockopt");
  resolve(r.epoll_ctl, "epoll_ctl");
  resolve(r.close_range, "close_range");
  resolve(r.closefrom, "closefrom");
  resolve(r.read, "read");
  resolve(r.write, "write");
  resolve(r.readv, "readv");
  resolve(r.writev, "writev");
  resolve(r.recv, "recv");
  resolve(r.send, "send");
  resolve(r.recvfrom, "recvfrom");
  resolve(r.sendto, "sendto");
  resolve(r.recvmsg, "recvmsg");
  resolve(r.sendmsg, "sendmsg");
  resolve(r.sendfile, "sendfile");
  resolve(r.splice, "splice");
  resolve(r.fclose, "fclose");
  resolve(r.shutdown, "shutdown");
  fdTable().init();
  fdTable().setShmHooks({shmRetain, shmRelease});
  g_real = r;
  g_resolved.store(true, std::memory_order_release);
}

const RealFunctions& real() {
  if (g_resolved.load(std::memory_order_acquire)) [[likely]]
    return g_real;
  if (t_resolving) return kRawFunctions;  // called back from inside dlsym on this thread
  t_resolving = true;
  int saved = errno;
  ::pthread_once(&g_real_once, resolveReal);
  errno = saved;
  t_resolving = false;
  return g_real;
}

// ---- configuration and logging -----------------------------------------------------------------

struct Shim {
  ShimConfig config;
};

constinit Shim g_shim;
pthread_once_t g_shim_once = PTHREAD_ONCE_INIT;
constinit std::atomic<bool> g_debug{false};
constinit std::atomic<bool> g_disabled{false};

void debugLog(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void debugLog(const char* fmt, ...) {
  if (!g_debug.load(std::memory_order_relaxed)) return;
  char buf[512];
  int n = std::snprintf(buf, sizeof(buf), "dmm-preload[%d]: ", static_cast<int>(::getpid()));
  if (n < 0) return;
  std::va_list ap;
  va_start(ap, fmt);
  int m = std::vsnprintf(buf + n, sizeof(buf) - static_cast<std::size_t>(n) - 1, fmt, ap);
  va_end(ap);
  if (m < 0) return;
  std::size_t len = static_cast<std::size_t>(n) + static_cast<std::size_t>(m);
  if (len > sizeof(buf) - 2) len = sizeof(buf) - 2;
  buf[len++] = '\n';
  int saved = errno;
  ssize_t ignored = real().write(STDERR_FILENO, buf, len);
  (void)ignored;
  errno = saved;
}

bool processIsSidecar() {
  // The daemon never loads the shim, but an LD_PRELOAD left in a service's environment would
  // make it capture its own tunnel connections: a loop. Its name gives it away.
  char comm[32] = {};
  int fd = ::open("/proc/self/comm", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = real().read(fd, comm, sizeof(comm) - 1);
  real().close(fd);
  if (n <= 0) return false;
  std::string_view name(comm, static_cast<std::size_t>(n));
  if (name.back() == '\n') name.remove_suffix(1);
  return name == "dmm-sidecar";
}

void loadShim() {
  int saved = errno;
  std::vector<std::string> warnings;
  try {
    g_shim.config =
        loadConfig([](const char* n) -> const char* { return std::getenv(n); }, warnings);
  } catch (...) {
    // Out of memory while reading a config file: the defaults, and nothing thrown into a C
    // program.
    g_shim.config = ShimConfig{};
    warnings.clear();
  }
  g_debug.store(g_shim.config.debug, std::memory_order_relaxed);
  for (const auto& w : warnings)
    debugLog("config: %s", w.c_str());
  if (processIsSidecar()) {
    g_disabled.store(true, std::memory_order_relaxed);
    debugLog("this process is dmm-sidecar: nothing is captured");
  }
  debugLog("socket %s, fallback %s, qos '%s', %zu include and %zu exclude prefixes",
           g_shim.config.socket_path,
           g_shim.config.fallback == Fallback::kDirect ? "direct" : "refuse", g_shim.config.qos,
           g_shim.config.include.size, g_shim.config.exclude.size);
  errno = saved;
}

const ShimConfig& config() {
  real();
  ::pthread_once(&g_shim_once, loadShim);
  return g_shim.config;
}

void atforkChild() {
  fdTable().resetLocksAfterFork();
}

__attribute__((constructor)) void shimInit() {
  real();
  ::pthread_atfork(nullptr, nullptr, atforkChild);
  // The configuration is read now, while the environment is the one the program was started
  // with: some programs replace it before they connect (nginx's workers keep only TZ unless
  // told otherwise), and a shim reading it at the first connect() would find nothing.
  config();
}

// ---- helpers -------------------------------------------------------------------------------

// Whether the captured entry of fd still describes the socket fd refers to.
bool sameSocket(int fd, const FdData& d) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return false;
  return st.st_dev == d.dev && st.st_ino == d.ino;
}

// The captured entry of fd, or nothing (a stale one is dropped on the way).
bool capturedData(int fd, FdData& out) {
  FdEntry* e = fdTable().find(fd);
  if (e == nullptr || e->state() != FdState::kCaptured) return false;
  out = e->read();
  if (out.state != FdState::kCaptured) return false;
  if (!sameSocket(fd, out)) {
    e->clear();
    return false;
  }
  return true;
}

void copyOut(const void* from, socklen_t size, sockaddr* to, socklen_t* to_size) {
  // As the kernel does: truncate to the caller's buffer, report the full size.
  socklen_t n = *to_size < size ? *to_size : size;
  if (to != nullptr && n > 0) std::memcpy(to, from, n);
  *to_size = size;
}

bool toEndpoint(const sockaddr* addr, socklen_t size, Endpoint& ep, Address& filter_address) {
  if (addr == nullptr || size < sizeof(sa_family_t)) return false;
  if (addr->sa_family == AF_INET && size >= sizeof(sockaddr_in)) {
    sockaddr_in in{};
    std::memcpy(&in, addr, sizeof(in));
    ep.family = AF_INET;
    std::memcpy(ep.address, &in.sin_addr, 4);
    ep.port = ntohs(in.sin_port);
  } else if (addr->sa_family == AF_INET6 && size >= sizeof(sockaddr_in6)) {
    sockaddr_in6 in6{};
    std::memcpy(&in6, addr, sizeof(in6));
    if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
      // A dual-stack socket dialling IPv4: the sidecar dials the IPv4 address.
      ep.family = AF_INET;
      std::memcpy(ep.address, in6.sin6_addr.s6_addr + 12, 4);
    } else {
      ep.family = AF_INET6;
      std::memcpy(ep.address, in6.sin6_addr.s6_addr, 16);
    }
    ep.port = ntohs(in6.sin6_port);
  } else {
    return false;
  }
  filter_address.family = ep.family;
  std::memcpy(filter_address.bytes, ep.address, 16);
  return ep.port != 0;
}

int intOption(int fd, int level, int name) {
  int v = 0;
  socklen_t len = sizeof(v);
  if (real().getsockopt(fd, level, name, &v, &len) != 0) return -1;
  return v;
}

bool writeAllTo(int fd, const std::uint8_t* data, std::size_t size) {
  while (size > 0) {
    ssize_t n = real().send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// Connects a new Unix socket to the sidecar and writes the preamble. Returns the socket, or -1
// with errno set (ENOENT, ECONNREFUSED, EAGAIN for a full backlog or the time bound, ...).
// With `shm` set (non-null), asks for shared memory and waits for the answer: *shm is the
// channel, or null when the sidecar keeps the stream on the socket.
int openSidecar(const ShimConfig& cfg, const Endpoint& dst, const char* qos, ShmChannel** shm) {
  const RealFunctions& r = real();
  int u = r.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (u < 0) return -1;
  auto fail = [&r, u] {
    int saved = errno;
    r.close(u);
    errno = saved;
    return -1;
  };
  // A blocking connect to a Unix socket waits while the listener's backlog is full: bounded
  // by SO_SNDTIMEO, which the kernel applies to it, so the application never hangs here.
  timeval tv{};
  tv.tv_sec = cfg.timeout_ms / 1000;
  tv.tv_usec = (cfg.timeout_ms % 1000) * 1000;
  r.setsockopt(u, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, cfg.socket_path, sizeof(sun.sun_path));
  int rc = 0;
  do {
    rc = r.connect(u, reinterpret_cast<const sockaddr*>(&sun), sizeof(sun));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return fail();
  ucred cred{};
  socklen_t cred_len = sizeof(cred);
  if (r.getsockopt(u, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) == 0 && cred.pid == ::getpid()) {
    // The socket is our own: this process is the sidecar. Never capture here again.
    g_disabled.store(true, std::memory_order_relaxed);
    debugLog("%s is this process's own socket: nothing is captured", cfg.socket_path);
    errno = ECONNREFUSED;
    return fail();
  }
  Preamble p;
  p.destination = dst;
  p.qos = qos;  // at most 10 bytes: the small-string buffer, no allocation
  p.shm = shm != nullptr;
  std::uint8_t buf[kMaxPreambleBytes];
  std::size_t n = encodePreamble(p, std::span<std::uint8_t>(buf));
  if (n == 0) {
    errno = EINVAL;
    return fail();
  }
  // Fresh socket, empty buffer: this completes at once unless the sidecar is wedged, and the
  // time bound covers that. The socket is blocking here whatever the application's is, so
  // nothing of the preamble can be lost to a full buffer.
  if (!writeAllTo(u, buf, n)) return fail();
  if (shm != nullptr) {
    // The answer comes before anything else the sidecar sends; bounded like the rest.
    r.setsockopt(u, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    *shm = nullptr;
    ShmReply reply = receiveShmReply(u, shm);
    if (reply == ShmReply::kFailed) return fail();
    if (reply == ShmReply::kShm) {
      // Writability is the socket's: the smallest send buffer makes a few filler bytes enough
      // to stop it polling writable while the ring is full (shm_ring.h).
      int one = 1;
      r.setsockopt(u, SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
    }
  }
  return u;
}

void formatEndpoint(const Endpoint& ep, char* out, std::size_t size) {
  char ip[INET6_ADDRSTRLEN] = "?";
  ::inet_ntop(ep.family, ep.address, ip, sizeof(ip));
  std::snprintf(out, size, ep.family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip,
                static_cast<unsigned>(ep.port));
}

// The options a captured fd answers from the table; their values on the TCP socket are carried
// over at capture, so that what the application set before connect() reads back the same.
constexpr struct {
  int level;
  int name;
} kCarriedOptions[] = {{IPPROTO_TCP, TCP_NODELAY},  {SOL_SOCKET, SO_KEEPALIVE},
                       {IPPROTO_TCP, TCP_KEEPIDLE}, {IPPROTO_TCP, TCP_KEEPINTVL},
                       {IPPROTO_TCP, TCP_KEEPCNT},  {IPPROTO_TCP, TCP_USER_TIMEOUT}};

bool answeredFromTable(int level, int name) {
  return level == IPPROTO_TCP || level == IPPROTO_IP || level == IPPROTO_IPV6 ||
         (level == SOL_SOCKET && name == SO_KEEPALIVE);
}

// The buffer sizes of a shared-memory fd: its socket's send buffer must stay the smallest
// (shm_ring.h), and the rings are the buffers anyway.
bool answeredForShm(int fd, int level, int name) {
  if (level != SOL_SOCKET ||
      (name != SO_SNDBUF && name != SO_RCVBUF && name != SO_SNDBUFFORCE && name != SO_RCVBUFFORCE))
    return false;
  FdEntry* e = fdTable().find(fd);
  return e != nullptr && e->shm() != nullptr;
}

// `shm` (may be null): the connection's shared-memory channel; its reference goes to the entry
// on success and stays the caller's on failure.
int replaceAndPublish(int fd, int u, const sockaddr* addr, socklen_t addr_len, FdData data,
                      ShmChannel* shm) {
  const RealFunctions& r = real();
  int fl = r.fcntl(fd, F_GETFL);
  int fdfl = r.fcntl(fd, F_GETFD);
  if (fl < 0 || fdfl < 0) return -1;
  // What the application set on the TCP socket that the Unix socket honours too.
  for (int opt : {SO_SNDTIMEO, SO_RCVTIMEO}) {
    timeval tv{};
    socklen_t len = sizeof(tv);
    if (r.getsockopt(fd, SOL_SOCKET, opt, &tv, &len) == 0) {
      r.setsockopt(u, SOL_SOCKET, opt, &tv, sizeof(tv));
    }
  }
  for (const auto& o : kCarriedOptions) {
    int v = intOption(fd, o.level, o.name);
    if (v >= 0) data.storeOption(o.level, o.name, &v, sizeof(v));
  }
  data.local_size = sizeof(data.local);
  if (r.getsockname(fd, reinterpret_cast<sockaddr*>(&data.local), &data.local_size) != 0) {
    data.local = {};
    data.local.ss_family = addr->sa_family;
    data.local_size = addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  }
  data.peer = {};
  std::memcpy(&data.peer, addr, addr_len < sizeof(data.peer) ? addr_len : sizeof(data.peer));
  data.peer_size = addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  if ((fl & O_NONBLOCK) != 0 && r.fcntl(u, F_SETFL, O_NONBLOCK) != 0) return -1;
  struct stat st {};
  if (::fstat(u, &st) != 0) return -1;
  data.dev = st.st_dev;
  data.ino = st.st_ino;
  data.state = FdState::kCaptured;
  data.epoll_count = 0;
  // The atomic swap: the application's fd number now refers to the Unix socket, and the TCP
  // socket (never connected) is closed by the kernel. Its FD_CLOEXEC is kept; O_NONBLOCK came
  // with the open file above.
  int rc = 0;
  do {
    rc = r.dup3(u, fd, (fdfl & FD_CLOEXEC) != 0 ? O_CLOEXEC : 0);
  } while (rc < 0 && (errno == EINTR || errno == EBUSY));
  if (rc < 0) return -1;
  FdEntry* e = fdTable().get(fd);  // exists: the caller checked capacity
  FdData before = e != nullptr ? e->read() : FdData{};
  if (e != nullptr) {
    e->write(data);
    e->setShm(shm);
  }
  // Epoll registrations of the TCP socket went with it; the new socket gets them again (it is
  // connected, so level- and edge-triggered EPOLLOUT fire at once, as for a completed connect).
  for (std::size_t i = 0; i < before.epoll_count; ++i) {
    epoll_event ev = before.epoll[i].event;
    r.epoll_ctl(before.epoll[i].epfd, EPOLL_CTL_ADD, fd, &ev);
  }
  return 0;
}

// connect() proper, once the destination is known to be one we capture.
int captureConnect(int fd, const sockaddr* addr, socklen_t len, const Endpoint& dst) {
  const RealFunctions& r = real();
  const ShimConfig& cfg = config();
  char where[64];
  formatEndpoint(dst, where, sizeof(where));
  FdEntry* entry = fdTable().get(fd);
  if (entry == nullptr) {
    debugLog("fd %d: %s not captured: beyond the fd table (%zu)", fd, where, fdTable().capacity());
    return r.connect(fd, addr, len);
  }
  FdData data = entry->read();
  if (data.state == FdState::kCaptured) {
    if (sameSocket(fd, data)) {
      // As TCP answers connect() again: 0 the first time after EINPROGRESS, then EISCONN.
      bool first = false;
      entry->update([&first](FdData& d) {
        first = d.connect_reported_in_progress;
        d.connect_reported_in_progress = false;
      });
      if (first) return 0;
      errno = EISCONN;
      return -1;
    }
    data = FdData{};
  }
  // Only a TCP socket of the address's family that has never connected: SCTP and MPTCP are
  // left alone, and so is a socket whose earlier connect() went direct and is still in
  // progress or done (the application asking again) - the kernel answers those.
  tcp_info ti{};
  socklen_t ti_len = sizeof(ti);
  if (intOption(fd, SOL_SOCKET, SO_DOMAIN) != addr->sa_family ||
      intOption(fd, SOL_SOCKET, SO_PROTOCOL) != IPPROTO_TCP ||
      r.getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &ti_len) != 0 || ti.tcpi_state != TCP_CLOSE) {
    return r.connect(fd, addr, len);
  }
  // The sidecar cannot have the connection: the application's own TCP socket, untouched so
  // far, connects directly, or connect() is refused, as configured.
  auto fallBack = [&](const char* what, int why) {
    if (g_disabled.load(std::memory_order_relaxed)) return r.connect(fd, addr, len);
    bool refuse = cfg.fallback == Fallback::kRefuse;
    debugLog("fd %d: %s %s: %s %s (%s)", fd, where, refuse ? "refused" : "direct", what,
             cfg.socket_path, std::strerror(why));
    if (!refuse) return r.connect(fd, addr, len);
    errno = ECONNREFUSED;
    return -1;
  };
  const char* qos = data.qos[0] != '\0' ? data.qos : cfg.qos;
  // Shared memory only for an fd closed on exec: a program exec()ed with it would read the
  // sidecar's doorbells as data, having no shim state for it.
  int fdflags = r.fcntl(fd, F_GETFD);
  bool want_shm = cfg.shm && fdflags >= 0 && (fdflags & FD_CLOEXEC) != 0;
  ShmChannel* shm = nullptr;
  int u = openSidecar(cfg, dst, qos, want_shm ? &shm : nullptr);
  if (u < 0) return fallBack("sidecar unavailable at", errno);
  if (replaceAndPublish(fd, u, addr, len, data, shm) != 0) {
    int why = errno;
    r.close(u);
    if (shm != nullptr) shmRelease(shm);
    return fallBack("could not put in place the connection to", why);
  }
  r.close(u);
  bool nonblocking = (r.fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
  if (shm != nullptr) {
    // The entry holds the channel's reference now; how reads wait is the open file's.
    shmSetNonBlocking(shm, nonblocking);
    timeval tv{};
    socklen_t tv_len = sizeof(tv);
    if (r.getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &tv_len) == 0)
      shmSetReceiveTimeout(shm, tv.tv_sec, tv.tv_usec);
  }
  debugLog("fd %d: %s captured via %s%s%s%s", fd, where, cfg.socket_path, qos[0] ? ", qos " : "",
           qos,
           shm != nullptr ? ", shared memory"
           : want_shm     ? ", no shared memory"
                          : "");
  if (nonblocking) {
    // The contract of a non-blocking connect: in progress, then writable, then SO_ERROR 0.
    entry->update([](FdData& d) { d.connect_reported_in_progress = true; });
    errno = EINPROGRESS;
    return -1;
  }
  return 0;
}

// getsockname() of a captured fd: the address the TCP socket was bound to, or, when it was
// not bound, the source address the kernel would pick for the destination (a UDP socket
// "connected" there sends nothing), with the bound port (0 when unbound).
int capturedSockname(const FdData& d, sockaddr* addr, socklen_t* len) {
  sockaddr_storage local = d.local;
  const RealFunctions& r = real();
  bool unbound = true;
  if (local.ss_family == AF_INET) {
    sockaddr_in in{};
    std::memcpy(&in, &local, sizeof(in));
    unbound = in.sin_addr.s_addr == htonl(INADDR_ANY);
  } else if (local.ss_family == AF_INET6) {
    sockaddr_in6 in6{};
    std::memcpy(&in6, &local, sizeof(in6));
    unbound = IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr);
  }
  if (unbound) {
    int probe = r.socket(d.peer.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe >= 0) {
      sockaddr_storage src{};
      socklen_t src_len = sizeof(src);
      if (r.connect(probe, reinterpret_cast<const sockaddr*>(&d.peer), d.peer_size) == 0 &&
          r.getsockname(probe, reinterpret_cast<sockaddr*>(&src), &src_len) == 0) {
        // Keep the bound port (the probe's is its own).
        if (src.ss_family == AF_INET) {
          reinterpret_cast<sockaddr_in*>(&src)->sin_port =
              reinterpret_cast<const sockaddr_in*>(&local)->sin_port;
        } else if (src.ss_family == AF_INET6) {
          reinterpret_cast<sockaddr_in6*>(&src)->sin6_port =
              reinterpret_cast<const sockaddr_in6*>(&local)->sin6_port;
        }
        local = src;
      }
      r.close(probe);
    }
  }
  copyOut(&local, d.peer_size, addr, len);
  return 0;
}

int setQos(int fd, int name, const void* value, socklen_t len) {
  if (name != DMM_SO_QOS) {
    errno = ENOPROTOOPT;
    return -1;
  }
  if (value == nullptr && len > 0) {
    errno = EFAULT;
    return -1;
  }
  std::string_view q(static_cast<const char*>(value), value == nullptr ? 0 : len);
  while (!q.empty() && q.back() == '\0')
    q.remove_suffix(1);
  if (!knownQosClass(q)) {
    errno = EINVAL;
    return -1;
  }
  FdData d;
  if (capturedData(fd, d)) {
    errno = EISCONN;
    return -1;
  }
  int domain = intOption(fd, SOL_SOCKET, SO_DOMAIN);
  if (domain < 0) return -1;  // EBADF, ENOTSOCK from the kernel
  if ((domain != AF_INET && domain != AF_INET6) ||
      intOption(fd, SOL_SOCKET, SO_TYPE) != SOCK_STREAM) {
    errno = ENOPROTOOPT;
    return -1;
  }
  FdEntry* e = fdTable().get(fd);
  if (e == nullptr) {
    errno = ENOBUFS;
    return -1;
  }
  e->update([q](FdData& data) {
    if (data.state != FdState::kInet) data = FdData{};
    data.state = FdState::kInet;
    std::memcpy(data.qos, q.data(), q.size());
    data.qos[q.size()] = '\0';
  });
  return 0;
}

int getQos(int fd, int name, void* value, socklen_t* len) {
  if (name != DMM_SO_QOS || len == nullptr) {
    errno = name != DMM_SO_QOS ? ENOPROTOOPT : EFAULT;
    return -1;
  }
  FdEntry* e = fdTable().find(fd);
  FdData d = e != nullptr ? e->read() : FdData{};
  if (d.state == FdState::kCaptured && !sameSocket(fd, d)) d = FdData{};
  if (d.state == FdState::kFree) {
    int domain = intOption(fd, SOL_SOCKET, SO_DOMAIN);
    if (domain < 0) return -1;
    if (domain != AF_INET && domain != AF_INET6) {
      errno = ENOPROTOOPT;
      return -1;
    }
  }
  const char* q = d.qos[0] != '\0' ? d.qos : config().qos;
  auto n = static_cast<socklen_t>(std::strlen(q));
  if (value != nullptr) std::memcpy(value, q, *len < n ? *len : n);
  *len = n;
  return 0;
}

void forgetRange(unsigned first, unsigned last) {
  fdTable().clearRange(first, last);
}

}  // namespace
}  // namespace dmm::preload

// ---- the interposers -------------------------------------------------------------------------

using dmm::preload::FdData;
using dmm::preload::FdState;
using dmm::preload::fdTable;
using dmm::preload::real;

DMM_EXPORT int connect(int fd, const sockaddr* addr, socklen_t len) {
  using namespace dmm::preload;
  const RealFunctions& r = real();
  Endpoint dst;
  Address filter_address;
  if (!toEndpoint(addr, len, dst, filter_address)) return r.connect(fd, addr, len);
  const ShimConfig& cfg = config();
  if (g_disabled.load(std::memory_order_relaxed) || !cfg.captures(filter_address)) {
    return r.connect(fd, addr, len);
  }
  int saved = errno;
  int rc = captureConnect(fd, addr, len, dst);
  if (rc == 0) errno = saved;
  return rc;
}

DMM_EXPORT int socket(int domain, int type, int protocol) noexcept {
  int fd = real().socket(domain, type, protocol);
  if (fd >= 0) {
    // Remembered only so that epoll registrations made before connect() can follow the fd
    // (see FdData::epoll); anything else is decided at connect() from the kernel's answers.
    bool inet = (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM;
    auto& table = fdTable();
    dmm::preload::FdEntry* e = inet ? table.get(fd) : table.find(fd);
    if (e != nullptr && (inet || e->state() != FdState::kFree)) {
      FdData d;
      d.state = inet ? FdState::kInet : FdState::kFree;
      e->write(d);
    }
  }
  return fd;
}

DMM_EXPORT int close(int fd) {
  auto& r = real();
  if (dmm::preload::FdEntry* e = fdTable().find(fd); e != nullptr && e->state() == FdState::kHidden)
    return 0;  // the shim's own (a shared-memory connection's eventfd): not the application's
  fdTable().clear(fd);  // before the number can be reused by another thread
  return r.close(fd);
}

DMM_EXPORT int dup(int fd) noexcept {
  int n = real().dup(fd);
  if (n >= 0) fdTable().copy(fd, n);
  return n;
}

DMM_EXPORT int dup2(int from, int to) noexcept {
  int n = real().dup2(from, to);
  if (n >= 0 && from != to) fdTable().copy(from, to);
  return n;
}

DMM_EXPORT int dup3(int from, int to, int flags) noexcept {
  int n = real().dup3(from, to, flags);
  if (n >= 0) fdTable().copy(from, to);
  return n;
}

namespace {
// The channel of a shared-memory fd, for a bookkeeping update (not across I/O), or null.
dmm::preload::ShmChannel* shmOf(int fd) {
  dmm::preload::FdEntry* e = fdTable().find(fd);
  return e != nullptr ? static_cast<dmm::preload::ShmChannel*>(e->shm()) : nullptr;
}

int fcntlCommon(int (*fn)(int, int, ...), int fd, int cmd, void* arg) {
  int rc = fn(fd, cmd, arg);
  if (rc >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) fdTable().copy(fd, rc);
  if (rc >= 0 && cmd == F_SETFL) {
    if (auto* ch = shmOf(fd)) {
      auto flags = static_cast<int>(reinterpret_cast<std::intptr_t>(arg));
      dmm::preload::shmSetNonBlocking(ch, (flags & O_NONBLOCK) != 0);
    }
  }
  return rc;
}
}  // namespace

// The third argument is an int or a pointer, or absent; like glibc, pass on a pointer-sized
// value, which carries either.
DMM_EXPORT int fcntl(int fd, int cmd, ...) {
  std::va_list ap;
  va_start(ap, cmd);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  return fcntlCommon(real().fcntl, fd, cmd, arg);
}

DMM_EXPORT int fcntl64(int fd, int cmd, ...) {
  std::va_list ap;
  va_start(ap, cmd);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  return fcntlCommon(real().fcntl64, fd, cmd, arg);
}

namespace {
// close_range() that steps around the shim's own fds (kHidden), which the application does
// not know it has; they are close-on-exec already.
int closeRangeKeepingHidden(unsigned first, unsigned last, int flags) {
  auto& r = real();
  if ((static_cast<unsigned>(flags) & CLOSE_RANGE_CLOEXEC) != 0)
    return r.close_range(first, last, flags);
  dmm::preload::forgetRange(first, last);
  while (first <= last) {
    long h = fdTable().nextHidden(first, last);
    if (h < 0) return r.close_range(first, last, flags);
    if (static_cast<unsigned long>(h) > first) {
      int rc = r.close_range(first, static_cast<unsigned>(h) - 1, flags);
      if (rc != 0) return rc;
    }
    if (static_cast<unsigned>(h) == last) break;
    first = static_cast<unsigned>(h) + 1;
  }
  return 0;
}
}  // namespace

DMM_EXPORT int close_range(unsigned first, unsigned last, int flags) noexcept {
  return closeRangeKeepingHidden(first, last, flags);
}

DMM_EXPORT void closefrom(int lowfd) noexcept {
  auto& r = real();
  if (lowfd < 0) return r.closefrom(lowfd);
  if (fdTable().nextHidden(static_cast<unsigned>(lowfd), ~0u) < 0) {
    dmm::preload::forgetRange(static_cast<unsigned>(lowfd), ~0u);
    return r.closefrom(lowfd);
  }
  closeRangeKeepingHidden(static_cast<unsigned>(lowfd), ~0u, 0);
}

DMM_EXPORT int getpeername(int fd, sockaddr* __restrict addr, socklen_t* __restrict len) noexcept {
  FdData d;
  if (len != nullptr && dmm::preload::capturedData(fd, d)) {
    dmm::preload::copyOut(&d.peer, d.peer_size, addr, len);
    return 0;
  }
  return real().getpeername(fd, addr, len);
}

DMM_EXPORT int getsockname(int fd, sockaddr* __restrict addr, socklen_t* __restrict len) noexcept {
  FdData d;
  if (len != nullptr && dmm::preload::capturedData(fd, d)) {
    return dmm::preload::capturedSockname(d, addr, len);
  }
  return real().getsockname(fd, addr, len);
}

DMM_EXPORT int setsockopt(int fd, int level, int name, const void* value, socklen_t len) noexcept {
  using namespace dmm::preload;
  if (level == SOL_DMM) return setQos(fd, name, value, len);
  FdData d;
  if ((answeredFromTable(level, name) || answeredForShm(fd, level, name)) && capturedData(fd, d)) {
    // Meaningless on the Unix socket, harmless to accept: the sidecar sets its own options on
    // the real TCP connections. Remembered so that getsockopt reads back what was set.
    if (value == nullptr && len > 0) {
      errno = EFAULT;
      return -1;
    }
    if (FdEntry* e = fdTable().find(fd)) {
      e->update([&](FdData& data) {
        if (data.state == FdState::kCaptured) data.storeOption(level, name, value, len);
      });
    }
    return 0;
  }
  int rc = real().setsockopt(fd, level, name, value, len);
  if (rc == 0 && level == SOL_SOCKET && name == SO_RCVTIMEO && value != nullptr &&
      len >= sizeof(timeval)) {
    if (auto* ch = shmOf(fd)) {
      timeval tv{};
      std::memcpy(&tv, value, sizeof(tv));
      shmSetReceiveTimeout(ch, tv.tv_sec, tv.tv_usec);
    }
  }
  return rc;
}

DMM_EXPORT int getsockopt(int fd, int level, int name, void* __restrict value,
                          socklen_t* __restrict len) noexcept {
  using namespace dmm::preload;
  if (level == SOL_DMM) return getQos(fd, name, value, len);
  if (len == nullptr) return real().getsockopt(fd, level, name, value, len);
  bool faked = level == SOL_SOCKET && (name == SO_DOMAIN || name == SO_PROTOCOL);
  FdData d;
  bool shm_buffer = answeredForShm(fd, level, name);
  if ((faked || shm_buffer || answeredFromTable(level, name)) && capturedData(fd, d)) {
    if (faked) {
      // What the application created, not the Unix socket standing in for it.
      int v = name == SO_DOMAIN ? int{d.peer.ss_family} : int{IPPROTO_TCP};
      socklen_t n = *len < sizeof(v) ? *len : static_cast<socklen_t>(sizeof(v));
      if (value != nullptr) std::memcpy(value, &v, n);
      *len = n;
      return 0;
    }
    if (const StoredOption* o = d.findOption(level, name)) {
      socklen_t n = *len < o->size ? *len : o->size;
      if (value != nullptr) std::memcpy(value, o->value, n);
      *len = n;
      return 0;
    }
    if (shm_buffer) return real().getsockopt(fd, level, name, value, len);  // never set
    // Never set: zeroes, as many as asked for (an int 0; TCP_INFO a struct saying only that
    // the connection is established).
    if (value != nullptr) {
      std::memset(value, 0, *len);
      if (level == IPPROTO_TCP && name == TCP_INFO && *len > 0) {
        static_cast<std::uint8_t*>(value)[0] = TCP_ESTABLISHED;
      }
    }
    return 0;
  }
  return real().getsockopt(fd, level, name, value, len);
}

DMM_EXPORT int epoll_ctl(int epfd, int op, int fd, epoll_event* event) noexcept {
  int rc = real().epoll_ctl(epfd, op, fd, event);
  if (rc != 0) return rc;
  dmm::preload::FdEntry* e = fdTable().find(fd);
  if (e == nullptr || e->state() != FdState::kInet) return rc;
  e->update([&](FdData& d) {
    if (d.state != FdState::kInet) return;
    std::size_t at = d.epoll_count;
    for (std::size_t i = 0; i < d.epoll_count; ++i) {
      if (d.epoll[i].epfd == epfd) at = i;
    }
    if (op == EPOLL_CTL_DEL) {
      if (at < d.epoll_count) d.epoll[at] = d.epoll[--d.epoll_count];
      return;
    }
    if (event == nullptr) return;
    if (at == d.epoll_count) {
      if (d.epoll_count == dmm::preload::kMaxEpollRegistrations) return;
      ++d.epoll_count;
    }
    d.epoll[at].epfd = epfd;
    d.epoll[at].event = *event;
  });
  return rc;
}

// ---- I/O on shared-memory fds (stage 2) ------------------------------------------------------
//
// Each call looks the fd up (two atomic loads when it is not ours) and otherwise goes straight
// to libc.

extern "C" void __chk_fail(void) __attribute__((noreturn));

namespace {

using dmm::preload::ShmChannel;

// A reference to fd's channel for the length of one call (another thread may close the fd
// meanwhile; the channel then outlives the call), or null.
class ShmRef {
 public:
  explicit ShmRef(int fd) {
    dmm::preload::FdEntry* e = fdTable().find(fd);
    if (e == nullptr) return;
    void* p = e->shm();
    if (p == nullptr) return;
    auto* ch = static_cast<ShmChannel*>(p);
    int refs = ch->refs.load(std::memory_order_relaxed);
    do {
      if (refs == 0) return;  // being freed
    } while (!ch->refs.compare_exchange_weak(refs, refs + 1, std::memory_order_acquire));
    if (e->shm() != p) {  // closed and reused between the two loads
      dmm::preload::shmRelease(ch);
      return;
    }
    ch_ = ch;
  }
  ~ShmRef() {
    if (ch_ != nullptr) {
      int saved = errno;
      dmm::preload::shmRelease(ch_);
      errno = saved;
    }
  }
  ShmRef(const ShmRef&) = delete;
  ShmRef& operator=(const ShmRef&) = delete;
  ShmChannel* get() const { return ch_; }
  explicit operator bool() const { return ch_ != nullptr; }

 private:
  ShmChannel* ch_ = nullptr;
};

ssize_t shmRead1(ShmChannel* ch, int fd, void* buf, size_t n, int flags) {
  iovec v{buf, n};
  return dmm::preload::shmRead(ch, fd, &v, 1, flags);
}
ssize_t shmWrite1(ShmChannel* ch, int fd, const void* buf, size_t n, int flags) {
  iovec v{const_cast<void*>(buf), n};
  return dmm::preload::shmWrite(ch, fd, &v, 1, flags);
}
bool badIovCount(int count) {
  if (count < 0 || count > IOV_MAX) {
    errno = EINVAL;
    return true;
  }
  return false;
}

}  // namespace

DMM_EXPORT ssize_t read(int fd, void* buf, size_t n) {
  if (ShmRef ch{fd}) return shmRead1(ch.get(), fd, buf, n, 0);
  return real().read(fd, buf, n);
}

DMM_EXPORT ssize_t __read_chk(int fd, void* buf, size_t n, size_t buflen) {
  if (n > buflen) __chk_fail();
  return read(fd, buf, n);
}

DMM_EXPORT ssize_t write(int fd, const void* buf, size_t n) {
  if (ShmRef ch{fd}) return shmWrite1(ch.get(), fd, buf, n, 0);
  return real().write(fd, buf, n);
}

DMM_EXPORT ssize_t readv(int fd, const iovec* iov, int count) {
  if (ShmRef ch{fd}) {
    if (badIovCount(count)) return -1;
    return dmm::preload::shmRead(ch.get(), fd, iov, static_cast<size_t>(count), 0);
  }
  return real().readv(fd, iov, count);
}

DMM_EXPORT ssize_t writev(int fd, const iovec* iov, int count) {
  if (ShmRef ch{fd}) {
    if (badIovCount(count)) return -1;
    return dmm::preload::shmWrite(ch.get(), fd, iov, static_cast<size_t>(count), 0);
  }
  return real().writev(fd, iov, count);
}

DMM_EXPORT ssize_t recv(int fd, void* buf, size_t n, int flags) {
  if (ShmRef ch{fd}) return shmRead1(ch.get(), fd, buf, n, flags);
  return real().recv(fd, buf, n, flags);
}

DMM_EXPORT ssize_t __recv_chk(int fd, void* buf, size_t n, size_t buflen, int flags) {
  if (n > buflen) __chk_fail();
  return recv(fd, buf, n, flags);
}

DMM_EXPORT ssize_t send(int fd, const void* buf, size_t n, int flags) {
  if (ShmRef ch{fd}) return shmWrite1(ch.get(), fd, buf, n, flags);
  return real().send(fd, buf, n, flags);
}

DMM_EXPORT ssize_t recvfrom(int fd, void* __restrict buf, size_t n, int flags,
                            sockaddr* __restrict addr, socklen_t* __restrict len) {
  if (ShmRef ch{fd}) {
    if (len != nullptr) *len = 0;  // as a connected TCP socket: no address
    return shmRead1(ch.get(), fd, buf, n, flags);
  }
  return real().recvfrom(fd, buf, n, flags, addr, len);
}

DMM_EXPORT ssize_t __recvfrom_chk(int fd, void* __restrict buf, size_t n, size_t buflen, int flags,
                                  sockaddr* __restrict addr, socklen_t* __restrict len) {
  if (n > buflen) __chk_fail();
  return recvfrom(fd, buf, n, flags, addr, len);
}

DMM_EXPORT ssize_t sendto(int fd, const void* buf, size_t n, int flags, const sockaddr* addr,
                          socklen_t len) {
  if (ShmRef ch{fd}) {
    if (addr != nullptr && len > 0) {
      errno = EISCONN;  // what the Unix stream of stage 1 answers
      return -1;
    }
    return shmWrite1(ch.get(), fd, buf, n, flags);
  }
  return real().sendto(fd, buf, n, flags, addr, len);
}

DMM_EXPORT ssize_t recvmsg(int fd, msghdr* msg, int flags) {
  if (ShmRef ch{fd}) {
    if (msg == nullptr) {
      errno = EFAULT;
      return -1;
    }
    if (msg->msg_iovlen > IOV_MAX) {
      errno = EMSGSIZE;
      return -1;
    }
    ssize_t n = dmm::preload::shmRead(ch.get(), fd, msg->msg_iov, msg->msg_iovlen, flags);
    if (n >= 0) {
      msg->msg_namelen = 0;
      msg->msg_controllen = 0;
      msg->msg_flags = 0;
    }
    return n;
  }
  return real().recvmsg(fd, msg, flags);
}

DMM_EXPORT ssize_t sendmsg(int fd, const msghdr* msg, int flags) {
  if (ShmRef ch{fd}) {
    if (msg == nullptr) {
      errno = EFAULT;
      return -1;
    }
    if (msg->msg_name != nullptr && msg->msg_namelen > 0) {
      errno = EISCONN;
      return -1;
    }
    if (msg->msg_iovlen > IOV_MAX) {
      errno = EMSGSIZE;
      return -1;
    }
    return dmm::preload::shmWrite(ch.get(), fd, msg->msg_iov, msg->msg_iovlen, flags);
  }
  return real().sendmsg(fd, msg, flags);
}

namespace {
// sendfile() into a shared-memory fd: the file's bytes are copied through a buffer, read at
// explicit offsets so that nothing is consumed from the file that the ring did not take.
ssize_t sendfileToShm(ShmChannel* ch, int out, int in, off_t* offset, size_t count) {
  off_t pos = offset != nullptr ? *offset : ::lseek(in, 0, SEEK_CUR);
  if (pos < 0) {
    errno = EINVAL;  // not a seekable file: what sendfile() says of such an in_fd
    return -1;
  }
  char buf[16384];
  size_t done = 0;
  while (done < count) {
    size_t want = count - done < sizeof buf ? count - done : sizeof buf;
    ssize_t got = ::pread(in, buf, want, pos);
    if (got < 0) {
      if (done > 0) break;
      return -1;
    }
    if (got == 0) break;
    ssize_t put = shmWrite1(ch, out, buf, static_cast<size_t>(got), 0);
    if (put < 0) {
      if (done > 0) break;
      return -1;
    }
    done += static_cast<size_t>(put);
    pos += put;
    if (put < got) break;
  }
  if (offset != nullptr) {
    *offset = pos;
  } else {
    ::lseek(in, pos, SEEK_SET);
  }
  return static_cast<ssize_t>(done);
}
}  // namespace

DMM_EXPORT ssize_t sendfile(int out, int in, off_t* offset, size_t count) {
  if (ShmRef ch{out}) return sendfileToShm(ch.get(), out, in, offset, count);
  if (ShmRef ch{in}) {
    errno = EINVAL;
    return -1;
  }
  return real().sendfile(out, in, offset, count);
}

DMM_EXPORT ssize_t sendfile64(int out, int in, off_t* offset, size_t count) {
  return sendfile(out, in, offset, count);
}

DMM_EXPORT ssize_t splice(int in, loff_t* in_off, int out, loff_t* out_off, size_t n,
                          unsigned flags) {
  if (ShmRef a{in}) {
    errno = EINVAL;  // not a pipe or a kernel socket: splice() cannot reach the ring
    return -1;
  }
  if (ShmRef b{out}) {
    errno = EINVAL;
    return -1;
  }
  return real().splice(in, in_off, out, out_off, n, flags);
}

DMM_EXPORT int shutdown(int fd, int how) noexcept {
  int rc = real().shutdown(fd, how);
  if (rc == 0 && (how == SHUT_WR || how == SHUT_RDWR)) {
    // The socket refuses writes now; the ring must too (shmWrite() checks the flag).
    if (ShmRef ch{fd}) ch.get()->header->app_write_shut.store(1, std::memory_order_release);
  }
  return rc;
}

DMM_EXPORT int fclose(FILE* stream) {
  // fclose() closes inside libc, out of the shim's sight: forget the fd's entry first.
  if (stream != nullptr) {
    int fd = ::fileno(stream);
    dmm::preload::FdEntry* e = fd >= 0 ? fdTable().find(fd) : nullptr;
    if (e != nullptr && e->state() != FdState::kFree && e->state() != FdState::kHidden) e->clear();
  }
  return real().fclose(stream);
}

DMM_EXPORT int ioctl(int fd, unsigned long request, ...) {
  std::va_list ap;
  va_start(ap, request);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  if (request == FIONBIO && arg != nullptr) {
    int rc = static_cast<int>(::syscall(SYS_ioctl, fd, request, arg));
    if (rc == 0) {
      if (auto* ch = shmOf(fd)) {
        int on = 0;
        std::memcpy(&on, arg, sizeof on);
        dmm::preload::shmSetNonBlocking(ch, on != 0);
      }
    }
    return rc;
  }
  if (request == FIONREAD) {
    if (ShmRef ch{fd}) {
      // The bytes ready in the ring, not the doorbells on the socket.
      if (arg == nullptr) {
        errno = EFAULT;
        return -1;
      }
      int n = static_cast<int>(ch.get()->down.readable());
      std::memcpy(arg, &n, sizeof n);
      return 0;
    }
  }
  return static_cast<int>(::syscall(SYS_ioctl, fd, request, arg));
}
