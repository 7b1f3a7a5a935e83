#pragma once
// Worker: one thread, one event loop, its own SO_REUSEPORT listeners, and everything its
// connections need without locks: pipe and buffer pools, timeout lists, a resume queue for
// relays that used up their wake-up budget. A connection lives on one worker for its life.

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/event_loop.h"
#include "common/intrusive_list.h"
#include "common/result.h"
#include "common/unique_fd.h"
#include "proxy/context.h"
#include "proxy/local_addresses.h"
#include "proxy/relay.h"
#include "proxy/tunnel_pool.h"

namespace dmm::proxy {

class ServiceManager;
struct SessionListTag;
class Worker;

// A connection still in its handshake or onward connect, before it becomes a Relay. It is
// listed with its worker from construction to end(), and has one timer for its current phase.
// Sessions own themselves: end() hands them to the loop's deferred deletion.
class Session : public Deferrable, public ListHook<SessionListTag> {
 public:
  using Clock = std::chrono::steady_clock;
  // Ends the session at once (the worker is stopping).
  virtual void shutdown() = 0;
  // The worker drains: a session that carries no connection (an idle reused tunnel waiting
  // for the peer's next HELLO) ends now; one with work in progress finishes it.
  virtual void drainIdle() {}

 protected:
  explicit Session(Worker& worker);
  // (Re)arms the phase timer; onTimeout() runs if it expires first.
  void armTimer(std::chrono::milliseconds timeout);
  virtual void onTimeout() = 0;
  // Leaves the worker and deletes this once the running callback has returned. No timeout
  // fires after it. Idempotent.
  void end();

  Worker& worker_;
  const std::uint64_t id_;           // the connection id on every log line
  const Clock::time_point started_;  // when the connection was accepted

 private:
  static void onTimer(evutil_socket_t fd, short what, void* arg);
  EventPtr timer_;
  bool ended_ = false;
};

// One worker's share of [relay] buffer_memory: the bytes its connections' relay buffers and
// splice pipes hold (a pipe counts its full size; the pools' idle buffers and empty pipes,
// at most kIdleBuffers/kIdlePipes, do not). Exact, because only the worker's own loop thread
// takes and gives; used() may be read from any thread.
class MemoryBudget {
 public:
  MemoryBudget(std::uint64_t limit, prometheus::Gauge* gauge) : limit_(limit), gauge_(gauge) {}
  ~MemoryBudget();
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;
  bool limited() const { return limit_ != 0; }
  // False, taking nothing, when `bytes` more would pass the limit.
  bool take(std::size_t bytes);
  void give(std::size_t bytes);
  std::uint64_t room() const;  // bytes that can still be taken (UINT64_MAX: no limit)
  std::uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  std::uint64_t limit() const { return limit_; }
  // Brings the shared gauge up to date with this worker's books (the worker's tick: the data
  // path touches no shared cache line).
  void publish();

 private:
  std::uint64_t limit_;
  prometheus::Gauge* gauge_;  // dmm_sidecar_buffer_memory_bytes (all workers), or null
  std::atomic<std::uint64_t> used_{0};
  std::uint64_t published_ = 0;
};

// Pipes for splice(), kept open between uses: creating a pipe costs two fds and a syscall.
class PipePool {
 public:
  PipePool(std::size_t pipe_size, std::size_t max_idle, MemoryBudget& budget);
  ~PipePool();
  PipePool(const PipePool&) = delete;
  PipePool& operator=(const PipePool&) = delete;
  // An empty pipe: 0, or why none can be had: ENOBUFS (the memory budget has no room for one)
  // or the errno of pipe2() (out of fds).
  int get(int& read_end, int& write_end);
  // Returns an EMPTY pipe.
  void put(int read_end, int write_end);
  // Closes a pipe that still holds bytes (it cannot be reused).
  void discard(int read_end, int write_end);
  // Bytes a pipe of this pool holds.
  std::size_t pipeSize() const { return pipe_size_; }

