#include "proxy/sidecar.h"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <iterator>

#include "proxy/handshake_codec.h"
#include "proxy/version.h"

namespace dmm::proxy {

Sidecar::Sidecar(Config config, const stacks::StackRegistry& registry)
    : config_(std::move(config)), registry_(registry) {}

Sidecar::~Sidecar() {
  stop();
}

std::string Sidecar::start(EventLoop& main_loop, ServiceManager* service) {
  std::vector<std::string> names;
  for (const auto& s : config_.stacks) {
    const auto* factory = registry_.find(s.kind);
    auto stack = factory->create(s.name, *s.options);
    if (!stack) {
      return "stack \"" + s.name + "\": " + stack.error().reason + ": " +
             std::strerror(stack.error().code);
    }
    stacks_.push_back(std::move(*stack));
    names.push_back(s.name);
  }
  Diagnostics diags;
  auto initial = loadPolicyFor(config_, registry_, 1, diags);
  if (!initial) return "invalid policy in " + config_.policy_dir + ":\n" + diags.formatAll();
  for (const auto& d : diags.sorted())
    spdlog::warn("{}", d.format());
  metrics_ = std::make_unique<Metrics>(names, DMM_VERSION, DMM_GIT_COMMIT);
  metrics_->policyLoaded(initial->version());
  peers_ = std::make_unique<PeerTable>();
  replay_ = std::make_unique<ReplayCache>(2 * config_.max_clock_skew, config_.replay_cache_size);
  policy_store_ = std::make_unique<policy::PolicyStore>(std::move(initial));
  faults_ = std::make_unique<FaultInjector>(names, *metrics_->registry());
  for (const auto& f : config_.faults) {
    auto it = std::find(names.begin(), names.end(), f.stack);
    faults_->set(static_cast<std::size_t>(it - names.begin()), f.plan);
    spdlog::warn("fault injection armed on stack {}: {}", f.stack, f.plan.describe());
  }
  std::vector<std::uint8_t> kinds;
  for (const auto& stack : stacks_) {
    auto k = handshake::stackKindFromName(stack->kind());
    if (k && std::find(kinds.begin(), kinds.end(), static_cast<std::uint8_t>(*k)) == kinds.end())
      kinds.push_back(static_cast<std::uint8_t>(*k));
  }
  context_ = std::make_unique<SidecarContext>(SidecarContext{
      config_, stacks_, *metrics_, *peers_, *replay_, *policy_store_, *faults_, std::move(kinds)});

  if (config_.metrics_enabled) {
    metrics_server_ = std::make_unique<MetricsServer>(main_loop, metrics_->registry(), stacks_);
    if (auto err = metrics_server_->listen(config_.metrics_listen); !err.empty()) {
      return "metrics.listen " + config_.metrics_listen.toString() + ": " + err;
    }
  }

  unsigned n = config_.effectiveWorkers();
  metrics_->bufferMemoryLimit(config_.workerBufferMemory() * n);
  for (unsigned i = 0; i < n; ++i) {
    auto worker = std::make_unique<Worker>(*context_, i);
    auto bound = worker->bindListeners(service);
    if (!bound) {
      workers_.clear();
      return std::string(bound.error().reason) + ": " + std::strerror(bound.error().code);
    }
    workers_.push_back(std::move(worker));
  }
  // Each worker loads its own kernel relay (its maps and events are its own).
  bool kernel_relay = !workers_.empty();
  for (const auto& w : workers_) {
    if (w->kernelRelay() != nullptr) continue;
    kernel_relay = false;
    if (config_.kernel_relay) {
      spdlog::warn("kernel relay: not available ({}); the workers relay every byte",
                   w->kernelRelayWhy());
    }
    break;
  }
  if (kernel_relay) {
    spdlog::info("kernel relay: on (message flows of connections older than {} ms, {} KiB each)",
                 config_.kernel_relay_after.count(), config_.kernel_relay_window / 1024);
  }
  metrics_->kernelRelayUp(kernel_relay);
  if (config_.preload_enabled) {
    // Any local user may hand connections over, as the capture rules take everyone's.
    if (auto err = preload_listener_.listen(config_.preload_socket, 0666, 4096, "preload socket");
        !err.empty()) {
      workers_.clear();
      return err;
    }
    for (auto& w : workers_) {
      if (auto r = w->addPreloadListener(preload_listener_.fd(), config_.preload_socket); !r) {
        workers_.clear();
        return std::string(r.error().reason) + ": " + std::strerror(r.error().code);
      }
    }
  }
  if (service != nullptr) {
    auto inherited = service->inheritedCount();
    auto unused = service->closeUntaken();
    if (inherited > 0) {
      spdlog::info("took over {} listening sockets from the service manager", inherited - unused);
    }
    std::vector<int> fds;
    for (const auto& w : workers_) {
      auto part = w->listenerFds();
      fds.insert(fds.end(), part.begin(), part.end());
    }
    if (auto err = service->storeListeners(fds); !err.empty()) {
      spdlog::warn(
          "cannot store the listeners with the service manager ({}): a restart will "
          "refuse connections while no process listens",
          err);
    }
  }
  // Workers do not take the signals the main thread waits for.
  sigset_t block;
  sigset_t previous;
  sigemptyset(&block);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGQUIT})
    sigaddset(&block, sig);
  pthread_sigmask(SIG_BLOCK, &block, &previous);
  for (auto& w : workers_)
    w->start();
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);

  std::string listeners;
  if (config_.capture_enabled) {
    for (const auto& a : config_.capture_listen)
      listeners += " capture=" + a.toString();
  }
  if (config_.tunnel_enabled) {
    for (const auto& a : config_.tunnel_listen)
      listeners += " tunnel=" + a.toString();
  }
  if (config_.preload_enabled) listeners += " preload=" + config_.preload_socket;
  if (config_.metrics_enabled) listeners += " metrics=" + config_.metrics_listen.toString();
  spdlog::info("dmm-sidecar {} started: {} workers, {} stacks,{}", DMM_VERSION, n, stacks_.size(),
               listeners);
  return {};
}

