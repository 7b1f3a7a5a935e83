// The shared tables: replay cache and peer table.

#include <gtest/gtest.h>

#include "proxy/peer_table.h"
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

}  // namespace
}  // namespace dmm::proxy
