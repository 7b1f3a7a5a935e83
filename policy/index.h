#pragma once
// MatchIndex (Policy::Index) — the matcher behind Policy::classify(). Internal to policy/.
//
// One path-compressed binary trie per address family over the rules' `dst` prefixes. Every
// node holds a prefix and the ascending indices of the rules that list exactly that prefix;
// rules without `dst` sit at both roots (and in `no_dst`, for facts without a destination). A
// lookup walks the destination's bits from the root, visiting only nodes whose prefix contains
// the address, and keeps the smallest rule index that fully matches: each node's list is
// scanned in ascending order and the scan stops at the first full match or at the best index
// found so far. Nodes with long lists also carry a port index (elementary port intervals, each
// with the ascending rules whose `ports` cover it, plus the node's rules without `ports`), so
// rules that cannot match the port are not looked at.
//
// Everything lives in flat vectors built once; lookup() allocates nothing. Before a rule is
// checked in full, a few bytes per rule (Prefilter) reject most candidates that cannot match.

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "policy/policy.h"

namespace dmm::policy {

// The match keys other than `dst` (Rule::matches() is this plus `dst`).
bool matchesExceptDst(const Rule& rule, const Facts& facts);

struct MatchIndex {
  static constexpr std::uint32_t kNone = 0xFFFFFFFFu;
  // Nodes with more rules than this get a port index.
  static constexpr std::size_t kPortIndexThreshold = 16;

  // An address's bits, most significant first; IPv4 in the top 32 bits of `hi`.
  struct Key {
    std::uint64_t hi = 0;
    std::uint64_t lo = 0;
  };

  struct Node {
    Key prefix;  // bits past `length` are zero
    std::uint32_t length = 0;
    std::uint32_t child[2] = {kNone, kNone};
    std::uint32_t rules_begin = 0;  // [begin, end) in `rule_ids`: every rule at this node
    std::uint32_t rules_end = 0;
    std::uint32_t ports = kNone;  // index into `port_indexes`, or kNone
  };

  // What a lookup can reject a rule by without touching the Rule (a cache miss or two): the
  // span of its ports and the facts it needs known. A necessary condition only; a rule that
  // passes is checked in full.
  struct Prefilter {
    enum : std::uint8_t { kUid = 1, kApp = 2, kQos = 4, kPeerStacks = 8 };
    std::uint16_t port_min = 0;  // no `ports`: every port, even 0 (no destination)
    std::uint16_t port_max = 65535;
    std::uint8_t needs = 0;
  };

  struct PortIndex {
    std::uint32_t bounds_begin = 0;  // [begin, end) in `bounds`: interval starts, first is 0
    std::uint32_t bounds_end = 0;
    std::uint32_t offsets_begin = 0;  // in `offsets`: (end - begin + 1) entries into
                                      // `interval_rules`, one list per interval
    std::uint32_t any_begin = 0;      // [begin, end) in `rule_ids`: rules without `ports`
    std::uint32_t any_end = 0;
  };

  std::vector<Node> nodes;  // [0]: the IPv4 root, [1]: the IPv6 root
  std::vector<std::uint32_t> rule_ids;
  std::vector<PortIndex> port_indexes;
  std::vector<std::uint32_t> bounds;  // up to 65535 + 1, hence 32 bits
  std::vector<std::uint32_t> offsets;
  std::vector<std::uint32_t> interval_rules;
  std::uint32_t no_dst_begin = 0;  // [begin, end) in `rule_ids`: rules without `dst`
  std::uint32_t no_dst_end = 0;
  std::vector<Prefilter> prefilters;  // one per rule

  // Fills an empty index from the rules.
  void build(const std::vector<Rule>& rules);

  // The smallest index of a rule that matches `facts`, or kNone.
  std::uint32_t lookup(const std::vector<Rule>& rules, const Facts& facts) const;

  // Calls fn(span of ascending rule indices) for every node whose prefix contains `cidr`: the
  // rules whose `dst` lists a prefix of it (and, at the root, the rules without `dst`). A rule
  // may come up more than once. The loader's shadowing check finds its candidates this way.
  template <class Fn>
  void forEachCovering(const Cidr& cidr, Fn&& fn) const;
  std::span<const std::uint32_t> rulesWithoutDst() const {
    return {rule_ids.data() + no_dst_begin, no_dst_end - no_dst_begin};
  }

  static Key keyOf(const IpAddress& ip);
  static std::uint32_t bitAt(const Key& k, std::uint32_t i) {
    return static_cast<std::uint32_t>(i < 64 ? (k.hi >> (63 - i)) & 1u : (k.lo >> (127 - i)) & 1u);
  }
  // Whether the first `length` bits of `k` equal those of `prefix`.
  static bool hasPrefix(const Key& k, const Key& prefix, std::uint32_t length) {
    if (length == 0) return true;
    if (length <= 64) return ((k.hi ^ prefix.hi) >> (64 - length)) == 0;
    return k.hi == prefix.hi && ((k.lo ^ prefix.lo) >> (128 - length)) == 0;
  }
};

template <class Fn>
void MatchIndex::forEachCovering(const Cidr& cidr, Fn&& fn) const {
  Key key = keyOf(cidr.network());
  auto length = static_cast<std::uint32_t>(cidr.prefixLength());
  std::uint32_t id = cidr.family() == AF_INET ? 0 : 1;
  while (id != kNone) {
    const Node& n = nodes[id];
    if (n.length > length || !hasPrefix(key, n.prefix, n.length)) return;
    fn(std::span<const std::uint32_t>(rule_ids.data() + n.rules_begin,
                                      n.rules_end - n.rules_begin));
    if (n.length == length) return;
    id = n.child[bitAt(key, n.length)];
  }
}

// Policy names its index without its header; this is it.
struct Policy::Index : MatchIndex {};

}  // namespace dmm::policy
