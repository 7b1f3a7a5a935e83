#pragma once
// DpdkConnection: the worker's end of a channel (channel.h). read() and write() touch only the
// channel's rings; anything lwIP must do (send, reopen the window, FIN, RST) is a command bit
// the poll thread picks up. Readiness comes back as event bits through the worker's LoopQueue
// (one eventfd per worker and instance).

#include <memory>
#include <optional>

#include "common/event_loop.h"
#include "stacks/dpdk/channel.h"
#include "stacks/stack.h"

namespace dmm::stacks::dpdk {

class DpdkConnection final : public StackConnection {
 public:
  // Takes the worker's reference on `ch`.
  DpdkConnection(Channel& ch, ConnectionCallbacks* callbacks);
  ~DpdkConnection() override;

  void setCallbacks(ConnectionCallbacks& callbacks) override { callbacks_ = &callbacks; }
  IoResult read(std::span<std::byte> buffer) override;
  IoResult write(std::span<const std::byte> data) override;
  void shutdownWrite() override;
  void close(CloseType type) override;
  bool mayBeReadable() const override;
  std::optional<SocketAddress> peerAddress() const override;

  // The worker loop's side of a LoopQueue: delivers the queued channels' events.
  static void onQueue(evutil_socket_t fd, short what, void* arg);

 private:
  void dispatch(std::uint32_t events);

  Channel* ch_;
  ConnectionCallbacks* callbacks_;
  bool shut_ = false;
  bool empty_seen_ = false;  // the last read() found the ring empty
};

}  // namespace dmm::stacks::dpdk
