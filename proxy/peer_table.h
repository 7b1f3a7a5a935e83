#pragma once
// PeerTable: what this sidecar has learned about peer hosts, shared by all workers, bounded in
// size:
//   - whether a sidecar answered there (and until when one is known NOT to: later connections
//     go direct at once instead of paying the probe again),
//   - the stack kinds its sidecar runs (from its REPLY) and its smoothed RTT on the control
//     connection (TCP_INFO) - the peer facts the policy matches on,
//   - one circuit breaker per stack instance toward it: after `failures` failed attempts in a
//     row the instance is skipped for `open_for`; then one probe attempt is let through, and
//     its result closes the breaker or opens it again.

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "common/socket_address.h"
#include "policy/policy.h"

namespace dmm::proxy {

struct PeerFacts {
  policy::PeerSidecar sidecar = policy::PeerSidecar::kUnknown;
  std::uint32_t kinds = 0;  // bit (1 << StackKind value) per kind its sidecar runs; 0: unknown
  std::optional<std::chrono::microseconds> rtt;
};

class PeerTable {
 public:
  using Clock = std::chrono::steady_clock;
  explicit PeerTable(std::size_t max_entries = 65536) : max_entries_(max_entries) {}

  // Remembers that `peer` has no usable sidecar for `ttl`.
  void markNoSidecar(const IpAddress& peer, Clock::duration ttl, Clock::time_point now);
  // A sidecar answered at `peer`, running `kinds`; `rtt` is a fresh sample if one was taken.
  void markSidecar(const IpAddress& peer, std::uint32_t kinds = 0,
                   std::optional<std::chrono::microseconds> rtt = std::nullopt);
  // True while a no-sidecar mark for `peer` is fresh.
  bool knownNoSidecar(const IpAddress& peer, Clock::time_point now);
  PeerFacts facts(const IpAddress& peer, Clock::time_point now);

  // Circuit breakers, per peer and stack instance index.
  enum class Verdict : std::uint8_t {
    kAllow,  // closed: use it
    kProbe,  // open time is over: this attempt is the one probe
    kSkip,   // open (or a probe is already out): do not use it now
  };
  enum class Transition : std::uint8_t { kNone, kOpened, kHalfOpened, kClosed };
  struct BreakerPolicy {
    std::uint32_t failures = 3;
    Clock::duration open_for = std::chrono::seconds(30);
  };
  Verdict breakerCheck(const IpAddress& peer, std::size_t stack, Clock::time_point now,
                       Transition* transition = nullptr);
  // The outcome of an attempt that breakerCheck() allowed.
  Transition breakerResult(const IpAddress& peer, std::size_t stack, bool ok,
                           const BreakerPolicy& policy, Clock::time_point now);
  // A probe that breakerCheck() let through ended without a result (cancelled): the next
  // check may probe again.
  void breakerAbandon(const IpAddress& peer, std::size_t stack);
  // Breakers open (or probing) now, per stack instance index (for the admin socket).
  struct OpenBreaker {
    IpAddress peer;
    std::size_t stack = 0;
    std::uint32_t failures = 0;
    bool probing = false;
    Clock::time_point until;
  };
  std::vector<OpenBreaker> openBreakers();

  std::size_t size();

 private:
  struct Breaker {
    std::uint32_t failures = 0;  // in a row
    bool open = false;
    bool probing = false;    // the open time is over and one attempt is out
    bool half_open = false;  // a probe was granted since it (re)opened: counted once
    Clock::time_point until;
  };
  struct Entry {
    Clock::time_point no_sidecar_until{};
    bool sidecar = false;
    std::uint32_t kinds = 0;
    std::int64_t rtt_us = -1;  // smoothed; -1: none yet
    std::vector<Breaker> breakers;
  };
  struct Hash {
    std::size_t operator()(const IpAddress& ip) const;
  };
  Entry& entry(const IpAddress& peer, Clock::time_point now);

  std::mutex mutex_;
  std::unordered_map<IpAddress, Entry, Hash> peers_;
  std::size_t max_entries_;
};

}  // namespace dmm::proxy
