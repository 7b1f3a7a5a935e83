#include "proxy/worker.h"

#include <fcntl.h>
#include <openssl/rand.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/log.h"
#include "common/socket_util.h"
#include "proxy/inbound_session.h"
#include "proxy/outbound_session.h"
#include "proxy/preload_session.h"
#include "proxy/service_manager.h"

namespace dmm::proxy {

namespace {

constexpr int kAcceptsPerWakeup = 64;
constexpr timeval kAcceptRetry{0, 100'000};  // after EMFILE: let fds free up, don't spin
constexpr std::size_t kIdlePipes = 256;
constexpr std::size_t kIdleBuffers = 256;

}  // namespace

// ---- Session ---------------------------------------------------------------------------------

Session::Session(Worker& worker)
    : worker_(worker), id_(worker.nextConnectionId()), started_(Clock::now()) {
  timer_ = worker.loop().newEvent(-1, 0, &Session::onTimer, this);
  worker.sessionStarted(*this);
}

void Session::armTimer(std::chrono::milliseconds timeout) {
  auto tv = toTimeval(timeout);
  event_add(timer_.get(), &tv);
}

void Session::onTimer(evutil_socket_t, short, void* arg) {
  static_cast<Session*>(arg)->onTimeout();
}

void Session::end() {
  if (ended_) return;
  ended_ = true;
  timer_.reset();
  worker_.sessionEnded(*this);
  worker_.loop().deferDelete(std::unique_ptr<Deferrable>(this));
}

// ---- PipePool --------------------------------------------------------------------------------

// ---- MemoryBudget ----------------------------------------------------------------------------

MemoryBudget::~MemoryBudget() {
  if (gauge_ != nullptr) gauge_->Decrement(static_cast<double>(published_));
}

bool MemoryBudget::take(std::size_t bytes) {
  const std::uint64_t used = used_.load(std::memory_order_relaxed);
  if (limit_ != 0 && used + bytes > limit_) return false;
  used_.store(used + bytes, std::memory_order_relaxed);  // one writer: the worker's loop thread
  return true;
}

void MemoryBudget::give(std::size_t bytes) {
  used_.store(used_.load(std::memory_order_relaxed) - bytes, std::memory_order_relaxed);
}

void MemoryBudget::publish() {
  const std::uint64_t now = used();
  if (gauge_ == nullptr || now == published_) return;
  gauge_->Increment(static_cast<double>(now) - static_cast<double>(published_));
  published_ = now;
}

std::uint64_t MemoryBudget::room() const {
  if (limit_ == 0) return std::numeric_limits<std::uint64_t>::max();
  const std::uint64_t u = used();
  return u >= limit_ ? 0 : limit_ - u;
}

// ---- PipePool --------------------------------------------------------------------------------

PipePool::PipePool(std::size_t pipe_size, std::size_t max_idle, MemoryBudget& budget)
    : pipe_size_(pipe_size), max_idle_(max_idle), budget_(budget) {
  // Learn the size the kernel really gives (it rounds up to a power of two pages, and caps
  // unprivileged processes at fs.pipe-max-size).
  int fds[2];
  if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) == 0) {
    ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(pipe_size));
    int actual = ::fcntl(fds[1], F_GETPIPE_SZ);
    if (actual > 0) pipe_size_ = static_cast<std::size_t>(actual);
    idle_.emplace_back(fds[0], fds[1]);
  }
}

PipePool::~PipePool() {
  for (auto [r, w] : idle_) {
    ::close(r);
    ::close(w);
  }
}

int PipePool::get(int& read_end, int& write_end) {
  if (!budget_.take(pipe_size_)) return ENOBUFS;
  if (!idle_.empty()) {
    std::tie(read_end, write_end) = idle_.back();
    idle_.pop_back();
    return 0;
  }
  int fds[2];
  if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
    int err = errno;
    budget_.give(pipe_size_);
    return err;
  }
  ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(pipe_size_));
  read_end = fds[0];
  write_end = fds[1];
  return 0;
}

void PipePool::put(int read_end, int write_end) {
  budget_.give(pipe_size_);
  if (idle_.size() < max_idle_) {
    idle_.emplace_back(read_end, write_end);
    return;
  }
  ::close(read_end);
  ::close(write_end);
}

