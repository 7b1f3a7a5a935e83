// The policy loader: policy.d/*.toml -> one validated Policy, every problem reported in one pass
// as file:line:col through TomlTable, then the index and the shadowing check.

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <system_error>

#include "common/toml_table.h"
#include "policy/index.h"

namespace dmm::policy {

namespace {

std::string positionText(const SourcePosition& p) {
  return p.file + ":" + std::to_string(p.line) + ":" + std::to_string(p.column);
}

std::string joinNames(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  std::string out;
  for (const auto& n : names)
    out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::optional<std::uint32_t> parseUid(std::string_view text) {
  std::uint32_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return value;
}

// "1000" or "2000-2999", first <= last.
std::optional<UidRange> parseUidRange(std::string_view text) {
  auto dash = text.find('-');
  auto first = parseUid(text.substr(0, dash));
  auto last = dash == std::string_view::npos ? first : parseUid(text.substr(dash + 1));
  if (!first || !last || *first > *last) return std::nullopt;
  return UidRange{*first, *last};
}

const std::function<std::optional<Cidr>(std::string_view)> kParseCidr = [](std::string_view s) {
  return Cidr::parse(s);
};
const std::function<std::optional<PortRange>(std::string_view)> kParsePorts =
    [](std::string_view s) { return PortRange::parse(s); };
const std::function<std::optional<std::string>(std::string_view)> kParseApp =
    [](std::string_view s) -> std::optional<std::string> {
  if (s.empty()) return std::nullopt;
  return std::string(s);
};
const std::function<std::optional<std::uint8_t>(std::string_view)> kParseQos = qosFromName;
const std::function<std::optional<PeerSidecar>(std::string_view)> kParsePeer =
    [](std::string_view s) -> std::optional<PeerSidecar> {
  for (auto p : {PeerSidecar::kYes, PeerSidecar::kNo, PeerSidecar::kUnknown}) {
    if (s == peerSidecarName(p)) return p;
  }
  return std::nullopt;
};
const std::function<std::optional<RttClass>(std::string_view)> kParseRtt =
    [](std::string_view s) -> std::optional<RttClass> {
  for (auto c : {RttClass::kLocal, RttClass::kLan, RttClass::kWan, RttClass::kUnknown}) {
    if (s == rttClassName(c)) return c;
  }
  return std::nullopt;
};

// What the shadowing check compares first, so that most pairs are rejected in a few
// instructions: the presence of the open-ended keys, the enumerable keys as bit sets (an absent
// key is every value, including "unknown"), the spans of the port and uid ranges, and the names
// (apps, peer stack kinds) as 64-bit Bloom masks.
struct MatchSummary {
  enum : std::uint8_t { kDst = 1, kPorts = 2, kUids = 4, kApps = 8, kPeerStacks = 16 };
  std::uint8_t present = 0;
  std::uint8_t roles = 0;
  std::uint8_t peers = 0;
  std::uint8_t rtts = 0;
  std::uint8_t qos = 0;  // one bit per class; bit 7: an unknown QoS (only when `qos` is absent)
  std::uint16_t port_min = 0;
  std::uint16_t port_max = 65535;
  std::uint32_t uid_min = 0;
  std::uint32_t uid_max = 0xFFFFFFFFu;
  std::uint64_t apps = ~std::uint64_t{0};
  std::uint64_t kinds = ~std::uint64_t{0};

  static MatchSummary of(const Rule& r) {
    MatchSummary s;
    if (!r.dst.empty()) s.present |= kDst;
    if (!r.ports.empty()) {
      s.present |= kPorts;
      s.port_min = 65535;
      s.port_max = 0;
      for (const auto& p : r.ports) {
        s.port_min = std::min(s.port_min, p.first);
        s.port_max = std::max(s.port_max, p.last);
      }
    }
    if (!r.uids.empty()) {
      s.present |= kUids;
      s.uid_min = 0xFFFFFFFFu;
      s.uid_max = 0;
      for (const auto& u : r.uids) {
        s.uid_min = std::min(s.uid_min, u.first);
        s.uid_max = std::max(s.uid_max, u.last);
      }
    }
    if (!r.apps.empty()) {
      s.present |= kApps;
      s.apps = bloom(r.apps);
    }
    if (!r.peer_stacks.empty()) {
      s.present |= kPeerStacks;
      s.kinds = bloom(r.peer_stacks);
    }
    s.roles = r.role ? static_cast<std::uint8_t>(1u << static_cast<unsigned>(*r.role)) : 0x3;
    s.peers = bits(r.peer, 0x7);
    s.rtts = bits(r.rtt, 0xF);
    s.qos = bits(r.qos, 0xFF);
    return s;
  }

  template <class T>
  static std::uint8_t bits(const std::vector<T>& values, std::uint8_t all) {
    if (values.empty()) return all;
    unsigned out = 0;
    for (T v : values)
      out |= 1u << static_cast<unsigned>(v);
    return static_cast<std::uint8_t>(out);
  }

  static std::uint64_t bloom(const std::vector<std::string>& names) {
    std::uint64_t out = 0;
    for (const auto& n : names)
      out |= std::uint64_t{1} << (std::hash<std::string>{}(n) % 64);
    return out;
  }

  // Whether a rule summarised by `this` could match everything one summarised by `b` does
  // (a necessary condition; covers() decides).
  bool mayCover(const MatchSummary& b) const {
    return (present & ~b.present) == 0 && (b.roles & ~roles) == 0 && (b.peers & ~peers) == 0 &&
           (b.rtts & ~rtts) == 0 && (b.qos & ~qos) == 0 && port_min <= b.port_min &&
           b.port_max <= port_max && uid_min <= b.uid_min && b.uid_max <= uid_max &&
           (b.apps & ~apps) == 0 && (b.kinds & ~kinds) == 0;
  }
};

bool cidrWithin(const Cidr& inner, const Cidr& outer) {
  return inner.family() == outer.family() && outer.prefixLength() <= inner.prefixLength() &&
         outer.contains(inner.network());
}

bool rangeWithin(const PortRange& inner, const PortRange& outer) {
  return outer.first <= inner.first && inner.last <= outer.last;
}

bool rangeWithin(const UidRange& inner, const UidRange& outer) {
  return outer.first <= inner.first && inner.last <= outer.last;
}

bool stringWithin(const std::string& inner, const std::string& outer) {
  return inner == outer;
}

// Every element of `inner` within some element of `outer`; an empty `outer` is everything.
// (The caller has checked that `inner` is not empty when `outer` is not.)
template <class T>
bool setWithin(const std::vector<T>& inner, const std::vector<T>& outer) {
  if (outer.empty()) return true;
  return std::all_of(inner.begin(), inner.end(), [&](const T& i) {
    return std::any_of(outer.begin(), outer.end(), [&](const T& o) {
      if constexpr (std::is_same_v<T, Cidr>) {
        return cidrWithin(i, o);
      } else if constexpr (std::is_same_v<T, std::string>) {
        return stringWithin(i, o);
      } else {
        return rangeWithin(i, o);
      }
    });
  });
}

// Whether rule `a` matches every connection rule `b` matches (given a.mayCover(b)).
bool covers(const Rule& a, const Rule& b) {
  return setWithin(b.dst, a.dst) && setWithin(b.ports, a.ports) && setWithin(b.uids, a.uids) &&
         setWithin(b.apps, a.apps) && setWithin(b.peer_stacks, a.peer_stacks);
}

}  // namespace

// Builds one Policy from parsed files; every problem goes to `diags`.
class PolicyBuilder {
 public:
  PolicyBuilder(const Environment& env, std::uint64_t version, Diagnostics& diags)
      : env_(env), diags_(diags), policy_(new Policy()) {
    policy_->version_ = version;
    std::vector<std::string> names;
    for (const auto& s : env_.stacks)
      names.push_back(s.name);
    known_stacks_ = joinNames(names);
  }

