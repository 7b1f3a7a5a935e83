#pragma once
// The proxy's Prometheus metrics, declared in one place. Every label set is created up front
// (bounded labels: role, stack instance, outcome, reason, direction; never addresses), so the data
// path only touches handles it already holds.
//
// dmm_sidecar_build_info{version,commit}                       gauge, 1
// dmm_sidecar_connections_total{role,stack,outcome}            counter, at close
// dmm_sidecar_active_connections{role}                         gauge
// dmm_sidecar_relay_bytes_total{role,stack,direction}          counter
// dmm_sidecar_relay_pauses_total{direction}                    counter (backpressure)
// dmm_sidecar_handshake_duration_seconds{role}                 histogram
// dmm_sidecar_handshake_rejections_total{role,reason}          counter
// dmm_sidecar_fallbacks_total{reason,action}                   counter
// dmm_sidecar_capture_refusals_total{reason}                   counter
// dmm_sidecar_preload_connections_total{data_path}             counter
// dmm_sidecar_preload_shm_declined_total{reason}               counter
// dmm_sidecar_accept_errors_total{listener}                    counter
// dmm_sidecar_splice_disabled_total                            counter
// dmm_sidecar_tunnel_reuses_total{role}                        counter
// dmm_sidecar_policy_version                                   gauge
// dmm_sidecar_policy_reloads_total{result}                     counter
// dmm_sidecar_policy_decisions_total{role,rule}                counter
// dmm_sidecar_stack_attempts_total{rule,stack,outcome}         counter
// dmm_sidecar_policy_fallbacks_total{rule,reason}              counter
// dmm_sidecar_breaker_transitions_total{stack,state}           counter
//
// The rule label takes the operator's rule names (few, and "default"); its handles are made
// on a rule's first use and kept (RuleMetrics).

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace dmm::proxy {

// Which side of a sidecar pair a connection is on.
enum class Role : std::uint8_t {
  kOutbound,  // a local application's connection this sidecar captured and carries out
  kInbound,   // a connection a peer sidecar carried in, delivered to a local server
  kCount
};
const char* roleName(Role r);

// How a connection ended (the termination cause on the close log line).
enum class Outcome : std::uint8_t {
  kClosed,             // both directions ended cleanly
  kReset,              // one side reset; the reset was passed on
  kIdleTimeout,        // no bytes either way for timeouts.idle
  kHalfClosedTimeout,  // one direction ended and the other stalled for timeouts.half_closed
  kConnectFailed,      // the onward connection could not be opened
  kRefused,            // refused by the handshake, policy or fallback mode
  kError,              // a local error (see the log line)
  kShutdown,           // the sidecar stopped
  kCount
};
const char* outcomeName(Outcome o);

// Why a connection bypassed (or would have bypassed) the peer sidecar.
enum class FallbackReason : std::uint8_t {
  kPeerRefused,             // nothing listens on the peer's tunnel port
  kPeerTimeout,             // connect or reply took too long
  kPeerUnreachable,         // no route, host unreachable, other connect errors
  kPeerClosed,              // the peer closed before replying
  kPeerProtocolError,       // the peer answered something that is not a v1 reply
  kPeerUnsupportedVersion,  // the peer rejected our version
  kPeerNoCommonStack,       // the peer supports none of the stacks we offered
  kPeerOverloaded,          // the peer asked us to go elsewhere
  kCachedNoSidecar,         // the peer was recently found to have no sidecar
  kBreakerOpen,             // every candidate stack's circuit breaker toward the peer is open
  kDataPathFailed,          // the chosen stack's own data connection failed, none other left
  kStackDown,               // every candidate stack instance of this side is down
  kCount
};
const char* fallbackReasonName(FallbackReason r);

enum class Direction : std::uint8_t {
  kUpstream,    // client -> server
  kDownstream,  // server -> client
  kCount
};

// Rejection reasons in the handshake; mirrors handshake::RejectReason plus the local-only ones.
enum class RejectionLabel : std::uint8_t {
  kMalformed,
  kUnsupportedVersion,
  kAuthFailed,
  kStale,
  kReplayed,
  kDestinationNotAllowed,
  kDestinationUnreachable,
  kNoCommonStack,
  kOverloaded,
  kTooLarge,
  kBadMagic,  // local only: not our protocol
  kTimeout,   // local only: the header did not arrive in time
  kUnknown,   // a peer sent a reason we do not know
  kCount
};
const char* rejectionLabelName(RejectionLabel r);

// How one attempt of a candidate stack ended.
enum class AttemptOutcome : std::uint8_t {
  kWon,                // it carried the connection
  kLostRace,           // another candidate was established first; this one was cancelled
  kFailedRefused,      // connection refused
  kFailedTimeout,      // no connection within attempt_timeout
  kFailedUnreachable,  // other connect errors
  kFailedClosed,       // the peer closed, broke or timed out the connection before its REPLY
  kRejected,           // the peer sidecar answered with a reject
  kSkippedBreaker,     // not tried: its circuit breaker toward the peer is open
  kSkippedDown,        // not tried: the instance is down (its port or EAL failed to start)
  kFailedDataPath,     // accepted, but its data connection could not be opened or bound
  kCount
};
const char* attemptOutcomeName(AttemptOutcome o);

enum class BreakerState : std::uint8_t { kOpen, kHalfOpen, kClosed, kCount };

// The handles of one policy rule, made on its first decision and kept.
struct RuleMetrics {
  std::array<prometheus::Counter*, 2> decisions{};  // by Role
  std::vector<prometheus::Counter*> attempts;       // [stack][AttemptOutcome]
  std::vector<prometheus::Counter*> fallbacks;      // [FallbackReason]
  prometheus::Counter& attempt(std::size_t stack, AttemptOutcome o) {
    return *attempts[stack * static_cast<std::size_t>(AttemptOutcome::kCount) +
                     static_cast<std::size_t>(o)];
  }
};

class Metrics {
 public:
  // `stack_names` are the configured instances. Two stack label values are added: "direct"
  // (a fallback connection that bypassed the peer sidecar) and "none" (a connection refused
  // or ended before any stack carried it).
  Metrics(const std::vector<std::string>& stack_names, const std::string& version,
          const std::string& commit);

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Indexes of "direct" and "none" among the stack labels.
  std::size_t directStack() const { return stack_count_; }
  std::size_t noStack() const { return stack_count_ + 1; }

  void connectionOpened(Role role) { active_[idx(role)]->Increment(); }
  void connectionClosed(Role role, std::size_t stack, Outcome outcome) {
    active_[idx(role)]->Decrement();
    connectionFailed(role, stack, outcome);
  }
  // A connection that never became a relay (refused, onward connect failed).
  void connectionFailed(Role role, std::size_t stack, Outcome outcome) {
    connections_[(idx(role) * (stack_count_ + 2) + stack) * kOutcomes + idx(outcome)]->Increment();
  }
  // Bytes are carried by a configured stack or "direct", never by "none".
  prometheus::Counter& bytes(Role role, std::size_t stack, Direction d) {
    return *bytes_[(idx(role) * (stack_count_ + 1) + stack) * 2 + idx(d)];
  }
  void relayPaused(Direction d) { pauses_[idx(d)]->Increment(); }
  void handshakeDone(Role role, double seconds) { handshake_seconds_[idx(role)]->Observe(seconds); }
  void rejection(Role role, RejectionLabel reason) {
    rejections_[idx(role) * kRejections + idx(reason)]->Increment();
  }
  void fallback(FallbackReason reason, bool direct) {
    fallbacks_[idx(reason) * 2 + (direct ? 0 : 1)]->Increment();
  }
  // A preloaded connection handed on, by the data path between the application and us.
  enum class PreloadPath { kUnixStream, kSharedMemory };
  void preloadConnection(PreloadPath path) {
    preload_connections_[static_cast<std::size_t>(path)]->Increment();
  }
  // The shim asked for shared memory and got the Unix stream: at the per-worker limit, or the
  // memory, eventfd or SCM_RIGHTS message failed.
  enum class ShmDeclined { kLimit, kError };
  void shmDeclined(ShmDeclined why) { shm_declined_[static_cast<std::size_t>(why)]->Increment(); }
  enum class CaptureRefusal { kLoop, kNoOriginalDestination, kBadPreamble };
  void captureRefused(CaptureRefusal why) {
    capture_refusals_[static_cast<std::size_t>(why)]->Increment();
  }
  void acceptError(bool tunnel) { accept_errors_[tunnel ? 1 : 0]->Increment(); }
  void spliceDisabled() { splice_disabled_->Increment(); }
  // The buffer memory budget ([relay] buffer_memory): bytes held now (all workers update it),
  // its limit, flows that waited for it, connections refused for want of it.
  prometheus::Gauge& bufferMemory() { return *buffer_memory_; }
  void bufferMemoryLimit(std::uint64_t bytes) {
    buffer_memory_limit_->Set(static_cast<double>(bytes));
  }
  void memoryWait() { memory_waits_->Increment(); }
  void memoryRefused(Role role) { memory_refusals_[idx(role)]->Increment(); }
  void tunnelReused(Role role) { tunnel_reuses_[idx(role)]->Increment(); }
  // The kernel relay (kernel_relay.h): whether this sidecar has it, directions handed to it
  // (and those it moves now), hand-overs it refused.
  void kernelRelayUp(bool up) { kernel_relay_up_->Set(up ? 1 : 0); }
  void kernelRelayAttached(Direction d) {
    kernel_relay_flows_[idx(d)]->Increment();
    kernel_relay_active_->Increment();
  }
  void kernelRelayDetached() { kernel_relay_active_->Decrement(); }
  void kernelRelayHandedBack() { kernel_relay_handbacks_->Increment(); }
  enum class KernelRelayRefusal { kNotRelayable, kFull, kMemory, kError, kCount };
  void kernelRelayRefused(KernelRelayRefusal why) { kernel_relay_refusals_[idx(why)]->Increment(); }

  // Policy. Any thread.
  RuleMetrics& rule(std::string_view name);
  void policyLoaded(std::uint64_t version) { policy_version_->Set(static_cast<double>(version)); }
  void policyReload(bool ok) { policy_reloads_[ok ? 0 : 1]->Increment(); }
  void breaker(std::size_t stack, BreakerState state) {
    breaker_transitions_[stack * 3 + idx(state)]->Increment();
  }

 private:
  template <class E>
  static std::size_t idx(E e) {
    return static_cast<std::size_t>(e);
  }
  static constexpr std::size_t kOutcomes = static_cast<std::size_t>(Outcome::kCount);
  static constexpr std::size_t kRejections = static_cast<std::size_t>(RejectionLabel::kCount);

  std::shared_ptr<prometheus::Registry> registry_;
  std::size_t stack_count_;
  std::vector<prometheus::Counter*> connections_;
  std::array<prometheus::Gauge*, 2> active_{};
  std::vector<prometheus::Counter*> bytes_;
  std::array<prometheus::Counter*, 2> pauses_{};
  std::array<prometheus::Histogram*, 2> handshake_seconds_{};
  std::vector<prometheus::Counter*> rejections_;
  std::vector<prometheus::Counter*> fallbacks_;
  std::array<prometheus::Counter*, 3> capture_refusals_{};
  std::array<prometheus::Counter*, 2> preload_connections_{};
  std::array<prometheus::Counter*, 2> shm_declined_{};
  std::array<prometheus::Counter*, 2> accept_errors_{};
  prometheus::Counter* splice_disabled_ = nullptr;
  prometheus::Gauge* buffer_memory_ = nullptr;
  prometheus::Gauge* buffer_memory_limit_ = nullptr;
  prometheus::Counter* memory_waits_ = nullptr;
  std::array<prometheus::Counter*, 2> memory_refusals_{};
  std::array<prometheus::Counter*, 2> tunnel_reuses_{};
  prometheus::Gauge* kernel_relay_up_ = nullptr;
  prometheus::Gauge* kernel_relay_active_ = nullptr;
  prometheus::Counter* kernel_relay_handbacks_ = nullptr;
  std::array<prometheus::Counter*, 2> kernel_relay_flows_{};
  std::array<prometheus::Counter*, 4> kernel_relay_refusals_{};
  std::vector<std::string> stack_names_;
  prometheus::Gauge* policy_version_ = nullptr;
  std::array<prometheus::Counter*, 2> policy_reloads_{};
  prometheus::Family<prometheus::Counter>* decisions_family_ = nullptr;
  prometheus::Family<prometheus::Counter>* attempts_family_ = nullptr;
  prometheus::Family<prometheus::Counter>* rule_fallbacks_family_ = nullptr;
  std::vector<prometheus::Counter*> breaker_transitions_;
  std::mutex rules_mutex_;
  std::map<std::string, std::unique_ptr<RuleMetrics>, std::less<>> rules_;
};

}  // namespace dmm::proxy
