// The policy engine: names, matching edge cases, evaluation order, the loader's diagnostics
// (exact file:line:col strings, all in one pass), shadowing warnings, explain(), loading a
// directory, and the index (classify) against the linear scan (explain) on random rule sets.

#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "policy/policy.h"

namespace dmm::policy {
namespace {

using Files = std::vector<std::pair<std::string, std::string>>;

Environment testEnvironment() {
  Environment env;
  env.stacks = {{"rdma0", "rdma"}, {"dpdk0", "dpdk"}, {"kernel", "kernel"}};
  env.kinds = {"kernel", "rdma", "dpdk"};
  env.attempt_timeout = Millis(3000);
  env.stagger = Millis(70);
  return env;
}

Facts to(const char* address) {
  Facts f;
  auto a = SocketAddress::parse(address);
  EXPECT_TRUE(a) << address;
  if (a) f.dst = *a;
  return f;
}

class PolicyTest : public ::testing::Test {
 protected:
  std::shared_ptr<const Policy> load(const Files& files) {
    diags_ = Diagnostics();
    return loadPolicyStrings(files, env_, 7, diags_);
  }
  std::shared_ptr<const Policy> load(const std::string& text) { return load({{"p.toml", text}}); }
  std::string messages() const { return diags_.formatAll(); }

  // The rule that decides, by both paths; they must agree.
  std::string decide(const Policy& p, const Facts& f) {
    std::vector<std::string> trace;
    auto linear = p.explain(f, trace);
    auto indexed = p.classify(f);
    EXPECT_EQ(indexed.rule, linear.rule);
    EXPECT_EQ(indexed.action, linear.action);
    return std::string(indexed.ruleName());
  }