  void addFileName(const std::string& file) { policy_->files_.push_back(file); }

  void addDocument(const toml::value& doc) {
    TomlTable root(doc, "the top level", diags_);
    if (const toml::value* d = root.getTable("default")) loadDefault(*d);
    int number = 0;
    for (const toml::value* entry : root.getArrayOfTables("rule"))
      loadRule(*entry, ++number);
    root.rejectUnknown();
  }

  std::shared_ptr<const Policy> finish() {
    if (diags_.hasErrors()) return nullptr;
    Policy& p = *policy_;
    if (!default_at_) {
      p.default_ = defaultAction();
      for (std::size_t i = 0; i < env_.stacks.size(); ++i)
        p.default_.stacks.push_back(i);
    }
    for (const auto& r : p.rules_) {
      p.uses_uid_ = p.uses_uid_ || !r.uids.empty();
      p.uses_app_ = p.uses_app_ || !r.apps.empty();
    }
    p.index_ = std::make_unique<Policy::Index>();
    p.index_->build(p.rules_);
    warnShadowed();
    return std::shared_ptr<const Policy>(std::move(policy_));
  }

 private:
  Action defaultAction() const {
    Action a;
    a.stagger = env_.stagger;
    a.attempt_timeout = env_.attempt_timeout;
    return a;
  }

