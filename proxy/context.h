#pragma once
// SidecarContext: what every worker shares for the life of the process. The config and the
// stack instances are read-only after start-up; the tables and metrics are thread-safe.

#include <cstdint>
#include <memory>
#include <vector>

#include "policy/policy.h"
#include "proxy/config.h"
#include "proxy/faults.h"
#include "proxy/metrics.h"
#include "proxy/peer_table.h"
#include "proxy/replay_cache.h"
#include "stacks/stack.h"

namespace dmm::proxy {

struct SidecarContext {
  const Config& config;
  const std::vector<std::unique_ptr<stacks::Stack>>& stacks;  // same order as config.stacks
  Metrics& metrics;
  PeerTable& peers;
  ReplayCache& replay;
  policy::PolicyStore& policy;  // swapped on reload; a connection keeps the snapshot it used
  FaultInjector& faults;        // off unless armed (config [[fault]], `ctl fault set`)
  std::vector<std::uint8_t> stackKinds;  // StackKind values of the instances (REPLY's peer facts)
};

}  // namespace dmm::proxy