  Environment env_ = testEnvironment();
  Diagnostics diags_;
};

// ---- names ------------------------------------------------------------------------------------

TEST(PolicyNames, EnumsHaveTheirConfigNames) {
  EXPECT_STREQ(roleName(Role::kOutbound), "outbound");
  EXPECT_STREQ(roleName(Role::kInbound), "inbound");
  EXPECT_STREQ(modeName(Mode::kSequential), "sequential");
  EXPECT_STREQ(modeName(Mode::kRace), "race");
  EXPECT_STREQ(noSidecarName(NoSidecar::kDefault), "default");
  EXPECT_STREQ(noSidecarName(NoSidecar::kDirect), "direct");
  EXPECT_STREQ(noSidecarName(NoSidecar::kRefuse), "refuse");
  EXPECT_STREQ(peerSidecarName(PeerSidecar::kUnknown), "unknown");
  EXPECT_STREQ(peerSidecarName(PeerSidecar::kYes), "sidecar");
  EXPECT_STREQ(peerSidecarName(PeerSidecar::kNo), "none");
  EXPECT_STREQ(rttClassName(RttClass::kUnknown), "unknown");
  EXPECT_STREQ(rttClassName(RttClass::kLocal), "local");
  EXPECT_STREQ(rttClassName(RttClass::kLan), "lan");
  EXPECT_STREQ(rttClassName(RttClass::kWan), "wan");
  EXPECT_EQ(qosFromName("default"), 0);
  EXPECT_EQ(qosFromName("latency"), 1);
  EXPECT_EQ(qosFromName("bulk"), 2);
  EXPECT_EQ(qosFromName("background"), 3);
  EXPECT_FALSE(qosFromName("Latency"));
  EXPECT_FALSE(qosFromName(""));
}

TEST(PolicyNames, RttThresholdsClassifyAtTheBoundaries) {
  using std::chrono::microseconds;
  RttThresholds t;  // local < 1000 µs <= lan < 10000 µs <= wan
  EXPECT_EQ(t.classify(std::nullopt), RttClass::kUnknown);
  EXPECT_EQ(t.classify(microseconds(0)), RttClass::kLocal);
  EXPECT_EQ(t.classify(microseconds(999)), RttClass::kLocal);
  EXPECT_EQ(t.classify(microseconds(1000)), RttClass::kLan);
  EXPECT_EQ(t.classify(microseconds(9999)), RttClass::kLan);
  EXPECT_EQ(t.classify(microseconds(10000)), RttClass::kWan);
  RttThresholds custom{microseconds(50), microseconds(60)};
  EXPECT_EQ(custom.classify(microseconds(55)), RttClass::kLan);
  EXPECT_EQ(custom.classify(microseconds(60)), RttClass::kWan);
}

// ---- the loader: what it reads ----------------------------------------------------------------

TEST_F(PolicyTest, ReadsEveryKey) {
  auto p = load(R"([[rule]]
name = "dc-fast"
match.dst = ["10.1.0.0/16", "fd00::/8", "192.168.1.7"]
match.ports = ["443", "8000-8100"]
match.uid = [1000, "2000-2999"]
match.app = ["redis-server"]
match.qos = ["latency"]
match.role = "outbound"
match.peer = ["sidecar"]
match.peer_stacks = ["rdma"]
match.rtt = ["local", "lan"]
stacks = ["rdma0", "dpdk0", "kernel"]
mode = "race"
stagger = "50ms"
attempt_timeout = "2s"
no_sidecar = "direct"
)");
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(), "");
  ASSERT_EQ(p->rules().size(), 1u);
  const Rule& r = p->rules()[0];
  EXPECT_EQ(r.name, "dc-fast");
  EXPECT_EQ(r.where.file, "p.toml");
  EXPECT_EQ(r.where.line, 1u);
  EXPECT_EQ(r.where.column, 1u);
  ASSERT_EQ(r.dst.size(), 3u);
  EXPECT_EQ(r.dst[0].toString(), "10.1.0.0/16");
  EXPECT_EQ(r.dst[1].toString(), "fd00::/8");
  EXPECT_EQ(r.dst[2].toString(), "192.168.1.7/32");
  ASSERT_EQ(r.ports.size(), 2u);
  EXPECT_EQ(r.ports[1].first, 8000);
  EXPECT_EQ(r.ports[1].last, 8100);
  ASSERT_EQ(r.uids.size(), 2u);
  EXPECT_EQ(r.uids[0].first, 1000u);
  EXPECT_EQ(r.uids[0].last, 1000u);
  EXPECT_EQ(r.uids[1].first, 2000u);
  EXPECT_EQ(r.uids[1].last, 2999u);
  EXPECT_EQ(r.apps, std::vector<std::string>{"redis-server"});
  EXPECT_EQ(r.qos, std::vector<std::uint8_t>{1});
  EXPECT_EQ(r.role, Role::kOutbound);
  EXPECT_EQ(r.peer, std::vector<PeerSidecar>{PeerSidecar::kYes});
  EXPECT_EQ(r.peer_stacks, std::vector<std::string>{"rdma"});
  EXPECT_EQ(r.rtt, (std::vector<RttClass>{RttClass::kLocal, RttClass::kLan}));
  EXPECT_EQ(r.action.stacks, (std::vector<std::size_t>{0, 1, 2}));
  EXPECT_EQ(r.action.mode, Mode::kRace);
  EXPECT_EQ(r.action.stagger, Millis(50));
  EXPECT_EQ(r.action.attempt_timeout, Millis(2000));
  EXPECT_EQ(r.action.no_sidecar, NoSidecar::kDirect);
  EXPECT_TRUE(p->usesUid());
  EXPECT_TRUE(p->usesApp());
  EXPECT_EQ(p->version(), 7u);
  EXPECT_EQ(p->files(), std::vector<std::string>{"p.toml"});
}

TEST_F(PolicyTest, ActionDefaultsComeFromTheEnvironment) {
  auto p = load("[[rule]]\nname = \"a\"\nstacks = \"kernel\"\n");
  ASSERT_TRUE(p) << messages();
  const Action& a = p->rules()[0].action;
  EXPECT_EQ(a.stacks, std::vector<std::size_t>{2});
  EXPECT_EQ(a.mode, Mode::kSequential);
  EXPECT_EQ(a.stagger, Millis(70));
  EXPECT_EQ(a.attempt_timeout, Millis(3000));
  EXPECT_EQ(a.no_sidecar, NoSidecar::kDefault);
  EXPECT_FALSE(p->usesUid());
  EXPECT_FALSE(p->usesApp());
  EXPECT_TRUE(p->rules()[0].dst.empty());
}

TEST_F(PolicyTest, MatchAsSubTableDottedKeysOrInlineTableAndScalarsForLists) {
  auto p = load(R"([[rule]]
name = "inline"
match = { dst = "10.0.0.0/8", ports = "80", uid = 5, peer = "none", rtt = "wan", qos = "bulk", app = "curl", peer_stacks = "dpdk" }
stacks = ["kernel"]

[[rule]]
name = "dotted"
match.dst = "fd00::1"
stacks = ["kernel"]

[[rule]]
name = "sub"
stacks = ["kernel"]
[rule.match]
dst = "192.168.0.0/16"
role = "inbound"
)");
  ASSERT_TRUE(p) << messages();
  ASSERT_EQ(p->rules().size(), 3u);
  const Rule& a = p->rules()[0];
  ASSERT_EQ(a.dst.size(), 1u);
  EXPECT_EQ(a.dst[0].toString(), "10.0.0.0/8");
  ASSERT_EQ(a.ports.size(), 1u);
  EXPECT_EQ(a.ports[0].first, 80);
  EXPECT_EQ(a.ports[0].last, 80);
  ASSERT_EQ(a.uids.size(), 1u);
  EXPECT_EQ(a.uids[0].first, 5u);
  EXPECT_EQ(a.peer, std::vector<PeerSidecar>{PeerSidecar::kNo});
  EXPECT_EQ(a.rtt, std::vector<RttClass>{RttClass::kWan});
  EXPECT_EQ(a.qos, std::vector<std::uint8_t>{2});
  EXPECT_EQ(a.apps, std::vector<std::string>{"curl"});
  EXPECT_EQ(a.peer_stacks, std::vector<std::string>{"dpdk"});
  ASSERT_EQ(p->rules()[1].dst.size(), 1u);
  EXPECT_EQ(p->rules()[1].dst[0].toString(), "fd00::1/128");
  const Rule& c = p->rules()[2];
  EXPECT_EQ(c.name, "sub");
  ASSERT_EQ(c.dst.size(), 1u);
  EXPECT_EQ(c.dst[0].toString(), "192.168.0.0/16");
  EXPECT_EQ(c.role, Role::kInbound);
}

TEST_F(PolicyTest, RuleNameIsAViewOfTheRulesOwnName) {
  // A name longer than any small-string buffer: a view of a copy would dangle.
  auto p = load(
      "[[rule]]\nname = \"a-rule-name-well-beyond-sixteen-characters\"\n"
      "stacks = \"kernel\"\n");
  ASSERT_TRUE(p) << messages();
  auto d = p->classify(to("10.0.0.1:80"));
  ASSERT_EQ(d.rule, &p->rules()[0]);
  EXPECT_EQ(d.ruleName().data(), p->rules()[0].name.data());
  EXPECT_EQ(d.ruleName(), "a-rule-name-well-beyond-sixteen-characters");
  EXPECT_EQ(Decision{}.ruleName(), "default");
}

TEST_F(PolicyTest, DefaultActionWithoutDefaultTableUsesEveryStackInOrder) {
  auto p = load("");
  ASSERT_TRUE(p) << messages();
  EXPECT_TRUE(p->rules().empty());
  EXPECT_EQ(p->defaultAction().stacks, (std::vector<std::size_t>{0, 1, 2}));
  EXPECT_EQ(p->defaultAction().mode, Mode::kSequential);
  EXPECT_EQ(p->defaultAction().stagger, Millis(70));
  EXPECT_EQ(p->defaultAction().attempt_timeout, Millis(3000));
  auto d = p->classify(to("10.0.0.1:80"));
  EXPECT_EQ(d.rule, nullptr);
  EXPECT_EQ(d.action, &p->defaultAction());
  EXPECT_EQ(d.ruleName(), "default");
  EXPECT_EQ(d.version, 7u);
}

TEST_F(PolicyTest, DefaultTableSetsTheDefaultAction) {
  auto p = load({{"a.toml", "[[rule]]\nname = \"x\"\nmatch.ports = \"1\"\nstacks = \"rdma0\"\n"},
                 {"b.toml",
                  "[default]\nstacks = [\"kernel\", \"dpdk0\"]\nmode = \"race\"\nstagger = "
                  "\"5ms\"\nattempt_timeout = \"1s\"\nno_sidecar = \"refuse\"\n"}});
  ASSERT_TRUE(p) << messages();
  const Action& a = p->defaultAction();
  EXPECT_EQ(a.stacks, (std::vector<std::size_t>{2, 1}));
  EXPECT_EQ(a.mode, Mode::kRace);
  EXPECT_EQ(a.stagger, Millis(5));
  EXPECT_EQ(a.attempt_timeout, Millis(1000));
  EXPECT_EQ(a.no_sidecar, NoSidecar::kRefuse);
  EXPECT_EQ(p->classify(to("10.0.0.1:2")).action, &a);
  EXPECT_EQ(p->classify(to("10.0.0.1:1")).action, &p->rules()[0].action);
  // Without stacks, [default] keeps every stack.
  auto q = load("[default]\nmode = \"race\"\n");
  ASSERT_TRUE(q) << messages();
  EXPECT_EQ(q->defaultAction().stacks, (std::vector<std::size_t>{0, 1, 2}));
  EXPECT_EQ(q->defaultAction().mode, Mode::kRace);
}

// ---- matching ---------------------------------------------------------------------------------

TEST_F(PolicyTest, CidrEdgeCases) {
  auto p = load(R"([[rule]]
name = "host4"
match.dst = "10.9.9.9/32"
stacks = "rdma0"
[[rule]]
name = "host6"
match.dst = "fd00::9/128"
stacks = "rdma0"
[[rule]]
name = "bare"
match.dst = ["10.8.8.8", "fd00::8"]
stacks = "rdma0"
[[rule]]
name = "mapped"
match.dst = "::ffff:0:0/96"
stacks = "rdma0"
[[rule]]
name = "all4"
match.dst = "0.0.0.0/0"
stacks = "dpdk0"
[[rule]]
name = "all6"
match.dst = "::/0"
stacks = "kernel"
)");
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(decide(*p, to("10.9.9.9:1")), "host4");
  EXPECT_EQ(decide(*p, to("10.9.9.8:1")), "all4");
  EXPECT_EQ(decide(*p, to("10.9.9.10:1")), "all4");
  EXPECT_EQ(decide(*p, to("[fd00::9]:1")), "host6");
  EXPECT_EQ(decide(*p, to("[fd00::8]:1")), "bare");
  EXPECT_EQ(decide(*p, to("10.8.8.8:1")), "bare");
  EXPECT_EQ(decide(*p, to("[fd00::a]:1")), "all6");
  // An IPv4-mapped address is IPv6 to the policy: not in 10.0.0.0/8, but in ::ffff:0:0/96.
  EXPECT_EQ(decide(*p, to("[::ffff:10.9.9.9]:1")), "mapped");
  EXPECT_EQ(decide(*p, to("0.0.0.0:1")), "all4");
  EXPECT_EQ(decide(*p, to("255.255.255.255:65535")), "all4");
  EXPECT_EQ(decide(*p, to("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1")), "all6");
  EXPECT_EQ(decide(*p, to("[::]:1")), "all6");
}

TEST_F(PolicyTest, FamiliesDoNotCrossAndAMappedRuleIsNotAnIpv4Rule) {
  auto p = load(R"([[rule]]
name = "v4"
match.dst = "0.0.0.0/0"
stacks = "rdma0"
[[rule]]
name = "mapped-v4"
match.dst = "::ffff:10.0.0.0/104"
stacks = "rdma0"
)");
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(decide(*p, to("[fd00::1]:80")), "default");  // v6 fact, v4 rule
  EXPECT_EQ(decide(*p, to("[::ffff:10.1.2.3]:80")), "mapped-v4");
  EXPECT_EQ(decide(*p, to("10.1.2.3:80")), "v4");
  auto q = load("[[rule]]\nname = \"v6\"\nmatch.dst = \"::/0\"\nstacks = \"rdma0\"\n");
  ASSERT_TRUE(q) << messages();
  EXPECT_EQ(decide(*q, to("10.1.2.3:80")), "default");  // v4 fact, v6 rule
  EXPECT_EQ(decide(*q, to("[::1]:80")), "v6");
}

TEST_F(PolicyTest, PortEdgeCases) {
  auto p = load(R"([[rule]]
name = "top"
match.ports = "65535"
stacks = "rdma0"
[[rule]]
name = "one"
match.ports = "1"
stacks = "rdma0"
[[rule]]
name = "all"
match.ports = "1-65535"
stacks = "rdma0"
)");
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(decide(*p, to("10.0.0.1:65535")), "top");
  EXPECT_EQ(decide(*p, to("10.0.0.1:65534")), "all");
  EXPECT_EQ(decide(*p, to("10.0.0.1:1")), "one");
  EXPECT_EQ(decide(*p, to("10.0.0.1:2")), "all");
  // Port 0 is not a destination port: no port key holds it.
  Facts zero;
  zero.dst = *SocketAddress::parse("10.0.0.1:0", true);
  EXPECT_EQ(decide(*p, zero), "default");
  // A destination that is not known has no port either.
  EXPECT_EQ(decide(*p, Facts{}), "default");
}

TEST_F(PolicyTest, UnknownFactsDoNotMatchKeysThatNameThem) {
  auto p = load(R"([[rule]]
name = "uid"
match.uid = "0-4294967295"
stacks = "kernel"
[[rule]]
name = "app"
match.app = ["curl"]
stacks = "kernel"
[[rule]]
name = "qos"
match.qos = ["default", "latency", "bulk", "background"]
stacks = "kernel"
[[rule]]
name = "peer-stacks"
match.peer_stacks = ["kernel", "rdma", "dpdk"]
stacks = "kernel"
[[rule]]
name = "dst"
match.dst = ["0.0.0.0/0", "::/0"]
stacks = "kernel"
[[rule]]
name = "unknown-peer"
match.peer = "unknown"
match.rtt = "unknown"
stacks = "kernel"
)");
  ASSERT_TRUE(p) << messages();
  Facts f;  // nothing known; peer and rtt are "unknown", which is itself a value
  EXPECT_EQ(decide(*p, f), "unknown-peer");
  f.rtt = RttClass::kLan;
  EXPECT_EQ(decide(*p, f), "default");
  f.dst = *SocketAddress::parse("10.0.0.1:80");
  EXPECT_EQ(decide(*p, f), "dst");
  f.peer_stacks = {"rdma"};
  EXPECT_EQ(decide(*p, f), "peer-stacks");
  f.qos = 3;
  EXPECT_EQ(decide(*p, f), "qos");
  f.app = "curl";
  EXPECT_EQ(decide(*p, f), "app");
  f.uid = 4294967295u;
  EXPECT_EQ(decide(*p, f), "uid");
}

TEST_F(PolicyTest, EachMatchKeyFiltersAndFirstMatchWins) {
  auto p = load(R"([[rule]]
name = "inbound-rdma-peer"
match.role = "inbound"
match.peer_stacks = ["rdma", "dpdk"]
stacks = "rdma0"
[[rule]]
name = "latency-lan"
match.qos = "latency"
match.rtt = ["local", "lan"]
stacks = "dpdk0"
[[rule]]
name = "no-sidecar"
match.peer = "none"
stacks = "kernel"
[[rule]]
name = "uid-range"
match.uid = ["2000-2999", 5]
stacks = "kernel"
[[rule]]
name = "catch-all"
stacks = "kernel"
[[rule]]
name = "never"
match.app = "x"
stacks = "kernel"
)");
  ASSERT_TRUE(p) << messages();
  Facts f = to("10.0.0.1:80");
  EXPECT_EQ(decide(*p, f), "catch-all");
  f.role = Role::kInbound;
  f.peer_stacks = {"kernel", "dpdk"};
  EXPECT_EQ(decide(*p, f), "inbound-rdma-peer");
  f.role = Role::kOutbound;
  f.qos = 1;
  f.rtt = RttClass::kWan;
  EXPECT_EQ(decide(*p, f), "catch-all");
  f.rtt = RttClass::kLan;
  EXPECT_EQ(decide(*p, f), "latency-lan");
  f.qos = 2;
  f.peer = PeerSidecar::kNo;
  EXPECT_EQ(decide(*p, f), "no-sidecar");
  f.peer = PeerSidecar::kYes;
  f.uid = 2999;
  EXPECT_EQ(decide(*p, f), "uid-range");
  f.uid = 3000;
  EXPECT_EQ(decide(*p, f), "catch-all");
  f.uid = 5;
  EXPECT_EQ(decide(*p, f), "uid-range");
  f.app = "x";  // "never" matches too, but comes after catch-all
  EXPECT_TRUE(p->rules()[5].matches(f));
  EXPECT_EQ(decide(*p, f), "uid-range");
}

TEST_F(PolicyTest, OrderIsFileOrderThenRuleOrderAndAMoreSpecificLaterRuleLoses) {
  // The first file is "b.toml": loadPolicyStrings keeps the order it is given.
  auto p = load({{"b.toml",
                  "[[rule]]\nname = \"b1\"\nmatch.dst = \"10.0.0.0/8\"\nstacks = \"rdma0\"\n"
                  "[[rule]]\nname = \"b2\"\nmatch.dst = \"10.1.0.0/16\"\nmatch.ports = "
                  "\"80\"\nstacks = \"rdma0\"\n"},
                 {"a.toml",
                  "[[rule]]\nname = \"a1\"\nmatch.dst = \"10.1.2.0/24\"\nstacks = \"rdma0\"\n"
                  "[[rule]]\nname = \"a2\"\nmatch.dst = \"fd00::/8\"\nstacks = \"rdma0\"\n"}});
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(p->files(), (std::vector<std::string>{"b.toml", "a.toml"}));
  ASSERT_EQ(p->rules().size(), 4u);
  EXPECT_EQ(p->rules()[0].name, "b1");
  EXPECT_EQ(p->rules()[1].name, "b2");
  EXPECT_EQ(p->rules()[2].name, "a1");
  EXPECT_EQ(p->rules()[3].name, "a2");
  EXPECT_EQ(decide(*p, to("10.1.2.3:80")), "b1");  // the shortest prefix, but first
  EXPECT_EQ(decide(*p, to("[fd01::1]:80")), "a2");
  EXPECT_EQ(decide(*p, to("11.0.0.1:80")), "default");
}

TEST_F(PolicyTest, ExplainSaysWhyEachRuleMissed) {
  auto p = load({{"p.d/10.toml", R"([[rule]]
name = "lan"
match.dst = ["10.0.0.0/8", "fd00::/8"]
stacks = "kernel"

[[rule]]
name = "web"
match.ports = ["443", "8000-8100"]
stacks = "kernel"
[[rule]]
name = "users"
match.uid = [1000, "2000-2999"]
stacks = "kernel"
[[rule]]
name = "apps"
match.app = ["redis-server", "curl"]
stacks = "kernel"
[[rule]]
name = "qos"
match.qos = ["latency", "bulk"]
stacks = "kernel"
[[rule]]
name = "inbound"
match.role = "inbound"
stacks = "kernel"
[[rule]]
name = "peer"
match.peer = ["sidecar"]
stacks = "kernel"
[[rule]]
name = "kinds"
match.peer_stacks = ["rdma"]
stacks = "kernel"
[[rule]]
name = "rtt"
match.rtt = ["local", "lan"]
stacks = "kernel"
)"},
                 {"p.d/20.toml",
                  "[[rule]]\nname = \"dc\"\nmatch.dst = \"192.168.0.0/16\"\n"
                  "stacks = \"kernel\"\n"}});
  ASSERT_TRUE(p) << messages();
  Facts f = to("192.168.1.5:80");
  f.uid = 1001;
  f.app = "wget";
  f.qos = 0;
  f.peer = PeerSidecar::kNo;
  f.peer_stacks = {"kernel", "dpdk"};
  f.rtt = RttClass::kWan;
  std::vector<std::string> trace;
  auto d = p->explain(f, trace);
  EXPECT_EQ(d.ruleName(), "dc");
  EXPECT_EQ(d.rule, &p->rules()[9]);
  EXPECT_EQ(d.version, 7u);
  EXPECT_EQ(trace, (std::vector<std::string>{
                       "  no    rule 'lan' (p.d/10.toml:1:1): dst 192.168.1.5 not in "
                       "10.0.0.0/8, fd00::/8",
                       "  no    rule 'web' (p.d/10.toml:6:1): port 80 not in 443, 8000-8100",
                       "  no    rule 'users' (p.d/10.toml:10:1): uid 1001 not in 1000, 2000-2999",
                       "  no    rule 'apps' (p.d/10.toml:14:1): app wget not in redis-server, curl",
                       "  no    rule 'qos' (p.d/10.toml:18:1): qos default not in latency, bulk",
                       "  no    rule 'inbound' (p.d/10.toml:22:1): role outbound not in inbound",
                       "  no    rule 'peer' (p.d/10.toml:26:1): peer none not in sidecar",
                       "  no    rule 'kinds' (p.d/10.toml:30:1): peer_stacks [kernel, dpdk] not "
                       "in rdma",
                       "  no    rule 'rtt' (p.d/10.toml:34:1): rtt wan not in local, lan",
                       "  match rule 'dc' (p.d/20.toml:1:1)",
                   }));
  EXPECT_EQ(p->classify(f).rule, d.rule);

  // Unknown facts, and no rule matching.
  trace.clear();
  d = p->explain(Facts{}, trace);
  EXPECT_EQ(d.rule, nullptr);
  EXPECT_EQ(d.action, &p->defaultAction());
  ASSERT_EQ(trace.size(), 11u);
  EXPECT_EQ(trace[0], "  no    rule 'lan' (p.d/10.toml:1:1): dst unknown");
  EXPECT_EQ(trace[1], "  no    rule 'web' (p.d/10.toml:6:1): port unknown");
  EXPECT_EQ(trace[2], "  no    rule 'users' (p.d/10.toml:10:1): uid unknown");
  EXPECT_EQ(trace[3], "  no    rule 'apps' (p.d/10.toml:14:1): app unknown");
  EXPECT_EQ(trace[4], "  no    rule 'qos' (p.d/10.toml:18:1): qos unknown");
  EXPECT_EQ(trace[5], "  no    rule 'inbound' (p.d/10.toml:22:1): role outbound not in inbound");
  EXPECT_EQ(trace[6], "  no    rule 'peer' (p.d/10.toml:26:1): peer unknown not in sidecar");
  EXPECT_EQ(trace[7], "  no    rule 'kinds' (p.d/10.toml:30:1): peer_stacks unknown");
  EXPECT_EQ(trace[8], "  no    rule 'rtt' (p.d/10.toml:34:1): rtt unknown not in local, lan");
  EXPECT_EQ(trace[9], "  no    rule 'dc' (p.d/20.toml:1:1): dst unknown");
  EXPECT_EQ(trace[10], "  default action (no rule matched)");
}

// ---- the loader: diagnostics ------------------------------------------------------------------

TEST_F(PolicyTest, ReportsEveryMatchErrorInOnePass) {
  auto p = load({{"p.d/10.toml", R"([[rule]]
name = "a"
match.dst = ["10.0.0.0/8", "10.0.0.300", "fd00::/129"]
match.ports = ["443", "8100-8000", "0", "65536"]
match.uid = [1000, "2999-2000", -1, 4294967296, "x", 1.5]
match.qos = "fast"
match.role = "sideways"
match.peer = ["sidecar", "maybe"]
match.peer_stacks = ["rdma", "quic"]
match.rtt = "far"
match.app = ""
stacks = ["kernel"]
)"}});
  EXPECT_FALSE(p);
  EXPECT_EQ(
      messages(),
      "p.d/10.toml:3:28: error: 'dst' in match of [[rule]] 'a': \"10.0.0.300\" is not a CIDR such "
      "as \"10.0.0.0/8\" or \"fd00::/8\", or an address\n"
      "p.d/10.toml:3:42: error: 'dst' in match of [[rule]] 'a': \"fd00::/129\" is not a CIDR such "
      "as \"10.0.0.0/8\" or \"fd00::/8\", or an address\n"
      "p.d/10.toml:4:23: error: 'ports' in match of [[rule]] 'a': \"8100-8000\" is not a port or "
      "range such as \"443\" or \"8000-8100\" (1-65535, first <= last)\n"
      "p.d/10.toml:4:36: error: 'ports' in match of [[rule]] 'a': \"0\" is not a port or range "
      "such as \"443\" or \"8000-8100\" (1-65535, first <= last)\n"
      "p.d/10.toml:4:41: error: 'ports' in match of [[rule]] 'a': \"65536\" is not a port or "
      "range such as \"443\" or \"8000-8100\" (1-65535, first <= last)\n"
      "p.d/10.toml:5:20: error: 'uid' in match of [[rule]] 'a': \"2999-2000\" is not a uid or "
      "range such as 1000 or \"2000-2999\" (0-4294967295, first <= last)\n"
      "p.d/10.toml:5:33: error: 'uid' in match of [[rule]] 'a': -1 is not a uid or range such as "
      "1000 or \"2000-2999\" (0-4294967295, first <= last)\n"
      "p.d/10.toml:5:37: error: 'uid' in match of [[rule]] 'a': 4294967296 is not a uid or range "
      "such as 1000 or \"2000-2999\" (0-4294967295, first <= last)\n"
      "p.d/10.toml:5:49: error: 'uid' in match of [[rule]] 'a': \"x\" is not a uid or range such "
      "as 1000 or \"2000-2999\" (0-4294967295, first <= last)\n"
      "p.d/10.toml:5:54: error: 'uid' in match of [[rule]] 'a': expected an integer or a string "
      "such as \"2000-2999\"\n"
      "p.d/10.toml:6:13: error: 'qos' in match of [[rule]] 'a': \"fast\" is not one of default, "
      "latency, bulk, background\n"
      "p.d/10.toml:7:14: error: 'role' in match of [[rule]] 'a': \"sideways\" is not one of "
      "outbound, inbound\n"
      "p.d/10.toml:8:26: error: 'peer' in match of [[rule]] 'a': \"maybe\" is not one of sidecar, "
      "none, unknown\n"
      "p.d/10.toml:9:30: error: 'peer_stacks' in match of [[rule]] 'a': \"quic\" is not a stack "
      "kind this build knows (one of kernel, rdma, dpdk)\n"
      "p.d/10.toml:10:13: error: 'rtt' in match of [[rule]] 'a': \"far\" is not one of local, "
      "lan, wan, unknown\n"
      "p.d/10.toml:11:13: error: 'app' in match of [[rule]] 'a': \"\" is not a process name\n");
}

TEST_F(PolicyTest, ReportsEveryActionErrorInOnePass) {
  auto p = load({{"p.toml", R"([[rule]]
name = "unknown-stack"
stacks = ["rdma0", "rdma9"]
mode = "racing"
stagger = "0ms"
attempt_timeout = "soon"
no_sidecar = "ignore"

[[rule]]
name = "twice"
stacks = ["kernel", "rdma0", "kernel"]
attempt_timeout = "0s"

[[rule]]
name = "empty"
stacks = []

[[rule]]
name = "typed"
stacks = "kernel"
mode = 1
stagger = 50
)"}});
  EXPECT_FALSE(p);
  EXPECT_EQ(messages(),
            "p.toml:3:20: error: 'stacks' in [[rule]] 'unknown-stack': \"rdma9\" is not a "
            "configured stack (one of rdma0, dpdk0, kernel)\n"
            "p.toml:4:8: error: 'mode' in [[rule]] 'unknown-stack': \"racing\" is not one of "
            "sequential, race\n"
            "p.toml:5:11: error: 'stagger' in [[rule]] 'unknown-stack': must be positive\n"
            "p.toml:6:19: error: 'attempt_timeout' in [[rule]] 'unknown-stack': \"soon\" is not a "
            "duration (use ms, s, m or h, e.g. \"5s\")\n"
            "p.toml:7:14: error: 'no_sidecar' in [[rule]] 'unknown-stack': \"ignore\" is not one "
            "of default, direct, refuse\n"
            "p.toml:11:30: error: 'stacks' in [[rule]] 'twice': \"kernel\" is listed twice\n"
            "p.toml:12:19: error: 'attempt_timeout' in [[rule]] 'twice': must be positive\n"
            "p.toml:16:10: error: 'stacks' in [[rule]] 'empty': needs at least one stack\n"
            "p.toml:21:8: error: 'mode' in [[rule]] 'typed': expected a string, got an integer\n"
            "p.toml:22:11: error: 'stagger' in [[rule]] 'typed': expected a duration string such "
            "as \"5s\" or \"250ms\", got an integer\n");
}

TEST_F(PolicyTest, ReportsNamesMissingKeysUnknownKeysAndDefaultsAcrossFiles) {
  auto p = load({{"p.d/10.toml", R"([[rule]]
name = "a"
stacks = "kernel"
colour = "red"
match.colour = 1
match.dst = "10.0.0.0/8"

[default]
stacks = "kernel"
)"},
                 {"p.d/20.toml", R"([[rule]]
match.dst = "10.0.0.1"

  [[rule]]
name = "a"
stacks = ["kernel"]

[[rule]]
name = "bad name!"
stacks = "kernel"

[[rule]]
name = 5

[default]
mode = "race"
typo = 1

[[rules]]
name = "x"
)"},
                 {"p.d/30.toml", "\n[default]\n"},
                 {"p.d/40.toml", "x = = 1\n"}});
  EXPECT_FALSE(p);
  EXPECT_EQ(messages(),
            "p.d/10.toml:4:1: error: unknown key 'colour' in [[rule]] 'a'\n"
            "p.d/10.toml:5:7: error: unknown key 'colour' in match of [[rule]] 'a'\n"
            "p.d/20.toml:1:1: error: [[rule]] #1: missing required key 'name'\n"
            "p.d/20.toml:1:1: error: [[rule]] #1: missing required key 'stacks'\n"
            "p.d/20.toml:5:8: error: 'name' in [[rule]] 'a': \"a\" is already the name of the "
            "rule at p.d/10.toml:1:1\n"
            "p.d/20.toml:9:8: error: 'name' in [[rule]] #3: \"bad name!\" is not 1-64 "
            "characters of [A-Za-z0-9_.-]\n"
            "p.d/20.toml:12:1: error: [[rule]] #4: missing required key 'stacks'\n"
            "p.d/20.toml:13:8: error: 'name' in [[rule]] #4: expected a string, got an integer\n"
            "p.d/20.toml:15:1: error: [default] is already set at p.d/10.toml:8:1 (at most one "
            "[default] across all files)\n"
            "p.d/20.toml:17:1: error: unknown key 'typo' in [default]\n"
            "p.d/20.toml:19:1: error: unknown key 'rules' in the top level\n"
            "p.d/30.toml:2:1: error: [default] is already set at p.d/10.toml:8:1 (at most one "
            "[default] across all files)\n"
            "p.d/40.toml:1:5: error: TOML syntax error: bad format: unknown value appeared\n");
}

TEST_F(PolicyTest, WarnsAboutEmptyListsButLoads) {
  auto p = load("[[rule]]\nname = \"a\"\nmatch.dst = []\nmatch.uid = []\nstacks = \"kernel\"\n");
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(),
            "p.toml:3:13: warning: 'dst' in match of [[rule]] 'a': an empty list matches "
            "everything; leave the key out\n"
            "p.toml:4:13: warning: 'uid' in match of [[rule]] 'a': an empty list matches "
            "everything; leave the key out\n");
  EXPECT_TRUE(p->rules()[0].matches(Facts{}));
}

// ---- shadowing --------------------------------------------------------------------------------

TEST_F(PolicyTest, WarnsAboutARuleAnEarlierRuleShadows) {
  auto p = load({{"a.toml", R"([[rule]]
name = "wide"
match.dst = ["10.0.0.0/8", "fd00::/16"]
match.ports = ["1-1000", "8000-9000"]
match.uid = "0-5000"
match.app = ["a", "b"]
match.qos = ["latency", "bulk"]
match.peer = ["sidecar", "unknown"]
match.peer_stacks = ["rdma", "dpdk"]
match.rtt = ["local", "lan"]
stacks = "kernel"
)"},
                 {"b.toml", R"([[rule]]
name = "narrow"
match.dst = ["10.1.0.0/16", "10.2.3.4", "fd00:0:1::/48"]
match.ports = ["80", "8080-8090"]
match.uid = [5, "100-200"]
match.app = "b"
match.qos = "bulk"
match.role = "inbound"
match.peer = "sidecar"
match.peer_stacks = "dpdk"
match.rtt = "lan"
stacks = "rdma0"

[[rule]]
name = "any"
stacks = "kernel"

[[rule]]
name = "after-any"
match.ports = "22"
stacks = "kernel"

[[rule]]
name = "any-again"
mode = "race"
stacks = "kernel"
)"}});
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(),
            "b.toml:1:1: warning: rule 'narrow' can never match: rule 'wide' (a.toml:1:1) "
            "matches every connection it does\n"
            "b.toml:18:1: warning: rule 'after-any' can never match: rule 'any' (b.toml:14:1) "
            "matches every connection it does\n"
            "b.toml:23:1: warning: rule 'any-again' can never match: rule 'any' (b.toml:14:1) "
            "matches every connection it does\n");
}

TEST_F(PolicyTest, NoShadowingWarningWhenTheEarlierRuleIsNarrowerInAnyDimension) {
  const std::string later = R"([[rule]]
name = "later"
match.dst = ["10.1.0.0/16", "fd00::/16"]
match.ports = ["80", "8080-8090"]
match.uid = [5, "100-200"]
match.app = "b"
match.qos = "bulk"
match.role = "inbound"
match.peer = "sidecar"
match.peer_stacks = "dpdk"
match.rtt = "lan"
stacks = "kernel"
)";
  // Each earlier rule covers `later` in every key but one.
  const std::vector<std::string> narrower = {
      "match.dst = \"10.1.0.0/16\"",                  // misses the v6 prefix
      "match.dst = [\"10.1.0.0/17\", \"fd00::/8\"]",  // /17 is inside /16
      "match.dst = [\"10.0.0.0/8\", \"fd00::/17\"]",
      "match.dst = \"0.0.0.0/0\"",  // every IPv4 address, no IPv6 one
      "match.ports = [\"80\", \"8080-8089\"]",
      "match.ports = [\"80\", \"8080-8085\", \"8086-8090\"]",  // covered by the union only
      "match.uid = [\"0-99\", \"101-300\"]",
      "match.uid = [\"6-200\"]",
      "match.app = \"a\"",
      "match.qos = \"latency\"",
      "match.role = \"outbound\"",
      "match.peer = [\"none\", \"unknown\"]",
      "match.peer_stacks = [\"rdma\", \"kernel\"]",
      "match.rtt = [\"local\", \"wan\"]",
  };
  for (const auto& key : narrower) {
    auto p = load(
        {{"p.toml", "[[rule]]\nname = \"earlier\"\n" + key + "\nstacks = \"kernel\"\n" + later}});
    ASSERT_TRUE(p) << messages();
    EXPECT_EQ(messages(), "") << key;
  }
  // The control: the same with nothing narrower warns.
  auto p = load({{"p.toml",
                  "[[rule]]\nname = \"earlier\"\nmatch.peer = [\"sidecar\", \"none\"]\n"
                  "match.rtt = [\"lan\", \"wan\"]\nstacks = \"kernel\"\n" +
                      later}});
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(),
            "p.toml:6:1: warning: rule 'later' can never match: rule 'earlier' (p.toml:1:1) "
            "matches every connection it does\n");
}

TEST_F(PolicyTest, ShadowingNamesTheFirstCoveringRuleAndTreatsEnumeratedValuesAsAll) {
  auto p = load(R"([[rule]]
name = "port-22"
match.dst = "10.1.0.0/16"
match.ports = "22"
stacks = "kernel"
[[rule]]
name = "wide-7"
match.dst = "10.0.0.0/7"
stacks = "kernel"
[[rule]]
name = "qos-all"
match.qos = ["default", "latency", "bulk", "background"]
stacks = "kernel"
[[rule]]
name = "net-10"
match.dst = "10.0.0.0/8"
stacks = "kernel"
[[rule]]
name = "host"
match.dst = "10.1.1.1"
stacks = "kernel"
[[rule]]
name = "every-peer"
match.peer = ["unknown", "none", "sidecar"]
match.rtt = ["unknown", "local", "lan", "wan"]
stacks = "kernel"
[[rule]]
name = "anything"
stacks = "kernel"
)");
  ASSERT_TRUE(p) << messages();
  // "host" is on the path of port-22, which does not cover it, and is covered by wide-7 and
  // net-10: the first is named. Listing every peer and rtt
  // value is "any" (so every-peer covers "anything"); listing every QoS class is not, as an
  // unknown QoS matches none of them (so qos-all does not cover every-peer).
  EXPECT_EQ(messages(),
            "p.toml:14:1: warning: rule 'net-10' can never match: rule 'wide-7' (p.toml:6:1) "
            "matches every connection it does\n"
            "p.toml:18:1: warning: rule 'host' can never match: rule 'wide-7' (p.toml:6:1) "
            "matches every connection it does\n"
            "p.toml:27:1: warning: rule 'anything' can never match: rule 'every-peer' "
            "(p.toml:22:1) matches every connection it does\n");
}

TEST_F(PolicyTest, NoShadowingWhenTheLaterRuleLacksAKeyTheEarlierHas) {
  // Without `ports` (or `uid`, `app`, `qos`, `peer_stacks`, `dst`) a rule also matches
  // connections whose fact is unknown, which no list covers.
  for (const char* key :
       {"match.ports = \"1-65535\"", "match.uid = \"0-4294967295\"",
        "match.dst = [\"0.0.0.0/0\", \"::/0\"]",
        "match.qos = [\"default\", \"latency\", \"bulk\", \"background\"]",
        "match.peer_stacks = [\"kernel\", \"rdma\", \"dpdk\"]", "match.role = \"outbound\""}) {
    auto p = load("[[rule]]\nname = \"a\"\n" + std::string(key) +
                  "\nstacks = \"kernel\"\n[[rule]]\nname = \"b\"\nstacks = \"kernel\"\n");
    ASSERT_TRUE(p) << messages();
    EXPECT_EQ(messages(), "") << key;
  }
}

TEST_F(PolicyTest, ShadowingNeedsEveryPrefixCovered) {
  auto p = load(R"([[rule]]
name = "a"
match.dst = ["10.1.0.0/16", "10.3.0.0/16"]
stacks = "kernel"
[[rule]]
name = "b"
match.dst = ["10.1.2.0/24", "10.2.0.0/24"]
stacks = "kernel"
[[rule]]
name = "c"
match.dst = ["10.3.2.0/24", "10.1.0.0/16"]
stacks = "kernel"
)");
  ASSERT_TRUE(p) << messages();
  // b has a prefix outside a; c is inside a (its first prefix through a's second).
  EXPECT_EQ(messages(),
            "p.toml:9:1: warning: rule 'c' can never match: rule 'a' (p.toml:1:1) matches every "
            "connection it does\n");
}

// ---- loading a directory ----------------------------------------------------------------------

class PolicyDirTest : public PolicyTest {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("dmm-policy-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  static std::string rule(const std::string& name) {
    return "[[rule]]\nname = \"" + name + "\"\nmatch.app = \"" + name + "\"\nstacks = \"kernel\"\n";
  }

  std::filesystem::path dir_;
};

TEST_F(PolicyDirTest, LoadsTomlFilesInByteOrderOfNames) {
  write("20-b.toml", rule("b") + rule("b2"));
  write("10-a.toml", rule("a"));
  write("9-z.toml", rule("z"));
  write("B.toml", rule("upper"));
  write("a-lower.toml", rule("lower"));
  write("README", "not toml at all = = =");
  write("30-c.toml.bak", "not toml = = =");
  write(".#20-b.toml", "an editor's lock file = = =");
  std::filesystem::create_directories(dir_ / "sub.toml");
  diags_ = Diagnostics();
  auto p = loadPolicyDir(dir_.string(), env_, 3, diags_);
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(), "");
  const std::string d = dir_.string() + "/";
  EXPECT_EQ(p->files(), (std::vector<std::string>{d + "10-a.toml", d + "20-b.toml", d + "9-z.toml",
                                                  d + "B.toml", d + "a-lower.toml"}));
  std::vector<std::string> names;
  for (const auto& r : p->rules())
    names.push_back(r.name);
  EXPECT_EQ(names, (std::vector<std::string>{"a", "b", "b2", "z", "upper", "lower"}));
  EXPECT_EQ(p->rules()[1].where.file, d + "20-b.toml");
  EXPECT_EQ(p->rules()[2].where.line, 5u);
  EXPECT_EQ(p->version(), 3u);
}

TEST_F(PolicyDirTest, ReportsErrorsWithTheFilePath) {
  write("10-a.toml", "[[rule]]\nname = \"a\"\n");
  diags_ = Diagnostics();
  auto p = loadPolicyDir(dir_.string(), env_, 1, diags_);
  EXPECT_FALSE(p);
  EXPECT_EQ(messages(), (dir_ / "10-a.toml").string() +
                            ":1:1: error: [[rule]] 'a': missing required key "
                            "'stacks'\n");
}

TEST_F(PolicyDirTest, AMissingDirectoryIsAnEmptyPolicyWithAWarning) {
  const std::string missing = (dir_ / "nope").string();
  diags_ = Diagnostics();
  auto p = loadPolicyDir(missing, env_, 4, diags_);
  ASSERT_TRUE(p) << messages();
  EXPECT_EQ(messages(), missing +
                            ": warning: policy directory does not exist: no rules, every "
                            "connection gets the default action\n");
  EXPECT_TRUE(p->rules().empty());
  EXPECT_TRUE(p->files().empty());
  EXPECT_EQ(p->defaultAction().stacks, (std::vector<std::size_t>{0, 1, 2}));
  EXPECT_EQ(p->version(), 4u);
}

TEST_F(PolicyDirTest, AFileInPlaceOfTheDirectoryIsAnError) {
  write("file", "");
  const std::string path = (dir_ / "file").string();
  diags_ = Diagnostics();
  EXPECT_FALSE(loadPolicyDir(path, env_, 1, diags_));
  EXPECT_EQ(messages(), path + ": error: not a directory\n");
}

TEST_F(PolicyTest, ALongListOnOnePrefixKeepsRuleOrderPerPort) {
  // 40 rules on one prefix, more than the index scans without its port intervals: windows of
  // 26 ports every 10 ports (so each port is in two or three), every 7th rule without ports
  // but with an app.
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "[[rule]]\nname = \"p" + std::to_string(i) + "\"\nmatch.dst = \"10.0.0.0/8\"\n";
    if (i % 7 == 6) {
      text += "match.app = \"x\"\n";
    } else {
      text += "match.ports = \"" + std::to_string(1000 + i * 10) + "-" +
              std::to_string(1025 + i * 10) + "\"\n";
    }
    text += "stacks = \"kernel\"\n";
  }
  auto p = load(text);
  ASSERT_TRUE(p) << messages();
  for (int port = 980; port <= 1440; ++port) {
    Facts f = to(("10.2.3.4:" + std::to_string(port)).c_str());
    std::string expected = "default";
    for (int i = 0; i < 40; ++i) {
      if (i % 7 != 6 && port >= 1000 + i * 10 && port <= 1025 + i * 10) {
        expected = "p" + std::to_string(i);
        break;
      }
    }
    EXPECT_EQ(decide(*p, f), expected) << port;
    f.app = "x";
    std::string with_app = "default";
    for (int i = 0; i < 40; ++i) {
      if (i % 7 == 6 || (port >= 1000 + i * 10 && port <= 1025 + i * 10)) {
        with_app = "p" + std::to_string(i);
        break;
      }
    }
    EXPECT_EQ(decide(*p, f), with_app) << port;
  }
  EXPECT_EQ(decide(*p, to("10.2.3.4:1005")), "p0");
  EXPECT_EQ(decide(*p, to("10.2.3.4:1030")), "p1");
  EXPECT_EQ(decide(*p, to("11.2.3.4:1030")), "default");
}

// ---- the index against the linear scan --------------------------------------------------------

// Random rule sets over few base prefixes (so prefixes nest and overlap) and few port
// boundaries, with every other key sometimes present; random facts near the same bases.
class RandomPolicy {
 public:
  explicit RandomPolicy(std::uint32_t seed) : rng_(seed) {}

