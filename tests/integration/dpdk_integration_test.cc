// The dpdk stack kind end to end: two hosts in network namespaces, each with a kernel veth (the
// control path: capture, handshake, delivery) and a second veth pair between them owned by a
// DPDK port of each sidecar (net_af_packet, or net_memif between the two sidecars directly).
// Both sidecars run a dpdk instance with lwIP; the policy picks it; the metrics prove it carried
// the data.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kKey = "dpdk-integration-test-key-0123456";
constexpr const char* kDpA = "10.202.0.1";
constexpr const char* kDpB = "10.202.0.2";
constexpr std::uint64_t k64MiB = 64ull << 20;

// Under a sanitizer (TSan: 5-15 times slower) the poll threads take seconds to open 200 data
// connections at once through lwIP: a 2 s attempt would time out, and the breaker would send
// the rest to the kernel stack.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr const char* kConnectTimeout = "10s";
#else
constexpr const char* kConnectTimeout = "2s";
#endif

std::string commonSections() {
  return std::string("[security]\npsk = \"") + kKey + "\"\n\n[timeouts]\nconnect = \"" +
         kConnectTimeout + "\"\nhandshake = \"2s\"\n\n";
}

// One dpdk instance and the kernel stack after it: the default policy offers both, in order.
std::string dpdkStacks(const std::string& port, const std::string& address,
                       const std::string& extra = {}) {
  return "[[stack]]\nname = \"dp0\"\nkind = \"dpdk\"\nport = \"" + port + "\"\naddress = \"" +
         address + "/24\"\nmax_connections = 512\n" + extra +
         "\n[[stack]]\nname = \"kernel\"\nkind = \"kernel\"\n\n";
}

class DpdkPair : public HostPairTest {
 protected:
  void SetUp() override {
    // The DPDK link: a veth pair between the hosts, no kernel addresses, offloads off on both
    // kernel-side ends (frames reach the other DPDK port with full checksums).
    dev_a_ = uniqueName("da").substr(0, 15);
    dev_b_ = uniqueName("db").substr(0, 15);
    mustRun({"ip", "link", "add", dev_a_, "netns", hosts_.a().name(), "type", "veth", "peer",
             "name", dev_b_, "netns", hosts_.b().name()});
    for (auto [ns, dev] : {std::pair{&hosts_.a(), dev_a_}, std::pair{&hosts_.b(), dev_b_}}) {
      ns->mustExec({"sysctl", "-q", "-w", "net.ipv6.conf." + dev + ".disable_ipv6=1"});
      ns->mustExec({"ethtool", "-K", dev, "tx", "off"});
      ns->mustExec({"ip", "link", "set", dev, "up"});
    }
  }

  std::string afPacket(const std::string& dev) {
    return "net_af_packet0,iface=" + dev + ",framecnt=4096,qdisc_bypass=1";
  }
  void startB(const std::string& stacks) {
    b_ =
        std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(commonSections() + stacks), "b");
  }
  void startA(const std::string& stacks) {
    a_ =
        std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(commonSections() + stacks), "a");
    a_->installCapture();
  }
  void startBoth() {
    startB(dpdkStacks(afPacket(dev_b_), kDpB));
    startA(dpdkStacks(afPacket(dev_a_), kDpA));
  }
  double metric(SidecarProcess& s, const std::string& name,
                const std::map<std::string, std::string>& labels) {
    return s.metric(name, labels).value_or(-1);
  }
  bool waitMetric(SidecarProcess& s, const std::string& name,
                  const std::map<std::string, std::string>& labels, double want) {
    return eventually([&] { return s.metric(name, labels).value_or(-1) >= want; }, 10s);
  }

  // Through A to B's echo-back server (startEchoBack()): `bytes` sent, the same count back.
  bool transferThrough(std::uint64_t bytes) {
    UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 30s);
    if (!fd) return false;
    auto sent = sendStream(fd.get(), bytes, 9);
    ::shutdown(fd.get(), SHUT_WR);
    int err = 0;
    auto got = receiveStream(fd.get(), &err);
    return err == 0 && sent.bytes == bytes && got.bytes == bytes;
  }
  std::unique_ptr<ThreadServer> startEchoBack() {
    return std::make_unique<ThreadServer>(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
      auto got = receiveStream(conn.get());
      sendStream(conn.get(), got.bytes, 5);
    });
  }
  bool waitLink(SidecarProcess& s, double want, std::chrono::seconds limit = 10s) {
    return eventually(
        [&] {
          return s.metric("dmm_sidecar_dpdk_link_up", {{"stack", "dp0"}}) == want;
        },
        limit);
  }

  std::string dev_a_;
  std::string dev_b_;
};

