#pragma once
// Channel: one data connection of a dpdk instance, shared by the worker that owns it and the
// poll thread that runs its lwIP pcb. No locks: two single-producer/single-consumer byte rings,
// bit sets of pending events (poll -> worker) and commands (worker -> poll), each with a
// "queued" flag so that a channel sits at most once in a queue, and a reference count.
//
//   rx ring  poll thread writes what lwIP received; the worker reads. Its size is lwIP's
//            receive window: the window reopens (tcp_recved) only as the worker takes bytes out.
//   tx ring  the worker writes; the poll thread hands the bytes to lwIP without copying them
//            (lwIP references the ring until the peer acknowledges them) and frees the space
//            when they are acknowledged. The ring is the connection's send buffer.
//
// Positions are 64-bit counters that never wrap; an index is position & (size - 1).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

#include "common/socket_address.h"
#include "stacks/stack.h"

struct tcp_pcb;

namespace dmm::stacks::dpdk {

class Instance;
struct LoopQueue;
struct Expectation;
class DpdkConnection;

class ByteRing {
 public:
  ByteRing() = default;
  ~ByteRing();
  ByteRing(const ByteRing&) = delete;
  ByteRing& operator=(const ByteRing&) = delete;

  // Maps `size` bytes (a power of two); false when out of memory.
  bool allocate(std::size_t size);
  void release();  // unmaps (only when nothing references the bytes any more)
  bool allocated() const { return data_ != nullptr; }
  std::size_t size() const { return size_; }

  // Producer side.
  std::size_t freeSpace() const {
    return size_ - static_cast<std::size_t>(head_.load(std::memory_order_relaxed) -
                                            tail_.load(std::memory_order_acquire));
  }
  std::size_t put(std::span<const std::byte> bytes);  // copies what fits, publishes
  // Consumer side.
  std::size_t used() const {
    return static_cast<std::size_t>(head_.load(std::memory_order_acquire) -
                                    tail_.load(std::memory_order_relaxed));
  }
  std::size_t get(std::span<std::byte> out);  // copies and frees what it takes

  std::uint64_t head() const { return head_.load(std::memory_order_acquire); }
  std::uint64_t tail() const { return tail_.load(std::memory_order_acquire); }
  void setTail(std::uint64_t t) { tail_.store(t, std::memory_order_seq_cst); }
  // The contiguous bytes at position `pos` (at most `max`): for handing to lwIP in place.
  std::span<const std::byte> contiguous(std::uint64_t pos, std::size_t max) const;

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  alignas(64) std::atomic<std::uint64_t> head_{0};
  alignas(64) std::atomic<std::uint64_t> tail_{0};
};

// Each ring's size: lwIP's receive window and send buffer (lwipopts.h checks it).
inline constexpr std::size_t kRingBytes = 512 * 1024;

// Events, poll thread -> worker.
enum Event : std::uint32_t {
  kEvReadable = 1u << 0,
  kEvWritable = 1u << 1,
  kEvConnected = 1u << 2,  // connectData(): the responder accepted the token
  kEvFailed = 1u << 3,     // connectData() failed; error has the errno
  kEvAccepted = 1u << 4,   // a data connection presented an expected token
};

// Commands, worker -> poll thread.
enum Command : std::uint32_t {
  kCmdConnect = 1u << 0,
  kCmdSend = 1u << 1,      // the tx ring has new bytes
  kCmdConsumed = 1u << 2,  // the worker took bytes out of the rx ring
  kCmdShutdown = 1u << 3,  // FIN after the bytes written
  kCmdClose = 1u << 4,     // the worker is done: FIN after the bytes written, then forget
  kCmdAbort = 1u << 5,     // RST now
};

struct Channel {
  explicit Channel(Instance& inst) : instance(&inst) {}

  Instance* instance;
  std::atomic<int> refs{1};
  ByteRing rx;
  ByteRing tx;
  SocketAddress remote;  // the peer's data endpoint

  std::atomic<std::uint32_t> events{0};
  std::atomic<bool> in_worker_queue{false};
  std::atomic<std::uint32_t> commands{0};
  std::atomic<bool> in_poll_queue{false};
  // Sticky states, set by the poll thread.
  std::atomic<bool> rx_eof{false};         // the peer's FIN came after the last byte in rx
  std::atomic<int> error{0};               // non-zero: the connection is dead (ECONNRESET, ...)
  std::atomic<bool> want_writable{false};  // the worker found the tx ring full

  // Set before the first event can be queued; read by the poll thread afterwards.
  LoopQueue* queue = nullptr;

  // ---- poll thread only ----
  tcp_pcb* pcb = nullptr;
  std::uint64_t tx_sent = 0;       // tx position handed to lwIP so far
  std::uint64_t rx_announced = 0;  // rx position already reported to lwIP by tcp_recved
  enum class Phase : std::uint8_t {
    kConnecting,  // initiator: SYN sent
    kAwaitAck,    // initiator: token sent, waiting for the responder's acknowledgement byte
    kPreamble,    // responder: waiting for the magic and the token
    kOpen,
    kDone,  // pcb closed or gone
  } phase = Phase::kConnecting;
  SessionToken token{};
  std::uint8_t preamble[20]{};
  std::uint8_t preamble_len = 0;
  bool fin_pending = false;    // shutdown/close asked, bytes still to hand over
  bool close_pending = false;  // the worker is gone: close once everything is handed over
  bool worker_gone = false;
  bool counted = false;            // in the instance's active connection count
  std::uint32_t max_seq_sent = 0;  // highest segment sequence number sent (retransmissions)
  bool seq_valid = false;
  std::uint32_t extra_unacked = 0;  // copied bytes sent ahead of the ring's (preamble, ack)
  std::uint32_t born_tick = 0;      // poll iterations' clock (ms) at accept: preamble deadline

  // ---- worker only ----
  DpdkConnection* conn = nullptr;
  // Responder: what it was accepted for. Set by the poll thread before it queues
  // kEvAccepted (the queue orders it), taken by the worker when it handles that event.
  std::shared_ptr<Expectation> expectation;

  void retain() { refs.fetch_add(1, std::memory_order_relaxed); }
  // Drops a reference; the last one frees the channel (and its rings).
  void releaseRef();
};

}  // namespace dmm::stacks::dpdk
