#pragma once
// KernelConnection: a StackConnection over a kernel TCP socket, driven by one edge-triggered
// libevent event (read and write) on its worker loop. Used for the kernel stack's connections
// and for every local socket the proxy relays (captured clients, delivered servers).

#include "common/event_loop.h"
#include "common/unique_fd.h"
#include "stacks/stack.h"

namespace dmm::stacks::kernel {

class KernelConnection final : public StackConnection {
 public:
  // Takes `fd` (non-blocking, connected or with a connect in progress when `connecting`).
  // The socket is set to reset on close until close(kGraceful), so that if this process dies
  // the peer sees a reset rather than a clean end of a truncated stream.
  KernelConnection(EventLoop& loop, UniqueFd fd, ConnectionCallbacks& callbacks, bool connecting);
  ~KernelConnection() override;

  void setCallbacks(ConnectionCallbacks& callbacks) override { callbacks_ = &callbacks; }
  IoResult read(std::span<std::byte> buffer) override;
  IoResult write(std::span<const std::byte> data) override;
  void shutdownWrite() override;
  void close(CloseType type) override;
  int fd() const override { return fd_.get(); }
  bool mayBeReadable() const override { return maybe_readable_; }
  void watch(bool readable, bool writable) override;
  std::optional<SocketAddress> peerAddress() const override;

 private:
  static void onEvent(evutil_socket_t fd, short what, void* arg);

  UniqueFd fd_;
  EventPtr event_;
  ConnectionCallbacks* callbacks_;
  bool connecting_;
  // The peer's FIN or RST was seen (EPOLLRDHUP): reads go on to the end, a short read no longer
  // means drained.
  bool peer_closed_ = false;
  bool maybe_error_ = false;  // an event that may have been a reset (see onEvent)
  // False once a read() found the socket empty, until the next readable edge.
  bool maybe_readable_;
};

}  // namespace dmm::stacks::kernel