  void loadDefault(const toml::value& table) {
    TomlTable t(table, "[default]", diags_);
    Action action = defaultAction();
    loadAction(t, action, false);
    if (!t.getRaw("stacks")) {
      for (std::size_t i = 0; i < env_.stacks.size(); ++i)
        action.stacks.push_back(i);
    }
    t.rejectUnknown();
    if (default_at_) {
      diags_.error(t.position(), "[default] is already set at " + positionText(*default_at_) +
                                     " (at most one [default] across all files)");
      return;
    }
    default_at_ = t.position();
    policy_->default_ = std::move(action);
  }

  void loadRule(const toml::value& entry, int number) {
    // Name the rule in messages by its name when it has a usable one.
    std::string label = "[[rule]] #" + std::to_string(number);
    if (entry.is_table()) {
      auto it = entry.as_table().find("name");
      if (it != entry.as_table().end() && it->second.is_string() &&
          isConfigName(it->second.as_string().str))
        label = "[[rule]] '" + it->second.as_string().str + "'";
    }
    const std::size_t errors_before = diags_.errorCount();
    TomlTable t(entry, label, diags_);
    Rule rule;
    rule.where = t.position();
    if (auto name = t.getString("name")) {
      if (!isConfigName(*name)) {
        t.error("name", "\"" + *name + "\" is not 1-64 characters of [A-Za-z0-9_.-]");
      } else if (auto first = names_.find(*name); first != names_.end()) {
        t.error("name", "\"" + *name + "\" is already the name of the rule at " +
                            positionText(first->second));
      } else {
        names_.emplace(*name, rule.where);
        rule.name = *name;
      }
    } else if (!t.getRaw("name")) {
      t.requireKey("name");
    }
    if (const toml::value* m = t.getTable("match"))
      loadMatch(TomlTable(*m, "match of " + label, diags_), rule);
    rule.action = defaultAction();
    loadAction(t, rule.action, true);
    t.rejectUnknown();
    if (diags_.errorCount() == errors_before) policy_->rules_.push_back(std::move(rule));
  }

  // A list key into `target`. An empty list is accepted (it means "any", like an absent key)
  // with a warning, since it reads as "nothing".
  template <class T>
  void list(TomlTable& t, std::string_view key, std::string_view what,
            const std::function<std::optional<T>(std::string_view)>& parse,
            std::vector<T>& target) {
    auto v = t.getList<T>(key, what, parse);
    if (!v) return;
    if (v->empty()) t.warning(key, "an empty list matches everything; leave the key out");
    target = std::move(*v);
  }

  void loadMatch(TomlTable t, Rule& rule) {
    list<Cidr>(t, "dst", "a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", or an address", kParseCidr,
               rule.dst);
    list<PortRange>(t, "ports",
                    "a port or range such as \"443\" or \"8000-8100\" (1-65535, first <= last)",
                    kParsePorts, rule.ports);
    loadUids(t, rule.uids);
    list<std::string>(t, "app", "a process name", kParseApp, rule.apps);
    std::string qos_names;
    for (auto q : kQosClasses)
      qos_names += (qos_names.empty() ? "" : ", ") + std::string(q);
    list<std::uint8_t>(t, "qos", "one of " + qos_names, kParseQos, rule.qos);
    if (auto v = t.getString("role")) {
      if (*v == roleName(Role::kOutbound)) {
        rule.role = Role::kOutbound;
      } else if (*v == roleName(Role::kInbound)) {
        rule.role = Role::kInbound;
      } else {
        t.error("role", "\"" + *v + "\" is not one of outbound, inbound");
      }
    }
    list<PeerSidecar>(t, "peer", "one of sidecar, none, unknown", kParsePeer, rule.peer);
    const std::function<std::optional<std::string>(std::string_view)> parse_kind =
        [this](std::string_view s) -> std::optional<std::string> {
      for (const auto& k : env_.kinds) {
        if (k == s) return k;
      }
      return std::nullopt;
    };
    list<std::string>(t, "peer_stacks",
                      "a stack kind this build knows (one of " + joinNames(env_.kinds) + ")",
                      parse_kind, rule.peer_stacks);
    list<RttClass>(t, "rtt", "one of local, lan, wan, unknown", kParseRtt, rule.rtt);
    t.rejectUnknown();
  }

