#pragma once
// SidecarContext: what every worker shares for the life of the process. The config and the
// stack instances are read-only after start-up; the tables and metrics are thread-safe.

#include <memory>
#include <vector>

#include "proxy/config.h"
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
};

}  // namespace dmm::proxy