  std::string rules(int count, int no_dst_percent) {
    std::string text;
    for (int i = 0; i < count; ++i) {
      text += "[[rule]]\nname = \"r" + std::to_string(i) + "\"\nstacks = \"kernel\"\n";
      if (!chance(no_dst_percent)) {
        text += "match.dst = [";
        int n = 1 + pick(3);
        for (int k = 0; k < n; ++k)
          text += (k ? ", \"" : "\"") + prefix() + "\"";
        text += "]\n";
      }
      if (chance(60)) {
        text += "match.ports = [";
        int n = 1 + pick(3);
        for (int k = 0; k < n; ++k) {
          int a = kPorts[any(kPorts.size())];
          int b = kPorts[any(kPorts.size())];
          if (a > b) std::swap(a, b);
          text += (k ? ", \"" : "\"") + std::to_string(a) + "-" + std::to_string(b) + "\"";
        }
        text += "]\n";
      }
      if (chance(20)) {
        int a = pick(3000);
        text += "match.uid = [\"" + std::to_string(a) + "-" + std::to_string(a + pick(1500)) +
                "\", " + std::to_string(pick(3000)) + "]\n";
      }
      if (chance(15)) text += "match.app = [\"" + app() + "\", \"" + app() + "\"]\n";
      if (chance(15)) text += "match.qos = \"" + std::string(kQosClasses[any(4)]) + "\"\n";
      if (chance(15))
        text += chance(50) ? "match.role = \"inbound\"\n" : "match.role = \"outbound\"\n";
      if (chance(15)) text += "match.peer = [\"" + peer() + "\", \"" + peer() + "\"]\n";
      if (chance(15)) text += "match.peer_stacks = \"" + kind() + "\"\n";
      if (chance(15)) text += "match.rtt = [\"" + rtt() + "\"]\n";
    }
    return text;
  }

