#include "policy/index.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace dmm::policy {

namespace {

using Index = MatchIndex;
using Key = Index::Key;
constexpr std::uint32_t kNone = Index::kNone;

std::uint32_t commonPrefix(const Key& a, const Key& b, std::uint32_t max) {
  std::uint64_t x = a.hi ^ b.hi;
  if (x != 0) return std::min(static_cast<std::uint32_t>(std::countl_zero(x)), max);
  x = a.lo ^ b.lo;
  if (x != 0) return std::min(64u + static_cast<std::uint32_t>(std::countl_zero(x)), max);
  return max;
}

Key truncate(const Key& k, std::uint32_t length) {
  Key out;
  if (length == 0) return out;
  if (length <= 64) {
    out.hi = length == 64 ? k.hi : k.hi & ~(~std::uint64_t{0} >> length);
    return out;
  }
  out.hi = k.hi;
  out.lo = length == 128 ? k.lo : k.lo & ~(~std::uint64_t{0} >> (length - 64));
  return out;
}

// The trie while it is built: per-node rule lists, flattened by finish().
class Builder {
 public:
  explicit Builder(Index& index) : index_(index) {
    index_.nodes.resize(2);  // the two roots, prefix length 0
    lists_.resize(2);
  }

  void insert(std::uint32_t root, const Key& key, std::uint32_t length, std::uint32_t rule) {
    std::uint32_t cur = root;
    for (;;) {
      if (index_.nodes[cur].length == length) return add(cur, rule);
      std::uint32_t b = Index::bitAt(key, index_.nodes[cur].length);
      std::uint32_t c = index_.nodes[cur].child[b];
      if (c == kNone) {
        std::uint32_t leaf = newNode(key, length);
        index_.nodes[cur].child[b] = leaf;
        return add(leaf, rule);
      }
      const Key child_prefix = index_.nodes[c].prefix;
      const std::uint32_t child_length = index_.nodes[c].length;
      std::uint32_t common = commonPrefix(key, child_prefix, std::min(length, child_length));
      if (common == child_length) {  // the child's prefix is a prefix of ours: descend
        cur = c;
        continue;
      }
      if (common == length) {  // ours is a prefix of the child's: insert between
        std::uint32_t mid = newNode(key, length);
        index_.nodes[mid].child[Index::bitAt(child_prefix, length)] = c;
        index_.nodes[cur].child[b] = mid;
        return add(mid, rule);
      }
      // The two diverge below both: a branch node at the common prefix.
      std::uint32_t branch = newNode(truncate(key, common), common);
      std::uint32_t leaf = newNode(key, length);
      index_.nodes[branch].child[Index::bitAt(key, common)] = leaf;
      index_.nodes[branch].child[Index::bitAt(child_prefix, common)] = c;
      index_.nodes[cur].child[b] = branch;
      return add(leaf, rule);
    }
  }

  void addToRoots(std::uint32_t rule) {
    add(0, rule);
    add(1, rule);
    no_dst_.push_back(rule);
  }

  void finish(const std::vector<Rule>& rules) {
    for (std::size_t id = 0; id < index_.nodes.size(); ++id) {
      auto& node = index_.nodes[id];
      const auto& list = lists_[id];
      node.rules_begin = static_cast<std::uint32_t>(index_.rule_ids.size());
      index_.rule_ids.insert(index_.rule_ids.end(), list.begin(), list.end());
      node.rules_end = static_cast<std::uint32_t>(index_.rule_ids.size());
      if (list.size() > Index::kPortIndexThreshold) buildPortIndex(node, list, rules);
    }
    index_.no_dst_begin = static_cast<std::uint32_t>(index_.rule_ids.size());
    index_.rule_ids.insert(index_.rule_ids.end(), no_dst_.begin(), no_dst_.end());
    index_.no_dst_end = static_cast<std::uint32_t>(index_.rule_ids.size());
  }

