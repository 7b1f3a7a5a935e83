#pragma once
// FdTable: what the shim knows about each file descriptor number, safe for any thread.
//
// Indexed by fd. Chunks of kChunkEntries entries are mapped (mmap, not malloc) the first time
// an fd in their range needs an entry and never unmapped, so a lookup is two atomic loads and
// never allocates; fds at or above capacity() (RLIMIT_NOFILE's hard limit, at most
// kMaxEntries) have no entry and are left alone. Each entry has a tiny spin lock guarding its
// data: held for a copy of at most a few hundred bytes and never across a system call.
//
// The kernel owns the truth; the table is a cache of it that can go stale when an fd is closed
// behind our back (fclose() of an fdopen()ed socket closes inside libc, which no LD_PRELOAD
// sees). A captured entry therefore remembers its socket's inode, and users check it with
// sameSocket() before trusting the entry.

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "preload/shim_config.h"

namespace dmm::preload {

enum class FdState : std::uint8_t {
  kFree = 0,      // nothing known
  kInet = 1,      // an IPv4/IPv6 stream socket not (yet) connected through the sidecar
  kCaptured = 2,  // connected to the sidecar's Unix socket in place of a TCP connection
  kHidden = 3,    // the shim's own fd (a shared-memory connection's eventfd): not the app's
};

// Hooks for the shared-memory channel an entry may point to (stage 2): every entry holding
// the pointer holds one reference. Set once by the shim before any use; null in tests.
struct ShmHooks {
  void (*retain)(void*) = nullptr;
  void (*release)(void*) = nullptr;
};

// A socket option the application set on a captured fd, at a level a Unix socket does not
// have (TCP, IP, IPv6) or with no meaning for it (SO_KEEPALIVE): remembered, not applied.
struct StoredOption {
  int level = 0;
  int name = 0;
  socklen_t size = 0;
  unsigned char value[16] = {};
};

struct EpollRegistration {
  int epfd = -1;
  epoll_event event{};
};

inline constexpr std::size_t kMaxStoredOptions = 10;
inline constexpr std::size_t kMaxEpollRegistrations = 4;

// The data of one entry: plain, copied as a whole.
struct FdData {
  FdState state = FdState::kFree;
  // kCaptured: the destination exactly as the application gave it to connect(), and the
  // local address its TCP socket was bound to then (family set, zeroes when unbound).
  sockaddr_storage peer{};
  socklen_t peer_size = 0;
  sockaddr_storage local{};
  socklen_t local_size = 0;
  // kCaptured: connect() said EINPROGRESS and has not been asked again; the next connect()
  // answers 0, later ones EISCONN, as Linux TCP does.
  bool connect_reported_in_progress = false;
  dev_t dev = 0;  // kCaptured: the Unix socket's inode, to tell a stale entry
  ino_t ino = 0;
  // The QoS hint set with setsockopt(SOL_DMM, DMM_SO_QOS); "" = none.
  char qos[kMaxQosBytes + 1] = {};
  StoredOption options[kMaxStoredOptions];
  std::size_t option_count = 0;
  // kInet: epoll registrations made before connect(). Replacing the socket drops them in the
  // kernel (they belong to the old open file), so the shim adds them again to the new one.
  EpollRegistration epoll[kMaxEpollRegistrations];
  std::size_t epoll_count = 0;

  // Remembers an option (replacing an earlier value); false when the table is full.
  bool storeOption(int level, int name, const void* value, socklen_t size);
  const StoredOption* findOption(int level, int name) const;
};

class FdEntry {
 public:
  // Cheap, lock-free: whether there is anything to look at.
  FdState state() const { return static_cast<FdState>(state_.load(std::memory_order_acquire)); }
  FdData read() const;
  void write(const FdData& data);
  // Calls fn(FdData&) with the lock held; fn must not make system calls.
  template <typename Fn>
  void update(Fn&& fn) {
    lock();
    fn(data_);
    state_.store(static_cast<std::uint8_t>(data_.state), std::memory_order_release);
    unlock();
  }
  void clear();
  // The shared-memory channel of a captured fd (lock-free: the I/O hot path reads it), or
  // null. setShm() takes over the caller's reference and releases the one it replaces.
  void* shm() const { return shm_.load(std::memory_order_acquire); }
  void setShm(void* channel);
  // After fork(), in the child: a lock held by a thread that does not exist there is freed.
  void resetLock() { lock_.store(false, std::memory_order_relaxed); }

 private:
  void lock() const;
  void unlock() const { lock_.store(false, std::memory_order_release); }
  std::atomic<std::uint8_t> state_{0};
  mutable std::atomic<bool> lock_{false};
  std::atomic<void*> shm_{nullptr};
  FdData data_;
};

class FdTable {
 public:
  static constexpr std::size_t kChunkEntries = 1024;
  static constexpr std::size_t kMaxEntries = std::size_t{1} << 20;

  // Sizes the table from RLIMIT_NOFILE; called once, before any other use.
  void init();
  std::size_t capacity() const { return capacity_.load(std::memory_order_relaxed); }
  // The entry of fd if its chunk exists (never allocates); nullptr otherwise.
  FdEntry* find(int fd) const;
  // The entry of fd, mapping its chunk if needed; nullptr at or beyond capacity or when the
  // memory cannot be had.
  FdEntry* get(int fd);
  // fd `to` now refers to what `from` does (dup, dup2, dup3, F_DUPFD): it gets from's entry,
  // or none. Epoll registrations are not copied: they belong to the number, not the file.
  void copy(int from, int to);
  void clear(int fd);
  // Clears every entry in [first, last].
  void clearRange(unsigned first, unsigned last);
  void resetLocksAfterFork();
  // The lowest kHidden fd in [first, last], or -1 (close_range steps around them).
  long nextHidden(unsigned first, unsigned last) const;
  void setShmHooks(ShmHooks hooks) { hooks_ = hooks; }
  const ShmHooks& shmHooks() const { return hooks_; }

 private:
  std::atomic<std::size_t> capacity_{0};
  ShmHooks hooks_;
  std::atomic<FdEntry*> chunks_[kMaxEntries / kChunkEntries] = {};
};

// The table of the process.
FdTable& fdTable();

}  // namespace dmm::preload
