#pragma once
// The shared-memory data path between libdmm-preload.so and the sidecar (preload stage 2):
// the layout of the memory both map, its two byte rings, and the wake-up rules. Header-only,
// the standard library and pthreads only: the shim and the daemon include the same file.
//
// One memfd per connection, made by the sidecar and passed to the shim over the connection's
// Unix socket (SCM_RIGHTS, with an eventfd and the read end of a pipe):
//
//   [Header: one page][up ring: application -> sidecar][down ring: sidecar -> application]
//
// Each ring has one producer and one consumer side. Positions are byte counts since the start
// (64-bit, never wrap); a ring holds `head - tail` bytes. The sidecar is one thread; the
// application may have many threads and, after fork(), several processes: its side of each
// ring is serialised by a process-shared robust mutex in the header (held only while copying,
// never across a system call).
//
// Wake-ups (see preload/README.md, "Stage 2"):
//   application -> sidecar: the eventfd. Written when the application produced into an empty
//     ring the sidecar is waiting on (up.consumer_armed), freed space the sidecar waits for
//     (down.producer_waiting), or asks for a doorbell (doorbell_request).
//   sidecar -> application, a reader blocked in read()/recv() (down.consumer_armed ==
//     kArmedBell): one byte into a pipe whose read end the shim holds and blocks on. A pipe
//     rather than an eventfd because the sidecar's death closes its write end, which wakes the
//     reader (end of file); cheaper than a socket doorbell. The sidecar sets down_eof before it
//     ends its direction and writes the bell then too.
//   sidecar -> application, otherwise (kArmedDoorbell): the Unix socket, which stays the
//     application's fd, so that poll, epoll and select see the truth without being intercepted:
//     - readable: a kDoorbell byte, sent when the sidecar produced into the down ring while the
//       application had found it empty (down.consumer_armed); or the socket's end of stream,
//       after the sidecar's last byte (half-close) or when it closed.
//     - writable: the socket's own writability. When the up ring is full the shim sends kFiller
//       bytes until the socket (whose send buffer it set to the minimum) stops being writable,
//       and sets up.producer_waiting; the sidecar reads the filler back when it frees space,
//       which makes the socket writable again.
//     The application never sends anything else on the socket, and the sidecar nothing but
//     doorbells, so each side reads the other's bytes without framing.

#include <pthread.h>
#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace dmm::preload::shm {

inline constexpr std::uint32_t kMagic = 0x73'4d'4d'44;  // "DMMs" in memory order
inline constexpr std::uint32_t kVersion = 1;
inline constexpr std::uint32_t kRingBytes = 256 * 1024;  // per direction; a power of two
inline constexpr std::size_t kHeaderBytes = 4096;

// The sidecar's answer to a preamble that asked for shared memory: one byte, the first the
// sidecar ever sends on the connection.
inline constexpr char kReplyShm = 'S';     // with SCM_RIGHTS {memfd, eventfd, bell pipe}: stage 2
inline constexpr char kReplyStream = 'U';  // no shared memory: the socket carries the stream
inline constexpr char kDoorbell = 'D';
inline constexpr char kBell = 'B';
// consumer_armed of the down ring: how the application waits.
inline constexpr std::uint32_t kArmedDoorbell = 1;  // poll/epoll/select or non-blocking
inline constexpr std::uint32_t kArmedBell = 2;      // blocked in a read: the pipe
inline constexpr char kFiller = 'F';

struct RingControl {
  alignas(64) std::atomic<std::uint64_t> head;  // bytes produced
  alignas(64) std::atomic<std::uint64_t> tail;  // bytes consumed
  // The consumer found the ring empty and waits: the producer's next bytes must wake it.
  alignas(64) std::atomic<std::uint32_t> consumer_armed;
  // The producer found the ring full and waits: freeing space must wake it.
  std::atomic<std::uint32_t> producer_waiting;
  // The application's side of this ring (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST).
  alignas(64) pthread_mutex_t app_lock;
};