 private:
  std::size_t pipe_size_;
  std::size_t max_idle_;
  MemoryBudget& budget_;
  std::vector<std::pair<int, int>> idle_;
};

// Fixed-size copy buffers, kept between uses.
class BufferPool {
 public:
  BufferPool(std::size_t buffer_size, std::size_t max_idle, MemoryBudget& budget)
      : buffer_size_(buffer_size), max_idle_(max_idle), budget_(budget) {}
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  // A buffer; nullptr when the memory budget has no room for one (or out of memory).
  std::byte* get();
  void put(std::byte* buffer);
  // Whether a get() would succeed now; how many would.
  bool canGet() const { return budget_.room() >= buffer_size_; }
  std::size_t available() const;
  std::size_t bufferSize() const { return buffer_size_; }

 private:
  std::size_t buffer_size_;
  std::size_t max_idle_;
  MemoryBudget& budget_;
  std::vector<std::byte*> idle_;
};

class Worker {
 public:
  using Clock = std::chrono::steady_clock;

  Worker(SidecarContext& context, unsigned index);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Opens this worker's listeners (main thread, before start()), taking the sockets systemd
  // passed in from `inherited` (may be null) before binding new ones. Fails with a message.
  Result<bool> bindListeners(ServiceManager* inherited);
  // Also accepts on the preload Unix socket `fd` (main thread, before start()); the worker
  // keeps a duplicate of it.
  Result<bool> addPreloadListener(int fd, const std::string& path);
  // The TCP listening sockets (main thread, after bindListeners()), for the fd store.
  std::vector<int> listenerFds() const;
  void start();
  // Stops accepting and lets established connections finish: idle pooled tunnels close, a
  // connection that ends does not return its tunnel to the pool. Any thread.
  void drain();
  // Connections still open: sessions and relays (loop thread).
  std::size_t liveCount() const { return sessions_.size() + relay_count_; }
  // Stops accepting, ends every connection, and leaves the loop. Any thread; then join().
  void stop();
  void join();

  EventLoop& loop() { return loop_; }
  SidecarContext& context() { return context_; }
  const Config& config() const { return context_.config; }
  Metrics& metrics() { return context_.metrics; }
  unsigned index() const { return index_; }
  std::uint64_t nextConnectionId() { return (std::uint64_t{index_} << 48) | ++next_id_; }
  LocalAddresses& localAddresses() { return local_addresses_; }
  PipePool& pipes() { return pipes_; }
  // Preloaded connections on shared memory open now (ShmConnection counts itself; loop thread).
  std::size_t& shmConnections() { return shm_connections_; }
  BufferPool& buffers() { return buffers_; }
  MemoryBudget& memory() { return budget_; }
  // The memory budget has no room for one more connection's two buffers: new connections are
  // refused until it has (loop thread).
  bool memoryExhausted() const {
    return budget_.limited() && budget_.room() < 2 * std::uint64_t{buffers_.bufferSize()};
  }
  // A kernel relay window of `bytes` charged to the budget, or false. Windows may hold at most
  // half of this worker's budget: the other half stays for the buffers of the connections the
  // worker relays itself and for admitting new ones (loop thread).
  bool takeKernelWindow(std::size_t bytes);
  void giveKernelWindow(std::size_t bytes);
  // `relay` needs a buffer the budget cannot give now: it is resumed, in turn, once buffers
  // are returned (loop thread).
  void memoryWait(Relay& relay);
  // A relay returned buffer or pipe memory to the budget: resume as many waiters as fit.
  void memoryReturned();
  // A buffer of relay.buffer_size bytes for whatever runs now on this loop (never held across
  // callbacks).
  std::span<std::byte> scratch() { return {scratch_.get(), buffers_.bufferSize()}; }
  // False once splice() proved unusable here; relays then copy.
  bool spliceUsable() const { return splice_usable_; }
  void disableSplice() { splice_usable_ = false; }