  Facts facts() {
    Facts f;
    int which = pick(10);
    std::uint16_t port = static_cast<std::uint16_t>(
        chance(50) ? kPorts[any(kPorts.size())] + pick(3) - 1 : 1 + pick(65535));
    if (port == 0) port = 1;
    if (which < 4) {
      f.dst = SocketAddress(near(kV4[any(kV4.size())], true), port);
    } else if (which < 8) {
      f.dst = SocketAddress(near(kV6[any(kV6.size())], false), port);
    } else if (which < 9) {
      f.dst = SocketAddress(*IpAddress::parse("::ffff:10.0.0." + std::to_string(pick(256))), port);
    }  // else: no destination
    if (chance(70)) f.uid = static_cast<std::uint32_t>(pick(4500));
    if (chance(70)) f.app = app();
    if (chance(70)) f.qos = static_cast<std::uint8_t>(pick(4));
    f.role = chance(50) ? Role::kInbound : Role::kOutbound;
    f.peer = static_cast<PeerSidecar>(pick(3));
    if (chance(70)) {
      f.peer_stacks.push_back(kind());
      if (chance(50)) f.peer_stacks.push_back(kind());
    }
    f.rtt = static_cast<RttClass>(pick(4));
    return f;
  }

 private:
  static constexpr std::array<int, 9> kPorts = {1, 22, 80, 443, 1000, 8000, 8100, 65534, 65535};
  static constexpr std::array<const char*, 3> kV4 = {"10.0.0.0", "10.1.0.0", "192.168.0.0"};
  static constexpr std::array<const char*, 3> kV6 = {"fd00::", "fd00:0:1::", "2001:db8::"};

