#pragma once
// dmm::policy — protocol routing: the rules that map a connection's facts to the ordered stack
// instances that may carry it. An immutable, versioned snapshot (Policy) is built from TOML
// files, validated in one pass with every problem as "file:line:col: message", and swapped
// atomically on reload (PolicyStore). Depends on common/ only.
//
//   policy.d/*.toml ─> loadPolicyDir() ─> Policy (rules + index) ─> PolicyStore::swap()
//   worker: Facts ─> PolicyStore::current()->classify(facts) ─> Decision (rule, stacks, mode ...)
//   admin:  Facts ─> Policy::explain(facts, trace) ─> the same Decision + why each rule missed
//
// Evaluation order: files in byte order of their names (10-a.toml before 20-b.toml), rules in
// the order they appear in their file; the first rule whose every match key holds decides. No
// rule matching means the [default] action (see docs/policy.md).
//
// Threading: a Policy is immutable and safe to use from any thread. PolicyStore::current() and
// swap() may be called from any thread.

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/diagnostics.h"
#include "common/duration.h"
#include "common/socket_address.h"

namespace dmm::policy {

// Which side of a sidecar pair classifies: the initiator (a captured connection going out) or
// the receiver (a peer's HELLO coming in).
enum class Role : std::uint8_t { kOutbound, kInbound };
const char* roleName(Role r);  // "outbound", "inbound"

enum class Mode : std::uint8_t {
  kSequential,  // one candidate after another, each bounded by attempt_timeout
  kRace,        // staggered starts; the first established wins, the others are cancelled
};
const char* modeName(Mode m);  // "sequential", "race"

// What to do when the peer host runs no (usable) sidecar.
enum class NoSidecar : std::uint8_t {
  kDefault,  // what sidecar.toml [fallback] mode says
  kDirect,   // pass through: a plain kernel connection to the destination
  kRefuse,   // reset the client's connection
};
const char* noSidecarName(NoSidecar n);  // "default", "direct", "refuse"

// What is known about the peer host's sidecar.
enum class PeerSidecar : std::uint8_t { kUnknown, kYes, kNo };
const char* peerSidecarName(PeerSidecar p);  // "unknown", "sidecar", "none"

// QoS classes a connection may carry (the preload shim supplies them; the handshake carries
// the index as its QoS byte).
inline constexpr std::array<std::string_view, 4> kQosClasses = {"default", "latency", "bulk",
                                                                "background"};
std::optional<std::uint8_t> qosFromName(std::string_view name);

// RTT classes, from the peer's smoothed RTT on the control connection (TCP_INFO).
enum class RttClass : std::uint8_t { kUnknown, kLocal, kLan, kWan };
const char* rttClassName(RttClass c);  // "unknown", "local", "lan", "wan"
struct RttThresholds {
  std::chrono::microseconds local{1000};  // below: local
  std::chrono::microseconds lan{10000};   // below: lan; at or above: wan
  RttClass classify(std::optional<std::chrono::microseconds> rtt) const;
};

// An inclusive uid range: 1000, or "1000-1999".
struct UidRange {
  std::uint32_t first = 0;
  std::uint32_t last = 0;
  bool contains(std::uint32_t uid) const { return uid >= first && uid <= last; }
};

// A stack instance from sidecar.toml, as the policy sees it.
struct StackInfo {
  std::string name;
  std::string kind;
};

// What the loader must know of the running sidecar.
struct Environment {
  std::vector<StackInfo> stacks;   // configured instances, in config order
  std::vector<std::string> kinds;  // stack kinds this build knows (peer_stacks values)
  Millis attempt_timeout{5000};    // default per-attempt timeout (timeouts.connect)
  Millis stagger{100};             // default race stagger
};

// The facts a connection is classified by. Unknown facts never satisfy a match key that
// names them (a rule with `uid = [1000]` does not match a connection whose uid is unknown).
struct Facts {
  Role role = Role::kOutbound;
  SocketAddress dst;                 // the original destination
  std::optional<std::uint32_t> uid;  // owner of the client socket
  std::string app;                   // process name; empty: unknown
  std::optional<std::uint8_t> qos;   // index into kQosClasses
  PeerSidecar peer = PeerSidecar::kUnknown;
  std::vector<std::string> peer_stacks;  // kinds the peer offered; empty: unknown
  RttClass rtt = RttClass::kUnknown;
};

// The action of a rule (or of [default]).
struct Action {
  std::vector<std::size_t> stacks;  // indices into Environment::stacks, in order of preference
  Mode mode = Mode::kSequential;
  Millis stagger{100};
  Millis attempt_timeout{5000};
  NoSidecar no_sidecar = NoSidecar::kDefault;
};

struct Rule {
  std::string name;
  SourcePosition where;  // the [[rule]] header
  // Match keys; an empty list (or nullopt) means "any".
  std::vector<Cidr> dst;
  std::vector<PortRange> ports;
  std::vector<UidRange> uids;
  std::vector<std::string> apps;
  std::vector<std::uint8_t> qos;
  std::optional<Role> role;
  std::vector<PeerSidecar> peer;
  std::vector<std::string> peer_stacks;  // matches when the peer offered any of these kinds
  std::vector<RttClass> rtt;
  Action action;