  // Relay bookkeeping (loop thread).
  void relayStarted(Relay& relay);
  void relayActive(Relay& relay);  // bytes moved: restart its inactivity clock
  void relayEnded(Relay& relay);
  // This worker's kernel relay (kernel_relay.h), or null: off, or not on this host (why()).
  KernelRelay* kernelRelay() { return kernel_relay_.get(); }
  const std::string& kernelRelayWhy() const { return kernel_relay_why_; }
  // A flow of `relay` (its source's `cookie`) went to the kernel relay: its events go to the
  // relay, and its counts are refreshed at every tick, until kernelFlowEnded().
  void kernelFlowStarted(std::uint64_t cookie, Relay& relay);
  void kernelFlowEnded(std::uint64_t cookie);
  void scheduleResume(Relay& relay);
  // A framed session ended cleanly on `tunnel`: outbound, it goes to the pool for the next
  // session to the same peer; inbound, it waits for the peer's next HELLO (with `leftover`,
  // bytes of it that already arrived). Called from inside the tunnel's callbacks.
  void tunnelReleased(const Relay::Info& info, std::unique_ptr<stacks::StackConnection> tunnel,
                      std::vector<std::byte> leftover);
  TunnelPool& tunnels() { return tunnels_; }
  // A rule's metric handles, from this worker's cache (Metrics::rule() takes a lock).
  RuleMetrics& ruleMetrics(std::string_view rule);
  // Fills `out` with fresh random bytes from a per-worker batch: one RAND_bytes() (and the
  // getpid() OpenSSL does for fork safety) per 4 KiB rather than per handshake.
  void randomBytes(std::span<std::uint8_t> out);
  // Session bookkeeping (loop thread).
  void sessionStarted(Session& session);
  void sessionEnded(Session& session);

  std::size_t relayCount() const { return relay_count_; }
  // The live relays' descriptions and infos (loop thread; the admin socket posts here).
  struct ConnectionView {
    std::string line;  // Relay::describe()
    Relay::Info info;
  };
  std::vector<ConnectionView> connections() const;

 private:
  struct Listener {
    enum class Kind { kCapture, kForward, kTunnel, kPreload };
    Worker* worker = nullptr;
    Kind kind = Kind::kCapture;
    SocketAddress address;      // TCP kinds
    std::string label;          // the address, or the preload socket's path, for messages
    SocketAddress destination;  // kForward: where its connections go
    UniqueFd fd;
    EventPtr event;
    EventPtr retry;  // re-enables accept after EMFILE/ENFILE
  };

  static void onAccept(evutil_socket_t fd, short what, void* arg);
  static void onAcceptRetry(evutil_socket_t fd, short what, void* arg);
  static void onTick(evutil_socket_t fd, short what, void* arg);
  static void onResume(evutil_socket_t fd, short what, void* arg);
  static void onKernelEvents(evutil_socket_t fd, short what, void* arg);
  void accepted(Listener& listener, UniqueFd fd);
  void sweep();
  void shutdownAll();

  SidecarContext& context_;
  unsigned index_;
  EventLoop loop_;
  std::thread thread_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  UniqueFd tick_fd_;
  EventPtr tick_;
  EventPtr resume_event_;
  IntrusiveList<Relay, TimeoutListTag> open_relays_;         // by last activity
  IntrusiveList<Relay, TimeoutListTag> half_closed_relays_;  // by last activity
  IntrusiveList<Relay, ResumeListTag> resume_queue_;
  IntrusiveList<Session, SessionListTag> sessions_;
  IntrusiveList<Relay, MemoryWaitTag> memory_waiters_;  // in arrival order
  std::unique_ptr<KernelRelay> kernel_relay_;
  std::string kernel_relay_why_;
  EventPtr kernel_events_;
  std::unordered_map<std::uint64_t, Relay*> kernel_flows_;  // by the source's cookie
  std::size_t relay_count_ = 0;
  std::size_t shm_connections_ = 0;
  std::uint64_t next_id_ = 0;
  LocalAddresses local_addresses_;
  MemoryBudget budget_;
  std::uint64_t kernel_windows_ = 0;  // of budget_, held by kernel relay windows
  PipePool pipes_;
  BufferPool buffers_;
  std::unique_ptr<std::byte[]> scratch_;
  TunnelPool tunnels_;
  struct NameHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  std::unordered_map<std::string, RuleMetrics*, NameHash, std::equal_to<>> rule_metrics_;
  std::array<std::uint8_t, 4096> random_{};
  std::size_t random_used_ = sizeof(random_);
  bool splice_usable_ = true;
  bool stopping_ = false;
  bool draining_ = false;
};

}  // namespace dmm::proxy
