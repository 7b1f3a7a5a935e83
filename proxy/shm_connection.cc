#include "proxy/shm_connection.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace dmm::proxy {

namespace shm = preload::shm;
using stacks::CloseType;
using stacks::IoResult;

Result<std::unique_ptr<ShmConnection>> ShmConnection::create(EventLoop& loop, UniqueFd& socket,
                                                             std::size_t& live) {
  UniqueFd memfd(::memfd_create("dmm-preload-shm", MFD_CLOEXEC));
  if (!memfd) return Error{errno, "memfd_create"};
  const std::size_t size = shm::mappingBytes(kRingBytes);
  if (::ftruncate(memfd.get(), static_cast<off_t>(size)) != 0) return Error{errno, "ftruncate"};
  void* mapping = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
  if (mapping == MAP_FAILED) return Error{errno, "mmap"};
  if (!shm::initialise(mapping, kRingBytes)) {
    ::munmap(mapping, size);
    return Error{ENOMEM, "shm_mutex"};
  }
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) {
    int e = errno;
    ::munmap(mapping, size);
    return Error{e, "eventfd"};
  }
  // The read end blocks (the shim's reader sleeps in read() on it); ours never does.
  int bell[2];
  if (::pipe2(bell, O_CLOEXEC) != 0 || ::fcntl(bell[1], F_SETFL, O_NONBLOCK) != 0) {
    int e = errno;
    ::munmap(mapping, size);
    return Error{e, "pipe2"};
  }
  return std::unique_ptr<ShmConnection>(new ShmConnection(loop, std::move(socket), std::move(memfd),
                                                          std::move(wake), UniqueFd(bell[0]),
                                                          UniqueFd(bell[1]), mapping, live));
}

ShmConnection::ShmConnection(EventLoop& loop, UniqueFd socket, UniqueFd memfd, UniqueFd wake,
                             UniqueFd bell_read, UniqueFd bell_write, void* mapping,
                             std::size_t& live)
    : loop_(loop),
      live_(live),
      socket_(std::move(socket)),
      memfd_(std::move(memfd)),
      wake_(std::move(wake)),
      bell_read_(std::move(bell_read)),
      bell_write_(std::move(bell_write)),
      mapping_(mapping),
      header_(static_cast<shm::Header*>(mapping)),
      up_(shm::upRing(mapping, kRingBytes)),
      down_(shm::downRing(mapping, kRingBytes)) {
  ++live_;
}

ShmConnection::~ShmConnection() {
  if (mapping_ != nullptr) close(CloseType::kAbort);
  --live_;
}

Status ShmConnection::offer() {
  char reply = shm::kReplyShm;
  iovec iov{&reply, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(3 * sizeof(int));
  int fds[3] = {memfd_.get(), wake_.get(), bell_read_.get()};
  std::memcpy(CMSG_DATA(c), fds, sizeof fds);
  ssize_t n;
  do {
    n = ::sendmsg(socket_.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n != 1) return Error{n < 0 ? errno : EIO, "shm_offer"};
  // The shim has the memory and the bell's read end now; ours need not stay open.
  memfd_.reset();
  bell_read_.reset();
  wake_event_ =
      loop_.newEvent(wake_.get(), EV_READ | EV_PERSIST | EV_ET, &ShmConnection::onWake, this);
  socket_event_ = loop_.newEvent(socket_.get(), EV_READ | EV_CLOSED | EV_PERSIST | EV_ET,
                                 &ShmConnection::onSocket, this);
  event_add(wake_event_.get(), nullptr);
  event_add(socket_event_.get(), nullptr);
  return {};
}

UniqueFd ShmConnection::releaseSocket() {
  return std::move(socket_);
}

void ShmConnection::onWake(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<ShmConnection*>(arg);
  if (self->header_->doorbell_request.load(std::memory_order_relaxed) != 0 &&
      self->header_->doorbell_request.exchange(0) != 0) {
    self->ringDoorbell();
  }
  // The shim waits for room in the up ring that an earlier read freed (it raced us).
  if (self->up_.takeProducerWaiting()) self->drainFiller();
  if (self->up_.readable() > 0 || self->app_eof_) {
    self->callbacks_->onReadable(*self);
    if (self->mapping_ == nullptr) return;  // closed inside
  }
  if (self->want_write_ && self->down_.writable() > 0) {
    self->want_write_ = false;
    self->callbacks_->onWritable(*self);
  }
}

void ShmConnection::onSocket(evutil_socket_t, short what, void* arg) {
  auto* self = static_cast<ShmConnection*>(arg);
  if ((what & EV_CLOSED) == 0) {
    // Filler (read back when space is freed), or the application's close: libevent reports a
    // hang-up (EPOLLHUP, both directions shut) as EV_READ | EV_WRITE without EV_CLOSED.
    pollfd p{self->socket_.get(), POLLRDHUP, 0};
    if (::poll(&p, 1, 0) != 1 || (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) == 0) return;
  }
  if (!self->app_eof_) {
    self->app_eof_ = true;
    self->checkGone();
    self->callbacks_->onReadable(*self);
    if (self->mapping_ == nullptr) return;
  } else if (!self->app_gone_) {
    self->checkGone();  // a half-close earlier, the close now
  }
  if (self->app_gone_ && self->want_write_) {
    self->want_write_ = false;
    self->callbacks_->onWritable(*self);  // the write sees the reset
  }
}

void ShmConnection::checkGone() {
  // POLLHUP on a Unix stream: both directions are shut, i.e. the application closed its end.
  pollfd p{socket_.get(), POLLOUT, 0};
  if (::poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR)) != 0) app_gone_ = true;
}