void PipePool::discard(int read_end, int write_end) {
  budget_.give(pipe_size_);
  ::close(read_end);
  ::close(write_end);
}

// ---- BufferPool ------------------------------------------------------------------------------

BufferPool::~BufferPool() {
  for (auto* b : idle_)
    delete[] b;
}

std::byte* BufferPool::get() {
  if (!budget_.take(buffer_size_)) return nullptr;
  if (!idle_.empty()) {
    auto* b = idle_.back();
    idle_.pop_back();
    return b;
  }
  auto* b = new (std::nothrow) std::byte[buffer_size_];
  if (b == nullptr) budget_.give(buffer_size_);
  return b;
}

void BufferPool::put(std::byte* buffer) {
  budget_.give(buffer_size_);
  if (idle_.size() < max_idle_) {
    idle_.push_back(buffer);
  } else {
    delete[] buffer;
  }
}

std::size_t BufferPool::available() const {
  return static_cast<std::size_t>(
      std::min<std::uint64_t>(budget_.room() / buffer_size_, std::uint64_t{1} << 32));
}

// ---- Worker ----------------------------------------------------------------------------------

Worker::Worker(SidecarContext& context, unsigned index)
    : context_(context),
      index_(index),
      // The budget is split evenly: a connection lives on one worker, and each worker keeps
      // exact books without sharing a counter on the data path.
      budget_(context.config.workerBufferMemory(), &context.metrics.bufferMemory()),
      pipes_(context.config.pipe_size, kIdlePipes, budget_),
      buffers_(context.config.buffer_size, kIdleBuffers, budget_),
      scratch_(new std::byte[context.config.buffer_size]),
      tunnels_(loop_, context.config.tunnel_max_idle) {
  const auto& c = context.config;
  // Timeouts are checked by a sweep; its period bounds how late one can fire.
  auto shortest = std::min(c.idle_timeout, c.half_closed_timeout);
  auto period =
      std::clamp(shortest / 4, std::chrono::milliseconds(100), std::chrono::milliseconds(1000));
  // A timerfd rather than a libevent timer: with no timer pending, the loop blocks in
  // epoll_wait() without a timeout, so a wake-up does not arm and cancel an hrtimer each time
  // (in a VM each costs an exit to program the APIC timer). The timerfd's own timer is armed
  // once per period.
  tick_fd_ = UniqueFd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (tick_fd_) {
    itimerspec spec{};
    spec.it_interval.tv_sec = static_cast<time_t>(period.count() / 1000);
    spec.it_interval.tv_nsec = static_cast<long>((period.count() % 1000) * 1'000'000);
    spec.it_value = spec.it_interval;
    ::timerfd_settime(tick_fd_.get(), 0, &spec, nullptr);
    tick_ = loop_.newEvent(tick_fd_.get(), EV_READ | EV_PERSIST, &Worker::onTick, this);
    event_add(tick_.get(), nullptr);
  } else {  // no timerfd (out of fds): a libevent timer does the same
    tick_ = loop_.newEvent(-1, EV_PERSIST, &Worker::onTick, this);
    auto tv = toTimeval(period);
    event_add(tick_.get(), &tv);
  }
  resume_event_ = loop_.newEvent(-1, 0, &Worker::onResume, this);
  if (c.kernel_relay) {
    KernelRelay::Options options;
    options.max_flows = std::max<std::size_t>(64, c.kernel_relay_max / c.effectiveWorkers());
    options.window = c.kernel_relay_window;
    kernel_relay_ = KernelRelay::create(options, kernel_relay_why_);
    if (kernel_relay_) {
      kernel_events_ = loop_.newEvent(kernel_relay_->eventFd(), EV_READ | EV_PERSIST,
                                      &Worker::onKernelEvents, this);
      event_add(kernel_events_.get(), nullptr);
    }
  } else {
    kernel_relay_why_ = "relay.kernel_relay = false";
  }
}

void Worker::onKernelEvents(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  self->kernel_relay_->takeEvents([self](std::uint64_t cookie, KernelRelay::Event event) {
    // A flow that already ended (its relay gone) has nothing left to do.
    if (auto it = self->kernel_flows_.find(cookie); it != self->kernel_flows_.end())
      it->second->onKernelEvent(cookie, event);
  });
}