  // The match keys alone, linear (the index and explain() agree with it).
  bool matches(const Facts& facts) const;
};

struct Decision {
  const Rule* rule = nullptr;  // nullptr: no rule matched, `action` is the default
  const Action* action = nullptr;
  std::uint64_t version = 0;  // the policy snapshot that decided
  // (Both arms are views: `rule->name : "default"` would copy the name into a temporary
  // std::string and return a view of it after it is gone.)
  std::string_view ruleName() const {
    return rule != nullptr ? std::string_view(rule->name) : std::string_view("default");
  }
};

class Policy {
 public:
  ~Policy();
  Policy(const Policy&) = delete;
  Policy& operator=(const Policy&) = delete;

  std::uint64_t version() const { return version_; }
  const std::vector<Rule>& rules() const { return rules_; }
  const Action& defaultAction() const { return default_; }
  const std::vector<std::string>& files() const { return files_; }
  // Whether any rule matches on uid / app (so callers skip looking them up otherwise).
  bool usesUid() const { return uses_uid_; }
  bool usesApp() const { return uses_app_; }

  // The first matching rule, through the index (the hot path: no allocation).
  Decision classify(const Facts& facts) const;
  // The same decision by a linear scan, appending one line per rule considered to `trace`:
  // why it did not match, or that it matched. For `policy explain` and tests.
  Decision explain(const Facts& facts, std::vector<std::string>& trace) const;

 private:
  friend class PolicyBuilder;
  Policy();
  struct Index;

  std::uint64_t version_ = 0;
  std::vector<Rule> rules_;
  Action default_;
  std::vector<std::string> files_;
  bool uses_uid_ = false;
  bool uses_app_ = false;
  std::unique_ptr<Index> index_;
};

// Loads every *.toml in `dir` (byte order of names). A missing directory is an empty policy
// with a warning. Returns nullptr when there is any error; everything found is in `diags`.
std::shared_ptr<const Policy> loadPolicyDir(const std::string& dir, const Environment& env,
                                            std::uint64_t version, Diagnostics& diags);
// Loads the given files, in the given order.
std::shared_ptr<const Policy> loadPolicyFiles(const std::vector<std::string>& files,
                                              const Environment& env, std::uint64_t version,
                                              Diagnostics& diags);
// The same from texts (tests): {file name, text} in order.
std::shared_ptr<const Policy> loadPolicyStrings(
    const std::vector<std::pair<std::string, std::string>>& files, const Environment& env,
    std::uint64_t version, Diagnostics& diags);

// The live policy: an atomic pointer to an immutable snapshot.
class PolicyStore {
 public:
  explicit PolicyStore(std::shared_ptr<const Policy> initial) : current_(std::move(initial)) {}
  std::shared_ptr<const Policy> current() const { return current_.load(); }
  void swap(std::shared_ptr<const Policy> next) { current_.store(std::move(next)); }

 private:
  std::atomic<std::shared_ptr<const Policy>> current_;
};

}  // namespace dmm::policy