TEST_F(DpdkPair, Transfers64MiBEachWayByteExact) {
  startBoth();
  EXPECT_TRUE(transferBothWays(hosts_.a(), hosts_.b(), at(TwoHosts::kIp4B, 9000), k64MiB, 60s));
  // Carried by the dpdk instance on both sides.
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  EXPECT_GE(metric(*a_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "outbound"}, {"stack", "dp0"}, {"direction", "upstream"}}),
            static_cast<double>(k64MiB));
  // The port itself moved the bytes: at least 64 MiB / 1460 frames each way.
  EXPECT_GE(metric(*a_, "dmm_sidecar_dpdk_port_tx_packets_total", {{"stack", "dp0"}}),
            static_cast<double>(k64MiB / 1460));
  EXPECT_GE(metric(*b_, "dmm_sidecar_dpdk_port_tx_packets_total", {{"stack", "dp0"}}),
            static_cast<double>(k64MiB / 1460));
}

TEST_F(DpdkPair, HalfCloseEachWay) {
  startBoth();
  // The client half-closes first; the server answers after its EOF, more than a ring's worth.
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000),
                      [](UniqueFd conn) { answerAfterEof(conn.get()); });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 20s);
  ASSERT_TRUE(fd);
  EXPECT_TRUE(halfCloseThenFullAnswer(fd.get()));
  fd.reset();
  server.stop();

  // The server speaks first and half-closes first; the client still sends afterwards.
  std::atomic<std::size_t> server_got{0};  // written by the server's thread
  ThreadServer server2(hosts_.b(), at(TwoHosts::kIp4B, 9001), [&](UniqueFd conn) {
    std::string banner = "220 hello from the server\r\n";
    writeAll(conn.get(), banner.data(), banner.size());
    ::shutdown(conn.get(), SHUT_WR);
    server_got = readToEof(conn.get()).size();
  });
  fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9001), 20s);
  ASSERT_TRUE(fd);
  EXPECT_EQ(readToEof(fd.get()), "220 hello from the server\r\n");
  std::string late(200000, 'l');
  ASSERT_TRUE(writeAll(fd.get(), late.data(), late.size()));
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_TRUE(eventually([&] { return server_got.load() == late.size(); }));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 2));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 2));
}

TEST_F(DpdkPair, ServerResetReachesClientAsReset) {
  startBoth();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
    readExactly(conn.get(), 5);
    linger l{1, 0};
    ::setsockopt(conn.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    conn.reset();  // RST
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 20s);
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "hello", 5));
  int err = 0;
  std::string rest = readToEof(fd.get(), &err);
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(err, ECONNRESET) << "a reset must arrive as a reset, not as a clean end of stream";
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "reset"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "reset"}}, 1));
}

TEST_F(DpdkPair, TwoHundredConcurrentConnections) {
  startBoth();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  constexpr int kConns = 200;
  constexpr std::size_t kEach = 64 * 1024;
  EXPECT_TRUE(echoManyAtOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), kConns, kEach));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, kConns));
  EXPECT_GE(metric(*b_, "dmm_sidecar_dpdk_data_connections_total",
                   {{"stack", "dp0"}, {"result", "accepted"}}),
            kConns);
  // Nothing stays open once they are done.
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*b_, "dmm_sidecar_dpdk_connections", {{"stack", "dp0"}}) == 0;
      },
      30s));
}

TEST_F(DpdkPair, InstanceThatFailsToStartFallsBackToKernel) {
  startB(dpdkStacks(afPacket(dev_b_), kDpB));
  // A's port names an interface that does not exist: dp0 is down from the start.
  startA(dpdkStacks("net_af_packet0,iface=nosuchdev0", kDpA));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "dp0"}, {"kind", "dpdk"}}), 0);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "kernel"}, {"kind", "kernel"}}), 1);
  EXPECT_EQ(metric(*b_, "dmm_sidecar_stack_up", {{"stack", "dp0"}, {"kind", "dpdk"}}), 1);
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "over the kernel"), "over the kernel");
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "dp0"}, {"outcome", "skipped_down"}}),
            1);
  EXPECT_NE(a_->log().find("dpdk stack dp0 is down"), std::string::npos);
  auto stacks = a_->ctl({"stacks"});
  EXPECT_NE(stacks.output.find("dp0 kind=dpdk down (probing port"), std::string::npos)
      << stacks.output;
  EXPECT_NE(stacks.output.find("kernel kind=kernel up"), std::string::npos) << stacks.output;
  auto b_stacks = b_->ctl({"stacks"});
  EXPECT_NE(b_stacks.output.find("dp0 kind=dpdk up net_af_packet0"), std::string::npos)
      << b_stacks.output;
}