  // `uid`: integers and "a-b" strings, alone or in an array. Not TomlTable::getList, which
  // takes strings only.
  void loadUids(TomlTable& t, std::vector<UidRange>& target) {
    const toml::value* v = t.getRaw("uid");
    if (v == nullptr) return;
    std::vector<const toml::value*> elements;
    if (v->is_array()) {
      for (const auto& e : v->as_array())
        elements.push_back(&e);
    } else {
      elements.push_back(v);
    }
    std::vector<UidRange> out;
    for (const toml::value* e : elements) {
      std::optional<UidRange> range;
      std::string text;
      if (e->is_integer()) {
        auto n = e->as_integer();
        text = std::to_string(n);
        if (n >= 0 && n <= 0xFFFFFFFFLL) {
          auto uid = static_cast<std::uint32_t>(n);
          range = UidRange{uid, uid};
        }
      } else if (e->is_string()) {
        text = "\"" + e->as_string().str + "\"";
        range = parseUidRange(e->as_string().str);
      } else {
        diags_.error(positionOf(*e), "'uid' in " + t.name() +
                                         ": expected an integer or a string such as "
                                         "\"2000-2999\"");
        continue;
      }
      if (!range) {
        diags_.error(positionOf(*e), "'uid' in " + t.name() + ": " + text +
                                         " is not a uid or range such as 1000 or \"2000-2999\" "
                                         "(0-4294967295, first <= last)");
        continue;
      }
      out.push_back(*range);
    }
    if (v->is_array() && elements.empty())
      t.warning("uid", "an empty list matches everything; leave the key out");
    target = std::move(out);
  }

  void loadAction(TomlTable& t, Action& a, bool is_rule) {
    const std::function<std::optional<std::size_t>(std::string_view)> parse_stack =
        [this](std::string_view s) -> std::optional<std::size_t> {
      for (std::size_t i = 0; i < env_.stacks.size(); ++i) {
        if (env_.stacks[i].name == s) return i;
      }
      return std::nullopt;
    };
    auto stacks = t.getList<std::size_t>(
        "stacks", "a configured stack (one of " + known_stacks_ + ")", parse_stack);
    if (stacks) {
      if (stacks->empty()) t.error("stacks", "needs at least one stack");
      // getList has parsed every element, so they line up with the array's.
      const toml::value* raw = t.getRaw("stacks");
      for (std::size_t i = 0; i < stacks->size(); ++i) {
        for (std::size_t j = 0; j < i; ++j) {
          if ((*stacks)[i] != (*stacks)[j]) continue;
          diags_.error(positionOf(raw->as_array()[i]), "'stacks' in " + t.name() + ": \"" +
                                                           env_.stacks[(*stacks)[i]].name +
                                                           "\" is listed twice");
          break;
        }
      }
      a.stacks = std::move(*stacks);
    } else if (is_rule && !t.getRaw("stacks")) {
      t.requireKey("stacks");
    }
    if (auto v = t.getString("mode")) {
      if (*v == modeName(Mode::kSequential)) {
        a.mode = Mode::kSequential;
      } else if (*v == modeName(Mode::kRace)) {
        a.mode = Mode::kRace;
      } else {
        t.error("mode", "\"" + *v + "\" is not one of sequential, race");
      }
    }
    for (auto [key, target] :
         {std::pair<const char*, Millis*>{"stagger", &a.stagger},
          std::pair<const char*, Millis*>{"attempt_timeout", &a.attempt_timeout}}) {
      if (auto v = t.getDuration(key)) {
        if (v->count() <= 0) {
          t.error(key, "must be positive");
        } else {
          *target = *v;
        }
      }
    }
    if (auto v = t.getString("no_sidecar")) {
      bool found = false;
      for (auto n : {NoSidecar::kDefault, NoSidecar::kDirect, NoSidecar::kRefuse}) {
        if (*v == noSidecarName(n)) {
          a.no_sidecar = n;
          found = true;
        }
      }
      if (!found) t.error("no_sidecar", "\"" + *v + "\" is not one of default, direct, refuse");
    }
  }