  int pick(std::size_t n) { return static_cast<int>(rng_() % n); }
  std::size_t any(std::size_t n) { return rng_() % n; }
  bool chance(int percent) { return pick(100) < percent; }
  std::string app() { return std::string(1, static_cast<char>('a' + pick(3))); }
  std::string kind() { return std::vector<std::string>{"kernel", "rdma", "dpdk"}[any(3)]; }
  std::string peer() { return peerSidecarName(static_cast<PeerSidecar>(pick(3))); }
  std::string rtt() { return rttClassName(static_cast<RttClass>(pick(4))); }

  // An address near `base`: its low bits (below the first 8 for IPv4, 16 for IPv6) random,
  // and mostly zero so that host prefixes hit.
  IpAddress near(const char* base, bool v4) {
    auto ip = *IpAddress::parse(base);
    std::array<std::uint8_t, 16> b{};
    std::copy(ip.bytes(), ip.bytes() + ip.size(), b.begin());
    std::size_t first = v4 ? 1 : 2;
    for (std::size_t i = first; i < ip.size(); ++i) {
      if (chance(35)) b[i] = static_cast<std::uint8_t>(chance(50) ? pick(4) : pick(256));
    }
    if (v4) {
      in_addr a{};
      std::memcpy(&a, b.data(), 4);
      return IpAddress::v4(a);
    }
    in6_addr a{};
    std::memcpy(&a, b.data(), 16);
    return IpAddress::v6(a);
  }

