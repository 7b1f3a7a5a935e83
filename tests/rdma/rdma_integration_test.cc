// The rdma stack kind end to end, on real Soft-RoCE: run inside the guest of tests/rdma/
// (run-in-vm.sh), whose rxe0 device sits on a dummy interface carrying two addresses, one per
// "host". Soft-RoCE in the guest's kernel works only in its initial network namespace, so both
// sidecars, the client and the server share it: sidecar A (192.168.77.1) takes the client's
// connection on a [[forward]] listener and hands it to sidecar B (192.168.77.2) over its tunnel
// port; the handshake runs on kernel TCP, the data on an RC queue pair between their rd0
// instances. Both offer rd0 first, then the kernel. The metrics prove which stack carried what.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <regex>
#include <thread>

#include "testbed/metrics_reference.h"
#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kKey = "rdma-integration-test-key-0123456";
constexpr std::uint64_t k64MiB = 64ull << 20;

std::string env(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

class RdmaPair : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(::access("/sys/class/infiniband", F_OK), 0)
        << "no RDMA device here: run this through tests/rdma/run-in-vm.sh (ctest -L rdma)";
  }

  void TearDown() override {
    if (HasFailure()) {
      for (auto* s : {a_.get(), b_.get()})
        if (s != nullptr) std::cerr << "---- " << s->configPath() << "\n" << s->log() << "\n";
    }
    a_.reset();
    b_.reset();
  }

  // One sidecar: capture off, its tunnel on its own address, its metrics on `metrics`, the
  // stacks given (rd0 then kernel by default) and A's forward listeners.
  std::string config(const std::string& ip, const std::string& metrics, const std::string& stacks,
                     bool forwards) {
    std::string text = std::string("[security]\npsk = \"") + kKey +
                       "\"\n\n[timeouts]\nconnect = \"6s\"\nhandshake = \"6s\"\n\n"
                       "[capture]\nenabled = false\n\n[tunnel]\nlisten = [\"" +
                       ip + ":17002\"]\n\n" + stacks;
    if (forwards) {
      for (int i = 0; i < 3; ++i)
        text += "[[forward]]\nlisten = \"127.0.0.1:" + std::to_string(15000 + i) +
                "\"\ndestination = \"" + ipB() + ":" + std::to_string(9000 + i) + "\"\n\n";
    }
    std::string full = sidecarConfig(text);
    auto at = full.find("127.0.0.1:17090");
    full.replace(at, std::strlen("127.0.0.1:17090"), metrics);
    return full;
  }
  static std::string rdmaStacks(const std::string& address, const std::string& extra = {}) {
    return "[[stack]]\nname = \"rd0\"\nkind = \"rdma\"\naddress = \"" + address +
           "\"\nport = 7401\nmax_connections = 512\n" + extra +
           "\n[[stack]]\nname = \"kernel\"\nkind = \"kernel\"\n\n";
  }
  void startB(const std::string& stacks) {
    b_ = std::make_unique<SidecarProcess>(*ns_, config(ipB(), "127.0.0.1:17092", stacks, false),
                                          "b");
  }
  void startA(const std::string& stacks) {
    a_ =
        std::make_unique<SidecarProcess>(*ns_, config(ipA(), "127.0.0.1:17091", stacks, true), "a");
  }
  void startBoth() {
    startB(rdmaStacks(ipB()));
    startA(rdmaStacks(ipA()));
  }
  static std::string ipA() { return env("RDMAVM_IP_A", "192.168.77.1"); }
  static std::string ipB() { return env("RDMAVM_IP_B", "192.168.77.2"); }
  // The server behind B, and where the client connects for it (A's forward listener).
  static SocketAddress server(int i) {
    return at(ipB().c_str(), static_cast<std::uint16_t>(9000 + i));
  }
  static SocketAddress via(int i) { return at("127.0.0.1", static_cast<std::uint16_t>(15000 + i)); }

  double metric(SidecarProcess& s, const std::string& name,
                const std::map<std::string, std::string>& labels) {
    return s.metric(name, labels).value_or(-1);
  }
  bool waitMetric(SidecarProcess& s, const std::string& name,
                  const std::map<std::string, std::string>& labels, double want,
                  std::chrono::milliseconds within = 20s) {
    return eventually([&] { return s.metric(name, labels).value_or(-1) >= want; }, within);
  }

  std::unique_ptr<Netns> ns_ = Netns::current();
  std::unique_ptr<SidecarProcess> b_;
  std::unique_ptr<SidecarProcess> a_;
};

