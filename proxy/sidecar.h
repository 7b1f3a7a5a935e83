#pragma once
// Sidecar: the running daemon. Owns the stack instances, the shared tables, the metrics and
// their HTTP exposer, and the workers. The main thread creates it, start()s it, and stop()s it
// on SIGTERM; workers do all connection work.

#include <memory>
#include <string>
#include <vector>

#include "common/unix_listener.h"
#include "proxy/config.h"
#include "proxy/context.h"
#include "proxy/metrics.h"
#include "proxy/metrics_server.h"
#include "proxy/peer_table.h"
#include "proxy/replay_cache.h"
#include "proxy/service_manager.h"
#include "proxy/worker.h"
#include "stacks/stack.h"

namespace dmm::proxy {

// Loads config.policy_dir for `config` as snapshot `version`; nullptr when invalid (see diags).
std::shared_ptr<const policy::Policy> loadPolicyFor(const Config& config,
                                                    const stacks::StackRegistry& registry,
                                                    std::uint64_t version, Diagnostics& diags);

class Sidecar {
 public:
  Sidecar(Config config, const stacks::StackRegistry& registry);
  ~Sidecar();
  Sidecar(const Sidecar&) = delete;
  Sidecar& operator=(const Sidecar&) = delete;

  // Creates the stacks, binds every listener and the metrics endpoint (served on `main_loop`,
  // the caller's thread), starts the workers. Listeners systemd passed in (`service`, may be
  // null) are used before new ones are bound, and every listener is stored with it for the
  // next start. Returns an empty string on success, else why it could not start (nothing
  // keeps running).
  std::string start(EventLoop& main_loop, ServiceManager* service = nullptr);
  // Graceful stop, first half: every worker stops accepting and closes idle pooled tunnels;
  // established connections go on. Then poll liveConnections() and stop().
  void drain();
  // Connections still open on all workers (asks each on its loop; waits up to 2 s each).
  std::size_t liveConnections();
  // Stops the workers (closing every connection) and waits for them.
  void stop();

  const Config& config() const { return config_; }

  // Policy (main thread). reloadPolicy() loads policy.d again: a valid policy is swapped in
  // with the next version, an invalid one is refused and the running one stays; `report` gets
  // every diagnostic. Established connections are never touched.
  bool reloadPolicy(std::string& report);
  std::shared_ptr<const policy::Policy> policy() const { return policy_store_->current(); }
  policy::Environment policyEnvironment() const { return config_.policyEnvironment(registry_); }
  SidecarContext& context() { return *context_; }
  // Every worker's live connections (asks each worker on its own loop; waits up to 2 s each).
  std::vector<Worker::ConnectionView> connections();

 private:
  Config config_;
  const stacks::StackRegistry& registry_;
  std::vector<std::unique_ptr<stacks::Stack>> stacks_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<PeerTable> peers_;
  std::unique_ptr<ReplayCache> replay_;
  std::unique_ptr<FaultInjector> faults_;
  std::unique_ptr<policy::PolicyStore> policy_store_;
  std::unique_ptr<SidecarContext> context_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::vector<std::unique_ptr<Worker>> workers_;
  net::UnixListener preload_listener_;  // each worker accepts on a duplicate
};

}  // namespace dmm::proxy
