#include "preload/shim_shm.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>

#include "preload/fd_table.h"

namespace dmm::preload {
namespace {

namespace sys {
ssize_t recv(int fd, void* buf, std::size_t len, int flags) {
  return ::syscall(SYS_recvfrom, fd, buf, len, flags, nullptr, nullptr);
}
ssize_t send(int fd, const void* buf, std::size_t len, int flags) {
  return ::syscall(SYS_sendto, fd, buf, len, flags, nullptr, 0);
}
int poll(pollfd* p, unsigned n, int timeout_ms) {
  timespec ts{};
  timespec* t = nullptr;
  if (timeout_ms >= 0) {
    ts.tv_sec = timeout_ms / 1000;
    ts.tv_nsec = static_cast<long>(timeout_ms % 1000) * 1000000L;
    t = &ts;
  }
  return static_cast<int>(::syscall(SYS_ppoll, p, n, t, nullptr, 8));
}
void signal(int efd) {
  std::uint64_t one = 1;
  ssize_t ignored = ::syscall(SYS_write, efd, &one, sizeof one);
  (void)ignored;  // EAGAIN only at 2^64-2 wake-ups; EBADF: the channel is going away
}
int close(int fd) {
  return static_cast<int>(::syscall(SYS_close, fd));
}
int fileFlags(int fd) {
  return static_cast<int>(::syscall(SYS_fcntl, fd, F_GETFL));
}
}  // namespace sys

// ---- channel objects: a pool never unmapped, so a racing reference is never a fault -------

constexpr std::size_t kSlab = 64;
constinit std::atomic<bool> g_pool_lock{false};
constinit ShmChannel* g_free = nullptr;  // linked through `mapping` while free

void poolLock() {
  while (g_pool_lock.exchange(true, std::memory_order_acquire))
    sched_yield();
}
void poolUnlock() {
  g_pool_lock.store(false, std::memory_order_release);
}

ShmChannel* allocateChannel() {
  poolLock();
  if (g_free == nullptr) {
    void* mem = ::mmap(nullptr, sizeof(ShmChannel) * kSlab, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      poolUnlock();
      return nullptr;
    }
    auto* slab = static_cast<ShmChannel*>(mem);
    for (std::size_t i = 0; i < kSlab; ++i) {
      new (&slab[i]) ShmChannel;
      slab[i].refs.store(0, std::memory_order_relaxed);
      slab[i].mapping = g_free;
      g_free = &slab[i];
    }
  }
  ShmChannel* ch = g_free;
  g_free = static_cast<ShmChannel*>(ch->mapping);
  poolUnlock();
  ch->mapping = nullptr;
  ch->refs.store(1, std::memory_order_release);
  return ch;
}

void freeChannel(ShmChannel* ch) {
  if (ch->mapping != nullptr) ::munmap(ch->mapping, ch->size);
  for (int fd : {ch->wake_fd, ch->bell_fd}) {
    if (fd < 0) continue;
    if (FdEntry* e = fdTable().find(fd)) e->clear();
    sys::close(fd);
  }
  ch->header = nullptr;
  ch->wake_fd = -1;
  ch->bell_fd = -1;
  poolLock();
  ch->mapping = g_free;
  g_free = ch;
  poolUnlock();
}

// ---- the application's side of a ring is shared by its threads and processes -------------

class AppLock {
 public:
  explicit AppLock(pthread_mutex_t& m) : m_(m) {
    // A holder that died mid-copy left positions that are still consistent (each is published
    // in one store after its bytes): carry on.
    if (pthread_mutex_lock(&m_) == EOWNERDEAD) pthread_mutex_consistent(&m_);
  }
  ~AppLock() { pthread_mutex_unlock(&m_); }
  AppLock(const AppLock&) = delete;
  AppLock& operator=(const AppLock&) = delete;

 private:
  pthread_mutex_t& m_;
};

// iov[] past the first `skip` bytes, into `out` (at most 64 entries; returns the count).
std::size_t advance(const iovec* iov, std::size_t count, std::size_t skip, iovec* out) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < count && n < 64; ++i) {
    if (skip >= iov[i].iov_len) {
      skip -= iov[i].iov_len;
      continue;
    }
    out[n].iov_base = static_cast<char*>(iov[i].iov_base) + skip;
    out[n].iov_len = iov[i].iov_len - skip;
    skip = 0;
    ++n;
  }
  return n;
}

std::size_t total(const iovec* iov, std::size_t count) {
  std::size_t t = 0;
  for (std::size_t i = 0; i < count; ++i)
    t += iov[i].iov_len;
  return t;
}