TEST_F(RdmaPair, Transfers64MiBEachWayByteExact) {
  startBoth();
  EXPECT_TRUE(transferBothWays(*ns_, *ns_, server(0), k64MiB, 60s, via(0)));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "rd0"}, {"outcome", "closed"}}, 1));
  // The queue pairs moved the bytes, each way.
  for (auto* s : {a_.get(), b_.get()}) {
    for (const char* dir : {"tx", "rx"}) {
      EXPECT_GE(metric(*s, "dmm_sidecar_rdma_bytes_total", {{"stack", "rd0"}, {"direction", dir}}),
                static_cast<double>(k64MiB))
          << s->configPath() << " " << dir;
    }
  }
  EXPECT_EQ(metric(*b_, "dmm_sidecar_rdma_data_connections_total",
                   {{"stack", "rd0"}, {"result", "accepted"}}),
            1);
  // Nothing is left open, and the rings are given back (only idle send rings stay registered).
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_rdma_queue_pairs", {{"stack", "rd0"}}) == 0;
      },
      10s));
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*b_, "dmm_sidecar_rdma_queue_pairs", {{"stack", "rd0"}}) == 0;
      },
      10s));
  EXPECT_LE(metric(*b_, "dmm_sidecar_rdma_registered_memory_bytes", {{"stack", "rd0"}}),
            512.0 * 1024);
}

TEST_F(RdmaPair, HalfCloseEachWay) {
  startBoth();
  // The client half-closes first; the server answers after its EOF, more than a ring's worth.
  ThreadServer first(*ns_, server(0), [](UniqueFd conn) { answerAfterEof(conn.get()); });
  UniqueFd fd = connectTcp(*ns_, via(0), 20s);
  ASSERT_TRUE(fd);
  EXPECT_TRUE(halfCloseThenFullAnswer(fd.get()));
  fd.reset();
  first.stop();

  // The server speaks first and half-closes first; the client still sends afterwards.
  std::string server_got;
  ThreadServer second(*ns_, server(1), [&](UniqueFd conn) {
    std::string banner = "220 hello from the server\r\n";
    writeAll(conn.get(), banner.data(), banner.size());
    ::shutdown(conn.get(), SHUT_WR);
    server_got = readToEof(conn.get());
  });
  fd = connectTcp(*ns_, via(1), 20s);
  ASSERT_TRUE(fd);
  EXPECT_EQ(readToEof(fd.get()), "220 hello from the server\r\n");
  std::string late(200000, 'l');
  ASSERT_TRUE(writeAll(fd.get(), late.data(), late.size()));
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_TRUE(eventually([&] { return second.accepted() == 1; }));
  second.stop();
  EXPECT_EQ(server_got, late);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "closed"}}, 2));
}

TEST_F(RdmaPair, ServerResetReachesClientAsReset) {
  startBoth();
  ThreadServer srv(*ns_, server(0), [](UniqueFd conn) {
    readExactly(conn.get(), 5);
    linger l{1, 0};
    ::setsockopt(conn.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    conn.reset();  // RST
  });
  UniqueFd fd = connectTcp(*ns_, via(0), 20s);
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "hello", 5));
  int err = 0;
  std::string rest = readToEof(fd.get(), &err);
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(err, ECONNRESET) << "a reset must arrive as a reset, not as a clean end of stream";
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "reset"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "rd0"}, {"outcome", "reset"}}, 1));
}

TEST_F(RdmaPair, HundredConcurrentConnections) {
  startBoth();
  EchoServer echo(*ns_, server(0));
  constexpr int kConns = 100;
  constexpr std::size_t kEach = 64 * 1024;
  EXPECT_TRUE(echoManyAtOnce(*ns_, via(0), kConns, kEach));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "closed"}}, kConns,
                         60s));
  EXPECT_GE(metric(*b_, "dmm_sidecar_rdma_data_connections_total",
                   {{"stack", "rd0"}, {"result", "accepted"}}),
            kConns);
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*b_, "dmm_sidecar_rdma_queue_pairs", {{"stack", "rd0"}}) == 0;
      },
      30s));
}