 private:
  std::uint32_t newNode(const Key& prefix, std::uint32_t length) {
    Index::Node node;
    node.prefix = prefix;
    node.length = length;
    index_.nodes.push_back(node);
    lists_.emplace_back();
    return static_cast<std::uint32_t>(index_.nodes.size() - 1);
  }

  void add(std::uint32_t node, std::uint32_t rule) {
    // Rules arrive in ascending order; a rule listing one prefix twice is kept once.
    auto& list = lists_[node];
    if (list.empty() || list.back() != rule) list.push_back(rule);
  }

  // Elementary intervals: every port range's first and last + 1 start one, so within an
  // interval each rule's ranges either cover every port or none.
  void buildPortIndex(Index::Node& node, const std::vector<std::uint32_t>& list,
                      const std::vector<Rule>& rules) {
    std::vector<std::uint32_t> starts{0};
    std::vector<std::uint32_t> any;
    for (std::uint32_t rule : list) {
      if (rules[rule].ports.empty()) {
        any.push_back(rule);
        continue;
      }
      for (const auto& range : rules[rule].ports) {
        starts.push_back(range.first);
        if (range.last < 65535) starts.push_back(std::uint32_t{range.last} + 1);
      }
    }
    std::sort(starts.begin(), starts.end());
    starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
    std::vector<std::vector<std::uint32_t>> per_interval(starts.size());
    for (std::uint32_t rule : list) {
      for (const auto& range : rules[rule].ports) {
        auto k = static_cast<std::size_t>(
            std::lower_bound(starts.begin(), starts.end(), std::uint32_t{range.first}) -
            starts.begin());
        for (; k < starts.size() && starts[k] <= range.last; ++k) {
          auto& l = per_interval[k];
          if (l.empty() || l.back() != rule) l.push_back(rule);
        }
      }
    }
    Index::PortIndex p;
    p.bounds_begin = static_cast<std::uint32_t>(index_.bounds.size());
    index_.bounds.insert(index_.bounds.end(), starts.begin(), starts.end());
    p.bounds_end = static_cast<std::uint32_t>(index_.bounds.size());
    p.offsets_begin = static_cast<std::uint32_t>(index_.offsets.size());
    for (const auto& l : per_interval) {
      index_.offsets.push_back(static_cast<std::uint32_t>(index_.interval_rules.size()));
      index_.interval_rules.insert(index_.interval_rules.end(), l.begin(), l.end());
    }
    index_.offsets.push_back(static_cast<std::uint32_t>(index_.interval_rules.size()));
    p.any_begin = static_cast<std::uint32_t>(index_.rule_ids.size());
    index_.rule_ids.insert(index_.rule_ids.end(), any.begin(), any.end());
    p.any_end = static_cast<std::uint32_t>(index_.rule_ids.size());
    node.ports = static_cast<std::uint32_t>(index_.port_indexes.size());
    index_.port_indexes.push_back(p);
  }

  Index& index_;
  std::vector<std::vector<std::uint32_t>> lists_;
  std::vector<std::uint32_t> no_dst_;
};

}  // namespace

Index::Key Index::keyOf(const IpAddress& ip) {
  Key k;
  const std::uint8_t* b = ip.bytes();
  if (ip.isV4()) {
    for (int i = 0; i < 4; ++i)
      k.hi = (k.hi << 8) | b[i];
    k.hi <<= 32;
  } else if (ip.isV6()) {
    for (int i = 0; i < 8; ++i)
      k.hi = (k.hi << 8) | b[i];
    for (int i = 8; i < 16; ++i)
      k.lo = (k.lo << 8) | b[i];
  }
  return k;
}

