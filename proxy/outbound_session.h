#pragma once
// OutboundSession: a captured connection on its way to the peer. It recovers the original
// destination, asks the peer host's sidecar to carry it (HELLO / REPLY over a control
// connection to the peer's tunnel port), and hands both connections to a Relay. When the peer
// has no usable sidecar it falls back to a direct kernel connection (or refuses, per
// fallback.mode), counts why, and remembers sidecar-less peers for fallback.no_sidecar_ttl.
//
//   accept -> classify (policy: rule -> candidate stacks, mode, timeouts, no_sidecar action)
//          -> [peer known sidecar-less?] -> attempts: connect the peer's tunnel port over each
//             candidate stack (sequential: one after another; race: staggered starts, the
//             first established wins, the others are cancelled), skipping candidates whose
//             circuit breaker toward the peer is open
//          -> send HELLO on the winner -> read REPLY
//             | every attempt failed       | closed/timeout/garbage
//             v                            v
//          direct connect or refuse  <--  fall back (the rule's no_sidecar, else [fallback])
//   REPLY accepted -> Relay over the chosen stack;  REPLY rejected -> fall back or refuse,
//   depending on the reason (docs/handshake.md lists which).

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/event_loop.h"
#include "common/socket_address.h"
#include "common/unique_fd.h"
#include "policy/policy.h"
#include "proxy/frame_io.h"
#include "proxy/handshake_codec.h"
#include "proxy/metrics.h"
#include "proxy/worker.h"
#include "stacks/stack.h"

namespace dmm::proxy {

// Who opened a connection, as the kernel tells it (the preload socket's SO_PEERCRED and
// /proc), with the QoS hint the application gave.
struct ClientIdentity {
  std::optional<std::uint32_t> uid;
  std::optional<pid_t> pid;
  std::string app;                  // process name; empty: unknown
  std::optional<std::uint8_t> qos;  // index into policy::kQosClasses
};

class OutboundSession final : public Session, public stacks::ConnectionCallbacks {
 public:
  // Takes a connection accepted on a capture listener (worker thread).
  static void startCaptured(Worker& worker, UniqueFd client);
  // Takes a connection accepted on a [[forward]] listener, bound for `destination`.
  static void start(Worker& worker, UniqueFd client, const SocketAddress& destination);
  // Takes a connection the preload shim handed over (PreloadSession), with what the kernel
  // said of the application: its facts replace the sock_diag lookup of the owner.
  static void startPreloaded(Worker& worker, UniqueFd client, const SocketAddress& destination,
                             ClientIdentity who);
  // The same over an already made connection (the shared-memory path, ShmConnection).
  static void startPreloaded(Worker& worker, std::unique_ptr<stacks::StackConnection> client,
                             const SocketAddress& destination, ClientIdentity who);
  ~OutboundSession() override;

  void shutdown() override;
  void onConnected(stacks::StackConnection& conn) override;
  void onConnectFailed(stacks::StackConnection& conn, Error error) override;
  void onReadable(stacks::StackConnection& conn) override;
  void onWritable(stacks::StackConnection& conn) override;

 private:
  enum class State { kConnectingPeer, kHandshaking, kConnectingData, kConnectingDirect };

  // One candidate stack's try at reaching the peer sidecar.
  struct Attempt {
    OutboundSession* session = nullptr;
    std::size_t stack = 0;  // index in context().stacks
    std::unique_ptr<stacks::StackConnection> conn;
    EventPtr timer;      // attempt_timeout
    bool probe = false;  // its circuit breaker let it through as the one probe
  };

