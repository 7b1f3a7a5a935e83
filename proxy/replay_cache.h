#pragma once
// ReplayCache: the nonces of recently accepted handshakes, so that a recorded HELLO replayed
// within the clock-skew window is refused. Shared by all workers (a replay may land on any of
// them), sharded to keep lock hold times short. Bounded: when a shard is full of unexpired
// entries, insert() reports kFull and the caller refuses the handshake (fail closed).

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <unordered_set>

namespace dmm::proxy {

class ReplayCache {
 public:
  using Clock = std::chrono::steady_clock;
  using Nonce = std::array<std::uint8_t, 16>;
  enum class Insert { kNew, kReplayed, kFull };

  // Entries live for `lifetime` (twice the accepted clock skew: a header is fresh for
  // [-skew, +skew] around our clock). At most `capacity` live entries in all.
  ReplayCache(Clock::duration lifetime, std::size_t capacity);

  Insert insert(const Nonce& nonce, Clock::time_point now);

 private:
  static constexpr std::size_t kShards = 16;
  struct NonceHash {
    std::size_t operator()(const Nonce& n) const;
  };
  struct Shard {
    std::mutex mutex;
    std::unordered_set<Nonce, NonceHash> live;
    std::deque<std::pair<Clock::time_point, Nonce>> by_age;  // expiry order
  };
  Clock::duration lifetime_;
  std::size_t per_shard_capacity_;
  std::array<Shard, kShards> shards_;
};

}  // namespace dmm::proxy