std::shared_ptr<const policy::Policy> loadPolicyFor(const Config& config,
                                                    const stacks::StackRegistry& registry,
                                                    std::uint64_t version, Diagnostics& diags) {
  return policy::loadPolicyDir(config.policy_dir, config.policyEnvironment(registry), version,
                               diags);
}

bool Sidecar::reloadPolicy(std::string& report) {
  auto current = policy_store_->current();
  Diagnostics diags;
  auto next = loadPolicyFor(config_, registry_, current->version() + 1, diags);
  report = diags.formatAll();
  metrics_->policyReload(next != nullptr);
  if (!next) {
    spdlog::error("policy reload: {} is invalid, keeping version {}:\n{}", config_.policy_dir,
                  current->version(), report);
    return false;
  }
  for (const auto& d : diags.sorted())
    spdlog::warn("{}", d.format());
  auto version = next->version();
  auto rules = next->rules().size();
  policy_store_->swap(std::move(next));
  metrics_->policyLoaded(version);
  spdlog::info("policy reload: version {} in force ({} rules from {})", version, rules,
               config_.policy_dir);
  return true;
}

std::vector<Worker::ConnectionView> Sidecar::connections() {
  std::vector<Worker::ConnectionView> all;
  for (auto& w : workers_) {
    auto promise = std::make_shared<std::promise<std::vector<Worker::ConnectionView>>>();
    auto future = promise->get_future();
    Worker* worker = w.get();
    worker->loop().post([worker, promise] { promise->set_value(worker->connections()); });
    if (future.wait_for(std::chrono::seconds(2)) != std::future_status::ready) continue;
    auto part = future.get();
    std::move(part.begin(), part.end(), std::back_inserter(all));
  }
  return all;
}

void Sidecar::drain() {
  for (auto& w : workers_)
    w->drain();
  // Its file goes too: a shim that connects now goes direct at once instead of waiting in a
  // backlog nobody accepts from.
  preload_listener_.close();
}

std::size_t Sidecar::liveConnections() {
  std::size_t total = 0;
  for (auto& w : workers_) {
    auto promise = std::make_shared<std::promise<std::size_t>>();
    auto future = promise->get_future();
    Worker* worker = w.get();
    worker->loop().post([worker, promise] { promise->set_value(worker->liveCount()); });
    if (future.wait_for(std::chrono::seconds(2)) == std::future_status::ready)
      total += future.get();
  }
  return total;
}

void Sidecar::stop() {
  for (auto& w : workers_)
    w->stop();
  for (auto& w : workers_)
    w->join();
  workers_.clear();
  preload_listener_.close();
  metrics_server_.reset();
}

}  // namespace dmm::proxy
