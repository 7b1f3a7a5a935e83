#include "stacks/rdma/instance.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "stacks/rdma/queue_pair.h"

namespace dmm::stacks::rdma {

namespace {

bool setNonBlocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

std::string errnoText(const char* what) {
  return std::string(what) + ": " + std::strerror(errno);
}

void rejectAndDestroy(rdma_cm_id* id) {
  (void)rdma_reject(id, nullptr, 0);
  (void)rdma_destroy_id(id);
}

}  // namespace

// ---- RingPool ---------------------------------------------------------------------------------

RingPool::~RingPool() {
  for (auto& r : idle_)
    destroy(r);
}

std::optional<Ring> RingPool::make(int access) {
  void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return std::nullopt;
  ibv_mr* mr = ibv_reg_mr(pd_, p, size_, static_cast<unsigned>(access));
  if (mr == nullptr) {
    int e = errno;
    ::munmap(p, size_);
    spdlog::warn("rdma: cannot register {} bytes: {}{}", size_, std::strerror(e),
                 e == ENOMEM ? " (raise the memlock limit: LimitMEMLOCK=infinity)" : "");
    errno = e;
    return std::nullopt;
  }
  counters_.registered_bytes.fetch_add(size_, std::memory_order_relaxed);
  return Ring{static_cast<std::uint8_t*>(p), size_, mr};
}

void RingPool::destroy(Ring r) {
  (void)ibv_dereg_mr(r.mr);
  ::munmap(r.base, r.size);
  counters_.registered_bytes.fetch_sub(r.size, std::memory_order_relaxed);
}

std::optional<Ring> RingPool::acquireSend() {
  {
    std::lock_guard lock(mutex_);
    if (!idle_.empty()) {
      Ring r = idle_.back();
      idle_.pop_back();
      return r;
    }
  }
  return make(IBV_ACCESS_LOCAL_WRITE);
}

void RingPool::releaseSend(Ring r) {
  {
    std::lock_guard lock(mutex_);
    if (idle_.size() < keep_) {
      idle_.push_back(r);
      return;
    }
  }
  destroy(r);
}

std::optional<Ring> RingPool::acquireReceive() {
  return make(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
}

void RingPool::releaseReceive(Ring r) {
  destroy(r);
}

// ---- Instance ---------------------------------------------------------------------------------

Instance::Instance(std::string name, const RdmaOptions& options)
    : name_(std::move(name)), options_(options) {}

std::unique_ptr<Instance> Instance::start(const std::string& name, const RdmaOptions& options,
                                          std::string& error) {
  std::unique_ptr<Instance> inst(new Instance(name, options));
  if (!inst->open(error)) return nullptr;
  return inst;
}

bool Instance::open(std::string& error) {
  listen_channel_ = rdma_create_event_channel();
  if (listen_channel_ == nullptr) {
    error = errnoText("no RDMA connection manager (rdma_create_event_channel)");
    return false;
  }
  if (rdma_create_id(listen_channel_, &listener_, this, RDMA_PS_TCP) != 0) {
    error = errnoText("rdma_create_id");
    return false;
  }
  sockaddr_storage ss{};
  SocketAddress(options_.address, options_.port).toSockaddr(ss);
  if (rdma_bind_addr(listener_, reinterpret_cast<sockaddr*>(&ss)) != 0) {
    error = errnoText(("cannot bind " + SocketAddress(options_.address, options_.port).toString() +
                       " (no RDMA device has this address?)")
                          .c_str());
    return false;
  }
  if (listener_->verbs == nullptr) {
    error = "no RDMA device has address " + options_.address.toString();
    return false;
  }
  device_name_ = ibv_get_device_name(listener_->verbs->device);
  pd_ = ibv_alloc_pd(listener_->verbs);
  if (pd_ == nullptr) {
    error = errnoText("ibv_alloc_pd");
    return false;
  }
  rings_ = std::make_unique<RingPool>(pd_, options_.ring_size, 64, counters_);
  if (rdma_listen(listener_, 1024) != 0) {
    error = errnoText("rdma_listen");
    return false;
  }
  if (!setNonBlocking(listen_channel_->fd)) {
    error = errnoText("fcntl");
    return false;
  }
  stop_fd_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  thread_ = std::thread([this] { listen(); });
  spdlog::info("rdma stack {}: device {}, data connections on {} (ring {} KiB each way)", name_,
               device_name_, SocketAddress(options_.address, options_.port).toString(),
               options_.ring_size / 1024);
  return true;
}

Instance::~Instance() {
  if (thread_.joinable()) {
    std::uint64_t one = 1;
    (void)::write(stop_fd_.get(), &one, sizeof one);
    thread_.join();
  }
  // The workers' loops are gone by now (the sidecar stops them first).
  for (auto& [loop, w] : workers_)
    w->abandon();
  workers_.clear();
  rings_.reset();
  if (pd_ != nullptr) (void)ibv_dealloc_pd(pd_);
  if (listener_ != nullptr) (void)rdma_destroy_id(listener_);
  if (listen_channel_ != nullptr) rdma_destroy_event_channel(listen_channel_);
}

std::string Instance::describe() const {
  return device_name_ + " " + SocketAddress(options_.address, options_.port).toString() +
         " queue_pairs=" + std::to_string(counters_.queue_pairs.load()) +
         (healthy() ? "" : " device=removed");
}

Worker* Instance::workerFor(EventLoop& loop) {
  std::lock_guard lock(mutex_);
  auto& w = workers_[&loop];
  if (!w) {
    auto made = std::make_unique<Worker>(*this, loop);
    if (!made->ok()) {
      workers_.erase(&loop);
      return nullptr;
    }
    w = std::move(made);
  }
  return w.get();
}

bool Instance::reserveSlot() {
  if (slots_.fetch_add(1, std::memory_order_relaxed) >= options_.max_connections) {
    slots_.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void Instance::releaseSlot() {
  slots_.fetch_sub(1, std::memory_order_relaxed);
}

Status Instance::expect(Worker& worker, const SessionToken& token, DataAcceptor& acceptor) {
  std::lock_guard lock(mutex_);
  if (expectations_.size() >= options_.max_connections) return Error{EAGAIN, "rdma_full"};
  if (!expectations_.emplace(token, Expectation{&worker, &acceptor, false}).second)
    return Error{EEXIST, "duplicate_token"};
  return {};
}

void Instance::cancel(Worker& worker, const SessionToken& token) {
  {
    std::lock_guard lock(mutex_);
    if (auto it = expectations_.find(token);
        it != expectations_.end() && it->second.worker == &worker)
      expectations_.erase(it);
  }
  // Once claimed, the expectation is gone from the map but the worker is accepting the
  // connection with the session as its acceptor: that must be cancelled too.
  worker.cancel(token);  // the caller runs on that worker's loop
}

DataAcceptor* Instance::claim(const SessionToken& token, const Worker& worker) {
  std::lock_guard lock(mutex_);
  auto it = expectations_.find(token);
  if (it == expectations_.end() || it->second.worker != &worker) return nullptr;
  DataAcceptor* a = it->second.acceptor;
  expectations_.erase(it);
  return a;
}

Worker* Instance::routeFor(const SessionToken& token) {
  std::lock_guard lock(mutex_);
  auto it = expectations_.find(token);
  if (it == expectations_.end() || it->second.routed) return nullptr;
  it->second.routed = true;  // a replayed request for the same token is refused
  return it->second.worker;
}

void Instance::listen() {
  pollfd fds[2] = {{listen_channel_->fd, POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("rdma stack {}: listener poll: {}", name_, std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    rdma_cm_event* event = nullptr;
    while (rdma_get_cm_event(listen_channel_, &event) == 0) {
      switch (event->event) {
        case RDMA_CM_EVENT_CONNECT_REQUEST:
          onConnectRequest(event);  // acknowledges it
          break;
        case RDMA_CM_EVENT_DEVICE_REMOVAL:
          spdlog::error("rdma stack {}: device {} removed; the instance is down", name_,
                        device_name_);
          markDeviceRemoved();
          (void)rdma_ack_cm_event(event);
          break;
        default:
          (void)rdma_ack_cm_event(event);
          break;
      }
    }
  }
}

void Instance::onConnectRequest(rdma_cm_event* event) {
  rdma_cm_id* id = event->id;
  auto hello = decodeHello(
      {static_cast<const std::uint8_t*>(event->param.conn.private_data),
       event->param.conn.private_data == nullptr ? 0u : event->param.conn.private_data_len});
  (void)rdma_ack_cm_event(event);
  Worker* worker = hello ? routeFor(hello->token) : nullptr;
  if (worker == nullptr) {
    spdlog::debug("rdma stack {}: refused a data connection ({})", name_,
                  hello ? "unknown token" : "bad private data");
    if (!hello) counters_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    rejectAndDestroy(id);
    return;
  }
  // The worker's channel reports the id's later events (ESTABLISHED, DISCONNECTED).
  if (rdma_migrate_id(id, worker->cmChannel()) != 0) {
    spdlog::warn("rdma stack {}: rdma_migrate_id: {}", name_, std::strerror(errno));
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    rejectAndDestroy(id);
    return;
  }
  worker->loop().post([worker, id, h = *hello] { worker->acceptRequest(id, h.token, h); });
}

// ---- Worker -----------------------------------------------------------------------------------

Worker::Worker(Instance& instance, EventLoop& loop) : instance_(instance), loop_(loop) {
  completions_ = ibv_create_comp_channel(instance_.pd()->context);
  cm_ = rdma_create_event_channel();
  if (completions_ == nullptr || cm_ == nullptr || !setNonBlocking(completions_->fd) ||
      !setNonBlocking(cm_->fd)) {
    spdlog::error("rdma stack {}: cannot make a worker's channels: {}", instance_.name(),
                  std::strerror(errno));
    return;
  }
  completions_event_ =
      loop_.newEvent(completions_->fd, EV_READ | EV_PERSIST, &Worker::onCompletions, this);
  cm_event_ = loop_.newEvent(cm_->fd, EV_READ | EV_PERSIST, &Worker::onCmEvents, this);
  event_add(completions_event_.get(), nullptr);
  event_add(cm_event_.get(), nullptr);
  ok_ = true;
}

Worker::~Worker() {
  accepting_.clear();
  retired_.clear();
  qps_.clear();  // every queue pair (and its CQ) before the channels
  completions_event_.reset();
  cm_event_.reset();
  if (completions_ != nullptr) (void)ibv_destroy_comp_channel(completions_);
  if (cm_ != nullptr) rdma_destroy_event_channel(cm_);
}

void Worker::abandon() {
  for (auto& [p, qp] : qps_)
    qp->forgetLoop();
  freeOrphanedEvent(completions_event_);
  freeOrphanedEvent(cm_event_);
}

Result<QueuePair*> Worker::connect(const Endpoint& peer, const SessionToken& token) {
  if (!instance_.reserveSlot()) return Error{EAGAIN, "rdma_full"};
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(cm_, &id, nullptr, RDMA_PS_TCP) != 0) {
    instance_.releaseSlot();
    return Error{errno, "rdma_create_id"};
  }
  auto qp = std::make_unique<QueuePair>(*this, id, QueuePair::Role::kInitiator);
  qp->holdSlot();
  qp->token = token;
  sockaddr_storage src{};
  sockaddr_storage dst{};
  SocketAddress(instance_.options().address, 0).toSockaddr(src);
  SocketAddress(peer.address, peer.port).toSockaddr(dst);
  if (rdma_resolve_addr(id, reinterpret_cast<sockaddr*>(&src), reinterpret_cast<sockaddr*>(&dst),
                        static_cast<int>(instance_.options().resolve_timeout_ms)) != 0)
    return Error{errno, "rdma_resolve_addr"};
  return adopt(std::move(qp));
}

void Worker::acceptRequest(rdma_cm_id* id, const SessionToken& token, const Hello& peer) {
  auto& counters = instance_.counters();
  DataAcceptor* acceptor = instance_.claim(token, *this);
  if (acceptor == nullptr || !instance_.reserveSlot()) {
    // The session gave up meanwhile, or the instance is full.
    counters.refused.fetch_add(1, std::memory_order_relaxed);
    rejectAndDestroy(id);
    return;
  }
  auto qp = std::make_unique<QueuePair>(*this, id, QueuePair::Role::kResponder);
  qp->holdSlot();
  qp->token = token;
  qp->acceptor = acceptor;
  auto set_up = qp->setUp();
  if (!set_up) {
    spdlog::warn("rdma stack {}: cannot accept a data connection: {}", instance_.name(),
                 set_up.error().reason);
    counters.refused.fetch_add(1, std::memory_order_relaxed);
    (void)rdma_reject(id, nullptr, 0);
    return;  // qp (and the id with it) is destroyed here
  }
  qp->setPeer(peer);
  auto bytes = encodeHello(qp->hello({}));
  rdma_conn_param param{};
  param.private_data = bytes.data();
  param.private_data_len = static_cast<std::uint8_t>(bytes.size());
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  if (rdma_accept(id, &param) != 0) {
    spdlog::warn("rdma stack {}: rdma_accept: {}", instance_.name(), std::strerror(errno));
    counters.refused.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  counters.accepted.fetch_add(1, std::memory_order_relaxed);
  accepting_[token] = adopt(std::move(qp));
}

void Worker::cancel(const SessionToken& token) {
  auto it = accepting_.find(token);
  if (it == accepting_.end()) return;
  QueuePair* qp = it->second;
  accepting_.erase(it);
  qp->acceptor = nullptr;
  qp->release(CloseType::kAbort);
}

QueuePair* Worker::adopt(std::unique_ptr<QueuePair> qp) {
  QueuePair* p = qp.get();
  qps_.emplace(p, std::move(qp));
  return p;
}

void Worker::retire(QueuePair* qp) {
  if (qp->role() == QueuePair::Role::kResponder) {
    auto it = accepting_.find(qp->token);
    if (it != accepting_.end() && it->second == qp) accepting_.erase(it);
  }
  retired_.push_back(qp);
  if (!reap_posted_) {
    reap_posted_ = true;
    loop_.post([this] { reap(); });
  }
}

void Worker::reap() {
  reap_posted_ = false;
  auto retired = std::move(retired_);
  retired_.clear();
  for (QueuePair* qp : retired)
    qps_.erase(qp);
}

void Worker::onCompletions(evutil_socket_t, short, void* arg) {
  static_cast<Worker*>(arg)->handleCompletions();
}

void Worker::onCmEvents(evutil_socket_t, short, void* arg) {
  static_cast<Worker*>(arg)->handleCmEvents();
}

void Worker::handleCompletions() {
  ibv_cq* cq = nullptr;
  void* context = nullptr;
  while (ibv_get_cq_event(completions_, &cq, &context) == 0) {
    ibv_ack_cq_events(cq, 1);
    auto* qp = static_cast<QueuePair*>(context);
    if (qps_.count(qp) != 0) qp->onCompletions();
  }
}

void Worker::handleCmEvents() {
  rdma_cm_event* event = nullptr;
  while (rdma_get_cm_event(cm_, &event) == 0) {
    // Copy what is needed and acknowledge at once: destroying an id waits for its events'
    // acknowledgements, and it may be destroyed from inside the handling below.
    const rdma_cm_event_type type = event->event;
    auto* qp = static_cast<QueuePair*>(event->id->context);
    std::vector<std::uint8_t> private_data;
    if (event->param.conn.private_data != nullptr) {
      auto* p = static_cast<const std::uint8_t*>(event->param.conn.private_data);
      private_data.assign(p, p + event->param.conn.private_data_len);
    }
    (void)rdma_ack_cm_event(event);
    if (qp == nullptr || qps_.count(qp) == 0) continue;
    switch (type) {
      case RDMA_CM_EVENT_ADDR_RESOLVED:
        qp->onAddressResolved();
        break;
      case RDMA_CM_EVENT_ROUTE_RESOLVED:
        qp->onRouteResolved();
        break;
      case RDMA_CM_EVENT_ESTABLISHED:
        if (qp->role() == QueuePair::Role::kResponder) accepting_.erase(qp->token);
        qp->onEstablished(private_data);
        break;
      case RDMA_CM_EVENT_ADDR_ERROR:
      case RDMA_CM_EVENT_ROUTE_ERROR:
        qp->onConnectFailed(EHOSTUNREACH, "rdma_unreachable");
        break;
      case RDMA_CM_EVENT_UNREACHABLE:
      case RDMA_CM_EVENT_CONNECT_ERROR:
        qp->onConnectFailed(ETIMEDOUT, "rdma_connect_error");
        break;
      case RDMA_CM_EVENT_REJECTED:
        qp->onConnectFailed(ECONNREFUSED, "rdma_rejected");
        break;
      case RDMA_CM_EVENT_DISCONNECTED:
        qp->onDisconnected();
        break;
      case RDMA_CM_EVENT_DEVICE_REMOVAL:
        instance_.markDeviceRemoved();
        qp->onDisconnected();
        break;
      default:
        break;
    }
  }
}

}  // namespace dmm::stacks::rdma