TEST_F(RdmaPair, ASlowReaderStopsTheWriterWithBoundedBuffering) {
  startBoth();
  std::atomic<bool> read_now{false};
  StreamDigest server_got;
  ThreadServer srv(*ns_, server(0), [&](UniqueFd conn) {
    while (!read_now)
      std::this_thread::sleep_for(10ms);  // not reading yet
    server_got = receiveStream(conn.get());
  });
  UniqueFd fd = connectTcp(*ns_, via(0), 20s);
  ASSERT_TRUE(fd);
  // Write until nothing more is taken for two seconds: everything in between (the client's
  // socket, sidecar A, the queue pair's rings, sidecar B, the server's socket) is bounded.
  std::vector<char> block(64 * 1024, 'w');
  std::uint64_t sent = 0;
  auto last_progress = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - last_progress < 2s) {
    ssize_t n = ::send(fd.get(), block.data(), block.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::uint64_t>(n);
      last_progress = std::chrono::steady_clock::now();
      ASSERT_LT(sent, 256ull << 20) << "the writer was never stopped";
    } else {
      std::this_thread::sleep_for(5ms);
    }
  }
  std::cerr << "taken before the writer stopped: " << (sent >> 10) << " KiB\n";
  EXPECT_LT(sent, 64ull << 20);
  // The queue pair ran out of credit: B's ring was full.
  EXPECT_GE(metric(*a_, "dmm_sidecar_rdma_credit_stalls_total", {{"stack", "rd0"}}), 1);
  // The reader starts: every byte arrives, in order.
  read_now = true;
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_TRUE(eventually([&] { return srv.accepted() == 1; }));
  srv.stop();
  EXPECT_EQ(server_got.bytes, sent);
}

TEST_F(RdmaPair, PeerSidecarKilledMidTransferFailsTheClientPromptly) {
  startBoth();
  ThreadServer srv(*ns_, server(0), [](UniqueFd conn) { receiveStream(conn.get()); });
  UniqueFd fd = connectTcp(*ns_, via(0), 20s);
  ASSERT_TRUE(fd);
  std::atomic<bool> done{false};
  std::atomic<int> send_errno{0};
  std::chrono::steady_clock::time_point failed_at;
  std::thread sender([&] {
    std::vector<char> block(1 << 16, 'x');
    while (!done) {
      ssize_t n = ::send(fd.get(), block.data(), block.size(), MSG_NOSIGNAL);
      if (n < 0) {
        send_errno = errno;
        failed_at = std::chrono::steady_clock::now();
        return;
      }
    }
  });
  // Data is flowing over rd0.
  bool flowing = eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_rdma_bytes_total",
                      {{"stack", "rd0"}, {"direction", "tx"}}) > 4e6;
      },
      20s);
  if (!flowing) {
    done = true;
    ::shutdown(fd.get(), SHUT_RDWR);
    sender.join();
    FAIL() << "no data flowed over rd0";
  }
  auto killed_at = std::chrono::steady_clock::now();
  b_->process().signal(SIGKILL);
  bool failed = eventually([&] { return send_errno.load() != 0; }, 15s);
  done = true;
  if (!failed) ::shutdown(fd.get(), SHUT_RDWR);
  sender.join();
  ASSERT_TRUE(failed) << "the client kept sending into a dead path";
  EXPECT_TRUE(send_errno == ECONNRESET || send_errno == EPIPE) << std::strerror(send_errno);
  EXPECT_LT(failed_at - killed_at, 3s);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "reset"}}, 1));
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_rdma_queue_pairs", {{"stack", "rd0"}}) == 0;
      },
      10s));
}

TEST_F(RdmaPair, DeviceMissingFallsBackToKernel) {
  startB(rdmaStacks(ipB()));
  // A's rd0 names an address no RDMA device has: it is down from the start.
  startA(rdmaStacks("127.0.0.1"));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "rd0"}, {"kind", "rdma"}}), 0);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "kernel"}, {"kind", "kernel"}}), 1);
  EXPECT_EQ(metric(*b_, "dmm_sidecar_stack_up", {{"stack", "rd0"}, {"kind", "rdma"}}), 1);
  ThreadServer srv(*ns_, server(0), echoHandler);
  EXPECT_EQ(echoOnce(*ns_, via(0), "over the kernel"), "over the kernel");
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "rd0"}, {"outcome", "skipped_down"}}),
            1);
  EXPECT_NE(a_->log().find("rdma stack rd0 is down"), std::string::npos);
  auto stacks = a_->ctl({"stacks"});
  EXPECT_NE(stacks.output.find("rd0 kind=rdma down ("), std::string::npos) << stacks.output;
  auto b_stacks = b_->ctl({"stacks"});
  EXPECT_NE(b_stacks.output.find("rd0 kind=rdma up rxe0"), std::string::npos) << b_stacks.output;
}