  // A rule that an earlier rule fully covers never decides anything: most likely the rules
  // are in the wrong order. Candidates come from the index: an earlier rule can only cover
  // this one if one of its prefixes contains this rule's first prefix (or it has no `dst`).
  void warnShadowed() {
    const auto& rules = policy_->rules_;
    const MatchIndex& index = *policy_->index_;
    std::vector<MatchSummary> summaries;
    summaries.reserve(rules.size());
    for (const auto& r : rules)
      summaries.push_back(MatchSummary::of(r));
    for (std::size_t j = 0; j < rules.size(); ++j) {
      auto later = static_cast<std::uint32_t>(j);
      std::uint32_t best = later;
      auto consider = [&](std::span<const std::uint32_t> candidates) {
        for (std::uint32_t i : candidates) {
          if (i >= best) return;
          if (summaries[i].mayCover(summaries[j]) && covers(rules[i], rules[j])) best = i;
        }
      };
      if (rules[j].dst.empty()) {
        consider(index.rulesWithoutDst());
      } else {
        index.forEachCovering(rules[j].dst.front(), consider);
      }
      if (best == later) continue;
      diags_.warning(rules[j].where, "rule '" + rules[j].name + "' can never match: rule '" +
                                         rules[best].name + "' (" +
                                         positionText(rules[best].where) +
                                         ") matches every connection it does");
    }
  }

  const Environment& env_;
  Diagnostics& diags_;
  std::unique_ptr<Policy> policy_;
  std::string known_stacks_;
  std::map<std::string, SourcePosition, std::less<>> names_;
  std::optional<SourcePosition> default_at_;
};

std::shared_ptr<const Policy> loadPolicyStrings(
    const std::vector<std::pair<std::string, std::string>>& files, const Environment& env,
    std::uint64_t version, Diagnostics& diags) {
  PolicyBuilder builder(env, version, diags);
  for (const auto& [name, text] : files) {
    builder.addFileName(name);
    if (auto doc = loadTomlString(text, name, diags)) builder.addDocument(*doc);
  }
  return builder.finish();
}

std::shared_ptr<const Policy> loadPolicyFiles(const std::vector<std::string>& files,
                                              const Environment& env, std::uint64_t version,
                                              Diagnostics& diags) {
  PolicyBuilder builder(env, version, diags);
  for (const auto& file : files) {
    builder.addFileName(file);
    if (auto doc = loadTomlFile(file, diags)) builder.addDocument(*doc);
  }
  return builder.finish();
}

std::shared_ptr<const Policy> loadPolicyDir(const std::string& dir, const Environment& env,
                                            std::uint64_t version, Diagnostics& diags) {
  namespace fs = std::filesystem;
  std::error_code ec;
  auto status = fs::status(dir, ec);
  if (status.type() == fs::file_type::not_found) {
    diags.warning({dir, 0, 0},
                  "policy directory does not exist: no rules, every connection gets the "
                  "default action");
    return loadPolicyFiles({}, env, version, diags);
  }
  if (ec || !fs::is_directory(status)) {
    diags.error({dir, 0, 0}, ec ? "cannot read: " + ec.message() : "not a directory");
    return nullptr;
  }
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    // Hidden files are editors' lock and backup files (".#10-dc.toml"), not policy.
    if (name.size() <= 5 || name.front() == '.' || !name.ends_with(".toml")) continue;
    std::error_code type_ec;
    if (!it->is_regular_file(type_ec)) continue;
    names.push_back(std::move(name));
  }
  if (ec) {
    diags.error({dir, 0, 0}, "cannot list: " + ec.message());
    return nullptr;
  }
  std::sort(names.begin(), names.end());  // byte order: std::string compares as unsigned char
  std::vector<std::string> files;
  for (const auto& name : names)
    files.push_back((fs::path(dir) / name).string());
  return loadPolicyFiles(files, env, version, diags);
}

}  // namespace dmm::policy
