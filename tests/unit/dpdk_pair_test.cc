// Two dpdk instances in one process, joined by a memif pair (no kernel, no namespace): the
// responder's hand-over of a data connection to the session that expects it.

#include <event2/event.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "stacks/dpdk/dpdk_stack.h"
#include "stacks/dpdk/instance.h"

namespace dmm::stacks::dpdk {
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

template <typename Pred>
bool waitFor(Pred pred, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Runs what is ready on `loop` (the worker's side of the instance's queue) for `span`.
void spin(EventLoop& loop, std::chrono::milliseconds span) {
  auto end = std::chrono::steady_clock::now() + span;
  while (std::chrono::steady_clock::now() < end) {
    event_base_loop(loop.base(), EVLOOP_NONBLOCK);
    std::this_thread::sleep_for(1ms);
  }
}

class DpdkPair : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "the DPDK EAL needs root here";
    char tmpl[] = "/tmp/dmm-dpdk-pair-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const std::string sock = dir_ + "/memif.sock";
    auto options = [&](const char* port, const char* address) {
      DpdkOptions o;
      o.port = std::string(port) + ",socket=" + sock + ",socket-abstract=no";
      o.address = *IpAddress::parse(address);
      o.max_connections = 16;
      o.mbufs = 4095;
      o.rx_descriptors = o.tx_descriptors = 256;
      return o;
    };
    responder_ = std::make_unique<DpdkStack>("r", options("net_memif0,role=server", "10.77.0.2"));
    initiator_ = std::make_unique<DpdkStack>("i", options("net_memif1,role=client", "10.77.0.1"));
    responder_->start();
    initiator_->start();
    ASSERT_TRUE(responder_->healthy()) << responder_->status();
    ASSERT_TRUE(initiator_->healthy()) << initiator_->status();
    ASSERT_TRUE(waitFor(
        [&] { return responder_->instance()->linkUp() && initiator_->instance()->linkUp(); }, 10s))
        << "the memif link did not come up";
  }
  void TearDown() override {
    initiator_.reset();
    responder_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // The initiator opens a data connection presenting `token`; returns once the responder's poll
  // thread matched the token (counted accepted) and queued the connection for `loop`'s worker,
  // which has not run yet.
  std::unique_ptr<StackConnection> present(EventLoop& initiator_loop, const SessionToken& token,
                                           std::span<const std::uint8_t> params, Initiator& cb) {
    const auto before = responder_->instance()->counters().accepted.load();
    auto conn = initiator_->connectData(initiator_loop, params, token, cb);
    EXPECT_TRUE(static_cast<bool>(conn));
    if (!conn) return nullptr;
    EXPECT_TRUE(waitFor(
        [&] { return responder_->instance()->counters().accepted.load() == before + 1; }, 10s))
        << "the responder never matched the token";
    return std::move(*conn);
  }

  std::string dir_;
  std::unique_ptr<DpdkStack> responder_;
  std::unique_ptr<DpdkStack> initiator_;
};

// Regression (found by the soak test: a SIGSEGV in InboundSession::startRelay): the poll thread
// took the expectation out of the table when the token arrived, so a session that gave up in the
// moment before its worker ran (its control connection reset) cancelled nothing, was deleted, and
// the worker then handed the connection to the deleted session.
TEST_F(DpdkPair, ACancelledExpectationNeverReachesItsAcceptorEvenOnceMatched) {
  EventLoop worker_loop;  // the responder's worker: run by hand below
  EventLoop initiator_loop;
  const auto advertised = initiator_->advertise();

  // First the hand-over itself works: the acceptor gets the connection it expects.
  Recorder kept;
  SessionToken token1{};
  token1.fill(0x11);
  auto params1 = responder_->expectData(worker_loop, token1, advertised, kept);
  ASSERT_TRUE(static_cast<bool>(params1)) << params1.error().reason;
  Initiator cb1;
  auto conn1 = present(initiator_loop, token1, *params1, cb1);
  ASSERT_NE(conn1, nullptr);
  spin(worker_loop, 200ms);
  ASSERT_EQ(kept.taken.size(), 1u);

  // Now the session gives up after the token matched but before its worker took the connection.
  Recorder gone;
  SessionToken token2{};
  token2.fill(0x22);
  auto params2 = responder_->expectData(worker_loop, token2, advertised, gone);
  ASSERT_TRUE(static_cast<bool>(params2)) << params2.error().reason;
  Initiator cb2;
  auto conn2 = present(initiator_loop, token2, *params2, cb2);
  ASSERT_NE(conn2, nullptr);
  responder_->cancelData(worker_loop, token2);
  spin(worker_loop, 200ms);
  EXPECT_TRUE(gone.taken.empty()) << "a cancelled session was handed a data connection";

  // Nothing of either stays expected: the table has room for max_connections new ones.
  std::vector<std::unique_ptr<Recorder>> more;
  for (int i = 0; i < 16; ++i) {
    SessionToken t{};
    t.fill(static_cast<std::uint8_t>(0x40 + i));
    more.push_back(std::make_unique<Recorder>());
    auto p = responder_->expectData(worker_loop, t, advertised, *more.back());
    ASSERT_TRUE(static_cast<bool>(p)) << "expectation " << i << ": " << p.error().reason;
  }
  for (int i = 0; i < 16; ++i) {
    SessionToken t{};
    t.fill(static_cast<std::uint8_t>(0x40 + i));
    responder_->cancelData(worker_loop, t);
  }

  conn1->close(CloseType::kAbort);
  conn2->close(CloseType::kAbort);
  for (auto& c : kept.taken)
    c->close(CloseType::kAbort);
  spin(worker_loop, 50ms);
  spin(initiator_loop, 50ms);
}

}  // namespace
}  // namespace dmm::stacks::dpdk
