#include "proxy/replay_cache.h"

#include <cstring>

namespace dmm::proxy {

std::size_t ReplayCache::NonceHash::operator()(const Nonce& n) const {
  // Nonces are random: their leading bytes are already a good hash.
  std::size_t h = 0;
  std::memcpy(&h, n.data(), sizeof h);
  return h;
}

ReplayCache::ReplayCache(Clock::duration lifetime, std::size_t capacity)
    : lifetime_(lifetime), per_shard_capacity_(capacity / kShards + 1) {}

ReplayCache::Insert ReplayCache::insert(const Nonce& nonce, Clock::time_point now) {
  std::uint64_t shard_key = 0;
  std::memcpy(&shard_key, nonce.data() + 8, sizeof shard_key);
  Shard& shard = shards_[shard_key % kShards];
  std::lock_guard lock(shard.mutex);
  while (!shard.by_age.empty() && shard.by_age.front().first <= now) {
    shard.live.erase(shard.by_age.front().second);
    shard.by_age.pop_front();
  }
  if (shard.live.count(nonce) != 0) return Insert::kReplayed;
  if (shard.live.size() >= per_shard_capacity_) return Insert::kFull;
  shard.live.insert(nonce);
  shard.by_age.emplace_back(now + lifetime_, nonce);
  return Insert::kNew;
}

}  // namespace dmm::proxy
