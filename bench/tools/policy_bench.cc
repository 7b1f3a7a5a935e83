// dmm-policy-bench: the policy matcher against a linear scan, on a generated policy.
//
//   dmm-policy-bench [--rules N] [--lookups N] [--linear-lookups N] [--seed S]
//
// Generates N rules (default 10,000): IPv4 prefixes /8-/32 and IPv6 prefixes /16-/128 drawn
// under a few common top bits (so prefixes nest), port ranges on half of them, uid and app
// keys on some, and 10% without dst (they sit at the trie roots, all with port ranges). The
// text goes through loadPolicyStrings(), so the load time includes parsing, validation, the
// index and the shadowing check. Then it times classify() over --lookups random facts (70%
// inside some rule's prefix, so hits at every depth; 30% anywhere, mostly misses) in batches
// of 1,000, and the same for a linear Rule::matches() loop over --linear-lookups facts in
// batches of 100 (it is ~1,000 times slower), and prints the median and p99 ns per lookup of
// the batches. Exit status 1 if the two ever disagree.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/toml_table.h"
#include "policy/policy.h"

namespace {

using Clock = std::chrono::steady_clock;
using dmm::Cidr;
using dmm::IpAddress;
using dmm::SocketAddress;
using namespace dmm::policy;

struct Options {
  std::size_t rules = 10000;
  std::size_t lookups = 1000000;
  std::size_t linear_lookups = 20000;
  std::uint32_t seed = 1;
};

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: dmm-policy-bench [--rules N] [--lookups N] [--linear-lookups N] "
               "[--seed S]\n");
  std::exit(2);
}

Options parseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) usage();
    unsigned long long value = std::strtoull(argv[++i], nullptr, 10);
    if (arg == "--rules") {
      o.rules = value;
    } else if (arg == "--lookups") {
      o.lookups = value;
    } else if (arg == "--linear-lookups") {
      o.linear_lookups = value;
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint32_t>(value);
    } else {
      usage();
    }
  }
  if (o.rules == 0 || o.lookups < 1000 || o.linear_lookups < 100) usage();
  return o;
}

const std::vector<std::string> kApps = {"redis-server", "nginx", "postgres",  "curl",
                                        "java",         "envoy", "memcached", "python3"};

class Generator {
 public:
  explicit Generator(std::uint32_t seed) : rng_(seed) {
    for (int i = 0; i < 16; ++i) {
      v4_tops_.push_back(static_cast<std::uint8_t>(below(256)));
      v6_tops_.push_back(static_cast<std::uint16_t>(below(65536)));
    }
  }

  std::size_t below(std::size_t n) { return rng_() % n; }
  bool chance(unsigned percent) { return below(100) < percent; }

  // A random address under one of the common top bits (or anywhere, when `anywhere`).
  IpAddress address(bool v4, bool anywhere) {
    std::uint8_t b[16];
    for (auto& byte : b)
      byte = static_cast<std::uint8_t>(rng_());
    if (!anywhere) {
      if (v4) {
        b[0] = v4_tops_[below(v4_tops_.size())];
      } else {
        std::uint16_t top = v6_tops_[below(v6_tops_.size())];
        b[0] = static_cast<std::uint8_t>(top >> 8);
        b[1] = static_cast<std::uint8_t>(top);
      }
    }
    if (v4) {
      in_addr a{};
      std::memcpy(&a, b, 4);
      return IpAddress::v4(a);
    }
    in6_addr a{};
    std::memcpy(&a, b, 16);
    return IpAddress::v6(a);
  }

  // An address inside `cidr`: its network with random host bits.
  IpAddress inside(const Cidr& cidr) {
    IpAddress random = address(cidr.family() == AF_INET, true);
    std::uint8_t b[16];
    std::size_t size = cidr.network().size();
    std::memcpy(b, random.bytes(), size);
    const std::uint8_t* n = cidr.network().bytes();
    for (std::size_t bit = 0; bit < static_cast<std::size_t>(cidr.prefixLength()); ++bit) {
      auto mask = static_cast<std::uint8_t>(0x80u >> (bit % 8));
      b[bit / 8] = static_cast<std::uint8_t>((b[bit / 8] & ~mask) | (n[bit / 8] & mask));
    }
    if (size == 4) {
      in_addr a{};
      std::memcpy(&a, b, 4);
      return IpAddress::v4(a);
    }
    in6_addr a{};
    std::memcpy(&a, b, 16);
    return IpAddress::v6(a);
  }