void Worker::kernelFlowStarted(std::uint64_t cookie, Relay& relay) {
  kernel_flows_[cookie] = &relay;
}

void Worker::kernelFlowEnded(std::uint64_t cookie) {
  kernel_flows_.erase(cookie);
}

Worker::~Worker() {
  join();
  // Anything still open (stop() not called) is ended here, before the pools it uses go away.
  shutdownAll();
  loop_.collectGarbage();
}

Result<bool> Worker::bindListeners(ServiceManager* inherited) {
  const auto& c = config();
  auto add = [&](const SocketAddress& addr, Listener::Kind kind,
                 const SocketAddress& destination = {}) -> Result<bool> {
    Result<UniqueFd> fd = inherited != nullptr ? inherited->takeListener(addr) : UniqueFd{};
    if (!fd->valid()) fd = net::listenTcp(addr, net::ListenOptions{});
    if (!fd) return fd.error();
    // Accepted sockets inherit SO_LINGER {on, 0}: reset on close unless closed gracefully
    // (KernelConnection), without a setsockopt() per connection.
    if (auto s = net::setAbortOnClose(fd->get(), true); !s) return s.error();
    auto l = std::make_unique<Listener>();
    l->worker = this;
    l->kind = kind;
    l->address = addr;
    l->label = addr.toString();
    l->destination = destination;
    l->fd = std::move(*fd);
    l->event = loop_.newEvent(l->fd.get(), EV_READ | EV_PERSIST, &Worker::onAccept, l.get());
    l->retry = loop_.newEvent(-1, 0, &Worker::onAcceptRetry, l.get());
    event_add(l->event.get(), nullptr);
    listeners_.push_back(std::move(l));
    return true;
  };
  if (c.capture_enabled) {
    for (const auto& a : c.capture_listen) {
      if (auto r = add(a, Listener::Kind::kCapture); !r) {
        return Error{r.error().code, "capture_listen"};
      }
    }
  }
  for (const auto& f : c.forwards) {
    if (auto r = add(f.listen, Listener::Kind::kForward, f.destination); !r)
      return Error{r.error().code, "forward_listen"};
  }
  if (c.tunnel_enabled) {
    for (const auto& a : c.tunnel_listen) {
      if (auto r = add(a, Listener::Kind::kTunnel); !r)
        return Error{r.error().code, "tunnel_listen"};
    }
  }
  return true;
}

Result<bool> Worker::addPreloadListener(int fd, const std::string& path) {
  UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!copy) return Error{errno, "preload_socket"};
  auto l = std::make_unique<Listener>();
  l->worker = this;
  l->kind = Listener::Kind::kPreload;
  l->label = path;
  l->fd = std::move(copy);
  l->event = loop_.newEvent(l->fd.get(), EV_READ | EV_PERSIST, &Worker::onAccept, l.get());
  l->retry = loop_.newEvent(-1, 0, &Worker::onAcceptRetry, l.get());
  event_add(l->event.get(), nullptr);
  listeners_.push_back(std::move(l));
  return true;
}

std::vector<int> Worker::listenerFds() const {
  std::vector<int> fds;
  for (const auto& l : listeners_) {
    if (l->kind != Listener::Kind::kPreload) fds.push_back(l->fd.get());
  }
  return fds;
}

void Worker::start() {
  thread_ = std::thread([this] {
    std::string name = "dmm-worker-" + std::to_string(index_);
    pthread_setname_np(pthread_self(), name.c_str());
    loop_.run();
  });
}

void Worker::stop() {
  loop_.post([this] {
    stopping_ = true;
    for (auto& l : listeners_) {
      l->event.reset();
      l->retry.reset();
      l->fd.reset();
    }
    listeners_.clear();
    shutdownAll();
    loop_.exit();
  });
}

