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
#include "proxy/handshake_codec.h"
#include "proxy/metrics.h"
#include "proxy/worker.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class InboundSession final : public Session, public stacks::ConnectionCallbacks {
 public:
  // Takes a connection accepted on a tunnel listener (worker thread).
  static void start(Worker& worker, UniqueFd control);
  ~InboundSession() override;

  void shutdown() override;
  void onConnected(stacks::StackConnection& conn) override;
  void onConnectFailed(stacks::StackConnection& conn, Error error) override;
  void onReadable(stacks::StackConnection& conn) override;
  void onWritable(stacks::StackConnection& conn) override;

 private:
  using Clock = std::chrono::steady_clock;
  enum class State { kReadingHello, kConnecting, kAccepting, kRejecting, kDone };

  InboundSession(Worker& worker, UniqueFd control);
  void readHello();
  void onHello();
  bool allowed(const SocketAddress& dst);
  void reject(handshake::RejectReason reason);
  void flushReply();
  void startRelay();
  // Ends without a reply (not our protocol, timeout, peer gone).
  void drop(RejectionLabel label, bool count);
  void end();
  void armTimer(std::chrono::milliseconds timeout);
  static void onTimer(evutil_socket_t fd, short what, void* arg);

  Worker& worker_;
  std::uint64_t id_;
  Clock::time_point started_;
  State state_ = State::kReadingHello;
  std::unique_ptr<stacks::StackConnection> control_;
  std::unique_ptr<stacks::StackConnection> server_;
  EventPtr timer_;
  std::vector<std::uint8_t> in_;
  std::size_t in_need_ = handshake::kPrefixSize;
  bool prefix_checked_ = false;
  handshake::Hello hello_;
  bool hello_valid_ = false;
  std::size_t chosen_stack_ = 0;
  bool stack_chosen_ = false;  // chosen_stack_ is meaningful
  std::uint8_t chosen_offer_ = 0;
  std::vector<std::uint8_t> out_;
  std::size_t out_done_ = 0;
};

}  // namespace dmm::proxy
