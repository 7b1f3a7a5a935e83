#include "proxy/admin_commands.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <sstream>

#include "common/duration.h"
#include "common/log.h"
#include "proxy/classify.h"

namespace dmm::proxy {

namespace {

std::string describeFacts(const policy::Facts& f) {
  std::string stacks;
  for (const auto& k : f.peer_stacks)
    stacks += (stacks.empty() ? "" : ",") + k;
  return fmt::format(
      "role={} dst={} uid={} app={} qos={} peer={} peer_stacks={} rtt={}", policy::roleName(f.role),
      f.dst.toString(), f.uid ? std::to_string(*f.uid) : "-", f.app.empty() ? "-" : f.app,
      f.qos ? std::string(policy::kQosClasses[*f.qos]) : "-", policy::peerSidecarName(f.peer),
      stacks.empty() ? "-" : stacks, policy::rttClassName(f.rtt));
}

std::string stackName(Sidecar& sidecar, std::size_t index) {
  const auto& stacks = sidecar.context().stacks;
  return index < stacks.size() ? stacks[index]->name() : "direct";
}

std::string firstStack(Sidecar& sidecar, const policy::Decision& d) {
  return d.action->stacks.empty() ? "-" : stackName(sidecar, d.action->stacks.front());
}

struct ExplainArgs {
  std::string dst;
  std::optional<std::uint32_t> uid;
  std::string app;
  std::string qos;
  std::string role = "outbound";
  std::string peer;
  std::vector<std::string> peer_stacks;
  std::string rtt;
};

int explain(Sidecar& sidecar, const ExplainArgs& a, std::string& out) {
  auto dst = SocketAddress::parse(a.dst);
  if (!dst) {
    out = "--dst: \"" + a.dst + "\" is not an address such as 10.0.0.2:80 or [fd00::2]:443\n";
    return 2;
  }
  auto& ctx = sidecar.context();
  // What this sidecar knows now, overridden by what the caller says.
  auto facts = outboundFacts(ctx, *dst, a.uid);
  facts.app = a.app;
  if (!a.qos.empty()) {
    facts.qos = policy::qosFromName(a.qos);
    if (!facts.qos) {
      out = "--qos: \"" + a.qos + "\" is not a QoS class\n";
      return 2;
    }
  }
  if (a.role == "inbound") facts.role = policy::Role::kInbound;
  if (!a.peer.empty()) {
    facts.peer = a.peer == "sidecar" ? policy::PeerSidecar::kYes
                 : a.peer == "none"  ? policy::PeerSidecar::kNo
                                     : policy::PeerSidecar::kUnknown;
  }
  if (!a.peer_stacks.empty()) facts.peer_stacks = a.peer_stacks;
  if (!a.rtt.empty()) {
    facts.rtt = a.rtt == "local" ? policy::RttClass::kLocal
                : a.rtt == "lan" ? policy::RttClass::kLan
                : a.rtt == "wan" ? policy::RttClass::kWan
                                 : policy::RttClass::kUnknown;
  }
  auto pol = sidecar.policy();
  std::vector<std::string> trace;
  auto d = pol->explain(facts, trace);
  std::string s =
      fmt::format("policy version {} ({} rules from {} files)\nfacts: {}\ntrace:\n", pol->version(),
                  pol->rules().size(), pol->files().size(), describeFacts(facts));
  for (const auto& line : trace)
    s += line + "\n";
  const auto& action = *d.action;
  const auto& config = ctx.config;
  std::string no_sidecar = policy::noSidecarName(action.no_sidecar);
  if (action.no_sidecar == policy::NoSidecar::kDefault)
    no_sidecar += config.fallback == FallbackMode::kDirect ? " (direct)" : " (refuse)";
  s += fmt::format("decision: rule={} mode={} stagger={} attempt_timeout={} no_sidecar={}\n",
                   d.ruleName(), policy::modeName(action.mode), formatDuration(action.stagger),
                   formatDuration(action.attempt_timeout), no_sidecar);
  s += "candidates:\n";
  auto breakers = ctx.peers.openBreakers();
  int n = 0;
  for (std::size_t i : action.stacks) {
    const auto& stack = *ctx.stacks[i];
    std::string note;
    if (!stack.healthy()) note = " - unhealthy, skipped";
    for (const auto& b : breakers) {
      if (b.stack == i && b.peer == dst->ip()) note = " - circuit breaker open toward the peer";
    }
    s += fmt::format("  {}. {} ({}){}\n", ++n, stack.name(), stack.kind(), note);
  }
  if (facts.peer == policy::PeerSidecar::kNo) {
    s += "the peer is known to run no sidecar: the no_sidecar action applies\n";
  }
  out = std::move(s);
  return 0;
}

int connections(Sidecar& sidecar, std::string& out) {
  auto all = sidecar.connections();
  std::sort(all.begin(), all.end(),
            [](const auto& a, const auto& b) { return a.info.id < b.info.id; });
  for (const auto& c : all)
    out += c.line + "\n";
  out += fmt::format("{} connections\n", all.size());
  return 0;
}

int diff(Sidecar& sidecar, const std::vector<std::string>& files, std::string& out) {
  Diagnostics diags;
  auto current = sidecar.policy();
  auto candidate =
      policy::loadPolicyFiles(files, sidecar.policyEnvironment(), current->version() + 1, diags);
  out += diags.formatAll();
  if (!candidate) {
    out += "the candidate policy is invalid\n";
    return 1;
  }
  auto all = sidecar.connections();
  std::sort(all.begin(), all.end(),
            [](const auto& a, const auto& b) { return a.info.id < b.info.id; });
  std::size_t changed = 0;
  std::size_t carried = 0;
  for (const auto& c : all) {
    // Fallback connections bypass every stack; a policy cannot move them.
    if (c.info.stack >= sidecar.context().stacks.size()) continue;
    ++carried;
    auto next = candidate->classify(c.info.facts.expand(
        c.info.role == Role::kOutbound ? policy::Role::kOutbound : policy::Role::kInbound,
        c.info.destination));
    auto now_stack = stackName(sidecar, c.info.stack);
    auto next_stack = firstStack(sidecar, next);
    if (now_stack == next_stack) continue;
    ++changed;
    out += fmt::format("{:x} role={} dst={}: stack={} rule={} (policy {}) -> stack={} rule={}\n",
                       c.info.id, roleName(c.info.role), c.info.destination.toString(), now_stack,
                       c.info.ruleName(), c.info.policyVersion(), next_stack, next.ruleName());
  }
  out += fmt::format("{} of {} carried connections would change stack ({} live in all)\n", changed,
                     carried, all.size());
  return 0;
}

int breakers(Sidecar& sidecar, std::string& out) {
  auto open = sidecar.context().peers.openBreakers();
  auto now = std::chrono::steady_clock::now();
  for (const auto& b : open) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(b.until - now);
    out += fmt::format("peer={} stack={} failures={} state={}\n", b.peer.toString(),
                       stackName(sidecar, b.stack), b.failures,
                       b.probing          ? "half_open (probing)"
                       : left.count() > 0 ? "open (probe in " + formatDuration(left) + ")"
                                          : "open (next connection probes)");
  }
  out += fmt::format("{} open circuit breakers\n", open.size());
  return 0;
}

int show(Sidecar& sidecar, std::string& out) {
  auto pol = sidecar.policy();
  out += fmt::format("policy version {} from {}\n", pol->version(), sidecar.config().policy_dir);
  for (const auto& f : pol->files())
    out += "  file " + f + "\n";
  for (const auto& r : pol->rules()) {
    std::string stacks;
    for (auto i : r.action.stacks)
      stacks += (stacks.empty() ? "" : ",") + stackName(sidecar, i);
    out += fmt::format("  rule {} ({}:{}:{}) stacks={} mode={}\n", r.name, r.where.file,
                       r.where.line, r.where.column, stacks, policy::modeName(r.action.mode));
  }
  return 0;
}

std::string faultLines(Sidecar& sidecar) {
  const auto& ctx = sidecar.context();
  std::string out;
  for (std::size_t i = 0; i < ctx.stacks.size(); ++i)
    out += fmt::format("{} {}\n", ctx.stacks[i]->name(), ctx.faults.plan(i).describe());
  return out;
}

// `fault set STACK KEY=VALUE...`: the keys and checks of a [[fault]] table (docs/config.md), so
// each setting is written as one TOML line and read by the config's own parser.
int faultSet(Sidecar& sidecar, const std::string& stack, const std::vector<std::string>& settings,
             std::string& out) {
  auto& ctx = sidecar.context();
  std::size_t index = ctx.stacks.size();
  for (std::size_t i = 0; i < ctx.stacks.size(); ++i) {
    if (ctx.stacks[i]->name() == stack) index = i;
  }
  if (index == ctx.stacks.size()) {
    out = "no stack instance is named \"" + stack + "\" (see `ctl stacks`)\n";
    return 2;
  }
  std::string text;
  for (const auto& s : settings) {
    auto eq = s.find('=');
    if (eq == std::string::npos || eq == 0 || !isConfigName(s.substr(0, eq))) {
      out = "\"" + s + "\": expected KEY=VALUE, e.g. fail_connect=1 or stall_direction=send\n";
      return 2;
    }
    std::string value = s.substr(eq + 1);
    bool number =
        !value.empty() && value.find_first_not_of("0123456789.eE+-_") == std::string::npos;
    if (!number && value.find_first_of("\"\\\n\r") != std::string::npos) {
      out = "\"" + s + "\": the value may not contain quotes, backslashes or line breaks\n";
      return 2;
    }
    text += s.substr(0, eq) + " = " + (number ? value : "\"" + value + "\"") + "\n";
  }
  Diagnostics diags;
  auto doc = loadTomlString(text, "fault set", diags);
  FaultPlan plan;
  if (doc) {
    TomlTable t(*doc, "fault set", diags);
    plan = parseFaultPlan(t);
    t.rejectUnknown();
  }
  if (diags.hasErrors()) {
    out = diags.formatAll();
    return 2;
  }
  ctx.faults.set(index, plan);
  spdlog::warn("fault injection on stack {} set through the admin socket: {}", stack,
               plan.describe());
  out = faultLines(sidecar);
  return 0;
}

}  // namespace