struct Header {
  std::uint32_t magic;
  std::uint32_t version;
  std::uint32_t ring_bytes;
  std::uint32_t reserved;
  // Set by the sidecar before it closes its end: the connection was reset, so the
  // application's reads end with ECONNRESET rather than a clean end of stream.
  alignas(64) std::atomic<std::uint32_t> reset;
  // Set by the application: it consumed a doorbell while bytes stay in the down ring (its
  // buffer was full), so its fd would not poll readable; the sidecar sends another.
  std::atomic<std::uint32_t> doorbell_request;
  // Set by the sidecar before it shuts down its direction (after its last byte): a reader
  // blocked on the bell looks at the socket for the end instead of blocking again.
  std::atomic<std::uint32_t> down_eof;
  // The application's side, shared by every process holding the fd (the file status flag and
  // SO_RCVTIMEO belong to the open file, not to one process): O_NONBLOCK, and the receive
  // timeout in ms (0: none). The sidecar never reads them.
  std::atomic<std::uint32_t> app_nonblocking;
  std::atomic<std::uint32_t> app_rcvtimeo_ms;
  // Set by the application when it shut down its direction (shutdown(SHUT_WR or SHUT_RDWR)):
  // its writes fail with EPIPE from then on, as on TCP, rather than put bytes in the ring after
  // its end of stream. In the shared page, so that a fork()ed process's shutdown counts for
  // every process. The sidecar does not read it: the socket's end of stream tells it.
  std::atomic<std::uint32_t> app_write_shut;
  RingControl up;    // application -> sidecar
  RingControl down;  // sidecar -> application
};
static_assert(sizeof(Header) <= kHeaderBytes);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

inline constexpr std::size_t mappingBytes(std::uint32_t ring_bytes) {
  return kHeaderBytes + 2 * std::size_t{ring_bytes};
}

// Fills a zeroed mapping (a fresh memfd) with an empty header. The sidecar's side. False if a
// mutex cannot be made.
inline bool initialise(void* mapping, std::uint32_t ring_bytes) {
  auto* h = static_cast<Header*>(mapping);
  h->magic = kMagic;
  h->version = kVersion;
  h->ring_bytes = ring_bytes;
  pthread_mutexattr_t attr;
  if (pthread_mutexattr_init(&attr) != 0) return false;
  bool ok = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) == 0 &&
            pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) == 0 &&
            pthread_mutex_init(&h->up.app_lock, &attr) == 0 &&
            pthread_mutex_init(&h->down.app_lock, &attr) == 0;
  pthread_mutexattr_destroy(&attr);
  // Consumers start armed: the first byte each way wakes the other side.
  h->up.consumer_armed.store(1, std::memory_order_relaxed);
  h->down.consumer_armed.store(1, std::memory_order_relaxed);
  return ok;
}

// A view of one ring from one side. Copies are split at the wrap-around; positions are
// published with release and read with acquire, so the bytes are visible before the position
// that covers them.
class Ring {
 public:
  Ring() = default;
  Ring(RingControl* control, std::byte* data, std::uint32_t size)
      : c_(control), data_(data), mask_(size - 1), size_(size) {}

  RingControl& control() const { return *c_; }

  // Consumer: bytes ready to take.
  std::size_t readable() const {
    std::uint64_t n =
        c_->head.load(std::memory_order_acquire) - c_->tail.load(std::memory_order_relaxed);
    return n > size_ ? size_ : static_cast<std::size_t>(n);
  }
  // Producer: room for more bytes.
  std::size_t writable() const {
    std::uint64_t used =
        c_->head.load(std::memory_order_relaxed) - c_->tail.load(std::memory_order_acquire);
    return used >= size_ ? 0 : size_ - static_cast<std::size_t>(used);
  }
  // Consumer, after seeing it empty and arming: the full-fence re-check (the producer
  // publishes its head, fences, then reads consumer_armed; one of the two sees the other).
  bool emptyAfterArming() const {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return c_->head.load(std::memory_order_seq_cst) == c_->tail.load(std::memory_order_relaxed);
  }

