// Two rdma instances in one process, on the guest's Soft-RoCE device (192.168.77.1 and .2): the
// responder's hand-over of a data connection to the session that expects it. Runs in the
// tests/rdma guest (label rdma), one guest per test.

#include <event2/event.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "stacks/rdma/rdma_stack.h"

namespace dmm::stacks::rdma {
namespace {

using namespace std::chrono_literals;

struct Recorder : DataAcceptor {
  std::vector<std::unique_ptr<StackConnection>> taken;
  void onDataConnection(std::unique_ptr<StackConnection> conn) override {
    taken.push_back(std::move(conn));
  }
};

struct Initiator : ConnectionCallbacks {
  bool connected = false;
  bool failed = false;
  void onConnected(StackConnection&) override { connected = true; }
  void onConnectFailed(StackConnection&, Error) override { failed = true; }
  void onReadable(StackConnection&) override {}
  void onWritable(StackConnection&) override {}
};

double accepted(const RdmaStack& stack) {
  std::vector<StackSample> samples;
  stack.samples(samples);
  for (const auto& s : samples) {
    if (std::strcmp(s.name, "dmm_sidecar_rdma_data_connections_total") == 0 &&
        s.label_value != nullptr && std::strcmp(s.label_value, "accepted") == 0)
      return s.value;
  }
  return -1;
}

// Runs both loops (the responder's worker and the initiator's) by hand until `done` or `limit`.
template <typename Pred>
bool spinUntil(EventLoop& a, EventLoop& b, Pred done, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    event_base_loop(a.base(), EVLOOP_NONBLOCK);
    if (done()) return true;
    event_base_loop(b.base(), EVLOOP_NONBLOCK);
    if (done()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
}

RdmaOptions options(const char* address) {
  RdmaOptions o;
  o.address = *IpAddress::parse(address);
  o.max_connections = 16;
  o.ring_size = 64 * 1024;
  return o;
}

// Regression (the dpdk stack's soak crash, the same hole here): once the worker had claimed the
// expectation and accepted the connection, a session that gave up before ESTABLISHED cancelled
// nothing (the expectation was gone from the table), was deleted, and ESTABLISHED then handed
// the connection to the deleted session.
TEST(RdmaStackPair, ACancelledExpectationNeverReachesItsAcceptorEvenOnceAccepted) {
  RdmaStack responder("r", options("192.168.77.2"));
  RdmaStack initiator("i", options("192.168.77.1"));
  responder.start();
  initiator.start();
  ASSERT_TRUE(responder.healthy()) << responder.status();
  ASSERT_TRUE(initiator.healthy()) << initiator.status();
  EventLoop worker_loop;  // the responder's worker
  EventLoop initiator_loop;
  const auto advertised = initiator.advertise();

  // The hand-over itself works.
  Recorder kept;
  SessionToken token1{};
  token1.fill(0x11);
  auto params1 = responder.expectData(worker_loop, token1, advertised, kept);
  ASSERT_TRUE(static_cast<bool>(params1)) << params1.error().reason;
  Initiator cb1;
  auto conn1 = initiator.connectData(initiator_loop, *params1, token1, cb1);
  ASSERT_TRUE(static_cast<bool>(conn1)) << conn1.error().reason;
  ASSERT_TRUE(spinUntil(
      worker_loop, initiator_loop, [&] { return kept.taken.size() == 1 && cb1.connected; }, 20s))
      << "taken " << kept.taken.size() << ", connected " << cb1.connected << ", failed "
      << cb1.failed;

  // The session gives up after its worker accepted the connection, before ESTABLISHED.
  Recorder gone;
  SessionToken token2{};
  token2.fill(0x22);
  auto params2 = responder.expectData(worker_loop, token2, advertised, gone);
  ASSERT_TRUE(static_cast<bool>(params2)) << params2.error().reason;
  Initiator cb2;
  auto conn2 = initiator.connectData(initiator_loop, *params2, token2, cb2);
  ASSERT_TRUE(static_cast<bool>(conn2)) << conn2.error().reason;
  ASSERT_TRUE(spinUntil(
      worker_loop, initiator_loop, [&] { return accepted(responder) == 2 || cb2.failed; }, 20s));
  ASSERT_FALSE(cb2.failed);
  EXPECT_TRUE(gone.taken.empty()) << "ESTABLISHED came in the same loop turn as the accept";
  responder.cancelData(worker_loop, token2);
  spinUntil(
      worker_loop, initiator_loop, [] { return false; }, 1s);
  EXPECT_TRUE(gone.taken.empty()) << "a cancelled session was handed a data connection";

  (*conn1)->close(CloseType::kAbort);
  (*conn2)->close(CloseType::kAbort);
  for (auto& c : kept.taken)
    c->close(CloseType::kAbort);
  spinUntil(
      worker_loop, initiator_loop, [] { return false; }, 200ms);
}

}  // namespace
}  // namespace dmm::stacks::rdma