TEST_F(DpdkPair, DataPathFailureTakesTheNextCandidate) {
  startBoth();
  // B's DPDK link goes down under it: the handshake (kernel) still works, the data connection
  // over dp0 cannot be made, and the session moves to the kernel candidate.
  hosts_.b().mustExec({"ip", "link", "set", dev_b_, "down"});
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "detour"), "detour");
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "dp0"}, {"outcome", "failed_data_path"}}),
            1);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_attempts_total",
                   {{"rule", "default"}, {"stack", "kernel"}, {"outcome", "won"}}),
            1);
}

TEST_F(DpdkPair, PeerSidecarKilledMidTransferFailsTheClientPromptly) {
  startBoth();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000),
                      [](UniqueFd conn) { receiveStream(conn.get()); });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 20s);
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
  // Data is flowing over dp0.
  ASSERT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_dpdk_port_tx_bytes_total", {{"stack", "dp0"}}) > 8e6;
      },
      10s));
  auto killed_at = std::chrono::steady_clock::now();
  b_->process().signal(SIGKILL);
  bool failed = eventually([&] { return send_errno.load() != 0; }, 10s);
  done = true;
  sender.join();
  ASSERT_TRUE(failed) << "the client kept sending into a dead path";
  EXPECT_TRUE(send_errno == ECONNRESET || send_errno == EPIPE) << std::strerror(send_errno);
  EXPECT_LT(failed_at - killed_at, 3s);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "reset"}}, 1));
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_dpdk_connections", {{"stack", "dp0"}}) == 0;
      },
      10s));
}

// Between the two sidecars over shared memory (net_memif, B the server): no kernel on the data
// path. DPDK 22.11's memif server has crashed when its client left: the client side leaving
// (and coming back) must leave B's sidecar serving.
TEST_F(DpdkPair, MemifBetweenTheSidecarsSurvivesTheClientLeaving) {
  TempDir dir;
  const std::string sock = dir.path() + "/memif.sock";
  auto memif = [&](const char* role) {
    return std::string("net_memif0,role=") + role + ",socket=" + sock + ",socket-abstract=no";
  };
  startB(dpdkStacks(memif("server"), kDpB));
  auto startClient = [&] { startA(dpdkStacks(memif("client"), kDpA)); };
  startClient();
  auto server = startEchoBack();
  ASSERT_TRUE(waitLink(*a_, 1));
  EXPECT_TRUE(transferThrough(k64MiB));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  // The client sidecar goes away abruptly, then comes back; B serves throughout.
  a_->removeCapture();
  a_->process().signal(SIGKILL);
  a_->process().wait(5s);
  std::this_thread::sleep_for(500ms);
  ASSERT_TRUE(b_->process().running()) << b_->log();
  EXPECT_TRUE(waitLink(*b_, 0));
  a_.reset();
  startClient();
  ASSERT_TRUE(waitLink(*a_, 1));
  EXPECT_TRUE(transferThrough(8 << 20));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(b_->process().running());
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 2));
}

// The other side of it (a soak test finding): a memif client connects to its server's socket
// only when its port starts, so a client sidecar whose server sidecar died stayed down for
// good. The client now reconnects by itself, and may also start before its server does; the
// server, killed, leaves its socket file behind, which the next one removes before binding.
TEST_F(DpdkPair, MemifClientReconnectsWhenItsServerComesBack) {
  TempDir dir;
  const std::string sock = dir.path() + "/memif.sock";
  auto memif = [&](const char* role) {
    return std::string("net_memif0,role=") + role + ",socket=" + sock + ",socket-abstract=no";
  };
  // The client first: up (it will reconnect), its link down until the server is there.
  startA(dpdkStacks(memif("client"), kDpA));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "dp0"}, {"kind", "dpdk"}}), 1);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_dpdk_link_up", {{"stack", "dp0"}}), 0);
  startB(dpdkStacks(memif("server"), kDpB));
  ASSERT_TRUE(waitLink(*a_, 1, 15s)) << a_->log();
  auto server = startEchoBack();
  EXPECT_TRUE(transferThrough(8 << 20));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  double restarts = metric(*a_, "dmm_sidecar_dpdk_port_restarts_total", {{"stack", "dp0"}});
  EXPECT_GE(restarts, 1);

  // The server sidecar dies (its socket file stays) and a new one starts.
  b_->process().signal(SIGKILL);
  b_->process().wait(5s);
  b_.reset();
  EXPECT_TRUE(std::filesystem::exists(sock));
  ASSERT_TRUE(waitLink(*a_, 0)) << a_->log();
  startB(dpdkStacks(memif("server"), kDpB));
  EXPECT_NE(b_->log().find("removed the stale memif socket"), std::string::npos) << b_->log();
  ASSERT_TRUE(waitLink(*a_, 1, 15s)) << a_->log();
  EXPECT_GT(metric(*a_, "dmm_sidecar_dpdk_port_restarts_total", {{"stack", "dp0"}}), restarts);
  EXPECT_NE(a_->log().find("memif link up again"), std::string::npos);
  // Carried by dp0 again, through the new B.
  EXPECT_TRUE(transferThrough(8 << 20));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 2));
}