void Worker::drain() {
  loop_.post([this] {
    if (draining_ || stopping_) return;
    draining_ = true;
    for (auto& l : listeners_) {
      l->event.reset();
      l->retry.reset();
      l->fd.reset();
    }
    listeners_.clear();
    tunnels_.clear();
    sessions_.forEachRemovable([](Session& s) { s.drainIdle(); });
  });
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::shutdownAll() {
  while (Session* s = sessions_.front())
    s->shutdown();
  while (Relay* r = open_relays_.front())
    r->shutdown();
  while (Relay* r = half_closed_relays_.front())
    r->shutdown();
  tunnels_.clear();
}

void Worker::onAccept(evutil_socket_t fd, short, void* arg) {
  auto* l = static_cast<Listener*>(arg);
  Worker* self = l->worker;
  for (int i = 0; i < kAcceptsPerWakeup; ++i) {
    int conn = ::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (conn >= 0) {
      self->accepted(*l, UniqueFd(conn));
      continue;
    }
    int err = errno;
    if (err == EAGAIN) return;
    if (err == EINTR || err == ECONNABORTED) continue;
    self->metrics().acceptError(l->kind == Listener::Kind::kTunnel);
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
      // The pending connection stays in the backlog; stop polling the listener for a moment
      // instead of spinning on a readiness that cannot be served.
      static log::RateLimiter limiter;
      log::limited(limiter, spdlog::level::warn,
                   "accept on {} failed: {}; pausing this listener for 100ms", l->label,
                   std::strerror(err));
      event_del(l->event.get());
      event_add(l->retry.get(), &kAcceptRetry);
    } else {
      static log::RateLimiter limiter;
      log::limited(limiter, spdlog::level::warn, "accept on {} failed: {}", l->label,
                   std::strerror(err));
    }
    return;
  }
}

void Worker::onAcceptRetry(evutil_socket_t, short, void* arg) {
  auto* l = static_cast<Listener*>(arg);
  if (l->event) event_add(l->event.get(), nullptr);
}

void Worker::accepted(Listener& listener, UniqueFd fd) {
  if (stopping_) return;
  // Out of buffer memory, a new connection is refused at once (a reset) rather than admitted
  // to wait. Tunnel connections are still taken: their sessions are rejected as "overloaded"
  // in the handshake, so the peer goes elsewhere knowing why.
  if (listener.kind != Listener::Kind::kTunnel && memoryExhausted()) {
    metrics().memoryRefused(Role::kOutbound);
    metrics().connectionFailed(Role::kOutbound, metrics().noStack(), Outcome::kRefused);
    static log::RateLimiter limiter;
    log::limited(limiter, spdlog::level::warn,
                 "connection on {} refused: the buffer memory budget is used up ({} of {} bytes "
                 "on this worker)",
                 listener.label, budget_.used(), budget_.limit());
    (void)net::setAbortOnClose(fd.get(), true);
    return;
  }
  switch (listener.kind) {
    case Listener::Kind::kCapture:
      OutboundSession::startCaptured(*this, std::move(fd));
      break;
    case Listener::Kind::kForward:
      OutboundSession::start(*this, std::move(fd), listener.destination);
      break;
    case Listener::Kind::kTunnel:
      InboundSession::start(*this, std::move(fd));
      break;
    case Listener::Kind::kPreload:
      PreloadSession::start(*this, std::move(fd));
      break;
  }
}

void Worker::onTick(evutil_socket_t fd, short, void* arg) {
  if (fd >= 0) {
    std::uint64_t expirations = 0;
    (void)!::read(fd, &expirations, sizeof expirations);
  }
  static_cast<Worker*>(arg)->sweep();
}

void Worker::sweep() {
  budget_.publish();
  // The kernel moves these relays' bytes unseen: their counts and activity first, so that the
  // idle timeout below does not take a busy one for idle.
  for (auto& [cookie, relay] : kernel_flows_)
    relay->refreshKernelFlows();
  auto now = Clock::now();
  const auto& c = config();
  while (Relay* r = open_relays_.front()) {
    if (now - r->lastActive() < c.idle_timeout) break;
    r->expire(Outcome::kIdleTimeout);
  }
  while (Relay* r = half_closed_relays_.front()) {
    if (now - r->lastActive() < c.half_closed_timeout) break;
    r->expire(Outcome::kHalfClosedTimeout);
  }
  tunnels_.sweep(now, c.tunnel_idle_timeout);
}

void Worker::randomBytes(std::span<std::uint8_t> out) {
  while (!out.empty()) {
    if (random_used_ == random_.size()) {
      if (RAND_bytes(random_.data(), static_cast<int>(random_.size())) != 1) {
        // No randomness: never hand out stale bytes.
        RAND_bytes(out.data(), static_cast<int>(out.size()));
        return;
      }
      random_used_ = 0;
    }
    std::size_t n = std::min(out.size(), random_.size() - random_used_);
    std::memcpy(out.data(), random_.data() + random_used_, n);
    random_used_ += n;  // each byte is handed out once
    out = out.subspan(n);
  }
}