void requestDoorbell(ShmChannel* ch) {
  ch->header->doorbell_request.store(1, std::memory_order_seq_cst);
  sys::signal(ch->wake_fd);
}

int sendTimeoutMs(int fd) {
  timeval tv{};
  socklen_t len = sizeof tv;
  if (::syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) != 0) return -1;
  if (tv.tv_sec == 0 && tv.tv_usec == 0) return -1;
  long ms = tv.tv_sec * 1000 + tv.tv_usec / 1000;
  return ms < 1 ? 1 : ms > 0x7fffffff ? 0x7fffffff : static_cast<int>(ms);
}

}  // namespace

void shmSetNonBlocking(ShmChannel* ch, bool nonblocking) {
  ch->header->app_nonblocking.store(nonblocking ? 1 : 0, std::memory_order_relaxed);
}

void shmSetReceiveTimeout(ShmChannel* ch, long sec, long usec) {
  long ms = sec * 1000 + (usec + 999) / 1000;
  if (ms < 0) ms = 0;
  if (ms > 0x7fffffff) ms = 0x7fffffff;
  ch->header->app_rcvtimeo_ms.store(static_cast<std::uint32_t>(ms), std::memory_order_relaxed);
}

void shmRetain(void* channel) {
  static_cast<ShmChannel*>(channel)->refs.fetch_add(1, std::memory_order_relaxed);
}

void shmRelease(void* channel) {
  auto* ch = static_cast<ShmChannel*>(channel);
  if (ch->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) freeChannel(ch);
}

ShmReply receiveShmReply(int sock, ShmChannel** out) {
  char reply = 0;
  iovec iov{&reply, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::syscall(SYS_recvmsg, sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) {
    if (n == 0) errno = ECONNRESET;
    return ShmReply::kFailed;
  }
  int fds[4];
  std::size_t nfds = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < k && nfds < 4; ++i)
      std::memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
  auto closeAll = [&] {
    for (std::size_t i = 0; i < nfds; ++i)
      sys::close(fds[i]);
  };
  if (reply == shm::kReplyStream && nfds == 0) return ShmReply::kStream;
  if (reply != shm::kReplyShm || nfds != 3 || (msg.msg_flags & MSG_CTRUNC) != 0) {
    closeAll();
    errno = EPROTO;
    return ShmReply::kFailed;
  }
  struct stat st {};
  if (::fstat(fds[0], &st) != 0 || st.st_size <= static_cast<off_t>(shm::kHeaderBytes) ||
      st.st_size > (off_t{1} << 30)) {
    closeAll();
    errno = EPROTO;
    return ShmReply::kFailed;
  }
  auto size = static_cast<std::size_t>(st.st_size);
  void* mapping = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  sys::close(fds[0]);
  auto closeRest = [&] {
    sys::close(fds[1]);
    sys::close(fds[2]);
  };
  if (mapping == MAP_FAILED) {
    closeRest();
    return ShmReply::kFailed;
  }
  auto* h = static_cast<shm::Header*>(mapping);
  std::uint32_t ring = h->ring_bytes;
  if (h->magic != shm::kMagic || h->version != shm::kVersion || ring == 0 ||
      (ring & (ring - 1)) != 0 || shm::mappingBytes(ring) != size) {
    ::munmap(mapping, size);
    closeRest();
    errno = EPROTO;
    return ShmReply::kFailed;
  }
  ShmChannel* ch = allocateChannel();
  FdEntry* hidden_wake = fdTable().get(fds[1]);
  FdEntry* hidden_bell = fdTable().get(fds[2]);
  if (ch == nullptr || hidden_wake == nullptr || hidden_bell == nullptr) {
    if (ch != nullptr) freeChannel(ch);
    ::munmap(mapping, size);
    closeRest();
    errno = ENOMEM;
    return ShmReply::kFailed;
  }
  FdData d;
  d.state = FdState::kHidden;
  hidden_wake->write(d);
  hidden_bell->write(d);
  ch->bell_fd = fds[2];
  ch->mapping = mapping;
  ch->size = size;
  ch->header = h;
  ch->up = shm::upRing(mapping, ring);
  ch->down = shm::downRing(mapping, ring);
  ch->wake_fd = fds[1];
  *out = ch;
  return ShmReply::kShm;
}

