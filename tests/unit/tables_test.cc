// The shared tables: replay cache and peer table.

#include <gtest/gtest.h>

#include <ctime>
#include <map>

#include "proxy/classify.h"
#include "proxy/peer_table.h"
#include "proxy/process_metrics.h"
#include "proxy/replay_cache.h"

namespace dmm::proxy {
namespace {

using namespace std::chrono_literals;

ReplayCache::Nonce nonce(std::uint8_t seed) {
  ReplayCache::Nonce n{};
  for (std::size_t i = 0; i < n.size(); ++i)
    n[i] = static_cast<std::uint8_t>(seed * 31 + i);
  return n;
}

TEST(ReplayCache, RefusesASecondUseUntilExpiry) {
  ReplayCache cache(10s, 1000);
  auto t0 = ReplayCache::Clock::now();
  EXPECT_EQ(cache.insert(nonce(1), t0), ReplayCache::Insert::kNew);
  EXPECT_EQ(cache.insert(nonce(1), t0 + 1s), ReplayCache::Insert::kReplayed);
  EXPECT_EQ(cache.insert(nonce(2), t0 + 1s), ReplayCache::Insert::kNew);
  // After its lifetime the nonce is forgotten (the timestamp check rejects it by then).
  EXPECT_EQ(cache.insert(nonce(1), t0 + 11s), ReplayCache::Insert::kNew);
}

TEST(ReplayCache, IsBounded) {
  ReplayCache cache(10s, 32);
  auto t0 = ReplayCache::Clock::now();
  int full = 0;
  for (int i = 0; i < 200; ++i) {
    if (cache.insert(nonce(static_cast<std::uint8_t>(i)), t0) == ReplayCache::Insert::kFull) ++full;
  }
  EXPECT_GT(full, 100);
  // Room again once entries expire.
  EXPECT_EQ(cache.insert(nonce(250), t0 + 11s), ReplayCache::Insert::kNew);
}

TEST(PeerTable, RemembersNoSidecarForItsTtl) {
  PeerTable peers(4);
  auto ip = *IpAddress::parse("10.0.0.2");
  auto t0 = PeerTable::Clock::now();
  EXPECT_FALSE(peers.knownNoSidecar(ip, t0));
  peers.markNoSidecar(ip, 5s, t0);
  EXPECT_TRUE(peers.knownNoSidecar(ip, t0 + 4s));
  EXPECT_FALSE(peers.knownNoSidecar(ip, t0 + 6s));
  peers.markNoSidecar(ip, 5s, t0);
  peers.markSidecar(ip);
  EXPECT_FALSE(peers.knownNoSidecar(ip, t0));
}

TEST(PeerTable, StaysBounded) {
  PeerTable peers(4);
  auto t0 = PeerTable::Clock::now();
  for (int i = 0; i < 50; ++i) {
    peers.markNoSidecar(*IpAddress::parse("10.0.0." + std::to_string(i)), 60s, t0);
    EXPECT_LE(peers.size(), 4u);
  }
}

TEST(PeerTable, FactsFollowWhatWasLearned) {
  PeerTable peers(8);
  auto ip = *IpAddress::parse("10.0.0.2");
  auto t0 = PeerTable::Clock::now();
  EXPECT_EQ(peers.facts(ip, t0).sidecar, policy::PeerSidecar::kUnknown);
  EXPECT_FALSE(peers.facts(ip, t0).rtt);
  peers.markSidecar(ip, 0b10, std::chrono::microseconds(800));
  auto f = peers.facts(ip, t0);
  EXPECT_EQ(f.sidecar, policy::PeerSidecar::kYes);
  EXPECT_EQ(f.kinds, 0b10u);
  ASSERT_TRUE(f.rtt);
  EXPECT_EQ(f.rtt->count(), 800);
  // Smoothed like TCP's SRTT: one sample of 1600 moves 800 by an eighth of the difference.
  peers.markSidecar(ip, 0, std::chrono::microseconds(1600));
  EXPECT_EQ(peers.facts(ip, t0).rtt->count(), 900);
  EXPECT_EQ(peers.facts(ip, t0).kinds, 0b10u);  // 0 means "not told", not "none"
  peers.markNoSidecar(ip, 5s, t0);
  EXPECT_EQ(peers.facts(ip, t0 + 1s).sidecar, policy::PeerSidecar::kNo);
  EXPECT_EQ(peers.facts(ip, t0 + 6s).sidecar, policy::PeerSidecar::kUnknown);
}

TEST(PeerTable, BreakerOpensAfterFailuresProbesOnceAndCloses) {
  using V = PeerTable::Verdict;
  using T = PeerTable::Transition;
  PeerTable peers(8);
  auto ip = *IpAddress::parse("10.0.0.2");
  auto other = *IpAddress::parse("10.0.0.3");
  PeerTable::BreakerPolicy bp{3, std::chrono::seconds(10)};
  auto t0 = PeerTable::Clock::now();
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0), V::kAllow);
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0), T::kNone);
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0), T::kNone);
  // A success in between resets the count: failures must be in a row.
  EXPECT_EQ(peers.breakerResult(ip, 1, true, bp, t0), T::kNone);
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0), T::kNone);
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0), T::kNone);
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0), T::kOpened);
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 5s), V::kSkip);
  // Per peer and per stack instance.
  EXPECT_EQ(peers.breakerCheck(ip, 0, t0 + 5s), V::kAllow);
  EXPECT_EQ(peers.breakerCheck(other, 1, t0 + 5s), V::kAllow);
  ASSERT_EQ(peers.openBreakers().size(), 1u);
  // After open_for: exactly one probe.
  T t = T::kNone;
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 11s, &t), V::kProbe);
  EXPECT_EQ(t, T::kHalfOpened);
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 11s), V::kSkip);
  // A probe handed back unstarted: the next connection probes, and that is no new transition
  // (the soak counted 60,266 half_open transitions of one breaker in an hour before).
  peers.breakerAbandon(ip, 1);
  t = T::kNone;
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 11s, &t), V::kProbe);
  EXPECT_EQ(t, T::kNone);
  // The probe fails: open again for open_for from now.
  EXPECT_EQ(peers.breakerResult(ip, 1, false, bp, t0 + 12s), T::kOpened);
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 20s), V::kSkip);
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 23s, &t), V::kProbe);
  EXPECT_EQ(t, T::kHalfOpened);  // reopened, then half-open again: a transition
  EXPECT_EQ(peers.breakerResult(ip, 1, true, bp, t0 + 23s), T::kClosed);
  EXPECT_EQ(peers.breakerCheck(ip, 1, t0 + 23s), V::kAllow);
  EXPECT_TRUE(peers.openBreakers().empty());
}

}  // namespace
}  // namespace dmm::proxy