TEST_F(DpdkPair, ASlowReaderStopsTheWriterWithBoundedBuffering) {
  startBoth();
  std::atomic<bool> read_now{false};
  StreamDigest server_got;
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [&](UniqueFd conn) {
    while (!read_now)
      std::this_thread::sleep_for(10ms);  // not reading yet
    server_got = receiveStream(conn.get());
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 20s);
  ASSERT_TRUE(fd);
  // Write until nothing more is taken for a second: everything in between (client socket,
  // sidecar A, the dpdk rings and windows, sidecar B, the server's socket) is bounded.
  std::vector<char> block(64 * 1024, 'w');
  std::uint64_t sent = 0;
  auto last_progress = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - last_progress < 1s) {
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
  // The reader starts: every byte arrives, in order.
  read_now = true;
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_TRUE(eventually([&] { return server.accepted() == 1; }));
  server.stop();
  EXPECT_EQ(server_got.bytes, sent);
}

// The EAL on hugepages (the production setting) instead of --no-huge: 2 MiB pages reserved for
// the test and given back afterwards (they are machine-wide).
TEST_F(DpdkPair, RunsOnHugepages) {
  auto read = [](const std::string& path) {
    std::ifstream in(path);
    long v = -1;
    in >> v;
    return v;
  };
  const std::string nr = "/proc/sys/vm/nr_hugepages";
  long before = read(nr);
  ASSERT_GE(before, 0);
  TempDir mnt;
  struct Restore {
    std::string nr, mnt;
    long before;
    ~Restore() {
      (void)run({"umount", mnt});
      std::ofstream(nr) << before;
    }
  } restore{nr, mnt.path(), before};
  std::ofstream(nr) << before + 512;  // 1 GiB more, both sidecars
  if (read(nr) < before + 512) GTEST_SKIP() << "the kernel could not reserve 512 hugepages";
  mustRun({"mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", mnt.path()});
  const std::string eal =
      "eal_args = [\"-m\", \"400\", \"--no-pci\", \"--huge-dir\", \"" + mnt.path() + "\"]\n";
  startB(dpdkStacks(afPacket(dev_b_), kDpB, eal));
  startA(dpdkStacks(afPacket(dev_a_), kDpA, eal));
  ASSERT_EQ(metric(*a_, "dmm_sidecar_stack_up", {{"stack", "dp0"}, {"kind", "dpdk"}}), 1)
      << a_->log();
  ASSERT_EQ(metric(*b_, "dmm_sidecar_stack_up", {{"stack", "dp0"}, {"kind", "dpdk"}}), 1)
      << b_->log();
  // The pages are really in use (DPDK maps its memory from them).
  EXPECT_LT(read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"), before + 512);
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  std::string payload(1 << 20, 'h');
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), payload), payload);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  server.stop();
  a_.reset();  // the sidecars give their pages back before the mount goes
  b_.reset();
}

