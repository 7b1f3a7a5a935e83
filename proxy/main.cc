// dmm-sidecar: the per-host daemon. See docs/ for the user guide.
//
//   dmm-sidecar [-c FILE]                     serve
//   dmm-sidecar -c FILE --mode validate       check the config, print every problem, exit
//   dmm-sidecar capture install|remove -c FILE   manage the iptables capture rules
//   dmm-sidecar ctl [-c FILE | --socket PATH] COMMAND...   talk to the running sidecar
//   dmm-sidecar --version

#include <event2/event.h>
#include <linux/capability.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "common/event_loop.h"
#include "common/log.h"
#include "common/socket_util.h"
#include "proxy/admin_commands.h"
#include "proxy/admin_socket.h"
#include "proxy/capture.h"
#include "proxy/config.h"
#include "proxy/service_manager.h"
#include "proxy/sidecar.h"
#include "proxy/version.h"
#include "stacks/stack.h"

namespace {

using dmm::proxy::Config;

constexpr int kExitOk = 0;
constexpr int kExitInvalidConfig = 2;
constexpr int kExitRuntime = 1;

// Loads the config and, with `check_policy`, the policy it points to: every problem of both
// is printed in one pass.
std::optional<Config> load(const std::string& path, const dmm::stacks::StackRegistry& registry,
                           bool print_warnings, bool check_policy) {
  dmm::Diagnostics diags;
  auto config = dmm::proxy::loadConfig(path, registry, diags);
  bool ok = config.has_value();
  if (config && check_policy)
    ok = dmm::proxy::loadPolicyFor(*config, registry, 1, diags) != nullptr;
  if (!ok || print_warnings) std::cerr << diags.formatAll();
  if (!ok) return std::nullopt;
  return config;
}

struct SignalContext {
  dmm::EventLoop* loop;
  std::string config_path;
  const dmm::stacks::StackRegistry* registry;
  dmm::proxy::ServiceManager* service;
  dmm::proxy::Sidecar* sidecar = nullptr;
  // Graceful stop: the first SIGTERM starts a drain that ends when no connection is left or
  // at the deadline; a second SIGTERM, or SIGINT during the drain, stops at once.
  dmm::EventPtr drain_timer{};
  std::chrono::steady_clock::time_point drain_deadline{};
  dmm::EventPtr status_timer{};
};

std::string statusLine(dmm::proxy::Sidecar& sidecar) {
  return std::to_string(sidecar.liveConnections()) + " connections open; policy version " +
         std::to_string(sidecar.policy()->version());
}

void onDrainTick(evutil_socket_t, short, void* arg) {
  auto* ctx = static_cast<SignalContext*>(arg);
  auto left = ctx->sidecar->liveConnections();
  auto now = std::chrono::steady_clock::now();
  if (left == 0 || now >= ctx->drain_deadline) {
    if (left > 0) spdlog::info("drain timeout: closing {} connections", left);
    event_base_loopbreak(ctx->loop->base());
    return;
  }
  ctx->service->status("draining: " + std::to_string(left) + " connections left");
  static constexpr timeval kTick{0, 100'000};
  event_add(ctx->drain_timer.get(), &kTick);
}

void onStopSignal(evutil_socket_t sig, short, void* arg) {
  auto* ctx = static_cast<SignalContext*>(arg);
  const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
  auto timeout =
      ctx->sidecar != nullptr ? ctx->sidecar->config().drain_timeout : std::chrono::milliseconds(0);
  if (ctx->drain_timer || ctx->sidecar == nullptr || timeout.count() == 0) {
    spdlog::info("received {}, stopping", name);
    ctx->service->stopping("stopping");
    event_base_loopbreak(ctx->loop->base());
    return;
  }
  spdlog::info("received {}, draining: no new connections, up to {} ms for open ones", name,
               timeout.count());
  ctx->service->stopping("draining");
  ctx->status_timer.reset();
  ctx->sidecar->drain();
  ctx->drain_deadline = std::chrono::steady_clock::now() + timeout;
  ctx->drain_timer = ctx->loop->newEvent(-1, 0, onDrainTick, ctx);
  event_active(ctx->drain_timer.get(), 0, 0);
}

void onHangup(evutil_socket_t, short, void* arg) {
  // Listeners, stacks and keys are fixed for the life of the process; a reload re-validates
  // the file and applies what can change without dropping connections: the log level, and the
  // policy (a new snapshot for new connections; established ones keep theirs).
  auto* ctx = static_cast<SignalContext*>(arg);
  if (ctx->drain_timer) return;  // stopping: nothing to reload into
  ctx->service->reloading();
  dmm::Diagnostics diags;
  auto config = dmm::proxy::loadConfig(ctx->config_path, *ctx->registry, diags);
  if (!config) {
    spdlog::error("reload: {} is invalid, keeping the running configuration:\n{}", ctx->config_path,
                  diags.formatAll());
  } else {
    dmm::log::setLevel(config->log_level);
    spdlog::info("reload: {} is valid; log level now {}", ctx->config_path,
                 spdlog::level::to_string_view(config->log_level));
  }
  std::string report;
  if (ctx->sidecar != nullptr) {
    ctx->sidecar->reloadPolicy(report);
    ctx->service->ready(statusLine(*ctx->sidecar));
  }
}

void onStatusTick(evutil_socket_t, short, void* arg) {
  auto* ctx = static_cast<SignalContext*>(arg);
  ctx->service->status(statusLine(*ctx->sidecar));
}

// The capabilities the configuration needs, checked before anything starts so that a unit
// without them fails with this message rather than with EPERM on every connection.
std::string checkCapabilities(const Config& config) {
  std::vector<int> wanted;
  if (config.mark != 0) wanted.push_back(CAP_NET_ADMIN);  // SO_MARK
  auto missing = dmm::proxy::missingCapabilities(wanted);
  if (missing.empty()) return {};
  std::string names;
  for (const auto& m : missing)
    names += (names.empty() ? "" : ", ") + m;
  return "missing capability " + names +
         " ([sidecar] mark sets SO_MARK on the sidecar's own sockets, which needs "
         "CAP_NET_ADMIN; run as root or grant it, e.g. AmbientCapabilities=CAP_NET_ADMIN)";
}

int serve(Config config, const dmm::stacks::StackRegistry& registry) {
  dmm::proxy::ServiceManager service;  // first: takes the listeners systemd passed in
  dmm::log::init(config.log_format, config.log_level);
  ::signal(SIGPIPE, SIG_IGN);  // splice() to a closed socket raises it; errors come back as EPIPE
  if (auto err = checkCapabilities(config); !err.empty()) {
    spdlog::critical("cannot start: {}", err);
    return kExitRuntime;
  }
  auto files = dmm::net::setFileLimit(config.open_files);
  spdlog::debug("open files limit: {}", files);

  dmm::EventLoop main_loop;
  SignalContext sctx{&main_loop, config.path, &registry, &service};
  dmm::EventPtr sigterm(evsignal_new(main_loop.base(), SIGTERM, onStopSignal, &sctx));
  dmm::EventPtr sigint(evsignal_new(main_loop.base(), SIGINT, onStopSignal, &sctx));
  dmm::EventPtr sighup(evsignal_new(main_loop.base(), SIGHUP, onHangup, &sctx));
  for (auto* ev : {sigterm.get(), sigint.get(), sighup.get()})
    evsignal_add(ev, nullptr);

  dmm::proxy::Sidecar sidecar(std::move(config), registry);
  if (auto err = sidecar.start(main_loop, &service); !err.empty()) {
    spdlog::critical("cannot start: {}", err);
    return kExitRuntime;
  }
  sctx.sidecar = &sidecar;
  std::unique_ptr<dmm::proxy::AdminServer> admin;
  if (sidecar.config().admin_enabled) {
    admin = std::make_unique<dmm::proxy::AdminServer>(
        main_loop, [&sidecar](const std::vector<std::string>& args, std::string& out) {
          return dmm::proxy::runAdminCommand(sidecar, args, out);
        });
    if (auto err = admin->listen(sidecar.config().admin_socket, 0660); !err.empty()) {
      spdlog::critical("cannot start: admin socket {}: {}", sidecar.config().admin_socket, err);
      sidecar.stop();
      return kExitRuntime;
    }
  }
  service.ready(statusLine(sidecar));
  if (service.supervised()) {
    sctx.status_timer = main_loop.newEvent(-1, EV_PERSIST, onStatusTick, &sctx);
    static constexpr timeval kStatusPeriod{10, 0};
    event_add(sctx.status_timer.get(), &kStatusPeriod);
  }
  main_loop.run();
  sctx.status_timer.reset();
  sctx.drain_timer.reset();
  admin.reset();
  sidecar.stop();
  spdlog::info("stopped");
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "dmm-sidecar: carries captured TCP connections to the peer host's sidecar over "
      "the stack its policy picks"};
  std::string config_path = "/etc/dmm-sidecar/sidecar.toml";
  std::string mode = "serve";
  app.add_option("-c,--config", config_path, "configuration file")->capture_default_str();
  app.add_option("--mode", mode, "serve, or validate: check the configuration and exit")
      ->check(CLI::IsMember({"serve", "validate"}))
      ->capture_default_str();
  app.set_version_flag("--version",
                       std::string("dmm-sidecar ") + DMM_VERSION + " (" + DMM_GIT_COMMIT + ")");

  auto* capture = app.add_subcommand("capture", "install or remove the iptables capture rules");
  std::string action;
  capture->add_option("action", action, "install or remove")
      ->required()
      ->check(CLI::IsMember({"install", "remove"}));
  capture->add_option("-c,--config", config_path, "configuration file")->capture_default_str();

  auto* ctl = app.add_subcommand(
      "ctl",
      "talk to the running sidecar over its admin socket (try: ctl --help, ctl policy "
      "explain --dst 10.0.0.2:80)");
  std::string admin_socket;
  ctl->add_option("-c,--config", config_path, "configuration file (for the socket path)")
      ->capture_default_str();
  ctl->add_option("--socket", admin_socket, "admin socket path (default: [admin] socket)");
  ctl->prefix_command();  // everything after the options is the command, passed on as it is

  CLI11_PARSE(app, argc, argv);

  dmm::stacks::StackRegistry registry;
  dmm::stacks::registerBuiltinStacks(registry);

  if (ctl->parsed()) {
    if (admin_socket.empty()) {
      dmm::Diagnostics diags;
      auto config = dmm::proxy::loadConfig(config_path, registry, diags);
      admin_socket = config ? config->admin_socket : Config{}.admin_socket;
    }
    auto words = ctl->remaining();
    if (words.empty()) words.push_back("--help");
    std::string out;
    std::string error;
    int status = dmm::proxy::adminRequest(admin_socket, words, out, error);
    std::cout << out;
    if (status < 0) {
      std::cerr << "dmm-sidecar ctl: " << error << "\n";
      return kExitRuntime;
    }
    return status;
  }

  if (capture->parsed()) {
    auto config = load(config_path, registry, false, false);
    if (!config) return kExitInvalidConfig;
    auto err = action == "install" ? dmm::proxy::installCaptureRules(*config)
                                   : dmm::proxy::removeCaptureRules(*config);
    if (!err.empty()) {
      std::cerr << "dmm-sidecar capture " << action << ": " << err << "\n";
      return kExitRuntime;
    }
    return kExitOk;
  }

  if (mode == "validate") {
    auto config = load(config_path, registry, true, true);
    if (!config) return kExitInvalidConfig;
    std::cout << config_path << ": ok\n";
    return kExitOk;
  }
  auto config = load(config_path, registry, true, false);  // serve() loads the policy
  if (!config) return kExitInvalidConfig;
  return serve(std::move(*config), registry);
}
