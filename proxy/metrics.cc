#include "proxy/metrics.h"

namespace dmm::proxy {

const char* roleName(Role r) {
  switch (r) {
    case Role::kOutbound:
      return "outbound";
    case Role::kInbound:
      return "inbound";
    default:
      return "unknown";
  }
}

const char* outcomeName(Outcome o) {
  switch (o) {
    case Outcome::kClosed:
      return "closed";
    case Outcome::kReset:
      return "reset";
    case Outcome::kIdleTimeout:
      return "idle_timeout";
    case Outcome::kHalfClosedTimeout:
      return "half_closed_timeout";
    case Outcome::kConnectFailed:
      return "connect_failed";
    case Outcome::kRefused:
      return "refused";
    case Outcome::kError:
      return "error";
    case Outcome::kShutdown:
      return "shutdown";
    default:
      return "unknown";
  }
}

const char* fallbackReasonName(FallbackReason r) {
  switch (r) {
    case FallbackReason::kPeerRefused:
      return "peer_refused";
    case FallbackReason::kPeerTimeout:
      return "peer_timeout";
    case FallbackReason::kPeerUnreachable:
      return "peer_unreachable";
    case FallbackReason::kPeerClosed:
      return "peer_closed";
    case FallbackReason::kPeerProtocolError:
      return "peer_protocol_error";
    case FallbackReason::kPeerUnsupportedVersion:
      return "peer_unsupported_version";
    case FallbackReason::kPeerNoCommonStack:
      return "peer_no_common_stack";
    case FallbackReason::kPeerOverloaded:
      return "peer_overloaded";
    case FallbackReason::kCachedNoSidecar:
      return "cached_no_sidecar";
    case FallbackReason::kBreakerOpen:
      return "breaker_open";
    case FallbackReason::kDataPathFailed:
      return "data_path_failed";
    case FallbackReason::kStackDown:
      return "stack_down";
    default:
      return "unknown";
  }
}

const char* attemptOutcomeName(AttemptOutcome o) {
  switch (o) {
    case AttemptOutcome::kWon:
      return "won";
    case AttemptOutcome::kLostRace:
      return "lost_race";
    case AttemptOutcome::kFailedRefused:
      return "failed_refused";
    case AttemptOutcome::kFailedTimeout:
      return "failed_timeout";
    case AttemptOutcome::kFailedUnreachable:
      return "failed_unreachable";
    case AttemptOutcome::kFailedClosed:
      return "failed_closed";
    case AttemptOutcome::kRejected:
      return "rejected";
    case AttemptOutcome::kSkippedBreaker:
      return "skipped_breaker_open";
    case AttemptOutcome::kSkippedDown:
      return "skipped_down";
    case AttemptOutcome::kFailedDataPath:
      return "failed_data_path";
    default:
      return "unknown";
  }
}

const char* rejectionLabelName(RejectionLabel r) {
  switch (r) {
    case RejectionLabel::kMalformed:
      return "malformed";
    case RejectionLabel::kUnsupportedVersion:
      return "unsupported_version";
    case RejectionLabel::kAuthFailed:
      return "auth_failed";
    case RejectionLabel::kStale:
      return "stale";
    case RejectionLabel::kReplayed:
      return "replayed";
    case RejectionLabel::kDestinationNotAllowed:
      return "destination_not_allowed";
    case RejectionLabel::kDestinationUnreachable:
      return "destination_unreachable";
    case RejectionLabel::kNoCommonStack:
      return "no_common_stack";
    case RejectionLabel::kOverloaded:
      return "overloaded";
    case RejectionLabel::kTooLarge:
      return "too_large";
    case RejectionLabel::kBadMagic:
      return "bad_magic";
    case RejectionLabel::kTimeout:
      return "timeout";
    default:
      return "unknown";
  }
}

Metrics::Metrics(const std::vector<std::string>& stack_names, const std::string& version,
                 const std::string& commit)
    : registry_(std::make_shared<prometheus::Registry>()), stack_count_(stack_names.size()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  std::vector<std::string> stacks = stack_names;
  stacks.emplace_back("direct");
  stacks.emplace_back("none");  // last: it has connection counts but never bytes
  constexpr auto kRoles = static_cast<std::size_t>(Role::kCount);

  BuildGauge()
      .Name("dmm_sidecar_build_info")
      .Help("Build information; always 1.")
      .Register(*registry_)
      .Add({{"version", version}, {"commit", commit}})
      .Set(1);

  auto& connections = BuildCounter()
                          .Name("dmm_sidecar_connections_total")
                          .Help("Connections ended, by role, carrying stack and outcome.")
                          .Register(*registry_);
  auto& bytes = BuildCounter()
                    .Name("dmm_sidecar_relay_bytes_total")
                    .Help(
                        "Bytes relayed, by role, carrying stack and direction "
                        "(upstream: client to server).")
                    .Register(*registry_);
  for (std::size_t r = 0; r < kRoles; ++r) {
    const char* role = roleName(static_cast<Role>(r));
    for (std::size_t i = 0; i < stacks.size(); ++i) {
      const std::string& stack = stacks[i];
      for (std::size_t o = 0; o < kOutcomes; ++o) {
        connections_.push_back(&connections.Add(
            {{"role", role}, {"stack", stack}, {"outcome", outcomeName(static_cast<Outcome>(o))}}));
      }
      if (i == noStack()) continue;
      bytes_.push_back(&bytes.Add({{"role", role}, {"stack", stack}, {"direction", "upstream"}}));
      bytes_.push_back(&bytes.Add({{"role", role}, {"stack", stack}, {"direction", "downstream"}}));
    }
  }

  auto& active = BuildGauge()
                     .Name("dmm_sidecar_active_connections")
                     .Help("Connections currently relayed, by role.")
                     .Register(*registry_);
  auto& handshake = BuildHistogram()
                        .Name("dmm_sidecar_handshake_duration_seconds")
                        .Help(
                            "Time from accepting a connection to the start of its relay "
                            "(outbound: includes the onward connect; inbound: includes "
                            "delivering to the local server).")
                        .Register(*registry_);
  const prometheus::Histogram::BucketBoundaries buckets = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
  auto& rejections = BuildCounter()
                         .Name("dmm_sidecar_handshake_rejections_total")
                         .Help(
                             "Handshakes rejected: inbound ones this sidecar refused, outbound "
                             "ones a peer refused, by reason.")
                         .Register(*registry_);
  for (std::size_t r = 0; r < kRoles; ++r) {
    const char* role = roleName(static_cast<Role>(r));
    active_[r] = &active.Add({{"role", role}});
    handshake_seconds_[r] = &handshake.Add({{"role", role}}, buckets);
    for (std::size_t reason = 0; reason < kRejections; ++reason) {
      rejections_.push_back(&rejections.Add(
          {{"role", role}, {"reason", rejectionLabelName(static_cast<RejectionLabel>(reason))}}));
    }
  }

  auto& pauses = BuildCounter()
                     .Name("dmm_sidecar_relay_pauses_total")
                     .Help(
                         "Times a relay direction stopped reading because its buffer reached "
                         "the high watermark.")
                     .Register(*registry_);
  pauses_[0] = &pauses.Add({{"direction", "upstream"}});
  pauses_[1] = &pauses.Add({{"direction", "downstream"}});

  auto& fallbacks = BuildCounter()
                        .Name("dmm_sidecar_fallbacks_total")
                        .Help(
                            "Captured connections that could not use the peer sidecar, by "
                            "reason and what was done (direct connection or refusal).")
                        .Register(*registry_);
  for (std::size_t r = 0; r < static_cast<std::size_t>(FallbackReason::kCount); ++r) {
    const char* reason = fallbackReasonName(static_cast<FallbackReason>(r));
    fallbacks_.push_back(&fallbacks.Add({{"reason", reason}, {"action", "direct"}}));
    fallbacks_.push_back(&fallbacks.Add({{"reason", reason}, {"action", "refuse"}}));
  }

  auto& capture = BuildCounter()
                      .Name("dmm_sidecar_capture_refusals_total")
                      .Help("Captured connections refused before any handshake, by reason.")
                      .Register(*registry_);
  capture_refusals_[0] = &capture.Add({{"reason", "loop"}});
  capture_refusals_[1] = &capture.Add({{"reason", "no_original_destination"}});
  capture_refusals_[2] = &capture.Add({{"reason", "bad_preamble"}});

  auto& preload = BuildCounter()
                      .Name("dmm_sidecar_preload_connections_total")
                      .Help(
                          "Connections the LD_PRELOAD shim handed over, by the data path between "
                          "the application and the sidecar.")
                      .Register(*registry_);
  preload_connections_[0] = &preload.Add({{"data_path", "unix_stream"}});
  preload_connections_[1] = &preload.Add({{"data_path", "shared_memory"}});
  auto& declined = BuildCounter()
                       .Name("dmm_sidecar_preload_shm_declined_total")
                       .Help(
                           "Shim requests for shared memory answered with the Unix stream, by "
                           "reason.")
                       .Register(*registry_);
  shm_declined_[0] = &declined.Add({{"reason", "limit"}});
  shm_declined_[1] = &declined.Add({{"reason", "error"}});

  auto& accept_errors = BuildCounter()
                            .Name("dmm_sidecar_accept_errors_total")
                            .Help("accept() failures (e.g. out of file descriptors), by listener.")
                            .Register(*registry_);
  accept_errors_[0] = &accept_errors.Add({{"listener", "capture"}});
  accept_errors_[1] = &accept_errors.Add({{"listener", "tunnel"}});

  auto& reuses = BuildCounter()
                     .Name("dmm_sidecar_tunnel_reuses_total")
                     .Help(
                         "Sessions carried on a sidecar-to-sidecar connection an earlier "
                         "session had used (framing v1), by role.")
                     .Register(*registry_);
  tunnel_reuses_[0] = &reuses.Add({{"role", "outbound"}});
  tunnel_reuses_[1] = &reuses.Add({{"role", "inbound"}});

  kernel_relay_up_ = &BuildGauge()
                          .Name("dmm_sidecar_kernel_relay_up")
                          .Help(
                              "1 when the kernel relay (BPF sockmap) moves long-lived "
                              "connections' bytes; 0 when this sidecar relays them all itself "
                              "(its log says why).")
                          .Register(*registry_)
                          .Add({});
  auto& kernel_flows = BuildCounter()
                           .Name("dmm_sidecar_kernel_relay_flows_total")
                           .Help("Relay directions handed to the kernel relay, by direction.")
                           .Register(*registry_);
  kernel_relay_flows_[0] = &kernel_flows.Add({{"direction", "upstream"}});
  kernel_relay_flows_[1] = &kernel_flows.Add({{"direction", "downstream"}});
  kernel_relay_active_ = &BuildGauge()
                              .Name("dmm_sidecar_kernel_relay_active_flows")
                              .Help("Relay directions the kernel relay moves now.")
                              .Register(*registry_)
                              .Add({});
  kernel_relay_handbacks_ = &BuildCounter()
                                 .Name("dmm_sidecar_kernel_relay_handbacks_total")
                                 .Help(
                                     "Relay directions the kernel relay gave back to the workers "
                                     "because their destination stopped taking bytes (a slow "
                                     "reader used up the direction's window).")
                                 .Register(*registry_)
                                 .Add({});
  auto& kernel_refusals =
      BuildCounter()
          .Name("dmm_sidecar_kernel_relay_refusals_total")
          .Help(
              "Relay directions the kernel relay did not take, by reason: "
              "not_relayable (not TCP, or already at its end), full "
              "(relay.kernel_relay_max), memory (the half of relay.buffer_memory "
              "windows may hold is used up), error.")
          .Register(*registry_);
  kernel_relay_refusals_[0] = &kernel_refusals.Add({{"reason", "not_relayable"}});
  kernel_relay_refusals_[1] = &kernel_refusals.Add({{"reason", "full"}});
  kernel_relay_refusals_[2] = &kernel_refusals.Add({{"reason", "memory"}});
  kernel_relay_refusals_[3] = &kernel_refusals.Add({{"reason", "error"}});

  splice_disabled_ = &BuildCounter()
                          .Name("dmm_sidecar_splice_disabled_total")
                          .Help("Relays that fell back from splice() to read/write copies.")
                          .Register(*registry_)
                          .Add({});

  buffer_memory_ = &BuildGauge()
                        .Name("dmm_sidecar_buffer_memory_bytes")
                        .Help(
                            "Bytes the relays' copy buffers and splice pipes hold now (a pipe "
                            "counts its full size), with the kernel relay's windows, against "
                            "[relay] buffer_memory.")
                        .Register(*registry_)
                        .Add({});
  buffer_memory_limit_ = &BuildGauge()
                              .Name("dmm_sidecar_buffer_memory_limit_bytes")
                              .Help(
                                  "[relay] buffer_memory as the workers share it (0: no "
                                  "limit).")
                              .Register(*registry_)
                              .Add({});
  memory_waits_ = &BuildCounter()
                       .Name("dmm_sidecar_buffer_memory_waits_total")
                       .Help(
                           "Times a relay direction stopped reading until buffer memory was "
                           "returned (the budget was used up).")
                       .Register(*registry_)
                       .Add({});
  auto& memory_refusals = BuildCounter()
                              .Name("dmm_sidecar_buffer_memory_refusals_total")
                              .Help(
                                  "New connections refused because the buffer memory budget was "
                                  "used up, by role (inbound: the session was rejected as "
                                  "overloaded).")
                              .Register(*registry_);
  memory_refusals_[0] = &memory_refusals.Add({{"role", "outbound"}});
  memory_refusals_[1] = &memory_refusals.Add({{"role", "inbound"}});

  stack_names_ = stack_names;
  policy_version_ = &BuildGauge()
                         .Name("dmm_sidecar_policy_version")
                         .Help(
                             "Version of the policy snapshot in force (1 at start, +1 per "
                             "successful reload).")
                         .Register(*registry_)
                         .Add({});
  auto& reloads = BuildCounter()
                      .Name("dmm_sidecar_policy_reloads_total")
                      .Help(
                          "Policy reloads by result: success (swapped in) or failure (invalid, "
                          "the old policy stays).")
                      .Register(*registry_);
  policy_reloads_[0] = &reloads.Add({{"result", "success"}});
  policy_reloads_[1] = &reloads.Add({{"result", "failure"}});
  decisions_family_ = &BuildCounter()
                           .Name("dmm_sidecar_policy_decisions_total")
                           .Help(
                               "Connections classified, by role and the rule that decided "
                               "(\"default\" when none matched).")
                           .Register(*registry_);
  attempts_family_ = &BuildCounter()
                          .Name("dmm_sidecar_stack_attempts_total")
                          .Help(
                              "Candidate stack attempts toward peer sidecars, by rule, stack "
                              "instance and outcome.")
                          .Register(*registry_);
  rule_fallbacks_family_ = &BuildCounter()
                                .Name("dmm_sidecar_policy_fallbacks_total")
                                .Help(
                                    "Connections that bypassed the peer sidecar, by rule and "
                                    "reason.")
                                .Register(*registry_);
  auto& breakers = BuildCounter()
                       .Name("dmm_sidecar_breaker_transitions_total")
                       .Help(
                           "Circuit breaker transitions (per peer and stack instance), by "
                           "stack instance and the state entered.")
                       .Register(*registry_);
  for (const auto& name : stack_names) {
    for (const char* state : {"open", "half_open", "closed"})
      breaker_transitions_.push_back(&breakers.Add({{"stack", name}, {"state", state}}));
  }
}

RuleMetrics& Metrics::rule(std::string_view name) {
  std::lock_guard lock(rules_mutex_);
  auto it = rules_.find(name);
  if (it != rules_.end()) return *it->second;
  auto m = std::make_unique<RuleMetrics>();
  std::string rule(name);
  for (Role r : {Role::kOutbound, Role::kInbound})
    m->decisions[idx(r)] = &decisions_family_->Add({{"role", roleName(r)}, {"rule", rule}});
  for (const auto& stack : stack_names_) {
    for (std::size_t o = 0; o < static_cast<std::size_t>(AttemptOutcome::kCount); ++o) {
      m->attempts.push_back(&attempts_family_->Add(
          {{"rule", rule},
           {"stack", stack},
           {"outcome", attemptOutcomeName(static_cast<AttemptOutcome>(o))}}));
    }
  }
  for (std::size_t r = 0; r < static_cast<std::size_t>(FallbackReason::kCount); ++r) {
    m->fallbacks.push_back(&rule_fallbacks_family_->Add(
        {{"rule", rule}, {"reason", fallbackReasonName(static_cast<FallbackReason>(r))}}));
  }
  return *rules_.emplace(std::move(rule), std::move(m)).first->second;
}

}  // namespace dmm::proxy
