#pragma once
// ShmConnection: the sidecar's end of a preloaded connection on the shared-memory data path
// (preload stage 2, preload/shm_ring.h). To the relay it is a StackConnection like any other:
// read() takes from the up ring, write() puts into the down ring, and readiness comes from the
// eventfd the shim writes and from the Unix socket (the shim's end of stream, or its close).
//
// Nothing the application writes into the shared memory is trusted: positions are clamped to
// the ring, sizes are the sidecar's own, and the application's locks are never taken here.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "common/event_loop.h"
#include "common/result.h"
#include "common/unique_fd.h"
#include "preload/shm_ring.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class ShmConnection final : public stacks::StackConnection {
 public:
  // The memory and the eventfd for a new connection over `socket` (the preload connection,
  // preamble consumed). Nothing is sent yet: offer() does that.
  // Events go to the callbacks given with setCallbacks(), which must come before the loop
  // runs again after offer().
  // `live` counts the connections open (incremented here, decremented when destroyed; it
  // must outlive the connection). `socket` is taken only on success.
  static Result<std::unique_ptr<ShmConnection>> create(EventLoop& loop, UniqueFd& socket,
                                                       std::size_t& live);
  ~ShmConnection() override;

  // Sends the shim kReplyShm with the memfd and the eventfd (SCM_RIGHTS), then starts watching
  // for events. On failure nothing usable was sent and the socket is returned, for stage 1.
  Status offer();
  // After a failed offer(): the socket back.
  UniqueFd releaseSocket();

  void setCallbacks(stacks::ConnectionCallbacks& callbacks) override { callbacks_ = &callbacks; }
  stacks::IoResult read(std::span<std::byte> buffer) override;
  stacks::IoResult write(std::span<const std::byte> data) override;
  void shutdownWrite() override;
  void close(stacks::CloseType type) override;
  bool mayBeReadable() const override;
  std::optional<SocketAddress> peerAddress() const override { return std::nullopt; }

  static constexpr std::uint32_t kRingBytes = preload::shm::kRingBytes;

 private:
  ShmConnection(EventLoop& loop, UniqueFd socket, UniqueFd memfd, UniqueFd wake, UniqueFd bell_read,
                UniqueFd bell_write, void* mapping, std::size_t& live);
  static void onWake(evutil_socket_t fd, short what, void* arg);
  static void onSocket(evutil_socket_t fd, short what, void* arg);
  // Reads back the shim's filler bytes: its fd polls writable again.
  void drainFiller();
  void ringDoorbell();
  // Wakes a reader blocked on the bell pipe.
  void ringBell();
  // The application's end is gone (closed, not just half-closed).
  void checkGone();
  void release();

  EventLoop& loop_;
  std::size_t& live_;
  UniqueFd socket_;
  UniqueFd memfd_;
  UniqueFd wake_;        // the eventfd the shim writes; never read here (edge-triggered)
  UniqueFd bell_read_;   // passed to the shim, then closed here
  UniqueFd bell_write_;  // the bell: a byte wakes a reader blocked in read()
  void* mapping_;
  preload::shm::Header* header_;
  preload::shm::Ring up_;    // consumer side
  preload::shm::Ring down_;  // producer side
  EventPtr wake_event_;
  EventPtr socket_event_;
  stacks::ConnectionCallbacks* callbacks_ = nullptr;
  bool app_eof_ = false;   // the shim shut down its direction (or closed)
  bool app_gone_ = false;  // the shim closed its end: writes reset
  bool write_shut_ = false;
  bool want_write_ = false;  // a write found the down ring full
};

}  // namespace dmm::proxy
