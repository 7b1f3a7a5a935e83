#pragma once
// Fault injection: makes a stack instance misbehave on purpose, so that tests (and operators
// rehearsing an incident) can watch fallback, timeouts, resets and metrics do their job.
// Off by default; armed per stack instance by [[fault]] tables in the config or at run time by
// `dmm-sidecar ctl fault set|clear|show` (docs/config.md#fault, docs/admin.md).
//
//   fail_connect     the instance's connects fail: refused / unreachable at once, or never
//                    complete (timeout: the attempt timer ends them). For stacks with a data
//                    connection of their own, the data connection fails too (failed_data_path).
//   drop_handshake   the initiator's HELLO is lost on the way: the peer never sees it, and the
//                    session ends as a silent peer does (peer_closed or peer_timeout)
//   reset            a relayed connection over the instance is reset after reset_after bytes
//   stall            a relayed connection over the instance stops moving bytes in a direction
//                    after stall_after bytes; only the idle timeout ends it
//
// Each fault has a probability (0 = off, 1 = every time), drawn per connection. Connect and
// handshake faults apply to attempts started while armed; reset and stall to relays started
// while armed (a relayed connection is wrapped then, and never spliced: every byte passes the
// fault's counter). Every injection is counted: dmm_sidecar_faults_injected_total{stack,fault};
// dmm_sidecar_fault_probability{stack,fault} shows what is armed.
//
// Thread safety: plans are set from any thread (config at start, the admin socket on the main
// loop) and read by the workers; nothing is read on the data path while nothing is armed.

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/event_loop.h"
#include "proxy/fault_plan.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class FaultInjector {
 public:
  FaultInjector(const std::vector<std::string>& stack_names, prometheus::Registry& registry);

  // Arms (or, with an all-zero plan, disarms) `stack`'s faults. Any thread.
  void set(std::size_t stack, const FaultPlan& plan);
  FaultPlan plan(std::size_t stack) const;
  // True when any stack has a fault armed (the only thing read while none is).
  bool armed() const { return armed_.load(std::memory_order_relaxed); }

  // Draws whether `fault` strikes this connection of `stack`; counts it when it does.
  bool strike(std::size_t stack, Fault fault);
  // The connect failure `stack` injects (after strike(kFailConnect)).
  ConnectFailure connectFailure(std::size_t stack) const;
  // A relay is about to carry `conn` over `stack`: when a reset or a stall strikes, returns
  // `conn` wrapped in the fault; otherwise `conn` itself.
  // `loop` is the relay's.
  std::unique_ptr<stacks::StackConnection> wrapRelayed(
      EventLoop& loop, std::size_t stack, std::unique_ptr<stacks::StackConnection> conn);

 private:
  struct PerStack {
    FaultPlan plan;
    std::array<prometheus::Counter*, static_cast<std::size_t>(Fault::kCount)> injected{};
    std::array<prometheus::Gauge*, static_cast<std::size_t>(Fault::kCount)> probability{};
  };
  bool draw(double p);

  mutable std::mutex mu_;
  std::vector<PerStack> stacks_;
  std::atomic<bool> armed_{false};
};

}  // namespace dmm::proxy