// Two dpdk instances in each sidecar (multi-instance: one lwIP, two ports, two poll threads),
// af_packet and memif, each picked by its own rule, carrying at the same time.
TEST_F(DpdkPair, TwoInstancesCarryAtOnceEachOnItsPort) {
  TempDir dir;
  const std::string sock = dir.path() + "/memif.sock";
  auto stacks = [&](const std::string& dev, const char* ip0, const char* role, const char* ip1) {
    return "[[stack]]\nname = \"dp0\"\nkind = \"dpdk\"\nport = \"" + afPacket(dev) +
           "\"\naddress = \"" + ip0 + "/24\"\n\n[[stack]]\nname = \"dp1\"\nkind = \"dpdk\"\n" +
           "port = \"net_memif0,role=" + role + ",socket=" + sock +
           ",socket-abstract=no\"\naddress = \"" + ip1 + "/24\"\ndata_port = 7302\n\n" +
           "[[stack]]\nname = \"kernel\"\nkind = \"kernel\"\n\n";
  };
  const std::map<std::string, std::string> policy{
      {"10-two.toml",
       "[[rule]]\nname = \"to-dp0\"\nmatch.ports = [\"9000\"]\nstacks = [\"dp0\"]\n\n"
       "[[rule]]\nname = \"to-dp1\"\nmatch.ports = [\"9001\"]\nstacks = [\"dp1\"]\n"}};
  b_ = std::make_unique<SidecarProcess>(
      hosts_.b(), sidecarConfig(commonSections() + stacks(dev_b_, kDpB, "server", "10.204.0.2")),
      "b", policy);
  a_ = std::make_unique<SidecarProcess>(
      hosts_.a(), sidecarConfig(commonSections() + stacks(dev_a_, kDpA, "client", "10.204.0.1")),
      "a", policy);
  a_->installCapture();
  ASSERT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_dpdk_link_up", {{"stack", "dp1"}}) == 1;
      },
      10s));
  std::vector<std::unique_ptr<ThreadServer>> servers;
  for (std::uint16_t p : {std::uint16_t{9000}, std::uint16_t{9001}}) {
    servers.push_back(
        std::make_unique<ThreadServer>(hosts_.b(), at(TwoHosts::kIp4B, p), [](UniqueFd conn) {
          auto got = receiveStream(conn.get());
          sendStream(conn.get(), got.bytes, 11);
        }));
  }
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (std::uint16_t p : {std::uint16_t{9000}, std::uint16_t{9001}}) {
    for (int i = 0; i < 4; ++i) {
      clients.emplace_back([&, p] {
        UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, p), 30s);
        if (!fd) return;
        auto sent = sendStream(fd.get(), 16 << 20, 13);
        ::shutdown(fd.get(), SHUT_WR);
        int err = 0;
        auto got = receiveStream(fd.get(), &err);
        if (err == 0 && sent.bytes == (16u << 20) && got.bytes == (16u << 20)) ++ok;
      });
    }
  }
  for (auto& t : clients)
    t.join();
  EXPECT_EQ(ok.load(), 8);
  for (const char* st : {"dp0", "dp1"}) {
    EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                           {{"role", "outbound"}, {"stack", st}, {"outcome", "closed"}}, 4))
        << st;
    EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                           {{"role", "inbound"}, {"stack", st}, {"outcome", "closed"}}, 4))
        << st;
    EXPECT_GE(metric(*a_, "dmm_sidecar_dpdk_port_tx_bytes_total", {{"stack", st}}), 64 << 20) << st;
  }
}

// Loss on the DPDK link: lwIP retransmits, the bytes still arrive exactly, and the instance's
// retransmission counter says so (it stays 0 in the loss-free tests above). The loss: B's
// af_packet receive ring holds 64 frames where a window is ~360, so bursts overflow it (this
// kernel has neither netem nor tc actions). af_packet does not report those drops in its
// DPDK counters, so only the retransmissions show them.
TEST_F(DpdkPair, LossIsRepairedAndCountedAsRetransmissions) {
  startB(dpdkStacks("net_af_packet0,iface=" + dev_b_ + ",framecnt=64,qdisc_bypass=1", kDpB));
  startA(dpdkStacks(afPacket(dev_a_), kDpA));
  StreamDigest server_got;
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000),
                      [&](UniqueFd conn) { server_got = receiveStream(conn.get()); });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 30s);
  ASSERT_TRUE(fd);
  auto sent = sendStream(fd.get(), 16 << 20, 17);
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_TRUE(eventually([&] { return server.accepted() == 1; }));
  readToEof(fd.get());
  server.stop();
  EXPECT_EQ(server_got.bytes, 16u << 20);
  EXPECT_EQ(server_got.sha256_hex, sent.sha256_hex);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "dp0"}, {"outcome", "closed"}}, 1));
  EXPECT_GT(metric(*a_, "dmm_sidecar_dpdk_tcp_retransmitted_segments_total", {{"stack", "dp0"}}),
            0);
  std::cerr << "retransmitted "
            << metric(*a_, "dmm_sidecar_dpdk_tcp_retransmitted_segments_total", {{"stack", "dp0"}})
            << "\n";
}

}  // namespace
}  // namespace dmm::testbed