int runAdminCommand(Sidecar& sidecar, const std::vector<std::string>& args, std::string& out) {
  CLI::App app{"dmm-sidecar ctl: talk to the running sidecar over its admin socket",
               "dmm-sidecar ctl"};
  app.require_subcommand(1);
  auto* status = app.add_subcommand("status", "version, policy, connections, breakers");
  auto* conns = app.add_subcommand("connections", "live connections: stack, rule, policy version");
  auto* brk = app.add_subcommand("breakers", "open circuit breakers per peer and stack");
  auto* stk = app.add_subcommand("stacks", "stack instances: kind, up or down, state");
  auto* reload = app.add_subcommand("reload", "reload the policy (same as SIGHUP)");
  auto* pol = app.add_subcommand("policy", "the policy: show, explain, diff, reload");
  pol->require_subcommand(1);
  auto* pshow = pol->add_subcommand("show", "the rules in force");
  auto* preload = pol->add_subcommand("reload", "reload policy.d; an invalid policy is refused");
  auto* pexplain = pol->add_subcommand("explain", "the rule trace and candidates for a connection");
  ExplainArgs ea;
  pexplain->add_option("--dst", ea.dst, "destination ADDR:PORT")->required();
  pexplain->add_option("--uid", ea.uid, "owner uid of the client socket");
  pexplain->add_option("--app", ea.app, "process name");
  pexplain->add_option("--qos", ea.qos, "QoS class");
  pexplain->add_option("--role", ea.role, "outbound (default) or inbound")
      ->check(CLI::IsMember({"outbound", "inbound"}));
  pexplain->add_option("--peer", ea.peer, "override the peer fact: sidecar, none, unknown")
      ->check(CLI::IsMember({"sidecar", "none", "unknown"}));
  pexplain->add_option("--peer-stacks", ea.peer_stacks, "override the peer's stack kinds")
      ->delimiter(',');
  pexplain->add_option("--rtt", ea.rtt, "override the RTT class: local, lan, wan, unknown")
      ->check(CLI::IsMember({"local", "lan", "wan", "unknown"}));
  auto* logc = app.add_subcommand("log", "the log level: show it, or set it until the next reload");
  auto* llevel = logc->add_subcommand("level", "show or set: trace, debug, info, warning, error");
  logc->require_subcommand(1);
  std::string new_level;
  llevel->add_option("level", new_level, "the new level (omit to show the current one)")
      ->check(
          CLI::IsMember({"trace", "debug", "info", "warning", "warn", "error", "critical", "off"}));
  auto* pdiff = pol->add_subcommand(
      "diff", "which live connections a candidate policy would put on another stack");
  std::vector<std::string> files;
  pdiff->add_option("files", files, "candidate policy files, in evaluation order")->required();

  auto* flt = app.add_subcommand("fault", "fault injection (off by default): show, set, clear");
  flt->require_subcommand(1);
  auto* fshow = flt->add_subcommand("show", "the faults armed on each stack instance");
  auto* fset = flt->add_subcommand(
      "set",
      "arm faults on a stack instance, replacing what it had: KEY=VALUE... ([[fault]] keys)");
  std::string fault_stack;
  std::vector<std::string> fault_settings;
  fset->add_option("stack", fault_stack, "the stack instance")->required();
  fset->add_option("settings", fault_settings, "e.g. fail_connect=1 connect_failure=timeout")
      ->required();
  auto* fclear = flt->add_subcommand("clear", "disarm a stack instance's faults (all: omit it)");
  std::string clear_stack;
  fclear->add_option("stack", clear_stack, "the stack instance");

  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    std::ostringstream o;
    std::ostringstream err;
    int code = app.exit(e, o, err);
    out = o.str() + err.str();
    return code == 0 ? 0 : 2;
  }
  if (status->parsed()) {
    auto p = sidecar.policy();
    auto all = sidecar.connections();
    out += fmt::format("policy version {} ({} rules)\nconnections {}\nopen breakers {}\n",
                       p->version(), p->rules().size(), all.size(),
                       sidecar.context().peers.openBreakers().size());
    return 0;
  }
  if (conns->parsed()) return connections(sidecar, out);
  if (brk->parsed()) return breakers(sidecar, out);
  if (stk->parsed()) {
    for (const auto& st : sidecar.context().stacks) {
      auto line = st->status();
      out += fmt::format("{} kind={} {}{}{}\n", st->name(), st->kind(),
                         st->healthy() ? "up" : "down", line.empty() ? "" : " ", line);
    }
    return 0;
  }
  if (reload->parsed() || preload->parsed()) {
    std::string report;
    bool ok = sidecar.reloadPolicy(report);
    out += report;
    out += ok ? fmt::format("policy version {} in force\n", sidecar.policy()->version())
              : fmt::format("invalid policy refused; version {} stays in force\n",
                            sidecar.policy()->version());
    return ok ? 0 : 1;
  }
  if (llevel->parsed()) {
    if (!new_level.empty()) {
      auto before = log::level();
      log::setLevel(*log::parseLevel(new_level));
      spdlog::info("log level {} (was {}), set through the admin socket",
                   log::levelName(log::level()), log::levelName(before));
    }
    out += fmt::format("log level {}\n", log::levelName(log::level()));
    return 0;
  }
  if (fshow->parsed()) {
    out = faultLines(sidecar);
    return 0;
  }
  if (fset->parsed()) return faultSet(sidecar, fault_stack, fault_settings, out);
  if (fclear->parsed()) {
    auto& ctx = sidecar.context();
    bool found = clear_stack.empty();
    for (std::size_t i = 0; i < ctx.stacks.size(); ++i) {
      if (!clear_stack.empty() && ctx.stacks[i]->name() != clear_stack) continue;
      found = true;
      ctx.faults.set(i, FaultPlan{});
    }
    if (!found) {
      out = "no stack instance is named \"" + clear_stack + "\" (see `ctl stacks`)\n";
      return 2;
    }
    spdlog::info("fault injection cleared on {} through the admin socket",
                 clear_stack.empty() ? std::string("every stack") : clear_stack);
    out = faultLines(sidecar);
    return 0;
  }
  if (pshow->parsed()) return show(sidecar, out);
  if (pexplain->parsed()) return explain(sidecar, ea, out);
  if (pdiff->parsed()) return diff(sidecar, files, out);
  out = app.help();
  return 2;
}

}  // namespace dmm::proxy
