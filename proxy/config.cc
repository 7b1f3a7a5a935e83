#include "proxy/config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <thread>

#include "common/toml_table.h"

namespace dmm::proxy {

namespace {

constexpr std::uint16_t kDefaultCapturePort = 17001;
constexpr std::uint16_t kDefaultTunnelPort = 17002;
constexpr std::uint16_t kDefaultMetricsPort = 17090;
constexpr std::size_t kMinKeyBytes = 16;

SocketAddress addr(const char* text) {
  return *SocketAddress::parse(text);
}

const std::function<std::optional<Cidr>(std::string_view)> kParseCidr = [](std::string_view s) {
  return Cidr::parse(s);
};
const std::function<std::optional<PortRange>(std::string_view)> kParsePorts =
    [](std::string_view s) { return PortRange::parse(s); };
const std::function<std::optional<SocketAddress>(std::string_view)> kParseAddress =
    [](std::string_view s) { return SocketAddress::parse(s); };

std::string trimRight(std::string s) {
  while (!s.empty() &&
         (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
    s.pop_back();
  return s;
}

void loadSidecar(TomlTable t, Config& c) {
  if (auto v = t.getInt("workers", 0, 256)) c.workers = static_cast<unsigned>(*v);
  if (auto v = t.getInt("mark", 0, 0xFFFFFFFFLL)) c.mark = static_cast<std::uint32_t>(*v);
  if (auto v = t.getDuration("drain_timeout")) c.drain_timeout = *v;
  if (auto v = t.getInt("open_files", 0, 1 << 30)) c.open_files = static_cast<std::uint64_t>(*v);
  t.rejectUnknown();
}

void loadLog(TomlTable t, Config& c) {
  if (auto v = t.getString("level")) {
    if (auto level = log::parseLevel(*v)) {
      c.log_level = *level;
    } else {
      t.error("level",
              "\"" + *v + "\" is not one of trace, debug, info, warning, error, critical, off");
    }
  }
  if (auto v = t.getString("format")) {
    if (auto format = log::parseFormat(*v)) {
      c.log_format = *format;
    } else {
      t.error("format", "\"" + *v + "\" is not one of auto, plain, journal");
    }
  }
  t.rejectUnknown();
}

// `listen`: one address or a non-empty list of them (kept at its default when absent).
void loadListen(TomlTable& t, const std::string& example, std::vector<SocketAddress>& target) {
  auto v =
      t.getList<SocketAddress>("listen", "an address such as \"" + example + "\"", kParseAddress);
  if (!v) return;
  if (v->empty()) t.error("listen", "needs at least one address");
  target = std::move(*v);
}

void loadCapture(TomlTable t, Config& c) {
  if (auto v = t.getBool("enabled")) c.capture_enabled = *v;
  loadListen(t, "127.0.0.1:17001", c.capture_listen);
  if (auto v = t.getList<Cidr>("include", "a CIDR such as \"10.0.0.0/8\"", kParseCidr))
    c.capture_include = *v;
  if (auto v = t.getList<Cidr>("exclude", "a CIDR such as \"10.0.0.0/8\"", kParseCidr))
    c.capture_exclude = *v;
  if (auto v = t.getList<PortRange>("exclude_ports",
                                    "a port or range such as \"22\" or \"8000-8080\"", kParsePorts))
    c.capture_exclude_ports = *v;
  if (auto v = t.getBool("ipv6")) c.capture_ipv6 = *v;
  if (auto v = t.getString("chain")) {
    // iptables chain names: up to 28 characters; keep to a safe alphabet.
    if (v->empty() || v->size() > 28 || !isConfigName(*v)) {
      t.error("chain", "must be 1-28 characters of [A-Za-z0-9_.-]");
    } else {
      c.capture_chain = *v;
    }
  }
  t.rejectUnknown();
}

void loadForwards(TomlTable& root, Config& c) {
  int index = 0;
  for (const toml::value* entry : root.getArrayOfTables("forward")) {
    TomlTable t(*entry, "[[forward]] #" + std::to_string(++index), root.diagnostics());
    auto listen = t.getSocketAddress("listen");
    auto destination = t.getSocketAddress("destination");
    if (!t.getRaw("listen")) t.requireKey("listen");
    if (!t.getRaw("destination")) t.requireKey("destination");
    t.rejectUnknown();
    if (listen && destination) c.forwards.push_back({*listen, *destination});
  }
}

void loadTunnel(TomlTable t, Config& c) {
  if (auto v = t.getBool("enabled")) c.tunnel_enabled = *v;
  loadListen(t, "0.0.0.0:17002", c.tunnel_listen);
  if (auto v = t.getInt("port", 1, 65535)) c.tunnel_port = static_cast<std::uint16_t>(*v);
  if (auto v = t.getInt("max_header_bytes", 256, 65536))
    c.max_header_bytes = static_cast<std::uint32_t>(*v);
  if (auto v = t.getBool("reuse")) c.tunnel_reuse = *v;
  if (auto v = t.getInt("max_idle", 0, 65536)) c.tunnel_max_idle = static_cast<std::uint32_t>(*v);
  if (auto v = t.getDuration("idle_timeout")) c.tunnel_idle_timeout = *v;
  if (auto v = t.getDuration("keepalive")) c.tunnel_keepalive = *v;
  t.rejectUnknown();
}

void loadFallback(TomlTable t, Config& c) {
  if (auto v = t.getString("mode")) {
    if (*v == "direct") {
      c.fallback = FallbackMode::kDirect;
    } else if (*v == "refuse") {
      c.fallback = FallbackMode::kRefuse;
    } else {
      t.error("mode", "\"" + *v + "\" is not one of direct, refuse");
    }
  }
  if (auto v = t.getDuration("no_sidecar_ttl")) c.no_sidecar_ttl = *v;
  t.rejectUnknown();
}

void loadInbound(TomlTable t, Config& c) {
  if (auto v = t.getBool("allow_local")) c.allow_local = *v;
  int index = 0;
  for (const toml::value* entry : t.getArrayOfTables("allow")) {
    TomlTable e(*entry, "[[inbound.allow]] #" + std::to_string(++index), t.diagnostics());
    InboundAllow allow;
    bool ok = true;
    if (auto cidr = e.getString("cidr")) {
      if (auto parsed = Cidr::parse(*cidr)) {
        allow.cidr = *parsed;
      } else {
        e.error("cidr", "\"" + *cidr + "\" is not a CIDR such as \"10.0.0.0/8\"");
        ok = false;
      }
    } else {
      e.requireKey("cidr");
      ok = false;
    }
    if (auto ports = e.getList<PortRange>(
            "ports", "a port or range such as \"80\" or \"8000-8080\"", kParsePorts)) {
      allow.ports = *ports;
    }
    e.rejectUnknown();
    if (ok) c.inbound_allow.push_back(std::move(allow));
  }
  t.rejectUnknown();
}

void loadTimeouts(TomlTable t, Config& c) {
  struct Item {
    const char* key;
    Millis* target;
  };
  for (Item item : {Item{"connect", &c.connect_timeout}, Item{"handshake", &c.handshake_timeout},
                    Item{"idle", &c.idle_timeout}, Item{"half_closed", &c.half_closed_timeout}}) {
    if (auto v = t.getDuration(item.key)) {
      if (v->count() <= 0) {
        t.error(item.key, "must be positive");
      } else {
        *item.target = *v;
      }
    }
  }
  t.rejectUnknown();
}

void loadRelay(TomlTable t, Config& c) {
  if (auto v = t.getInt("buffer_size", 4096, 16 << 20))
    c.buffer_size = static_cast<std::uint32_t>(*v);
  if (auto v = t.getInt("low_watermark", 0, 16 << 20))
    c.low_watermark = static_cast<std::uint32_t>(*v);
  if (c.low_watermark >= c.buffer_size) {
    t.error("low_watermark", "must be below buffer_size (" + std::to_string(c.buffer_size) + ")");
  }
  if (auto v = t.getBool("splice")) c.splice = *v;
  if (auto v = t.getInt("pipe_size", 4096, 64 << 20)) c.pipe_size = static_cast<std::uint32_t>(*v);
  if (c.low_watermark >= c.pipe_size) {
    t.error("low_watermark", "must be below pipe_size (" + std::to_string(c.pipe_size) + ")");
  }
  if (auto v = t.getInt("buffer_memory", 0, std::int64_t{1} << 50)) {
    c.buffer_memory = static_cast<std::uint64_t>(*v);
    if (c.buffer_memory != 0 && c.buffer_memory < 2ull * c.buffer_size) {
      t.error("buffer_memory", "must be 0 (no limit) or at least two buffers (" +
                                   std::to_string(2ull * c.buffer_size) + " bytes)");
    }
  }
  if (auto v = t.getBool("kernel_relay")) c.kernel_relay = *v;
  if (auto v = t.getDuration("kernel_relay_after")) {
    if (v->count() < 0) {
      t.error("kernel_relay_after", "must not be negative");
    } else {
      c.kernel_relay_after = *v;
    }
  }
  if (auto v = t.getInt("kernel_relay_max", 1, 1 << 24))
    c.kernel_relay_max = static_cast<std::uint32_t>(*v);
  if (auto v = t.getInt("kernel_relay_window", 16 << 10, 64 << 20))
    c.kernel_relay_window = static_cast<std::uint32_t>(*v);
  t.rejectUnknown();
}

void loadSecurity(TomlTable t, Config& c) {
  auto inline_key = t.getString("psk");
  auto key_file = t.getString("psk_file");
  if (inline_key && key_file) {
    t.error("psk", "set either psk or psk_file, not both");
  } else if (inline_key) {
    c.psk.assign(inline_key->begin(), inline_key->end());
    if (c.psk.size() < kMinKeyBytes)
      t.error("psk", "must be at least " + std::to_string(kMinKeyBytes) + " bytes");
  } else if (key_file) {
    std::ifstream in(*key_file, std::ios::binary);
    if (!in) {
      t.error("psk_file", "cannot read \"" + *key_file + "\"");
    } else {
      std::ostringstream text;
      text << in.rdbuf();
      std::string key = trimRight(text.str());
      c.psk.assign(key.begin(), key.end());
      if (c.psk.size() < kMinKeyBytes) {
        t.error("psk_file", "\"" + *key_file + "\" holds fewer than " +
                                std::to_string(kMinKeyBytes) + " bytes of key");
      }
      struct stat st {};
      if (::stat(key_file->c_str(), &st) == 0 && (st.st_mode & S_IROTH) != 0) {
        t.warning("psk_file", "\"" + *key_file + "\" is readable by everyone");
      }
    }
  }
  if (auto v = t.getString("key_id")) {
    if (v->empty() || v->size() > 64) {
      t.error("key_id", "must be 1-64 characters");
    } else {
      c.key_id = *v;
    }
  }
  if (auto v = t.getDuration("max_clock_skew")) c.max_clock_skew = *v;
  if (auto v = t.getInt("replay_cache_size", 1024, 1LL << 24))
    c.replay_cache_size = static_cast<std::uint32_t>(*v);
  t.rejectUnknown();
}

void loadMetrics(TomlTable t, Config& c) {
  if (auto v = t.getBool("enabled")) c.metrics_enabled = *v;
  if (auto v = t.getSocketAddress("listen", true)) c.metrics_listen = *v;
  t.rejectUnknown();
}

void loadPolicy(TomlTable t, Config& c) {
  if (auto v = t.getString("dir")) {
    if (v->empty()) {
      t.error("dir", "must name a directory");
    } else {
      c.policy_dir = *v;
    }
  }
  auto local = t.getDuration("rtt_local");
  auto lan = t.getDuration("rtt_lan");
  if (local) c.rtt.local = *local;
  if (lan) c.rtt.lan = *lan;
  if (c.rtt.local.count() <= 0) t.error("rtt_local", "must be positive");
  if (c.rtt.lan <= c.rtt.local) t.error("rtt_lan", "must be above rtt_local");
  if (auto v = t.getInt("breaker_failures", 1, 1000))
    c.breaker_failures = static_cast<std::uint32_t>(*v);
  if (auto v = t.getDuration("breaker_open_for")) {
    if (v->count() <= 0) {
      t.error("breaker_open_for", "must be positive");
    } else {
      c.breaker_open_for = *v;
    }
  }
  t.rejectUnknown();
}

// `socket`: an absolute path that fits sun_path (107 characters and a NUL).
void loadSocketPath(TomlTable& t, std::string& target) {
  if (auto v = t.getString("socket")) {
    if (v->empty() || v->size() > 107 || (*v)[0] != '/') {
      t.error("socket", "must be an absolute path of at most 107 characters");
    } else {
      target = *v;
    }
  }
}

void loadAdmin(TomlTable t, Config& c) {
  if (auto v = t.getBool("enabled")) c.admin_enabled = *v;
  loadSocketPath(t, c.admin_socket);
  t.rejectUnknown();
}

void loadPreload(TomlTable t, Config& c) {
  if (auto v = t.getBool("enabled")) c.preload_enabled = *v;
  loadSocketPath(t, c.preload_socket);
  if (auto v = t.getInt("shm_connections", 0, 1 << 20)) c.preload_shm_connections = *v;
  t.rejectUnknown();
}

void loadStacks(TomlTable& root, const stacks::StackRegistry& registry, Config& c) {
  std::set<std::string> names;
  int index = 0;
  for (const toml::value* entry : root.getArrayOfTables("stack")) {
    TomlTable t(*entry, "[[stack]] #" + std::to_string(++index), root.diagnostics());
    auto name = t.getString("name");
    auto kind = t.getString("kind");
    if (!name) t.requireKey("name");
    if (!kind) t.requireKey("kind");
    if (name && !isConfigName(*name)) {
      t.error("name", "must be 1-64 characters of [A-Za-z0-9_.-]");
      name.reset();
    }
    if (name && (*name == "direct" || *name == "none")) {
      // Metric label values of their own: fallback connections, and connections no stack carried.
      t.error("name", "\"" + *name + "\" is reserved (a metric label for " +
                          (*name == "direct" ? "connections that bypass the peer sidecar"
                                             : "connections no stack carried") +
                          ")");
      name.reset();
    }
    if (name && !names.insert(*name).second) {
      t.error("name", "a stack named \"" + *name + "\" is already defined");
      name.reset();
    }
    const stacks::StackFactory* factory = nullptr;
    if (kind) {
      factory = registry.find(*kind);
      if (factory == nullptr) {
        std::string known;
        for (const auto& k : registry.kinds())
          known += (known.empty() ? "" : ", ") + k;
        t.error("kind", "unknown stack kind \"" + *kind + "\" (this build has: " + known + ")");
      }
    }
    std::shared_ptr<const stacks::StackOptions> options;
    if (factory != nullptr) options = factory->parseOptions(t);
    t.rejectUnknown();
    if (name && kind && options) c.stacks.push_back({*name, *kind, std::move(options)});
  }
}

void loadFaults(TomlTable& root, Config& c) {
  int index = 0;
  std::set<std::string> seen;
  for (const toml::value* entry : root.getArrayOfTables("fault")) {
    TomlTable t(*entry, "[[fault]] #" + std::to_string(++index), root.diagnostics());
    auto stack = t.getString("stack");
    if (!stack) t.requireKey("stack");
    auto plan = parseFaultPlan(t);
    t.rejectUnknown();
    if (!stack) continue;
    bool known = c.stacks.empty() ? *stack == "kernel" : c.findStack(*stack) != nullptr;
    if (!known) {
      t.error("stack", "no [[stack]] is named \"" + *stack + "\"");
      continue;
    }
    if (!seen.insert(*stack).second) {
      t.error("stack", "stack \"" + *stack + "\" already has a [[fault]]");
      continue;
    }
    if (plan.armed()) c.faults.push_back({*stack, plan});
  }
}

std::optional<Config> loadFromToml(const toml::value& doc, const std::string& path,
                                   const stacks::StackRegistry& registry, Diagnostics& diags) {
  Config c;
  c.path = path;
  TomlTable root(doc, "the top level", diags);
  auto section = [&](const char* key, void (*load)(TomlTable, Config&)) {
    if (const toml::value* t = root.getTable(key))
      load(TomlTable(*t, std::string("[") + key + "]", diags), c);
  };
  section("sidecar", loadSidecar);
  section("log", loadLog);
  section("capture", loadCapture);
  section("tunnel", loadTunnel);
  section("fallback", loadFallback);
  section("inbound", loadInbound);
  section("timeouts", loadTimeouts);
  section("relay", loadRelay);
  section("security", loadSecurity);
  section("metrics", loadMetrics);
  section("policy", loadPolicy);
  section("admin", loadAdmin);
  section("preload", loadPreload);
  loadStacks(root, registry, c);
  loadForwards(root, c);
  loadFaults(root, c);
  root.rejectUnknown();

  if (c.capture_listen.empty()) {
    c.capture_listen = {SocketAddress(*IpAddress::parse("127.0.0.1"), kDefaultCapturePort)};
    if (c.capture_ipv6)
      c.capture_listen.emplace_back(*IpAddress::parse("::1"), kDefaultCapturePort);
  }
  if (c.tunnel_listen.empty()) {
    c.tunnel_listen = {SocketAddress(*IpAddress::parse("0.0.0.0"), kDefaultTunnelPort),
                       SocketAddress(*IpAddress::parse("::"), kDefaultTunnelPort)};
  }
  if (!c.metrics_listen.valid()) c.metrics_listen = addr("127.0.0.1:17090");
  static_assert(kDefaultMetricsPort == 17090);
  if (c.stacks.empty() && !diags.hasErrors()) {
    const auto* kernel = registry.find("kernel");
    const toml::value no_options(toml::table{});
    TomlTable empty(no_options, "default stack", diags);
    c.stacks.push_back({"kernel", "kernel", kernel->parseOptions(empty)});
  }
  if ((c.capture_enabled || c.tunnel_enabled || !c.forwards.empty()) && c.psk.empty()) {
    // Missing keys are reported where a key would go, or at the top of the file.
    if (const toml::value* t = root.getTable("security")) {
      TomlTable(*t, "[security]", diags).requireKey("psk_file");
    } else {
      diags.error({path, 1, 1},
                  "[security] psk_file (or psk) is required: peers authenticate each other");
    }
  }
  if (c.capture_enabled && c.mark == 0) {
    diags.error({path, 1, 1},
                "[sidecar] mark must not be 0 while capture is enabled: the capture "
                "rules skip the sidecar's own connections by this mark");
  }
  if (!c.capture_enabled && !c.tunnel_enabled && c.forwards.empty()) {
    diags.warning({path, 1, 1}, "both [capture] and [tunnel] are disabled: nothing to serve");
  }
  if (diags.hasErrors()) return std::nullopt;
  return c;
}

}  // namespace

bool InboundAllow::matches(const SocketAddress& dst) const {
  if (!cidr.contains(dst.ip())) return false;
  if (ports.empty()) return true;
  for (const auto& range : ports) {
    if (range.contains(dst.port())) return true;
  }
  return false;
}

unsigned Config::effectiveWorkers() const {
  if (workers != 0) return workers;
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

std::uint64_t Config::workerBufferMemory() const {
  if (buffer_memory == 0) return 0;
  return std::max<std::uint64_t>(buffer_memory / effectiveWorkers(), 2ull * buffer_size);
}

const StackInstanceConfig* Config::findStack(std::string_view name) const {
  for (const auto& s : stacks) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

policy::Environment Config::policyEnvironment(const stacks::StackRegistry& registry) const {
  policy::Environment env;
  for (const auto& s : stacks)
    env.stacks.push_back({s.name, s.kind});
  env.kinds = registry.kinds();
  env.attempt_timeout = connect_timeout;
  return env;
}

std::optional<Config> loadConfig(const std::string& path, const stacks::StackRegistry& registry,
                                 Diagnostics& diags) {
  auto doc = loadTomlFile(path, diags);
  if (!doc) return std::nullopt;
  return loadFromToml(*doc, path, registry, diags);
}

std::optional<Config> loadConfigString(const std::string& text, const std::string& file_name,
                                       const stacks::StackRegistry& registry, Diagnostics& diags) {
  auto doc = loadTomlString(text, file_name, diags);
  if (!doc) return std::nullopt;
  return loadFromToml(*doc, file_name, registry, diags);
}

}  // namespace dmm::proxy
