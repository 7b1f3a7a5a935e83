#include "stacks/kernel/kernel_connection.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "common/socket_util.h"

namespace dmm::stacks::kernel {

KernelConnection::KernelConnection(EventLoop& loop, UniqueFd fd, ConnectionCallbacks& callbacks,
                                   bool connecting)
    : fd_(std::move(fd)),
      callbacks_(&callbacks),
      connecting_(connecting),
      // Nothing can wait on a socket still connecting; an accepted one may hold bytes already.
      maybe_readable_(!connecting) {
  // Accepted sockets inherit it from their listener (Worker::bindListeners).
  if (connecting) (void)net::setAbortOnClose(fd_.get(), true);
  // EV_CLOSED (EPOLLRDHUP) tells a short read that leaves a FIN or RST behind from one that
  // drained the socket: only the latter may skip the read that would return EAGAIN.
  event_ = loop.newEvent(fd_.get(), EV_READ | EV_WRITE | EV_CLOSED | EV_PERSIST | EV_ET,
                         &KernelConnection::onEvent, this);
  event_add(event_.get(), nullptr);
}

KernelConnection::~KernelConnection() {
  if (fd_) close(CloseType::kAbort);
}

void KernelConnection::onEvent(evutil_socket_t, short what, void* arg) {
  auto* self = static_cast<KernelConnection*>(arg);
  if ((what & EV_CLOSED) != 0) {
    self->peer_closed_ = true;
    what |= EV_READ;
  }
  // libevent reports EPOLLERR and EPOLLHUP (a reset) as EV_READ | EV_WRITE, without EV_CLOSED:
  // an event with both may carry a reset behind the bytes, which no later edge announces. Reads
  // may not call the socket drained until one has seen it empty.
  if ((what & (EV_READ | EV_WRITE)) == (EV_READ | EV_WRITE)) self->maybe_error_ = true;
  if ((what & EV_READ) != 0) self->maybe_readable_ = true;
  if (self->connecting_) {
    if ((what & EV_WRITE) == 0 && (what & EV_READ) == 0) return;
    self->connecting_ = false;
    int err = net::socketError(self->fd_.get());
    if (err != 0) {
      self->callbacks_->onConnectFailed(*self, Error{err, "connect"});
      return;
    }
    self->callbacks_->onConnected(*self);
    // The first edge may also carry data (a server that speaks first).
    if (self->fd_ && (what & EV_READ) != 0) self->callbacks_->onReadable(*self);
    return;
  }
  if ((what & EV_READ) != 0) {
    self->callbacks_->onReadable(*self);
    if (!self->fd_) return;  // closed inside the callback
  }
  if ((what & EV_WRITE) != 0) self->callbacks_->onWritable(*self);
}

IoResult KernelConnection::read(std::span<std::byte> buffer) {
  ssize_t n = ::recv(fd_.get(), buffer.data(), buffer.size(), 0);
  if (n > 0) {
    // Edge-triggered: bytes arriving after this read raise a new edge, so a short read with no
    // FIN or RST seen has emptied the socket.
    auto got = static_cast<std::size_t>(n);
    bool drained = got < buffer.size() && !peer_closed_ && !maybe_error_;
    maybe_readable_ = !drained;
    return IoResult::ok(got, drained);
  }
  if (n == 0) return IoResult::eof();
  if (errno == EAGAIN) {
    maybe_readable_ = false;
    maybe_error_ = false;  // empty and no error pending: a later reset raises a new edge
  }
  return IoResult::fromErrno(errno);
}

IoResult KernelConnection::write(std::span<const std::byte> data) {
  ssize_t n = ::send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
  if (n >= 0) return IoResult::ok(static_cast<std::size_t>(n));
  return IoResult::fromErrno(errno);
}

void KernelConnection::watch(bool readable, bool writable) {
  if (!fd_ || connecting_) return;
  // libevent reports errors (EPOLLERR, EPOLLHUP) as EV_READ | EV_WRITE, and only to an event
  // that asked for one of those: with neither wanted, writability stays (it changes rarely, a
  // readable wake-up per segment would not). EV_CLOSED brings the end of stream.
  if (!readable && !writable) writable = true;
  auto what = static_cast<short>(EV_CLOSED | EV_PERSIST | EV_ET | (readable ? EV_READ : 0) |
                                 (writable ? EV_WRITE : 0));
  if (event_get_events(event_.get()) == what) return;
  event_base* base = event_get_base(event_.get());
  event_del(event_.get());
  event_assign(event_.get(), base, fd_.get(), what, &KernelConnection::onEvent, this);
  event_add(event_.get(), nullptr);
}

void KernelConnection::shutdownWrite() {
  ::shutdown(fd_.get(), SHUT_WR);
}

void KernelConnection::close(CloseType type) {
  if (!fd_) return;
  event_.reset();
  if (type == CloseType::kGraceful) (void)net::setAbortOnClose(fd_.get(), false);
  fd_.reset();
}

std::optional<SocketAddress> KernelConnection::peerAddress() const {
  return net::peerAddress(fd_.get());
}

}  // namespace dmm::stacks::kernel