void Index::build(const std::vector<Rule>& rules) {
  Builder builder(*this);
  for (std::size_t i = 0; i < rules.size(); ++i) {
    auto id = static_cast<std::uint32_t>(i);
    if (rules[i].dst.empty()) {
      builder.addToRoots(id);
      continue;
    }
    for (const auto& cidr : rules[i].dst) {
      builder.insert(cidr.family() == AF_INET ? 0 : 1, keyOf(cidr.network()),
                     static_cast<std::uint32_t>(cidr.prefixLength()), id);
    }
  }
  builder.finish(rules);
  prefilters.resize(rules.size());
  for (std::size_t i = 0; i < rules.size(); ++i) {
    const Rule& r = rules[i];
    Prefilter& p = prefilters[i];
    if (!r.ports.empty()) {
      p.port_min = 65535;
      p.port_max = 0;
      for (const auto& range : r.ports) {
        p.port_min = std::min(p.port_min, range.first);
        p.port_max = std::max(p.port_max, range.last);
      }
    }
    if (!r.uids.empty()) p.needs |= Prefilter::kUid;
    if (!r.apps.empty()) p.needs |= Prefilter::kApp;
    if (!r.qos.empty()) p.needs |= Prefilter::kQos;
    if (!r.peer_stacks.empty()) p.needs |= Prefilter::kPeerStacks;
  }
}

std::uint32_t Index::lookup(const std::vector<Rule>& rules, const Facts& facts) const {
  std::uint32_t best = kNone;
  const std::uint32_t port = facts.dst.valid() ? facts.dst.port() : 0;
  std::uint8_t unknown = 0;  // the facts a rule may need that are not known
  if (!facts.uid) unknown |= Prefilter::kUid;
  if (facts.app.empty()) unknown |= Prefilter::kApp;
  if (!facts.qos) unknown |= Prefilter::kQos;
  if (facts.peer_stacks.empty()) unknown |= Prefilter::kPeerStacks;
  auto mayMatch = [&](std::uint32_t id) {
    const Prefilter& p = prefilters[id];
    return port >= p.port_min && port <= p.port_max && (p.needs & unknown) == 0;
  };
  // Scans ascending rule indices until the first full match or one past the best so far.
  auto scan = [&](const std::uint32_t* it, const std::uint32_t* end) {
    for (; it != end && *it < best; ++it) {
      if (mayMatch(*it) && matchesExceptDst(rules[*it], facts)) {
        best = *it;
        return;
      }
    }
  };
  const std::uint32_t* ids = rule_ids.data();
  if (!facts.dst.valid()) {  // no destination: only rules without `dst` can match
    scan(ids + no_dst_begin, ids + no_dst_end);
    return best;
  }
  const Key key = keyOf(facts.dst.ip());
  std::uint32_t id = facts.dst.family() == AF_INET ? 0 : 1;
  while (id != kNone) {
    const Node& n = nodes[id];
    if (!hasPrefix(key, n.prefix, n.length)) break;
    if (n.ports == kNone) {
      scan(ids + n.rules_begin, ids + n.rules_end);
    } else {
      // Merge the rules whose ports cover this port's interval with those without `ports`,
      // in ascending order.
      const PortIndex& p = port_indexes[n.ports];
      const std::uint32_t* b = bounds.data() + p.bounds_begin;
      const std::uint32_t* b_end = bounds.data() + p.bounds_end;
      auto k = static_cast<std::uint32_t>(std::upper_bound(b, b_end, port) - b) - 1;
      const std::uint32_t* a = interval_rules.data() + offsets[p.offsets_begin + k];
      const std::uint32_t* a_end = interval_rules.data() + offsets[p.offsets_begin + k + 1];
      const std::uint32_t* c = ids + p.any_begin;
      const std::uint32_t* c_end = ids + p.any_end;
      while (a != a_end || c != c_end) {
        std::uint32_t next;
        if (c == c_end || (a != a_end && *a < *c)) {
          next = *a++;
        } else {
          next = *c++;
        }
        if (next >= best) break;
        if (mayMatch(next) && matchesExceptDst(rules[next], facts)) {
          best = next;
          break;
        }
      }
    }
    const std::uint32_t max_length = facts.dst.family() == AF_INET ? 32 : 128;
    if (n.length >= max_length) break;
    id = n.child[bitAt(key, n.length)];
  }
  return best;
}

}  // namespace dmm::policy