namespace dmm::proxy {
namespace {

TEST(ProcessMetrics, ReadThisProcessPlausibly) {
  std::vector<char> touched(64 << 20, 1);  // 64 MiB resident for a moment
  std::map<std::string, double> v;
  for (const auto& f : collectProcessMetrics())
    v[f.name] = f.type == prometheus::MetricType::Counter ? f.metric.at(0).counter.value
                                                          : f.metric.at(0).gauge.value;
  EXPECT_EQ(v.size(), 6u);
  EXPECT_GT(v["process_resident_memory_bytes"], 64.0 * (1 << 20));
  EXPECT_LT(v["process_resident_memory_bytes"], 4.0 * (1 << 30));
  EXPECT_GE(v["process_virtual_memory_bytes"], v["process_resident_memory_bytes"]);
  EXPECT_GE(v["process_cpu_seconds_total"], 0);
  EXPECT_GE(v["process_open_fds"], 3);  // stdin, stdout, stderr at least
  EXPECT_GE(v["process_max_fds"], v["process_open_fds"]);
  double now = static_cast<double>(std::time(nullptr));
  EXPECT_NEAR(v["process_start_time_seconds"], now, 3600);
  EXPECT_LE(v["process_start_time_seconds"], now + 1);
  EXPECT_EQ(touched[12345], 1);
}

}  // namespace
}  // namespace dmm::proxy

namespace dmm::proxy {
namespace {

TEST(ClassifiedFacts, KeepWhatThePolicyMatchedIncludingTheApp) {
  policy::Facts f;
  f.role = policy::Role::kOutbound;
  f.dst = *SocketAddress::parse("10.0.0.2:80");
  f.uid = 1000;
  f.app = "nginx";
  f.qos = 1;
  f.peer = policy::PeerSidecar::kYes;
  f.rtt = policy::RttClass::kLan;
  auto kept = ClassifiedFacts::of(f);
  EXPECT_EQ(kept.appName(), "nginx");
  auto back = kept.expand(policy::Role::kOutbound, f.dst);
  EXPECT_EQ(back.app, "nginx");
  EXPECT_EQ(back.uid, f.uid);
  EXPECT_EQ(back.qos, f.qos);
  EXPECT_EQ(back.peer, f.peer);
  EXPECT_EQ(back.rtt, f.rtt);
  // Longer than the kernel's comm: cut to its 15 characters.
  f.app = "a-very-long-process-name";
  EXPECT_EQ(ClassifiedFacts::of(f).appName(), "a-very-long-pro");
  f.app.clear();
  EXPECT_EQ(ClassifiedFacts::of(f).appName(), "");
}

}  // namespace
}  // namespace dmm::proxy