ssize_t shmRead(ShmChannel* ch, int fd, const iovec* iov, std::size_t count, int flags) {
  if ((flags & MSG_OOB) != 0) {
    errno = EINVAL;  // as TCP with no urgent data
    return -1;
  }
  if ((flags & MSG_ERRQUEUE) != 0) {
    errno = EAGAIN;
    return -1;
  }
  const bool peek = (flags & MSG_PEEK) != 0;
  const bool discard = (flags & MSG_TRUNC) != 0;
  const bool waitall = (flags & MSG_WAITALL) != 0 && !peek;
  const std::size_t want = total(iov, count);
  if (want == 0) return 0;
  std::size_t got = 0;
  bool took_doorbell = false;
  for (;;) {
    std::size_t n;
    bool wake = false;
    bool empty;
    {
      AppLock lock(ch->down.control().app_lock);
      iovec part[64];
      std::size_t parts = discard ? 0 : advance(iov, count, got, part);
      n = ch->down.get(discard ? nullptr : part, parts, want - got, peek);
      if (n > 0 && !peek) wake = ch->down.takeProducerWaiting();
      empty = ch->down.readable() == 0;
    }
    if (wake) sys::signal(ch->wake_fd);
    got += n;
    if (got == want || (got > 0 && !waitall)) {
      if (!peek && empty) {
        // Settle now, while the caller handles its bytes: arm, and take the doorbell that
        // announced them, so that the fd stops polling readable.
        // A doorbell taken in this call already was that one: one is sent per arming, and
        // every arming of this call was followed by the receive that took its doorbell.
        ch->down.control().consumer_armed.store(1, std::memory_order_seq_cst);
        if (ch->down.emptyAfterArming()) {
          char sink[64];
          if (!took_doorbell && sys::recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0)
            took_doorbell = true;
          empty = ch->down.readable() == 0;
        } else {
          empty = false;
        }
      }
      // Bytes left whose doorbell we took: ask for another, or the fd would not poll readable.
      if (!empty && took_doorbell) requestDoorbell(ch);
      return static_cast<ssize_t>(got);
    }
    // Nothing to take. A blocking read waits on the bell (a pipe: cheaper than a socket
    // doorbell, and the sidecar's death closes it), unless the sidecar said its direction
    // ended; the others arm the doorbell and look at the socket.
    const bool blocking = (flags & MSG_DONTWAIT) == 0 &&
                          ch->header->app_nonblocking.load(std::memory_order_relaxed) == 0;
    if (blocking && ch->header->down_eof.load(std::memory_order_seq_cst) == 0) {
      ch->down.control().consumer_armed.store(shm::kArmedBell, std::memory_order_seq_cst);
      if (!ch->down.emptyAfterArming()) continue;
      if (ch->header->down_eof.load(std::memory_order_seq_cst) == 0) {
        int timeout = static_cast<int>(ch->header->app_rcvtimeo_ms.load(std::memory_order_relaxed));
        if (timeout > 0) {
          pollfd p{ch->bell_fd, POLLIN, 0};
          int rc = sys::poll(&p, 1, timeout);
          if (rc == 0) {
            if (got > 0) return static_cast<ssize_t>(got);
            errno = EAGAIN;  // as SO_RCVTIMEO on a socket
            return -1;
          }
          if (rc < 0) {
            if (got > 0) return static_cast<ssize_t>(got);
            return -1;  // EINTR
          }
        }
        char bells[64];
        ssize_t b = ::syscall(SYS_read, ch->bell_fd, bells, sizeof bells);
        if (b > 0) {
          // The arming this bell answered sent no doorbell to the socket.
          took_doorbell = true;
          continue;
        }
        if (b < 0 && errno != EAGAIN) {
          if (got > 0) return static_cast<ssize_t>(got);
          return -1;  // EINTR
        }
        // b == 0: the sidecar is gone; its socket says how (below). EAGAIN: a bell taken by
        // another thread; look again.
        if (b < 0) continue;
      }
    }
    ch->down.control().consumer_armed.store(shm::kArmedDoorbell, std::memory_order_seq_cst);
    if (!ch->down.emptyAfterArming()) continue;
    char sink[64];
    ssize_t k = sys::recv(fd, sink, sizeof sink, flags & MSG_DONTWAIT);
    if (k > 0) {
      took_doorbell = true;
      continue;
    }
    if (k == 0) {
      // The sidecar's end of stream comes after its last byte: one more look at the ring.
      if (ch->down.readable() > 0) continue;
      if (got > 0) return static_cast<ssize_t>(got);
      if (ch->header->reset.load(std::memory_order_acquire) != 0) {
        errno = ECONNRESET;
        return -1;
      }
      return 0;
    }
    if (got > 0) return static_cast<ssize_t>(got);
    return -1;  // EAGAIN (non-blocking, or the receive timeout), EINTR, ...
  }
}