  std::string prefix() {
    bool v4 = chance(50);
    IpAddress ip = near(v4 ? kV4[any(kV4.size())] : kV6[any(kV6.size())], v4);
    int max = v4 ? 32 : 128;
    int length = chance(10) ? pick(static_cast<std::size_t>(max + 1))
                            : max - pick(static_cast<std::size_t>(max / 2));
    return ip.toString() + "/" + std::to_string(length);
  }

  std::mt19937 rng_;
};

TEST_F(PolicyTest, ClassifyAgreesWithExplainOnRandomRuleSets) {
  int total = 0;
  int by_prefix = 0;  // decided by a rule with `dst`: found below a trie root
  int by_default = 0;
  for (std::uint32_t seed = 1; seed <= 2000; ++seed) {
    RandomPolicy gen(seed);
    // Every 50th set is large, with many rules at the roots, so nodes get port indexes.
    int count = seed % 50 == 0 ? 300 : 1 + static_cast<int>(seed % 40);
    int no_dst_percent = seed % 50 == 0 ? 30 : static_cast<int>(seed % 4) * 10;
    auto p = load({{"r.toml", gen.rules(count, no_dst_percent)}});
    ASSERT_TRUE(p) << messages();
    for (int i = 0; i < 100; ++i) {
      Facts f = gen.facts();
      std::vector<std::string> trace;
      auto linear = p->explain(f, trace);
      auto indexed = p->classify(f);
      ASSERT_EQ(indexed.rule, linear.rule)
          << "seed " << seed << " fact " << i << ": classify " << indexed.ruleName() << ", explain "
          << linear.ruleName() << " for " << f.dst.toString();
      // And the first rule whose matches() holds is the one.
      const Rule* first = nullptr;
      for (const auto& r : p->rules()) {
        if (r.matches(f)) {
          first = &r;
          break;
        }
      }
      ASSERT_EQ(linear.rule, first) << "seed " << seed;
      ++total;
      if (first == nullptr) {
        ++by_default;
      } else if (!first->dst.empty()) {
        ++by_prefix;
      }
    }
  }
  // The generator is worth something only if both outcomes are common.
  EXPECT_GT(by_prefix, total / 10) << by_prefix << " of " << total;
  EXPECT_GT(by_default, total / 10) << by_default << " of " << total;
}

}  // namespace
}  // namespace dmm::policy
