#include "stacks/dpdk/dpdk_connection.h"

#include <rte_ring.h>
#include <unistd.h>

#include <cerrno>

#include "stacks/dpdk/instance.h"
#include "stacks/dpdk/tsan_annotations.h"

namespace dmm::stacks::dpdk {

DpdkConnection::DpdkConnection(Channel& ch, ConnectionCallbacks* callbacks)
    : ch_(&ch), callbacks_(callbacks) {
  ch.conn = this;
}

DpdkConnection::~DpdkConnection() {
  if (ch_ != nullptr) close(CloseType::kAbort);
}

IoResult DpdkConnection::read(std::span<std::byte> buffer) {
  if (ch_ == nullptr) return {IoResult::Status::kError, 0, EBADF};
  Channel& ch = *ch_;
  std::size_t before = ch.rx.used();
  if (before == 0) {
    if (int err = ch.error.load(std::memory_order_acquire); err != 0)
      return IoResult::fromErrno(err);
    if (ch.rx_eof.load(std::memory_order_acquire)) {
      // The FIN is flagged after the last byte was put: look once more.
      if (ch.rx.used() == 0) return IoResult::eof();
      before = ch.rx.used();
    } else {
      empty_seen_ = true;
      return IoResult::wouldBlock();
    }
  }
  std::size_t n = ch.rx.get(buffer);
  // The window reopens by what was taken. Wake a sleeping poll thread only when the ring was
  // half full (the sender may be waiting for it); otherwise its next iteration will do.
  ch.instance->command(ch, kCmdConsumed, before >= kRingBytes / 2);
  bool drained = n == before && !ch.rx_eof.load(std::memory_order_acquire) &&
                 ch.error.load(std::memory_order_relaxed) == 0 && ch.rx.used() == 0;
  empty_seen_ = drained;
  return IoResult::ok(n, drained);
}

bool DpdkConnection::mayBeReadable() const {
  return !empty_seen_;
}

IoResult DpdkConnection::write(std::span<const std::byte> data) {
  if (ch_ == nullptr) return {IoResult::Status::kError, 0, EBADF};
  Channel& ch = *ch_;
  if (int err = ch.error.load(std::memory_order_acquire); err != 0) return IoResult::fromErrno(err);
  if (shut_) return IoResult::fromErrno(EPIPE);
  std::size_t n = ch.tx.put(data);
  if (n == 0) {
    // Full: ask for a kEvWritable, then look again (the poll thread may have freed space
    // between the two).
    ch.want_writable.store(true, std::memory_order_seq_cst);
    n = ch.tx.put(data);
    if (n == 0) return IoResult::wouldBlock();
  }
  ch.instance->command(ch, kCmdSend);
  return IoResult::ok(n);
}

void DpdkConnection::shutdownWrite() {
  if (ch_ == nullptr || shut_) return;
  shut_ = true;
  ch_->instance->command(*ch_, kCmdShutdown);
}

void DpdkConnection::close(CloseType type) {
  if (ch_ == nullptr) return;
  Channel* ch = ch_;
  ch_ = nullptr;
  ch->conn = nullptr;
  ch->instance->command(*ch, type == CloseType::kAbort ? kCmdAbort : kCmdClose);
  ch->releaseRef();
}

std::optional<SocketAddress> DpdkConnection::peerAddress() const {
  if (ch_ == nullptr || !ch_->remote.valid()) return std::nullopt;
  return ch_->remote;
}

void DpdkConnection::dispatch(std::uint32_t events) {
  // A callback may close this connection (not delete it): check before each.
  if ((events & kEvFailed) != 0) {
    int err = ch_->error.load();
    close(CloseType::kAbort);  // the connection is dead; its owner hears it once, here
    callbacks_->onConnectFailed(*this, Error{err != 0 ? err : ECONNREFUSED, "dpdk_connect"});
    return;
  }
  if ((events & kEvConnected) != 0) {
    callbacks_->onConnected(*this);
    if (ch_ == nullptr) return;
  }
  if ((events & kEvReadable) != 0) {
    empty_seen_ = false;
    callbacks_->onReadable(*this);
    if (ch_ == nullptr) return;
  }
  if ((events & kEvWritable) != 0) callbacks_->onWritable(*this);
}

void DpdkConnection::onQueue(evutil_socket_t fd, short, void* arg) {
  auto* q = static_cast<LoopQueue*>(arg);
  std::uint64_t v;
  (void)::read(fd, &v, sizeof v);
  void* objs[32];
  for (;;) {
    unsigned n = rte_ring_sc_dequeue_burst(q->ring, objs, 32, nullptr);
    if (n > 0) ringAcquire(q->ring);
    if (n == 0) {
      // Re-arm, then look again: an enqueue between the two saw the arm down and will not
      // write the eventfd.
      q->armed.store(true, std::memory_order_seq_cst);
      if (rte_ring_empty(q->ring)) return;
      continue;
    }
    for (unsigned i = 0; i < n; ++i) {
      auto* ch = static_cast<Channel*>(objs[i]);
      ch->in_worker_queue.store(false, std::memory_order_seq_cst);
      std::uint32_t events = ch->events.exchange(0, std::memory_order_acq_rel);
      if ((events & kEvAccepted) != 0) {
        // A data connection presented a token this worker expects.
        auto e = ch->expectation;
        ch->expectation.reset();
        if (e) ch->instance->settle(*e);
        auto conn = std::make_unique<DpdkConnection>(*ch, nullptr);
        if (e && e->acceptor != nullptr) {
          DataAcceptor* acceptor = e->acceptor;
          e->acceptor = nullptr;
          acceptor->onDataConnection(std::move(conn));
        } else {
          conn->close(CloseType::kAbort);  // the session gave up waiting
        }
        events &= ~static_cast<std::uint32_t>(kEvAccepted);
      }
      if (events != 0 && ch->conn != nullptr && ch->conn->callbacks_ != nullptr)
        ch->conn->dispatch(events);
      ch->releaseRef();
    }
  }
}

}  // namespace dmm::stacks::dpdk