namespace {

// The up ring is full: makes the fd stop polling writable, as a TCP socket does when its send
// buffer is full (filler bytes into the socket's minimal send buffer, read back by the sidecar
// when it frees space), and asks the sidecar to say when it does. Returns 1 if there is room
// again already (the sidecar is told to take the filler), 0 if not, -1 if the socket failed
// (errno: EPIPE, the sidecar is gone; SIGPIPE came with it unless `flags` has MSG_NOSIGNAL).
int stopWritable(ShmChannel* ch, int fd, int flags) {
  for (int i = 0; i < 64; ++i) {
    pollfd p{fd, POLLOUT, 0};
    if (sys::poll(&p, 1, 0) != 1 || (p.revents & (POLLERR | POLLHUP)) != 0) break;
    char f = shm::kFiller;
    if (sys::send(fd, &f, 1, MSG_DONTWAIT | (flags & MSG_NOSIGNAL)) < 0) {
      if (errno == EAGAIN) break;
      return -1;
    }
  }
  ch->up.control().producer_waiting.store(1, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ch->up.writable() > 0) {
    // Space came meanwhile; the sidecar may not have seen us wait: have it take the filler.
    sys::signal(ch->wake_fd);
    return 1;
  }
  return 0;
}

}  // namespace

ssize_t shmWrite(ShmChannel* ch, int fd, const iovec* iov, std::size_t count, int flags) {
  if ((flags & MSG_OOB) != 0) {
    errno = EOPNOTSUPP;
    return -1;
  }
  if (ch->header->reset.load(std::memory_order_acquire) != 0) {
    // As TCP after a reset: the socket says EPIPE (and SIGPIPE unless asked not to).
    char f = shm::kFiller;
    ssize_t k = sys::send(fd, &f, 1, MSG_DONTWAIT | (flags & MSG_NOSIGNAL));
    if (k < 0) return -1;
    errno = ECONNRESET;
    return -1;
  }
  if (ch->header->app_write_shut.load(std::memory_order_acquire) != 0) {
    // After shutdown(SHUT_WR): the socket says EPIPE (and SIGPIPE unless asked not to), as TCP.
    char f = shm::kFiller;
    if (sys::send(fd, &f, 1, MSG_DONTWAIT | (flags & MSG_NOSIGNAL)) < 0) return -1;
    errno = EPIPE;
    return -1;
  }
  const std::size_t want = total(iov, count);
  if (want == 0) return 0;
  std::size_t sent = 0;
  int nonblocking = -1;  // unknown until the ring is found full
  for (;;) {
    std::size_t n;
    bool wake = false;
    {
      AppLock lock(ch->up.control().app_lock);
      iovec part[64];
      std::size_t parts = advance(iov, count, sent, part);
      n = ch->up.put(part, parts, want - sent);
      if (n > 0) wake = ch->up.takeConsumerArmed();
    }
    if (wake) sys::signal(ch->wake_fd);
    sent += n;
    if (sent < want && nonblocking < 0)
      nonblocking = (flags & MSG_DONTWAIT) != 0 || (sys::fileFlags(fd) & O_NONBLOCK) != 0;
    if (sent == want || (sent > 0 && nonblocking)) {
      // Done. If these bytes filled the ring, the fd must not poll writable any more: the
      // next write could take nothing (on TCP, a write that fills the buffer ends POLLOUT).
      if (ch->up.writable() == 0) {
        int saved = errno;
        stopWritable(ch, fd, MSG_NOSIGNAL);  // a failure shows on the next write
        errno = saved;
      }
      return static_cast<ssize_t>(sent);
    }
    if (n > 0) continue;  // a blocking write goes on while there is room
    // The ring is full.
    int room = stopWritable(ch, fd, flags);
    if (room < 0) {
      if (sent > 0) return static_cast<ssize_t>(sent);
      return -1;  // EPIPE: the sidecar is gone
    }
    if (room > 0) continue;
    if (nonblocking) {
      errno = EAGAIN;  // nothing sent: a non-blocking write with bytes returned above
      return -1;
    }
    pollfd p{fd, POLLOUT, 0};
    int rc = sys::poll(&p, 1, sendTimeoutMs(fd));
    if (rc == 0) {
      if (sent > 0) return static_cast<ssize_t>(sent);
      errno = EAGAIN;
      return -1;
    }
    if (rc < 0) {
      if (sent > 0) return static_cast<ssize_t>(sent);
      return -1;  // EINTR
    }
    if ((p.revents & (POLLERR | POLLHUP)) != 0 && ch->up.writable() == 0) {
      char f = shm::kFiller;
      if (sys::send(fd, &f, 1, MSG_DONTWAIT | (flags & MSG_NOSIGNAL)) < 0 && sent == 0) return -1;
      if (sent > 0) return static_cast<ssize_t>(sent);
      errno = EPIPE;
      return -1;
    }
  }
}

}  // namespace dmm::preload
