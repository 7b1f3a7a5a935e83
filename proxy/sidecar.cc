#include "proxy/sidecar.h"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstring>

#include "proxy/version.h"

namespace dmm::proxy {

Sidecar::Sidecar(Config config, const stacks::StackRegistry& registry)
    : config_(std::move(config)), registry_(registry) {}

Sidecar::~Sidecar() {
  stop();
}

std::string Sidecar::start(EventLoop& main_loop) {
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
  metrics_ = std::make_unique<Metrics>(names, DMM_VERSION, DMM_GIT_COMMIT);
  peers_ = std::make_unique<PeerTable>();
  replay_ = std::make_unique<ReplayCache>(2 * config_.max_clock_skew, config_.replay_cache_size);
  context_ = std::make_unique<SidecarContext>(
      SidecarContext{config_, stacks_, *metrics_, *peers_, *replay_});

  if (config_.metrics_enabled) {
    metrics_server_ = std::make_unique<MetricsServer>(main_loop, metrics_->registry());
    if (auto err = metrics_server_->listen(config_.metrics_listen); !err.empty()) {
      return "metrics.listen " + config_.metrics_listen.toString() + ": " + err;
    }
  }

  unsigned n = config_.effectiveWorkers();
  for (unsigned i = 0; i < n; ++i) {
    auto worker = std::make_unique<Worker>(*context_, i);
    auto bound = worker->bindListeners();
    if (!bound) {
      workers_.clear();
      return std::string(bound.error().reason) + ": " + std::strerror(bound.error().code);
    }
    workers_.push_back(std::move(worker));
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
  if (config_.metrics_enabled) listeners += " metrics=" + config_.metrics_listen.toString();
  spdlog::info("dmm-sidecar {} started: {} workers, {} stacks,{}", DMM_VERSION, n, stacks_.size(),
               listeners);
  return {};
}

void Sidecar::stop() {
  for (auto& w : workers_)
    w->stop();
  for (auto& w : workers_)
    w->join();
  workers_.clear();
  metrics_server_.reset();
}

}  // namespace dmm::proxy