  // Producer: copies up to `max` bytes of `iov` in and publishes them. Returns the count.
  std::size_t put(const iovec* iov, std::size_t count, std::size_t max) {
    std::uint64_t head = c_->head.load(std::memory_order_relaxed);
    // The other side may write anything into the shared positions: clamp to the ring.
    std::uint64_t used = head - c_->tail.load(std::memory_order_acquire);
    std::size_t room = used >= size_ ? 0 : size_ - static_cast<std::size_t>(used);
    if (room < max) max = room;
    std::size_t done = 0;
    for (std::size_t i = 0; i < count && done < max; ++i) {
      std::size_t n = iov[i].iov_len < max - done ? iov[i].iov_len : max - done;
      copyIn(head + done, static_cast<const std::byte*>(iov[i].iov_base), n);
      done += n;
    }
    if (done > 0) c_->head.store(head + done, std::memory_order_release);
    return done;
  }
  std::size_t put(const void* data, std::size_t size) {
    iovec v{const_cast<void*>(data), size};
    return put(&v, 1, size);
  }

  // Consumer: copies up to `max` bytes out into `iov` (a null `iov` drops them instead).
  // Consumes them unless `peek`. Returns the count.
  std::size_t get(const iovec* iov, std::size_t count, std::size_t max, bool peek) {
    std::uint64_t tail = c_->tail.load(std::memory_order_relaxed);
    std::uint64_t have = c_->head.load(std::memory_order_acquire) - tail;
    if (have > size_) have = size_;  // clamp what the other side claims to the ring
    if (have < max) max = static_cast<std::size_t>(have);
    std::size_t done = 0;
    if (iov == nullptr) {
      done = max;
    } else {
      for (std::size_t i = 0; i < count && done < max; ++i) {
        std::size_t n = iov[i].iov_len < max - done ? iov[i].iov_len : max - done;
        copyOut(tail + done, static_cast<std::byte*>(iov[i].iov_base), n);
        done += n;
      }
    }
    if (done > 0 && !peek) c_->tail.store(tail + done, std::memory_order_release);
    return done;
  }
  std::size_t get(void* data, std::size_t size, bool peek = false) {
    iovec v{data, size};
    return get(&v, 1, size, peek);
  }

  // After a put(): whether the consumer must be woken (it was armed; disarms it).
  bool takeConsumerArmed() { return takeConsumerArmedHow() != 0; }
  // The same, saying how it waits (kArmedDoorbell, kArmedBell; 0: not armed).
  std::uint32_t takeConsumerArmedHow() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (c_->consumer_armed.load(std::memory_order_relaxed) == 0) return 0;
    return c_->consumer_armed.exchange(0, std::memory_order_seq_cst);
  }
  // After a get(): whether the producer must be woken (it was waiting; clears the flag).
  bool takeProducerWaiting() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (c_->producer_waiting.load(std::memory_order_relaxed) == 0) return false;
    return c_->producer_waiting.exchange(0, std::memory_order_seq_cst) != 0;
  }

 private:
  void copyIn(std::uint64_t pos, const std::byte* from, std::size_t n) {
    std::size_t at = static_cast<std::size_t>(pos) & mask_;
    std::size_t first = n < size_ - at ? n : size_ - at;
    std::memcpy(data_ + at, from, first);
    if (first < n) std::memcpy(data_, from + first, n - first);
  }
  void copyOut(std::uint64_t pos, std::byte* to, std::size_t n) const {
    std::size_t at = static_cast<std::size_t>(pos) & mask_;
    std::size_t first = n < size_ - at ? n : size_ - at;
    std::memcpy(to, data_ + at, first);
    if (first < n) std::memcpy(to + first, data_, n - first);
  }

  RingControl* c_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

// The rings of a mapping of `ring_bytes` per direction. The sidecar passes its own size, never
// the header's, which the application can write.
inline Ring upRing(void* mapping, std::uint32_t ring_bytes) {
  auto* h = static_cast<Header*>(mapping);
  return Ring(&h->up, static_cast<std::byte*>(mapping) + kHeaderBytes, ring_bytes);
}
inline Ring downRing(void* mapping, std::uint32_t ring_bytes) {
  auto* h = static_cast<Header*>(mapping);
  return Ring(&h->down, static_cast<std::byte*>(mapping) + kHeaderBytes + ring_bytes, ring_bytes);
}

}  // namespace dmm::preload::shm
