#pragma once
// InboundSession: a peer sidecar's control connection on our tunnel port. It reads the HELLO
// (bounded size, within timeouts.handshake), authenticates it, checks freshness and replay,
// checks the destination against the inbound allowlist (never an open relay), picks the first
// offered stack it runs, connects to the destination over the local kernel, answers, and hands
// both connections to a Relay. Every refusal is answered when the peer can be answered, and
// counted by reason.

#include <chrono>
#include <memory>
#include <vector>

#include "common/event_loop.h"
#include "common/unique_fd.h"
#include "policy/policy.h"
#include "proxy/frame_io.h"
#include "proxy/handshake_codec.h"
#include "proxy/metrics.h"
#include "proxy/worker.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class InboundSession final : public Session,
                             public stacks::ConnectionCallbacks,
                             public stacks::DataAcceptor {
 public:
  // Takes a connection accepted on a tunnel listener (worker thread).
  static void start(Worker& worker, UniqueFd control);
  // Takes a framed connection whose previous session ended cleanly, to wait (up to
  // tunnel.keepalive) for the peer's next HELLO; `leftover` is what already arrived of it.
  // `stack`: the instance the connection was tuned for.
  static void resume(Worker& worker, std::unique_ptr<stacks::StackConnection> control,
                     std::size_t stack, std::vector<std::byte> leftover);
  ~InboundSession() override;

  void shutdown() override;
  void drainIdle() override;
  void onConnected(stacks::StackConnection& conn) override;
  void onConnectFailed(stacks::StackConnection& conn, Error error) override;
  void onReadable(stacks::StackConnection& conn) override;
  void onWritable(stacks::StackConnection& conn) override;
  // The chosen stack's data connection (kOwnDataPath stacks), bound by the token.
  void onDataConnection(std::unique_ptr<stacks::StackConnection> conn) override;

 private:
  enum class State { kReadingHello, kConnecting, kAccepting, kAwaitingData, kRejecting };

  InboundSession(Worker& worker, UniqueFd control);
  InboundSession(Worker& worker, std::unique_ptr<stacks::StackConnection> control);
  void onReaderStep(FrameReader::Step step);
  void readHello();
  void onHello();
  bool allowed(const SocketAddress& dst);
  void reject(handshake::RejectReason reason);
  void flushReply();
  void startRelay();
  // Ends without a reply (not our protocol, timeout, peer gone).
  void drop(RejectionLabel label, bool count);
  // No longer waits for a data connection (kOwnDataPath stacks).
  void cancelData();
  void onTimeout() override;

  State state_ = State::kReadingHello;
  std::unique_ptr<stacks::StackConnection> control_;
  std::unique_ptr<stacks::StackConnection> server_;
  FrameReader reader_;
  handshake::Hello hello_;
  bool hello_valid_ = false;
  std::size_t chosen_stack_ = 0;
  bool stack_chosen_ = false;  // chosen_stack_ is meaningful
  std::uint8_t chosen_offer_ = 0;
  // A stack whose sessions flow on a data connection of its own: the token it expects and its
  // connect parameters for the REPLY; data_ once it came.
  bool own_data_path_ = false;
  bool expecting_ = false;
  stacks::SessionToken token_{};
  std::vector<std::uint8_t> chosen_params_;
  std::unique_ptr<stacks::StackConnection> data_;
  bool reused_ = false;               // an earlier session ran on control_
  std::size_t tuned_for_ = SIZE_MAX;  // reused: the stack instance control_ is tuned for
  bool framed_ = false;               // this session's data is framed
  bool raw_frames_ = false;           // ... with version 2 (a direction may go raw)
  FrameWriter writer_;
  // This side's policy decision (which of its instances it allows); the snapshot is kept alive
  // while its rule and action are in use.
  std::shared_ptr<const policy::Policy> policy_;
  policy::Decision decision_;
  policy::Facts facts_;
};

}  // namespace dmm::proxy
