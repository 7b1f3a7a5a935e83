#pragma once
// Instance: one rdma stack instance's device state, shared by all workers: the protection
// domain, the listener (a thread blocked on its rdma_cm channel: it only routes connect
// requests to the worker that expects their token), the expectations, the send-ring pool and
// the counters. Worker: the instance's state on one worker loop: a completion channel and an
// rdma_cm channel (both file descriptors on the loop) and the queue pairs of that loop.

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/event_loop.h"
#include "common/result.h"
#include "common/unique_fd.h"
#include "stacks/endpoint.h"
#include "stacks/rdma/rdma_stack.h"
#include "stacks/rdma/wire.h"

namespace dmm::stacks::rdma {

class QueuePair;
class Worker;

// Read at scrape time from any thread; written by workers and the listener.
struct Counters {
  std::atomic<std::uint64_t> tx_bytes{0};
  std::atomic<std::uint64_t> rx_bytes{0};
  std::atomic<std::uint64_t> tx_messages{0};
  std::atomic<std::uint64_t> rx_messages{0};
  std::atomic<std::uint64_t> credit_stalls{0};  // a sender found no credit (bytes or receives)
  std::atomic<std::uint64_t> queue_pairs{0};    // open now
  std::atomic<std::uint64_t> registered_bytes{0};
  std::atomic<std::uint64_t> accepted{0};
  std::atomic<std::uint64_t> refused{0};  // unknown token, bad private data, full
  std::atomic<std::uint64_t> protocol_errors{0};
  // Completions with an error status, by ibv_wc_status (flushes of a queue pair already in
  // error are not errors of their own and are not counted).
  std::array<std::atomic<std::uint64_t>, 32> wc_errors{};
};

// A memory region of `size` bytes, registered with the protection domain.
struct Ring {
  std::uint8_t* base = nullptr;
  std::uint32_t size = 0;
  ibv_mr* mr = nullptr;
};

// Send rings: registered once (local access only) and reused, at most `keep` idle ones.
// Receive rings are registered per connection instead (remote write access): a peer holds a
// connection's rkey, which must not open any other connection's memory.
class RingPool {
 public:
  RingPool(ibv_pd* pd, std::uint32_t ring_size, std::size_t keep, Counters& counters)
      : pd_(pd), size_(ring_size), keep_(keep), counters_(counters) {}
  ~RingPool();
  // Any thread.
  std::optional<Ring> acquireSend();
  void releaseSend(Ring r);
  std::optional<Ring> acquireReceive();
  void releaseReceive(Ring r);

 private:
  std::optional<Ring> make(int access);
  void destroy(Ring r);

  ibv_pd* pd_;
  std::uint32_t size_;
  std::size_t keep_;
  Counters& counters_;
  std::mutex mutex_;
  std::vector<Ring> idle_;
};

class Instance {
 public:
  static std::unique_ptr<Instance> start(const std::string& name, const RdmaOptions& options,
                                         std::string& error);
  ~Instance();

  const std::string& name() const { return name_; }
  const RdmaOptions& options() const { return options_; }
  Counters& counters() { return counters_; }
  const Counters& counters() const { return counters_; }
  ibv_pd* pd() const { return pd_; }
  RingPool& rings() { return *rings_; }
  bool healthy() const { return !device_removed_.load(std::memory_order_relaxed); }
  std::string describe() const;

  // The instance's state on `loop` (made on first use); nullptr if its channels cannot be
  // made. Loop thread.
  Worker* workerFor(EventLoop& loop);
  // Reserves a connection slot; false when max_connections are open. Any thread.
  bool reserveSlot();
  void releaseSlot();

  // Responder side (loop thread of `worker`).
  Status expect(Worker& worker, const SessionToken& token, DataAcceptor& acceptor);
  // Forgets the expectation, and the connection `worker` accepted for it if claim() already
  // took it (its acceptor must never hear of it).
  void cancel(Worker& worker, const SessionToken& token);
  // The listener routed a request for `token` to `worker`; takes the expectation if `worker`
  // still holds it. Worker thread.
  DataAcceptor* claim(const SessionToken& token, const Worker& worker);
  // Listener: the worker expecting `token`, once (a second request for it gets nullptr).
  Worker* routeFor(const SessionToken& token);

  void markDeviceRemoved() { device_removed_.store(true, std::memory_order_relaxed); }

 private:
  Instance(std::string name, const RdmaOptions& options);
  bool open(std::string& error);
  void listen();
  void onConnectRequest(rdma_cm_event* event);

  struct Expectation {
    Worker* worker = nullptr;
    DataAcceptor* acceptor = nullptr;
    bool routed = false;
  };

  std::string name_;
  RdmaOptions options_;
  Counters counters_;
  rdma_event_channel* listen_channel_ = nullptr;
  rdma_cm_id* listener_ = nullptr;
  ibv_pd* pd_ = nullptr;
  std::unique_ptr<RingPool> rings_;
  std::string device_name_;
  std::thread thread_;
  UniqueFd stop_fd_;
  std::atomic<bool> device_removed_{false};
  std::atomic<std::uint32_t> slots_{0};

  std::mutex mutex_;  // guards expectations_ and workers_
  std::map<SessionToken, Expectation> expectations_;
  std::map<EventLoop*, std::unique_ptr<Worker>> workers_;
};

// The instance on one worker loop. Everything here runs on that loop's thread, except
// post(), which the listener uses to hand over a connect request.
class Worker {
 public:
  Worker(Instance& instance, EventLoop& loop);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  bool ok() const { return ok_; }

  Instance& instance() { return instance_; }
  EventLoop& loop() { return loop_; }
  ibv_comp_channel* completionChannel() const { return completions_; }
  rdma_event_channel* cmChannel() const { return cm_; }

  // Initiator: a queue pair resolving its way to `peer`, presenting `token`.
  Result<QueuePair*> connect(const Endpoint& peer, const SessionToken& token);
  // Responder: a connect request the listener migrated to this worker's channel.
  void acceptRequest(rdma_cm_id* id, const SessionToken& token, const Hello& peer);
  // The responder's session no longer waits for `token`'s connection.
  void cancel(const SessionToken& token);
  // Destroys `qp` once the current callback has returned.
  void retire(QueuePair* qp);
  // The instance is going away with the loops already stopped: free what is left without
  // touching the loop.
  void abandon();

 private:
  static void onCompletions(evutil_socket_t fd, short what, void* arg);
  static void onCmEvents(evutil_socket_t fd, short what, void* arg);
  void handleCompletions();
  void handleCmEvents();
  void reap();
  QueuePair* adopt(std::unique_ptr<QueuePair> qp);

  Instance& instance_;
  EventLoop& loop_;
  ibv_comp_channel* completions_ = nullptr;
  rdma_event_channel* cm_ = nullptr;
  EventPtr completions_event_;
  EventPtr cm_event_;
  std::unordered_map<QueuePair*, std::unique_ptr<QueuePair>> qps_;
  std::map<SessionToken, QueuePair*> accepting_;  // accepted, waiting for ESTABLISHED
  std::vector<QueuePair*> retired_;
  bool reap_posted_ = false;
  bool ok_ = false;
};

}  // namespace dmm::stacks::rdma
