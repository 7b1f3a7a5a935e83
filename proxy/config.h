#pragma once
// The daemon's configuration (sidecar.toml): the model, its defaults, and the loader that
// validates it and reports every problem as "file:line:col: message" in one pass.

#include <spdlog/common.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/diagnostics.h"
#include "common/duration.h"
#include "common/log.h"
#include "common/socket_address.h"
#include "policy/policy.h"
#include "proxy/fault_plan.h"
#include "stacks/stack.h"

namespace dmm::proxy {

struct StackInstanceConfig {
  std::string name;
  std::string kind;
  std::shared_ptr<const stacks::StackOptions> options;
};

// One entry of the inbound allowlist: destinations this sidecar may deliver to.
struct InboundAllow {
  Cidr cidr;
  std::vector<PortRange> ports;  // empty: every port
  bool matches(const SocketAddress& dst) const;
};

enum class FallbackMode { kDirect, kRefuse };

// A static outbound listener: every connection accepted on `listen` is carried to
// `destination` through the destination host's sidecar, as if captured on its way there.
struct Forward {
  SocketAddress listen;
  SocketAddress destination;
};

struct Config {
  std::string path;

  // [sidecar]
  unsigned workers = 0;         // 0: one per online CPU
  std::uint32_t mark = 0x444d;  // SO_MARK on every socket the sidecar opens
  // SIGTERM: stop accepting, let established connections finish for this long, close the rest.
  Millis drain_timeout{30'000};
  // RLIMIT_NOFILE to run with; 0: raise the soft limit to the hard limit.
  std::uint64_t open_files = 0;

  // [log]
  spdlog::level::level_enum log_level = spdlog::level::info;
  log::Format log_format = log::Format::kAuto;

  // [capture]: connections of local applications redirected here by iptables.
  bool capture_enabled = true;
  std::vector<SocketAddress> capture_listen;  // default 127.0.0.1:17001 and [::1]:17001
  std::vector<Cidr> capture_include;          // default: every destination
  std::vector<Cidr> capture_exclude;
  std::vector<PortRange> capture_exclude_ports;
  bool capture_ipv6 = true;
  std::string capture_chain = "DMM_SIDECAR";

  // [[forward]]: static outbound listeners (no iptables needed).
  std::vector<Forward> forwards;

  // [tunnel]: the sidecar-to-sidecar port.
  bool tunnel_enabled = true;
  std::vector<SocketAddress> tunnel_listen;  // default 0.0.0.0:17002 and [::]:17002
  std::uint16_t tunnel_port = 17002;         // dialed on peers
  std::uint32_t max_header_bytes = 4096;
  bool tunnel_reuse = true;             // frame session data and keep connections for reuse
  std::uint32_t tunnel_max_idle = 128;  // per worker, idle connections kept to peers
  Millis tunnel_idle_timeout{15'000};   // an idle connection to a peer is closed after this
  Millis tunnel_keepalive{60'000};      // how long a peer's idle connection waits for a HELLO

  // [fallback]
  FallbackMode fallback = FallbackMode::kDirect;
  Millis no_sidecar_ttl{60'000};

  // [inbound]
  bool allow_local = true;  // every address of this host, any port
  std::vector<InboundAllow> inbound_allow;

  // [timeouts]
  Millis connect_timeout{5'000};
  Millis handshake_timeout{5'000};
  Millis idle_timeout{3'600'000};
  Millis half_closed_timeout{60'000};

  // [relay]
  std::uint32_t buffer_size = 64 * 1024;  // per direction: the high watermark
  std::uint32_t low_watermark = 16 * 1024;
  std::uint32_t pipe_size = 1024 * 1024;  // splice() pipes: the high watermark of bulk flows
  bool splice = true;
  // The most bytes all connections' copy buffers and splice pipes may hold at once, shared
  // evenly by the workers (0: no limit). Out of it, flows wait and new connections are refused.
  std::uint64_t buffer_memory = 512ull << 20;
  // The kernel relay (kernel_relay.h): a direction of a connection that has lived this long is
  // handed to the kernel when it is between messages; at most kernel_relay_max at once.
  bool kernel_relay = false;  // opt-in: see docs/architecture.md#kernel-relay (known issue)
  Millis kernel_relay_after{20};
  std::uint32_t kernel_relay_max = 65536;
  std::uint32_t kernel_relay_window = 256 * 1024;  // bytes one flow may queue unaccounted

  // [security]
  std::vector<std::uint8_t> psk;
  std::string key_id = "default";
  Millis max_clock_skew{30'000};
  std::uint32_t replay_cache_size = 1u << 20;

  // [metrics]
  bool metrics_enabled = true;
  SocketAddress metrics_listen;  // default 127.0.0.1:17090

  // [policy]: protocol routing rules and the facts they use.
  std::string policy_dir = "/etc/dmm-sidecar/policy.d";
  policy::RttThresholds rtt;  // rtt_local, rtt_lan
  // The circuit breaker per peer and stack instance: after `breaker_failures` failed attempts
  // in a row the instance is skipped toward that peer for `breaker_open_for`, then one probe
  // attempt decides whether it is used again.
  std::uint32_t breaker_failures = 3;
  Millis breaker_open_for{30'000};

  // [preload]: the Unix socket the LD_PRELOAD shim hands applications' connections to.
  bool preload_enabled = true;
  std::string preload_socket = "/run/dmm-sidecar/preload.sock";
  // Shims that ask for the shared-memory data path get it (preload/shm_ring.h), up to this
  // many such connections per worker at once (each maps 2 x 256 KiB); 0 = never.
  std::int64_t preload_shm_connections = 1024;

  // [admin]: the Unix socket `dmm-sidecar ctl` talks to.
  bool admin_enabled = true;
  std::string admin_socket = "/run/dmm-sidecar/admin.sock";

  // [[stack]]
  std::vector<StackInstanceConfig> stacks;  // default: one kernel instance named "kernel"

  // [[fault]]: faults armed from the start (proxy/faults.h); none by default.
  struct FaultConfig {
    std::string stack;
    FaultPlan plan;
  };
  std::vector<FaultConfig> faults;

  unsigned effectiveWorkers() const;
  // One worker's share of buffer_memory (0: no limit): an even split, but never less than one
  // connection's two buffers.
  std::uint64_t workerBufferMemory() const;
  const StackInstanceConfig* findStack(std::string_view name) const;
  // What the policy loader needs to know of this configuration.
  policy::Environment policyEnvironment(const stacks::StackRegistry& registry) const;
};

// Reads and validates `path`. Returns nullopt when there is any error; all errors and warnings
// are in `diags`.
std::optional<Config> loadConfig(const std::string& path, const stacks::StackRegistry& registry,
                                 Diagnostics& diags);
// The same from text (tests).
std::optional<Config> loadConfigString(const std::string& text, const std::string& file_name,
                                       const stacks::StackRegistry& registry, Diagnostics& diags);

}  // namespace dmm::proxy