void ShmConnection::drainFiller() {
  char sink[256];
  for (;;) {
    ssize_t n = ::recv(socket_.get(), sink, sizeof sink, MSG_DONTWAIT);
    if (n > 0) continue;
    if (n == 0 && !app_eof_) {
      app_eof_ = true;
      checkGone();
    }
    break;
  }
}

void ShmConnection::ringBell() {
  char b = shm::kBell;
  // EAGAIN: the pipe is full of bells the reader has not taken; one of them will do.
  (void)!::write(bell_write_.get(), &b, 1);
}

void ShmConnection::ringDoorbell() {
  char bell = shm::kDoorbell;
  ssize_t n = ::send(socket_.get(), &bell, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
  // EAGAIN: the shim has not read the doorbells already sent; one of them will do.
  if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) app_gone_ = true;
}

IoResult ShmConnection::read(std::span<std::byte> buffer) {
  // The shim waits for space: take its filler back just before freeing the space, not after.
  // Taken after, the application could meanwhile fill the freed space, find its fd still
  // unwritable (the old filler) and send none: the fd would then poll writable over a full
  // ring. The check after the copy stays, for a wait that began during it.
  if (!buffer.empty() && up_.control().producer_waiting.load(std::memory_order_relaxed) != 0 &&
      up_.readable() > 0 && up_.takeProducerWaiting()) {
    drainFiller();
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::size_t n = up_.get(buffer.data(), buffer.size());
    if (n > 0) {
      if (up_.takeProducerWaiting()) drainFiller();
      bool drained = false;
      if (n < buffer.size() && !app_eof_) {
        // Arm before saying "drained": the shim's next byte then writes the eventfd.
        up_.control().consumer_armed.store(1, std::memory_order_seq_cst);
        drained = up_.emptyAfterArming();
      }
      return IoResult::ok(n, drained);
    }
    if (app_eof_) {
      // Bytes the shim wrote before ending its direction were published before the socket
      // said so; one more look, then the end.
      if (up_.readable() > 0) continue;
      if (app_gone_ && down_.readable() > 0)
        return IoResult{IoResult::Status::kReset, 0, ECONNRESET};
      return IoResult::eof();
    }
    up_.control().consumer_armed.store(1, std::memory_order_seq_cst);
    if (up_.emptyAfterArming()) return IoResult::wouldBlock();
  }
  return IoResult::wouldBlock();
}

IoResult ShmConnection::write(std::span<const std::byte> data) {
  if (app_gone_ || write_shut_) return IoResult{IoResult::Status::kReset, 0, EPIPE};
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::size_t n = down_.put(data.data(), data.size());
    if (n > 0) {
      std::uint32_t how = down_.takeConsumerArmedHow();
      if (how == shm::kArmedBell) {
        ringBell();
      } else if (how != 0) {
        ringDoorbell();
      }
      return IoResult::ok(n);
    }
    // Full: ask the shim to write the eventfd when it frees space, then look again.
    down_.control().producer_waiting.store(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (down_.writable() == 0) {
      want_write_ = true;
      return IoResult::wouldBlock();
    }
  }
  want_write_ = true;
  return IoResult::wouldBlock();
}

void ShmConnection::shutdownWrite() {
  if (write_shut_ || !socket_) return;
  write_shut_ = true;
  // After the last byte put in the ring: the shim reads the ring empty before it believes the
  // end of stream. A reader blocked on the bell is woken to look.
  header_->down_eof.store(1, std::memory_order_seq_cst);
  ::shutdown(socket_.get(), SHUT_WR);
  ringBell();
}

bool ShmConnection::mayBeReadable() const {
  return app_eof_ || up_.readable() > 0;
}

void ShmConnection::close(CloseType type) {
  if (mapping_ == nullptr) return;
  wake_event_.reset();
  socket_event_.reset();
  if (type == CloseType::kAbort) header_->reset.store(1, std::memory_order_release);
  header_->down_eof.store(1, std::memory_order_seq_cst);
  release();  // closing the bell's write end wakes a blocked reader (end of file)
}

void ShmConnection::release() {
  // Closing the socket is the shim's end of stream (and, with `reset` set, its reset).
  socket_.reset();
  wake_.reset();
  memfd_.reset();
  bell_read_.reset();
  bell_write_.reset();
  ::munmap(mapping_, shm::mappingBytes(kRingBytes));
  mapping_ = nullptr;
  header_ = nullptr;
}

}  // namespace dmm::proxy