TEST_F(RdmaPair, ConnectFailureTakesTheNextCandidate) {
  // B's rd0 sits on a third address of the RoCE interface, which then goes away under it: the
  // handshake (kernel, B's tunnel address) still works, the rdma_cm connect to rd0 cannot
  // complete, and the session moves to the kernel candidate once the attempt times out.
  // (Soft-RoCE loops traffic between its own addresses back inside the device, so netfilter
  // cannot be used to drop it.)
  const std::string dev = env("RDMAVM_NETDEV", "rdma0");
  const std::string third = "192.168.77.3";
  ns_->mustExec({"ip", "addr", "add", third + "/24", "dev", dev});
  startB(rdmaStacks(third));
  startA(rdmaStacks(ipA()));
  ns_->mustExec({"ip", "addr", "del", third + "/24", "dev", dev});
  ThreadServer srv(*ns_, server(0), echoHandler);
  EXPECT_EQ(echoOnce(*ns_, via(0), "detour"), "detour");
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "rd0"}, {"outcome", "failed_data_path"}}),
            1);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "kernel"}, {"outcome", "won"}}),
            1);
  // Nothing is left behind on either side.
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_rdma_queue_pairs", {{"stack", "rd0"}}) == 0;
      },
      10s));
}

// The rdma families as served, after traffic, against docs/metrics.md and the Grafana dashboard
// (the host's metrics tests cannot serve them: no RDMA device there), and promtool's lint.
TEST_F(RdmaPair, MetricsMatchTheReferenceAndTheDashboard) {
  startBoth();
  ThreadServer srv(*ns_, server(0), echoHandler);
  ASSERT_EQ(echoOnce(*ns_, via(0), "counted"), "counted");
  ASSERT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "rd0"}, {"outcome", "closed"}}, 1));
  const std::string page = a_->scrape() + b_->scrape();
  auto served = familiesOnPage(a_->scrape());
  for (const auto& [name, family] : familiesOnPage(b_->scrape()))
    served[name].labels.insert(family.labels.begin(), family.labels.end());
  auto documented = familiesInReference(readFile(std::string(DMM_SOURCE_DIR) + "/docs/metrics.md"));
  int rdma_families = 0;
  for (const auto& [name, family] : served) {
    if (!needsRdma(name)) continue;
    ++rdma_families;
    SCOPED_TRACE(name);
    auto doc = documented.find(name);
    ASSERT_NE(doc, documented.end()) << name << " is served but not in docs/metrics.md";
    EXPECT_EQ(doc->second.type, family.type);
    EXPECT_EQ(doc->second.labels, family.labels);
  }
  EXPECT_GE(rdma_families, 8);
  for (const auto& [name, family] : documented) {
    if (needsRdma(name)) {
      EXPECT_EQ(served.count(name), 1u) << name << " is documented, not served";
    }
  }
  const std::string dashboard =
      readFile(std::string(DMM_SOURCE_DIR) + "/docs/grafana/dmm-sidecar.json");
  auto on_page = namesOnPage(page);
  static const std::regex name_re("dmm_sidecar_rdma_[a-z_]+");
  int on_dashboard = 0;
  for (std::sregex_iterator it(dashboard.begin(), dashboard.end(), name_re), end; it != end;
       ++it, ++on_dashboard)
    EXPECT_EQ(on_page.count(it->str()), 1u) << "the dashboard uses " << it->str();
  EXPECT_GT(on_dashboard, 0);
  for (const auto& [name, family] : served) {
    if (needsRdma(name)) {
      EXPECT_NE(dashboard.find(name), std::string::npos) << name << " is not on the dashboard";
    }
  }
  std::string promtool;
  ASSERT_TRUE(prometheusTool("promtool", &promtool));
  for (auto* s : {a_.get(), b_.get()}) {
    auto r = runCommand({promtool, "check", "metrics"}, s->scrape());
    EXPECT_EQ(r.status, 0) << r.output;
  }
}

}  // namespace
}  // namespace dmm::testbed
