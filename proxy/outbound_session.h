#pragma once
// OutboundSession: a captured connection on its way to the peer. It recovers the original
// destination, asks the peer host's sidecar to carry it (HELLO / REPLY over a control
// connection to the peer's tunnel port), and hands both connections to a Relay. When the peer
// has no usable sidecar it falls back to a direct kernel connection (or refuses, per
// fallback.mode), counts why, and remembers sidecar-less peers for fallback.no_sidecar_ttl.
//
//   accept -> [peer known sidecar-less?] -> connect peer tunnel -> send HELLO -> read REPLY
//             |                              | refused/timeout     | closed/timeout/garbage
//             v                              v                     v
//          direct connect  <------------  fall back  <-------------+
//   REPLY accepted -> Relay over the chosen stack;  REPLY rejected -> fall back or refuse,
//   depending on the reason (docs/handshake.md lists which).

#include <chrono>
#include <memory>
#include <vector>

#include "common/event_loop.h"
#include "common/socket_address.h"
#include "common/unique_fd.h"
#include "proxy/frame_io.h"
#include "proxy/handshake_codec.h"
#include "proxy/metrics.h"
#include "proxy/worker.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class OutboundSession final : public Session, public stacks::ConnectionCallbacks {
 public:
  // Takes a connection accepted on a capture listener (worker thread).
  static void startCaptured(Worker& worker, UniqueFd client);
  // Takes a connection accepted on a [[forward]] listener, bound for `destination`.
  static void start(Worker& worker, UniqueFd client, const SocketAddress& destination);
  ~OutboundSession() override;

  void shutdown() override;
  void onConnected(stacks::StackConnection& conn) override;
  void onConnectFailed(stacks::StackConnection& conn, Error error) override;
  void onReadable(stacks::StackConnection& conn) override;
  void onWritable(stacks::StackConnection& conn) override;

 private:
  enum class State { kConnectingPeer, kHandshaking, kConnectingDirect };

  OutboundSession(Worker& worker, UniqueFd client, const SocketAddress& destination);
  void begin();
  void connectPeer();
  void sendHello();
  void flushHello();
  void readReply();
  void onReply(const handshake::Reply& reply);
  void fallBack(FallbackReason reason, bool no_sidecar);
  // The peer closed a pooled connection as we reused it: try a new one (nothing was sent but
  // a HELLO, which the peer never answered). False if this was not a reused connection.
  bool retryFresh();
  void connectDirect();
  void startRelay(std::unique_ptr<stacks::StackConnection> upstream, std::size_t stack);
  void refuse(Outcome outcome, std::size_t stack, const char* why);
  void retireUpstream();
  void onTimeout() override;

  SocketAddress destination_;
  SocketAddress peer_;
  State state_ = State::kConnectingPeer;
  std::unique_ptr<stacks::StackConnection> client_;
  std::unique_ptr<stacks::StackConnection> upstream_;
  // Connections closed inside their own callbacks wait here until the session is destroyed.
  std::vector<std::unique_ptr<stacks::StackConnection>> retired_;
  handshake::Nonce nonce_{};
  std::vector<std::size_t> offered_stacks_;  // offer index -> index in context().stacks
  bool reused_ = false;                      // upstream_ came from the worker's tunnel pool
  std::size_t tuned_for_ = SIZE_MAX;         // reused: the stack instance it is tuned for
  bool framed_ = false;                      // the REPLY accepted framing
  // The client's first bytes, read before the REPLY (only on a reused connection, whose peer
  // frames); sent with the HELLO when early_sent_, else by the relay.
  static constexpr std::size_t kEarlyDataMax = 16 * 1024;
  std::vector<std::byte> early_;
  bool early_sent_ = false;
  FrameWriter writer_;
  FrameReader reader_;  // the REPLY
};

}  // namespace dmm::proxy