  // A well-known port, or a range of up to 200 ports from `low` up.
  std::string portRange(std::size_t low) {
    if (low < 1024 && chance(40)) {
      static const int kCommon[] = {22, 80, 443, 3306, 5432, 6379, 8080, 9092};
      return std::to_string(kCommon[below(8)]);
    }
    std::size_t first = low + below(65335 - low);
    return std::to_string(first) + "-" + std::to_string(first + below(200));
  }

  std::string rule(std::size_t i) {
    char name[32];
    std::snprintf(name, sizeof name, "r%05zu", i);
    std::string text = "[[rule]]\nname = \"" + std::string(name) + "\"\n";
    unsigned kind = static_cast<unsigned>(below(100));
    bool has_dst = kind >= 10;
    bool broad = false;  // a short prefix: such rules also name ports, or they hide too much
    if (has_dst) {
      text += "match.dst = [";
      std::size_t count = chance(20) ? 2 : 1;
      for (std::size_t k = 0; k < count; ++k) {
        bool v4 = kind < 55;
        std::size_t length = v4 ? 8 + below(25) : 16 + below(113);
        broad = broad || length < (v4 ? 16u : 48u);
        // IPv4 anywhere; IPv6 under a few common /16s, so those prefixes nest more.
        text +=
            (k ? ", \"" : "\"") + address(v4, v4).toString() + "/" + std::to_string(length) + "\"";
      }
      text += "]\n";
    }
    if (!has_dst) {
      // At the roots, seen by every lookup: high ports only, often with uid or app.
      text += "match.ports = [\"" + portRange(10000) + "\"]\n";
    } else if (broad || chance(50)) {
      text += "match.ports = [\"" + portRange(1) + "\"]\n";
    }
    if (chance(has_dst ? 10 : 40)) {
      std::size_t first = below(5000);
      text += "match.uid = [\"" + std::to_string(first) + "-" + std::to_string(first + below(500)) +
              "\"]\n";
    }
    if (chance(has_dst ? 10 : 40)) text += "match.app = \"" + kApps[below(kApps.size())] + "\"\n";
    text += chance(50) ? "stacks = [\"rdma0\", \"kernel\"]\n" : "stacks = \"kernel\"\n";
    if (chance(20)) text += "mode = \"race\"\nstagger = \"20ms\"\n";
    return text;
  }
  Facts facts(const std::vector<Rule>& rules) {
    Facts f;
    const Rule& r = rules[below(rules.size())];
    auto port = static_cast<std::uint16_t>(1 + below(65535));
    if (!r.ports.empty() && chance(70)) {
      const auto& range = r.ports[below(r.ports.size())];
      port = static_cast<std::uint16_t>(range.first + below(range.last - range.first + 1u));
    }
    if (!r.dst.empty() && chance(70)) {
      f.dst = SocketAddress(inside(r.dst[below(r.dst.size())]), port);
    } else {
      f.dst = SocketAddress(address(chance(50), chance(50)), port);
    }
    if (chance(80)) f.uid = static_cast<std::uint32_t>(below(6000));
    if (chance(70)) f.app = kApps[below(kApps.size())];
    return f;
  }

 private:
  std::mt19937 rng_;
  std::vector<std::uint8_t> v4_tops_;
  std::vector<std::uint16_t> v6_tops_;
};

struct Timing {
  double median_ns = 0;
  double p99_ns = 0;
};