void Worker::tunnelReleased(const Relay::Info& info,
                            std::unique_ptr<stacks::StackConnection> tunnel,
                            std::vector<std::byte> leftover) {
  if (info.role == Role::kOutbound || stopping_ || draining_) {
    // (When stopping or draining, the pool is where it can be closed from inside its own
    // callback.)
    tunnels_.put(info.peer, info.stack, std::move(tunnel), Clock::now());
    if (stopping_ || draining_) tunnels_.clear();
  } else {
    InboundSession::resume(*this, std::move(tunnel), info.stack, std::move(leftover));
  }
}

RuleMetrics& Worker::ruleMetrics(std::string_view rule) {
  auto it = rule_metrics_.find(rule);
  if (it != rule_metrics_.end()) return *it->second;
  auto& m = metrics().rule(rule);
  rule_metrics_.emplace(std::string(rule), &m);
  return m;
}

std::vector<Worker::ConnectionView> Worker::connections() const {
  std::vector<ConnectionView> out;
  auto add = [&out](const Relay& r) { out.push_back({r.describe(), r.info()}); };
  open_relays_.forEach(add);
  half_closed_relays_.forEach(add);
  return out;
}

void Worker::relayStarted(Relay& relay) {
  ++relay_count_;
  open_relays_.pushBack(relay);
}

void Worker::relayActive(Relay& relay) {
  if (relay.halfClosed()) {
    half_closed_relays_.pushBack(relay);
  } else {
    open_relays_.pushBack(relay);
  }
}

void Worker::relayEnded(Relay& relay) {
  --relay_count_;
  IntrusiveList<Relay, TimeoutListTag>::remove(relay);
  IntrusiveList<Relay, ResumeListTag>::remove(relay);
  IntrusiveList<Relay, MemoryWaitTag>::remove(relay);
}

void Worker::scheduleResume(Relay& relay) {
  if (resume_queue_.empty()) event_active(resume_event_.get(), 0, 0);
  resume_queue_.pushBack(relay);
}

void Worker::memoryWait(Relay& relay) {
  if (static_cast<ListHook<MemoryWaitTag>&>(relay).linkedInList()) return;
  memory_waiters_.pushBack(relay);
  metrics().memoryWait();
}

bool Worker::takeKernelWindow(std::size_t bytes) {
  if (budget_.limited() && kernel_windows_ + bytes > budget_.limit() / 2) return false;
  if (!budget_.take(bytes)) return false;
  kernel_windows_ += bytes;
  return true;
}

void Worker::giveKernelWindow(std::size_t bytes) {
  kernel_windows_ -= bytes;
  budget_.give(bytes);
  memoryReturned();
}

void Worker::memoryReturned() {
  // Each waiter resumed may take a buffer; one that still finds none waits again (at the back).
  for (std::size_t n = buffers_.available(); n > 0; --n) {
    Relay* r = memory_waiters_.front();
    if (r == nullptr) return;
    IntrusiveList<Relay, MemoryWaitTag>::remove(*r);
    scheduleResume(*r);
  }
}

void Worker::onResume(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<Worker*>(arg);
  // Only the relays queued so far: one that re-queues itself waits for the next round.
  std::size_t n = self->resume_queue_.size();
  for (std::size_t i = 0; i < n; ++i) {
    Relay* r = self->resume_queue_.front();
    if (r == nullptr) break;
    IntrusiveList<Relay, ResumeListTag>::remove(*r);
    r->resume();
  }
  // Relays queued during this round (one that used its budget again, a memory waiter whose
  // buffer came back) found the queue non-empty and did not activate the event: do it for them.
  if (!self->resume_queue_.empty()) event_active(self->resume_event_.get(), 0, 0);
}

void Worker::sessionStarted(Session& session) {
  sessions_.pushBack(session);
}

void Worker::sessionEnded(Session& session) {
  IntrusiveList<Session, SessionListTag>::remove(session);
}

}  // namespace dmm::proxy