  OutboundSession(Worker& worker, UniqueFd client, const SocketAddress& destination);
  OutboundSession(Worker& worker, std::unique_ptr<stacks::StackConnection> client,
                  const SocketAddress& destination);
  void begin();
  // Starts the next candidate's attempt; false when none is left.
  bool startNextAttempt();
  Attempt* findAttempt(const stacks::StackConnection& conn);
  void attemptFailed(Attempt* attempt, int err);
  void onEstablished(Attempt* attempt);
  // Ends every attempt but `keep` (lost the race, or the session is over).
  void cancelAttempts(const Attempt* keep);
  void breakerResult(std::size_t stack, bool ok);
  // Counts how the winning attempt ended (once) and tells its breaker.
  void winnerDone(AttemptOutcome outcome);
  static void onAttemptTimer(evutil_socket_t fd, short what, void* arg);
  static void onStaggerTimer(evutil_socket_t fd, short what, void* arg);
  void sendHello();
  void flushHello();
  void readReply();
  void onReply(const handshake::Reply& reply);
  void fallBack(FallbackReason reason, bool no_sidecar);
  // The peer closed a pooled connection as we reused it: try a new one (nothing was sent but
  // a HELLO, which the peer never answered). False if this was not a reused connection.
  bool retryFresh();
  void connectDirect();
  policy::NoSidecar noSidecarAction() const;
  void startRelay(std::unique_ptr<stacks::StackConnection> upstream, std::size_t stack,
                  std::unique_ptr<stacks::StackConnection> control = nullptr);
  // The chosen stack carries sessions on a data connection of its own: open it.
  void connectData(std::size_t stack, const handshake::Reply& reply);
  // That data connection failed: the next candidates get a fresh handshake, or fall back.
  void dataPathFailed(int err);
  void refuse(Outcome outcome, std::size_t stack, const char* why);
  void retireUpstream();
  void onTimeout() override;

  SocketAddress destination_;
  SocketAddress peer_;
  // The policy decision; the snapshot is kept alive while its rule and action are in use.
  std::shared_ptr<const policy::Policy> policy_;
  policy::Decision decision_;
  policy::Facts facts_;
  std::optional<ClientIdentity> identity_;  // preloaded connections only
  RuleMetrics* rule_metrics_ = nullptr;
  std::vector<std::size_t> candidates_;  // stacks to try, in order (after breakers)
  std::size_t next_candidate_ = 0;
  std::vector<std::size_t> probes_;          // candidates let through as their breaker's one probe
  std::vector<std::size_t> probes_started_;  // of those, the ones an attempt was started for
  std::vector<std::unique_ptr<Attempt>> attempts_;  // in flight
  EventPtr stagger_;
  std::size_t winner_ = SIZE_MAX;  // the stack whose connection carries the HELLO
  bool winner_probe_ = false;
  bool winner_counted_ = false;
  FallbackReason last_failure_ = FallbackReason::kPeerTimeout;
  State state_ = State::kConnectingPeer;
  std::unique_ptr<stacks::StackConnection> client_;
  std::unique_ptr<stacks::StackConnection> upstream_;
  std::unique_ptr<stacks::StackConnection> data_;  // kConnectingData: the data connection
  std::size_t data_stack_ = SIZE_MAX;              // its stack
  // Connections closed inside their own callbacks wait here until the session is destroyed.
  std::vector<std::unique_ptr<stacks::StackConnection>> retired_;
  handshake::Nonce nonce_{};
  std::vector<std::size_t> offered_stacks_;  // offer index -> index in context().stacks
  bool reused_ = false;                      // upstream_ came from the worker's tunnel pool
  std::size_t tuned_for_ = SIZE_MAX;         // reused: the stack instance it is tuned for
  bool framed_ = false;                      // the REPLY accepted framing
  bool raw_frames_ = false;                  // ... version 2 (a direction may go raw)
  // The client's first bytes, read before the REPLY (only on a reused connection, whose peer
  // frames); sent with the HELLO when early_sent_, else by the relay.
  static constexpr std::size_t kEarlyDataMax = 16 * 1024;
  std::vector<std::byte> early_;
  bool early_sent_ = false;
  FrameWriter writer_;
  FrameReader reader_;  // the REPLY
};

}  // namespace dmm::proxy