// Runs `lookups` lookups through `decide` in batches of `batch`, cycling through `pool`;
// returns the median and p99 of the batches' ns per lookup.
template <class Decide>
Timing measure(const std::vector<Facts>& pool, std::size_t lookups, std::size_t batch,
               std::uintptr_t& sink, Decide&& decide) {
  std::vector<double> per_lookup;
  std::size_t next = 0;
  for (std::size_t done = 0; done + batch <= lookups; done += batch) {
    auto start = Clock::now();
    for (std::size_t i = 0; i < batch; ++i) {
      sink += reinterpret_cast<std::uintptr_t>(decide(pool[next]));
      if (++next == pool.size()) next = 0;
    }
    std::chrono::duration<double, std::nano> elapsed = Clock::now() - start;
    per_lookup.push_back(elapsed.count() / static_cast<double>(batch));
  }
  std::sort(per_lookup.begin(), per_lookup.end());
  Timing t;
  t.median_ns = per_lookup[per_lookup.size() / 2];
  t.p99_ns = per_lookup[std::min(per_lookup.size() - 1, per_lookup.size() * 99 / 100)];
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parseOptions(argc, argv);
  Generator gen(options.seed);

  Environment env;
  env.stacks = {{"rdma0", "rdma"}, {"kernel", "kernel"}};
  env.kinds = {"kernel", "rdma"};

  // Ten files, as a policy.d would hold.
  std::vector<std::pair<std::string, std::string>> files(10);
  for (std::size_t f = 0; f < files.size(); ++f) {
    char name[32];
    std::snprintf(name, sizeof name, "policy.d/%02zu-generated.toml", f * 10);
    files[f].first = name;
  }
  for (std::size_t i = 0; i < options.rules; ++i)
    files[i * files.size() / options.rules].second += gen.rule(i);

  dmm::Diagnostics diags;
  // The TOML parse alone, for the share of the load time that is toml11's.
  auto parse_start = Clock::now();
  for (const auto& [name, text] : files) {
    dmm::Diagnostics ignored;
    if (!dmm::loadTomlString(text, name, ignored)) return 1;
  }
  std::chrono::duration<double, std::milli> parse_ms = Clock::now() - parse_start;

  auto load_start = Clock::now();
  auto policy = loadPolicyStrings(files, env, 1, diags);
  std::chrono::duration<double, std::milli> load_ms = Clock::now() - load_start;
  if (!policy) {
    std::fputs(diags.formatAll().c_str(), stderr);
    return 1;
  }
  std::size_t warnings = diags.sorted().size();
  std::size_t v4 = 0, v6 = 0, no_dst = 0;
  for (const auto& r : policy->rules()) {
    if (r.dst.empty()) {
      ++no_dst;
    } else if (r.dst[0].family() == AF_INET) {
      ++v4;
    } else {
      ++v6;
    }
  }

  // A pool of facts reused cyclically (a million Facts would measure the memory system).
  std::vector<Facts> pool;
  for (std::size_t i = 0; i < (1u << 16); ++i)
    pool.push_back(gen.facts(policy->rules()));

  const auto& rules = policy->rules();
  auto linear = [&rules](const Facts& f) -> const Rule* {
    for (const auto& r : rules) {
      if (r.matches(f)) return &r;
    }
    return nullptr;
  };
  auto indexed = [&policy](const Facts& f) { return policy->classify(f).rule; };

  const std::size_t checked = std::min(pool.size(), options.linear_lookups);
  std::size_t hits = 0, mismatches = 0;
  for (std::size_t i = 0; i < checked; ++i) {
    const Rule* a = indexed(pool[i]);
    if (a != nullptr) ++hits;
    if (a != linear(pool[i])) ++mismatches;
  }

  std::uintptr_t sink = 0;
  measure(pool, std::min<std::size_t>(options.lookups, 100000), 1000, sink, indexed);  // warm up
  Timing index_time = measure(pool, options.lookups, 1000, sink, indexed);
  Timing linear_time = measure(pool, options.linear_lookups, 100, sink, linear);

  std::printf(
      "dmm-policy-bench: %zu rules (%zu IPv4, %zu IPv6, %zu without dst) in %zu files, "
      "seed %u\n",
      rules.size(), v4, v6, no_dst, files.size(), options.seed);
  std::printf(
      "load (parse, validate, index, shadowing check): %.0f ms (the TOML parse alone: "
      "%.0f ms), %zu warnings\n",
      load_ms.count(), parse_ms.count(), warnings);
  std::printf(
      "facts: %zu distinct; of %zu checked against the linear scan, %.0f%% decided by "
      "a rule, %zu disagreements\n\n",
      pool.size(), checked, 100.0 * static_cast<double>(hits) / static_cast<double>(checked),
      mismatches);
  std::printf("%-12s %10s %12s %12s\n", "matcher", "lookups", "median ns", "p99 ns");
  std::printf("%-12s %10zu %12.1f %12.1f\n", "index", options.lookups, index_time.median_ns,
              index_time.p99_ns);
  std::printf("%-12s %10zu %12.1f %12.1f\n", "linear scan", options.linear_lookups,
              linear_time.median_ns, linear_time.p99_ns);
  std::printf("\nindex vs linear (median): %.0fx faster%s\n",
              linear_time.median_ns / index_time.median_ns,
              index_time.median_ns <= 1000 ? "" : "  -- ABOVE THE 1 us TARGET");
  if (sink == 1) std::puts("");  // keeps the lookups from being optimised away
  return mismatches == 0 ? 0 : 1;
}
