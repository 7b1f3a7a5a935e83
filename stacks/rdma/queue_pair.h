#pragma once
// QueuePair: one data connection over an RC queue pair, as a byte stream (README.md here,
// "Protocol"). Each side owns a receive ring the peer writes into with RDMA WRITE WITH
// IMMEDIATE, and a send ring (registered) that the writer's bytes are copied into; small writes
// go inline from the caller's buffer. Credits bound both the peer's ring (bytes) and its posted
// receives (messages). RdmaConnection is the StackConnection the relay holds; the queue pair
// outlives it until its teardown is done. Worker loop thread only.

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>

#include "common/event_loop.h"
#include "stacks/rdma/instance.h"
#include "stacks/rdma/wire.h"
#include "stacks/stack.h"

namespace dmm::stacks::rdma {

class RdmaConnection;

class QueuePair {
 public:
  enum class Role : std::uint8_t { kInitiator, kResponder };
  enum class State : std::uint8_t {
    kResolving,   // initiator: address and route
    kConnecting,  // connect sent / accept sent, waiting for ESTABLISHED
    kConnected,
    kFailed,  // the connect failed (initiator) or the accept did (responder)
    kDead,    // torn down; waiting to be reaped
  };

  QueuePair(Worker& worker, rdma_cm_id* id, Role role);
  ~QueuePair();
  QueuePair(const QueuePair&) = delete;
  QueuePair& operator=(const QueuePair&) = delete;

  rdma_cm_id* id() const { return id_; }
  State state() const { return state_; }
  Role role() const { return role_; }

  // Creates the completion queue, the queue pair and the rings, and posts the receives.
  Status setUp();
  // The Hello this side sends (its ring, its receives), with `token` (zero in the accept).
  Hello hello(const SessionToken& session) const;
  // The peer's Hello: its ring and first credits.
  void setPeer(const Hello& peer);

  // rdma_cm events routed by the worker.
  void onAddressResolved();
  void onRouteResolved();
  void onEstablished(std::span<const std::uint8_t> private_data);
  void onConnectFailed(int err, const char* reason);
  void onDisconnected();

  // Completion channel: the CQ fired. Polls it empty, then delivers readiness.
  void onCompletions();

  // The relay's handle.
  void attach(RdmaConnection* conn) { conn_ = conn; }
  RdmaConnection* handle() const { return conn_; }
  IoResult read(std::span<std::byte> buffer);
  IoResult write(std::span<const std::byte> data);
  void shutdownWrite();
  // The handle lets go: graceful (FIN after the unsent bytes, bounded by linger) or abort.
  void release(CloseType type);
  bool mayBeReadable() const { return !empty_seen_; }
  std::optional<SocketAddress> peerAddress() const;

  // This queue pair holds one of the instance's connection slots (released with it).
  void holdSlot();

  // Responder bookkeeping: who gets the connection at ESTABLISHED.
  DataAcceptor* acceptor = nullptr;
  SessionToken token{};

  // Frees the verbs objects now (reaping, or the instance going away).
  void destroy();
  // The worker's loop is gone: drop (leak) its timer rather than free it on a freed base.
  void forgetLoop() { (void)linger_.release(); }

 private:
  void poll();
  void handle(const ibv_wc& wc);
  void pump();
  bool sendQueueFull() const;
  bool postWrite(std::uint32_t imm, const void* local, std::uint32_t length, std::uint32_t lkey,
                 bool inline_send, bool force_signal);
  void maybeSendCredit();
  void postReceives();
  void deliver();
  void protocolError(const char* what);
  void tearDown();
  static void onLinger(evutil_socket_t fd, short what, void* arg);
  std::uint32_t remoteSpace() const {
    return peer_ring_size_ - static_cast<std::uint32_t>(remote_written_ - remote_freed_);
  }

  Worker& worker_;
  Instance& instance_;
  Counters& counters_;
  rdma_cm_id* id_;
  Role role_;
  State state_;
  RdmaConnection* conn_ = nullptr;
  bool slot_ = false;  // holds one of the instance's connection slots

  ibv_cq* cq_ = nullptr;
  bool qp_made_ = false;
  Ring rx_;
  Ring tx_;
  std::uint32_t max_inline_ = 0;

  // Peer.
  std::uint64_t peer_ring_ = 0;
  std::uint32_t peer_rkey_ = 0;
  std::uint32_t peer_ring_size_ = 0;

  // Sending.
  std::uint64_t tx_head_ = 0;          // bytes of the send ring freed (their writes completed)
  std::uint64_t tx_posted_ = 0;        // bytes of the send ring posted
  std::uint64_t tx_tail_ = 0;          // bytes copied in by write()
  std::uint64_t remote_written_ = 0;   // bytes written into the peer's ring
  std::uint64_t remote_freed_ = 0;     // of those, freed by the peer's reader (CREDIT)
  std::uint32_t message_credits_ = 0;  // receives the peer has posted that we may consume
  std::uint64_t sends_posted_ = 0;     // work requests posted (sequence numbers from 1)
  std::uint64_t sends_done_ = 0;       // the last signaled one completed
  std::uint64_t last_signaled_ = 0;
  std::uint64_t last_signaled_pos_ = 0;
  struct Signaled {
    std::uint64_t seq;
    std::uint64_t tx_pos;  // tx_posted_ after it
  };
  std::deque<Signaled> signaled_;
  bool fin_wanted_ = false;
  bool fin_posted_ = false;
  std::uint64_t fin_seq_ = 0;
  bool fin_done_ = false;  // the FIN's write completed: everything before it was placed
  bool stalled_ = false;
  bool want_writable_ = false;

  // Receiving.
  std::uint64_t rx_head_ = 0;  // bytes read
  std::uint64_t rx_tail_ = 0;  // bytes the peer wrote
  std::uint32_t receives_to_post_ = 0;
  std::uint32_t unreported_messages_ = 0;
  std::uint64_t unreported_bytes_ = 0;
  bool fin_received_ = false;
  bool peer_gone_ = false;  // the peer disconnected
  bool reset_ = false;      // the stream is broken (peer reset, error)
  bool empty_seen_ = false;

  // Readiness to deliver after the current batch.
  bool notify_readable_ = false;
  bool notify_writable_ = false;

  bool closing_ = false;  // released gracefully: flushing, then disconnect
  EventPtr linger_;
};

class RdmaConnection final : public StackConnection {
 public:
  RdmaConnection(QueuePair& qp, ConnectionCallbacks* callbacks);
  ~RdmaConnection() override;

  void setCallbacks(ConnectionCallbacks& callbacks) override { callbacks_ = &callbacks; }
  IoResult read(std::span<std::byte> buffer) override;
  IoResult write(std::span<const std::byte> data) override;
  void shutdownWrite() override;
  void close(CloseType type) override;
  bool mayBeReadable() const override;
  std::optional<SocketAddress> peerAddress() const override;

  ConnectionCallbacks* callbacks() const { return callbacks_; }
  // The queue pair went away under the handle (the instance stopping): I/O fails from now on.
  void detach() {
    qp_ = nullptr;
    callbacks_ = nullptr;
  }

 private:
  QueuePair* qp_;
  ConnectionCallbacks* callbacks_;
};

}  // namespace dmm::stacks::rdma
