#include "policy/policy.h"

#include <algorithm>

#include "policy/index.h"

namespace dmm::policy {

const char* roleName(Role r) {
  switch (r) {
    case Role::kOutbound:
      return "outbound";
    case Role::kInbound:
      return "inbound";
  }
  return "?";
}

const char* modeName(Mode m) {
  switch (m) {
    case Mode::kSequential:
      return "sequential";
    case Mode::kRace:
      return "race";
  }
  return "?";
}

const char* noSidecarName(NoSidecar n) {
  switch (n) {
    case NoSidecar::kDefault:
      return "default";
    case NoSidecar::kDirect:
      return "direct";
    case NoSidecar::kRefuse:
      return "refuse";
  }
  return "?";
}

const char* peerSidecarName(PeerSidecar p) {
  switch (p) {
    case PeerSidecar::kUnknown:
      return "unknown";
    case PeerSidecar::kYes:
      return "sidecar";
    case PeerSidecar::kNo:
      return "none";
  }
  return "?";
}

std::optional<std::uint8_t> qosFromName(std::string_view name) {
  for (std::size_t i = 0; i < kQosClasses.size(); ++i) {
    if (kQosClasses[i] == name) return static_cast<std::uint8_t>(i);
  }
  return std::nullopt;
}

const char* rttClassName(RttClass c) {
  switch (c) {
    case RttClass::kUnknown:
      return "unknown";
    case RttClass::kLocal:
      return "local";
    case RttClass::kLan:
      return "lan";
    case RttClass::kWan:
      return "wan";
  }
  return "?";
}

RttClass RttThresholds::classify(std::optional<std::chrono::microseconds> rtt) const {
  if (!rtt) return RttClass::kUnknown;
  if (*rtt < local) return RttClass::kLocal;
  if (*rtt < lan) return RttClass::kLan;
  return RttClass::kWan;
}

namespace {

template <class T>
bool contains(const std::vector<T>& set, const T& value) {
  return std::find(set.begin(), set.end(), value) != set.end();
}

bool dstMatches(const Rule& rule, const Facts& facts) {
  if (rule.dst.empty()) return true;
  if (!facts.dst.valid()) return false;
  for (const auto& cidr : rule.dst) {
    if (cidr.contains(facts.dst.ip())) return true;
  }
  return false;
}

bool portMatches(const Rule& rule, const Facts& facts) {
  if (rule.ports.empty()) return true;
  if (!facts.dst.valid()) return false;
  for (const auto& range : rule.ports) {
    if (range.contains(facts.dst.port())) return true;
  }
  return false;
}

bool uidMatches(const Rule& rule, const Facts& facts) {
  if (rule.uids.empty()) return true;
  if (!facts.uid) return false;
  for (const auto& range : rule.uids) {
    if (range.contains(*facts.uid)) return true;
  }
  return false;
}

bool appMatches(const Rule& rule, const Facts& facts) {
  if (rule.apps.empty()) return true;
  return !facts.app.empty() && contains(rule.apps, facts.app);
}

bool qosMatches(const Rule& rule, const Facts& facts) {
  if (rule.qos.empty()) return true;
  return facts.qos && contains(rule.qos, *facts.qos);
}

bool roleMatches(const Rule& rule, const Facts& facts) {
  return !rule.role || *rule.role == facts.role;
}

bool peerMatches(const Rule& rule, const Facts& facts) {
  return rule.peer.empty() || contains(rule.peer, facts.peer);
}

bool peerStacksMatch(const Rule& rule, const Facts& facts) {
  if (rule.peer_stacks.empty()) return true;
  for (const auto& kind : facts.peer_stacks) {
    if (contains(rule.peer_stacks, kind)) return true;
  }
  return false;
}

bool rttMatches(const Rule& rule, const Facts& facts) {
  return rule.rtt.empty() || contains(rule.rtt, facts.rtt);
}

template <class T, class F>
std::string join(const std::vector<T>& items, F&& format) {
  std::string out;
  for (const auto& item : items) {
    if (!out.empty()) out += ", ";
    out += format(item);
  }
  return out;
}

std::string str(const std::string& s) {
  return s;
}

// Why `rule` does not match `facts`: the first failing key, in the documented order, as
// "<key> <fact> not in <values>" or "<key> unknown"; empty when it matches.
std::string whyNot(const Rule& rule, const Facts& facts) {
  if (!dstMatches(rule, facts)) {
    if (!facts.dst.valid()) return "dst unknown";
    return "dst " + facts.dst.ip().toString() + " not in " +
           join(rule.dst, [](const Cidr& c) { return c.toString(); });
  }
  if (!portMatches(rule, facts)) {
    if (!facts.dst.valid()) return "port unknown";
    return "port " + std::to_string(facts.dst.port()) + " not in " +
           join(rule.ports, [](const PortRange& r) { return r.toString(); });
  }
  if (!uidMatches(rule, facts)) {
    if (!facts.uid) return "uid unknown";
    return "uid " + std::to_string(*facts.uid) + " not in " +
           join(rule.uids, [](const UidRange& r) {
             return r.first == r.last ? std::to_string(r.first)
                                      : std::to_string(r.first) + "-" + std::to_string(r.last);
           });
  }
  if (!appMatches(rule, facts)) {
    if (facts.app.empty()) return "app unknown";
    return "app " + facts.app + " not in " + join(rule.apps, str);
  }
  if (!qosMatches(rule, facts)) {
    auto name = [](std::uint8_t q) {
      return q < kQosClasses.size() ? std::string(kQosClasses[q]) : std::to_string(q);
    };
    if (!facts.qos) return "qos unknown";
    return "qos " + name(*facts.qos) + " not in " + join(rule.qos, name);
  }
  if (!roleMatches(rule, facts)) {
    return std::string("role ") + roleName(facts.role) + " not in " + roleName(*rule.role);
  }
  if (!peerMatches(rule, facts)) {
    return std::string("peer ") + peerSidecarName(facts.peer) + " not in " +
           join(rule.peer, [](PeerSidecar p) { return std::string(peerSidecarName(p)); });
  }
  if (!peerStacksMatch(rule, facts)) {
    if (facts.peer_stacks.empty()) return "peer_stacks unknown";
    return "peer_stacks [" + join(facts.peer_stacks, str) + "] not in " +
           join(rule.peer_stacks, str);
  }
  if (!rttMatches(rule, facts)) {
    return std::string("rtt ") + rttClassName(facts.rtt) + " not in " +
           join(rule.rtt, [](RttClass c) { return std::string(rttClassName(c)); });
  }
  return {};
}

std::string positionText(const SourcePosition& p) {
  return p.file + ":" + std::to_string(p.line) + ":" + std::to_string(p.column);
}

}  // namespace

bool matchesExceptDst(const Rule& rule, const Facts& facts) {
  return portMatches(rule, facts) && uidMatches(rule, facts) && appMatches(rule, facts) &&
         qosMatches(rule, facts) && roleMatches(rule, facts) && peerMatches(rule, facts) &&
         peerStacksMatch(rule, facts) && rttMatches(rule, facts);
}

bool Rule::matches(const Facts& facts) const {
  return dstMatches(*this, facts) && matchesExceptDst(*this, facts);
}

Policy::Policy() = default;
Policy::~Policy() = default;

Decision Policy::classify(const Facts& facts) const {
  std::uint32_t id = index_->lookup(rules_, facts);
  if (id == MatchIndex::kNone) return {nullptr, &default_, version_};
  return {&rules_[id], &rules_[id].action, version_};
}

Decision Policy::explain(const Facts& facts, std::vector<std::string>& trace) const {
  for (const auto& rule : rules_) {
    std::string head = "rule '" + rule.name + "' (" + positionText(rule.where) + ")";
    std::string why = whyNot(rule, facts);
    if (why.empty()) {
      trace.push_back("  match " + head);
      return {&rule, &rule.action, version_};
    }
    trace.push_back("  no    " + head + ": " + why);
  }
  trace.push_back("  default action (no rule matched)");
  return {nullptr, &default_, version_};
}

}  // namespace dmm::policy
