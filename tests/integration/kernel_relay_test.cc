// The kernel relay (proxy/kernel_relay.h) end to end: two real sidecars on the test bed, a
// connection that lives long enough has its directions handed to the kernel (BPF sockmap), and
// everything a relay promises still holds: bytes exact and counted, half-close each way,
// resets, a peer that dies, a slow reader, timeouts. Each test proves from the metrics that the
// kernel relay carried the bytes.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <set>
#include <thread>

#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kKey = "kernel-relay-test-key-0123456789";
constexpr std::size_t kPing = 64;
constexpr int kPings = 20;

// The kernel relay is opt-in: on unless `relay` turns it off.
std::string section(const std::string& relay, const std::string& timeouts = {}) {
  std::string on =
      relay.find("kernel_relay = false") == std::string::npos ? "kernel_relay = true\n" : "";
  return std::string("[security]\npsk = \"") + kKey +
         "\"\n\n[timeouts]\nconnect = \"2s\"\nhandshake = \"2s\"\n" + timeouts + "\n[relay]\n" +
         on + relay + "\n";
}

// A server that answers kPings 64-byte pings, then runs `rest` on the connection.
ThreadServer::Handler pingThen(std::function<void(int)> rest) {
  return [rest = std::move(rest)](UniqueFd conn) {
    for (int i = 0; i < kPings; ++i) {
      std::string m = readExactly(conn.get(), kPing);
      if (m.size() != kPing || !writeAll(conn.get(), m.data(), m.size())) return;
    }
    rest(conn.get());
  };
}

// pingThen() and then the rest of what the client sends, sent back once it half-closed.
ThreadServer::Handler pingThenEchoTheRest() {
  return pingThen([](int fd) {
    std::string rest = readToEof(fd);
    writeAll(fd, rest.data(), rest.size());
  });
}

// The client's side of pingThenEchoTheRest() after the pings: 1 MiB of `c`, a half-close, and
// the same 1 MiB back before the end of stream.
void tailComesBack(int fd, char c) {
  std::string tail(1 << 20, c);
  ASSERT_TRUE(writeAll(fd, tail.data(), tail.size()));
  ::shutdown(fd, SHUT_WR);
  int err = 0;
  EXPECT_EQ(readToEof(fd, &err), tail);
  EXPECT_EQ(err, 0);
}

// The largest buffer of net.ipv4.<name> ("min default max"), in bytes.
std::uint64_t sysctlMax(const std::string& name) {
  std::ifstream f("/proc/sys/net/ipv4/" + name);
  std::uint64_t min = 0, def = 0, max = 0;
  f >> min >> def >> max;
  return max;
}

// The client's side of pingThen(): true when every ping came back.
bool ping(int fd) {
  for (int i = 0; i < kPings; ++i) {
    std::string m(kPing, static_cast<char>('a' + i % 26));
    if (!writeAll(fd, m.data(), m.size()) || readExactly(fd, kPing) != m) return false;
  }
  return true;
}

class KernelRelayPair : public HostPairTest {
 protected:
  // Both sidecars hand a connection's directions to the kernel relay as soon as they can
  // (kernel_relay_after = 0) unless `relay` says otherwise.
  void start(const std::string& relay = "kernel_relay_after = \"0s\"",
             const std::string& timeouts = {}) {
    b_ = std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(section(relay, timeouts)), "b");
    a_ = std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(section(relay, timeouts)), "a");
    a_->installCapture();
    if (relay.find("kernel_relay = false") == std::string::npos) {
      ASSERT_EQ(a_->metric("dmm_sidecar_kernel_relay_up", {}).value_or(-1), 1) << a_->log();
    }
  }
  double metric(SidecarProcess& s, const std::string& name,
                const std::map<std::string, std::string>& labels = {}) {
    return s.metric(name, labels).value_or(-1);
  }
  // Both directions of the connection are in the kernel relay, on both sidecars.
  bool inKernel(double flows_each = 1) {
    return eventually([&] {
      for (auto* s : {a_.get(), b_.get()}) {
        for (const char* d : {"upstream", "downstream"}) {
          if (metric(*s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", d}}) < flows_each)
            return false;
        }
      }
      return true;
    });
  }
  bool kernelIdle() {
    return eventually([&] {
      return metric(*a_, "dmm_sidecar_kernel_relay_active_flows") == 0 &&
             metric(*b_, "dmm_sidecar_kernel_relay_active_flows") == 0;
    });
  }
  bool closedOnBoth(double n = 1) {
    return eventually([&] {
      return metric(*a_, "dmm_sidecar_connections_total",
                    {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}) >= n &&
             metric(*b_, "dmm_sidecar_connections_total",
                    {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}) >= n;
    });
  }
  SocketAddress server() const { return at(TwoHosts::kIp4B, 9000); }
};

TEST_F(KernelRelayPair, BytesInBothDirectionsAreExactAndCounted) {
  start();
  constexpr std::uint64_t kBytes = 48ull << 20;
  StreamDigest server_got;
  StreamDigest server_sent;
  ThreadServer srv(hosts_.b(), server(), pingThen([&](int fd) {
                     server_got = receiveStream(fd);
                     server_sent = sendStream(fd, kBytes, 7);
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  // Small messages on a connection old enough: every direction went to the kernel.
  ASSERT_TRUE(inKernel()) << a_->log() << b_->log();
  EXPECT_EQ(metric(*a_, "dmm_sidecar_kernel_relay_active_flows"), 2);
  EXPECT_EQ(metric(*b_, "dmm_sidecar_kernel_relay_active_flows"), 2);
  // From here the kernel moves everything, bulk included.
  auto sent = sendStream(fd.get(), kBytes, 3);
  ::shutdown(fd.get(), SHUT_WR);
  int err = 0;
  auto got = receiveStream(fd.get(), &err);
  fd.reset();
  srv.stop();
  EXPECT_EQ(err, 0);
  EXPECT_EQ(server_got.bytes, kBytes);
  EXPECT_EQ(server_got.sha256_hex, sent.sha256_hex);
  EXPECT_EQ(got.bytes, kBytes);
  EXPECT_EQ(got.sha256_hex, server_sent.sha256_hex);
  ASSERT_TRUE(closedOnBoth());
  EXPECT_TRUE(kernelIdle());
  // Every byte counted once, whether a worker or the kernel moved it.
  const double up = kPings * kPing + kBytes;
  const double down = kPings * kPing + kBytes;
  EXPECT_EQ(metric(*a_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "outbound"}, {"stack", "kernel"}, {"direction", "upstream"}}),
            up);
  EXPECT_EQ(metric(*a_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "outbound"}, {"stack", "kernel"}, {"direction", "downstream"}}),
            down);
  EXPECT_EQ(metric(*b_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "inbound"}, {"stack", "kernel"}, {"direction", "upstream"}}),
            up);
  EXPECT_EQ(metric(*b_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "inbound"}, {"stack", "kernel"}, {"direction", "downstream"}}),
            down);
  EXPECT_NE(a_->log().find("up=" + std::to_string(kPings * kPing + kBytes)), std::string::npos)
      << a_->log();
  EXPECT_EQ(metric(*a_, "dmm_sidecar_kernel_relay_refusals_total", {{"reason", "error"}}), 0);
}

TEST_F(KernelRelayPair, TheCreditIsRenewedAsTheDestinationTakesTheBytes) {
  // 1 MiB windows: the bursts below (128 KiB) leave a busy worker three quarters of a window
  // to answer a request for credit in.
  start("kernel_relay_after = \"0s\"\nkernel_relay_window = 1048576");
  // 8 MiB each way in 16 KiB messages, a little apart: eight windows per direction.
  constexpr std::size_t kMessage = 16 * 1024;
  constexpr int kMessages = 512;
  ThreadServer srv(hosts_.b(), server(), pingThen([](int fd) {
                     for (int i = 0; i < kMessages; ++i) {
                       std::string m = readExactly(fd, kMessage);
                       if (m.size() != kMessage || !writeAll(fd, m.data(), m.size())) return;
                     }
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  for (int i = 0; i < kMessages; ++i) {
    std::string m(kMessage, static_cast<char>('A' + i % 26));
    ASSERT_TRUE(writeAll(fd.get(), m.data(), m.size()));
    ASSERT_EQ(readExactly(fd.get(), kMessage), m) << "message " << i;
    if (i % 8 == 0) std::this_thread::sleep_for(1ms);
  }
  // The destinations kept up: every time a direction asked, its credit was renewed, and none
  // fell back to the workers; all of it went through the kernel.
  for (auto* s : {a_.get(), b_.get()}) {
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_handbacks_total"), 0);
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_active_flows"), 2);
  }
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_EQ(readToEof(fd.get()), "");
  fd.reset();
  srv.stop();
  ASSERT_TRUE(closedOnBoth());
  const double each = kPings * kPing + static_cast<double>(kMessage) * kMessages;
  EXPECT_EQ(metric(*a_, "dmm_sidecar_relay_bytes_total",
                   {{"role", "outbound"}, {"stack", "kernel"}, {"direction", "downstream"}}),
            each);
}

TEST_F(KernelRelayPair, ATunnelWhoseFramingEndedIsNotReused) {
  start();
  ThreadServer srv(hosts_.b(), server(), pingThen([](int fd) { (void)readToEof(fd); }));
  for (int i = 0; i < 2; ++i) {
    UniqueFd fd = connectTcp(hosts_.a(), server());
    ASSERT_TRUE(fd);
    ASSERT_TRUE(ping(fd.get()));
    ASSERT_TRUE(inKernel(i + 1));
    ::shutdown(fd.get(), SHUT_WR);
    int err = 0;
    EXPECT_EQ(readToEof(fd.get(), &err), "");
    EXPECT_EQ(err, 0);
    ASSERT_TRUE(closedOnBoth(i + 1));
  }
  // The second session found no connection to reuse: the first one's ended with FINs.
  EXPECT_EQ(metric(*a_, "dmm_sidecar_tunnel_reuses_total", {{"role", "outbound"}}), 0);
  EXPECT_TRUE(kernelIdle());
}

TEST_F(KernelRelayPair, HalfCloseEachWay) {
  start();
  // The client half-closes first; the server answers 3 MiB after seeing it.
  ThreadServer srv(hosts_.b(), server(), pingThen(answerAfterEof));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  EXPECT_TRUE(halfCloseThenFullAnswer(fd.get()));
  fd.reset();
  srv.stop();
  ASSERT_TRUE(closedOnBoth(1));

  // The server half-closes first; the client goes on sending after it.
  std::atomic<std::size_t> server_got{0};
  std::atomic<bool> talk{false};
  ThreadServer srv2(hosts_.b(), at(TwoHosts::kIp4B, 9001), pingThen([&](int fd2) {
                      while (!talk)  // until both directions are in the kernel
                        std::this_thread::sleep_for(5ms);
                      std::string banner = "220 done talking\r\n";
                      writeAll(fd2, banner.data(), banner.size());
                      ::shutdown(fd2, SHUT_WR);
                      server_got = readToEof(fd2).size();
                    }));
  fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9001));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel(2));
  talk = true;
  int err = 0;
  EXPECT_EQ(readToEof(fd.get(), &err), "220 done talking\r\n");
  EXPECT_EQ(err, 0);
  std::string late(2 << 20, 'l');
  ASSERT_TRUE(writeAll(fd.get(), late.data(), late.size()));
  ::shutdown(fd.get(), SHUT_WR);
  fd.reset();
  srv2.stop();
  EXPECT_EQ(server_got.load(), late.size());
  EXPECT_TRUE(closedOnBoth(2));
  EXPECT_TRUE(kernelIdle());
}

TEST_F(KernelRelayPair, ResetsArePassedOnBothWays) {
  start();
  // The server resets (once both directions are in the kernel): the client sees a reset.
  std::atomic<bool> reset_now{false};
  ThreadServer srv(hosts_.b(), server(), pingThen([&](int fd) {
                     while (!reset_now)
                       std::this_thread::sleep_for(5ms);
                     linger l{1, 0};
                     ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  reset_now = true;
  srv.stop();  // the handler returned: its socket closed with a reset
  int err = 0;
  (void)readToEof(fd.get(), &err);
  EXPECT_EQ(err, ECONNRESET);
  fd.reset();
  EXPECT_TRUE(eventually([&] {
    return metric(*a_, "dmm_sidecar_connections_total",
                  {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "reset"}}) == 1;
  }));

  // The client resets: the server sees a reset.
  std::atomic<int> server_err{-1};
  ThreadServer srv2(hosts_.b(), at(TwoHosts::kIp4B, 9001), pingThen([&](int fd2) {
                      int e = 0;
                      (void)readToEof(fd2, &e);
                      server_err = e;
                    }));
  fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9001));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel(2));
  linger l{1, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
  fd.reset();
  EXPECT_TRUE(eventually([&] { return server_err.load() != -1; }));
  srv2.stop();
  EXPECT_EQ(server_err.load(), ECONNRESET);
  EXPECT_TRUE(kernelIdle());
}

TEST_F(KernelRelayPair, APeerSidecarThatDiesFailsTheClientPromptly) {
  start();
  std::atomic<bool> stop{false};
  ThreadServer srv(hosts_.b(), server(), pingThen([&](int fd) {
                     char buf[65536];
                     while (!stop && ::recv(fd, buf, sizeof buf, 0) > 0) {
                     }
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  b_->process().signal(SIGKILL);
  auto killed = std::chrono::steady_clock::now();
  // The client keeps sending; its writes fail within a few seconds.
  std::string chunk(65536, 'k');
  bool failed = false;
  while (std::chrono::steady_clock::now() - killed < 10s) {
    if (::send(fd.get(), chunk.data(), chunk.size(), MSG_NOSIGNAL) < 0 &&
        (errno == ECONNRESET || errno == EPIPE)) {
      failed = true;
      break;
    }
  }
  EXPECT_TRUE(failed);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 3s);
  stop = true;
  fd.reset();
  srv.stop();
  EXPECT_TRUE(
      eventually([&] { return metric(*a_, "dmm_sidecar_kernel_relay_active_flows") == 0; }));
}

TEST_F(KernelRelayPair, ASlowReaderStopsTheWriterWithBoundedBuffering) {
  start();
  std::atomic<bool> read_now{false};
  StreamDigest server_got;
  ThreadServer srv(hosts_.b(), server(), pingThen([&](int fd) {
                     while (!read_now)
                       std::this_thread::sleep_for(10ms);
                     server_got = receiveStream(fd);
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  // The server reads nothing: the client can write only what the sockets on the way hold.
  timeval tv{1, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  std::string chunk(65536, 's');
  std::uint64_t queued = 0;
  while (queued < (512ull << 20)) {
    ssize_t n = ::send(fd.get(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
    if (n <= 0) break;
    queued += static_cast<std::uint64_t>(n);
  }
  // What TCP itself lets the path hold (each of its six sockets at its largest buffer), plus
  // one window per kernel-relayed direction: without the window, the kernel would take
  // everything the client sends (the loop above stops at 512 MiB).
  const std::uint64_t tcp_path = 6 * (std::max(sysctlMax("tcp_rmem"), std::uint64_t{6} << 20) +
                                      std::max(sysctlMax("tcp_wmem"), std::uint64_t{4} << 20));
  EXPECT_LT(queued, tcp_path + 2 * (256u << 10)) << "the writer was never stopped";
  std::cout << "the stalled reader stopped the writer after " << (queued >> 10) << " KiB\n";
  EXPECT_GT(queued, 0u);
  // The kernel stopped taking bytes for the stalled destination once the direction's window
  // was used up, and gave it back to a worker, whose relay pauses at its high watermark.
  EXPECT_GE(metric(*b_, "dmm_sidecar_kernel_relay_handbacks_total"), 1);
  // Bounded: a worker's two buffers, and at most one window still with the kernel.
  EXPECT_LE(metric(*a_, "dmm_sidecar_buffer_memory_bytes"), 2 * 65536 + 256 * 1024);
  EXPECT_LE(metric(*b_, "dmm_sidecar_buffer_memory_bytes"), 2 * 65536 + 256 * 1024);
  // Once the reader reads, every byte arrives.
  read_now = true;
  ::shutdown(fd.get(), SHUT_WR);
  int err = 0;
  (void)readToEof(fd.get(), &err);
  srv.stop();
  EXPECT_EQ(err, 0);
  EXPECT_EQ(server_got.bytes, queued);
  EXPECT_TRUE(closedOnBoth());
}

// Message flows in the kernel that turn into bursts their destination does not take at once:
// each direction uses up its window, passes, is handed back to a worker and finishes there.
// Every stream must arrive exactly once, in order, both ways. Disabled: on Linux 6.18 some
// segments read after the hand-back arrive twice in about one run in two - the known issue
// that keeps relay.kernel_relay off by default (docs/architecture.md#kernel-relay). Run it with
// --gtest_also_run_disabled_tests.
TEST_F(KernelRelayPair, DISABLED_BurstsIntoStallingDestinationsArriveExactlyOnce) {
  start("kernel_relay_after = \"0s\"\nkernel_relay_window = 65536");
  constexpr int kConns = 8;
  constexpr std::uint64_t kUp = 16ull << 20;
  constexpr std::uint64_t kDown = 4ull << 20;
  std::mutex mutex;
  std::vector<StreamDigest> server_got;
  ThreadServer srv(hosts_.b(), server(), pingThen([&](int fd) {
                     std::this_thread::sleep_for(300ms);  // the burst finds nobody reading
                     auto got = receiveStream(fd);
                     {
                       std::lock_guard lock(mutex);
                       server_got.push_back(got);
                     }
                     auto seed = static_cast<std::uint32_t>(got.bytes % 1000);
                     (void)sendStream(fd, kDown, seed);
                   }));
  std::vector<std::thread> clients;
  std::vector<StreamDigest> sent(kConns), received(kConns);
  std::atomic<int> ok{0};
  for (int i = 0; i < kConns; ++i) {
    clients.emplace_back([&, i] {
      UniqueFd fd = connectTcp(hosts_.a(), server());
      if (!fd || !ping(fd.get())) return;
      std::this_thread::sleep_for(50ms);  // in the kernel relay by now
      sent[static_cast<std::size_t>(i)] =
          sendStream(fd.get(), kUp, 700 + static_cast<std::uint32_t>(i));
      ::shutdown(fd.get(), SHUT_WR);
      int err = 0;
      received[static_cast<std::size_t>(i)] = receiveStream(fd.get(), &err);
      if (err == 0) ++ok;
    });
  }
  for (auto& t : clients)
    t.join();
  srv.stop();
  EXPECT_EQ(ok.load(), kConns);
  std::multiset<std::string> want, got;
  for (auto& d : sent)
    want.insert(std::to_string(d.bytes) + ":" + d.sha256_hex);
  for (auto& d : server_got)
    got.insert(std::to_string(d.bytes) + ":" + d.sha256_hex);
  EXPECT_EQ(got, want) << "upstream streams changed on the way";
  // Every downstream stream is the one the server sent for its upstream's length.
  for (auto& d : received)
    EXPECT_EQ(d.bytes, kDown);
  EXPECT_GE(metric(*a_, "dmm_sidecar_kernel_relay_handbacks_total") +
                metric(*b_, "dmm_sidecar_kernel_relay_handbacks_total"),
            1);
  EXPECT_TRUE(closedOnBoth(kConns));
}

TEST_F(KernelRelayPair, ABusyConnectionOutlivesTheIdleTimeoutAndAnIdleOneDoesNot) {
  start("kernel_relay_after = \"0s\"", "idle = \"1s\"\n");
  ThreadServer srv(hosts_.b(), server(), pingThen([](int fd) {
                     std::string m;
                     while ((m = readExactly(fd, kPing)).size() == kPing)
                       writeAll(fd, m.data(), m.size());
                   }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  ASSERT_TRUE(inKernel());
  // 3 s of traffic the workers never see: the ticks' counts keep it alive.
  auto until = std::chrono::steady_clock::now() + 3s;
  while (std::chrono::steady_clock::now() < until) {
    std::string m(kPing, 'b');
    ASSERT_TRUE(writeAll(fd.get(), m.data(), m.size()));
    ASSERT_EQ(readExactly(fd.get(), kPing), m);
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(metric(*a_, "dmm_sidecar_connections_total",
                   {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "idle_timeout"}}),
            0);
  // Then quiet: the idle timeout ends it (cleanly: the kernel holds nothing of it), on
  // whichever sidecar counted its last activity first.
  EXPECT_TRUE(eventually(
      [&] {
        return metric(*a_, "dmm_sidecar_connections_total",
                      {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "idle_timeout"}}) +
                   metric(
                       *b_, "dmm_sidecar_connections_total",
                       {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "idle_timeout"}}) >=
               1;
      },
      5s));
  int err = 0;
  EXPECT_EQ(readToEof(fd.get(), &err), "");
  EXPECT_EQ(err, 0);
  fd.reset();
  srv.stop();
  EXPECT_TRUE(kernelIdle());
}

TEST_F(KernelRelayPair, OffMeansEveryByteThroughTheWorkers) {
  start("kernel_relay = false");
  ThreadServer srv(hosts_.b(), server(), pingThen([](int fd) { (void)readToEof(fd); }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  std::this_thread::sleep_for(200ms);
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_EQ(readToEof(fd.get()), "");
  fd.reset();
  srv.stop();
  EXPECT_TRUE(closedOnBoth());
  for (auto* s : {a_.get(), b_.get()}) {
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_up"), 0);
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}), 0);
  }
  // Framed and reusable as before: later sessions reuse the tunnels (one pool per worker,
  // and a session may land on either of the two).
  ThreadServer srv2(hosts_.b(), at(TwoHosts::kIp4B, 9001), echoHandler);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9001), "again"), "again");
  EXPECT_TRUE(eventually([&] {
    return metric(*a_, "dmm_sidecar_tunnel_reuses_total", {{"role", "outbound"}}) >= 1;
  }));
}

TEST_F(KernelRelayPair, OffByDefault) {
  // No kernel_relay key at all: the sidecars relay every byte themselves.
  std::string config = std::string("[security]\npsk = \"") + kKey + "\"\n";
  b_ = std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(config), "b");
  a_ = std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(config), "a");
  a_->installCapture();
  ThreadServer srv(hosts_.b(), server(), pingThen([](int fd) { (void)readToEof(fd); }));
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  std::this_thread::sleep_for(50ms);  // older than kernel_relay_after's default
  ASSERT_TRUE(ping(fd.get()));
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_EQ(readToEof(fd.get()), "");
  EXPECT_TRUE(closedOnBoth());
  for (auto* s : {a_.get(), b_.get()}) {
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_up"), 0);
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}), 0);
  }
}

TEST_F(KernelRelayPair, WhenOnOnlyConnectionsOlderThanTheThresholdAndNotStreams) {
  start("");  // on, with kernel_relay_after's default
  // A short request/response: over before it is old enough.
  ThreadServer echo(hosts_.b(), at(TwoHosts::kIp4B, 9001), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9001), "quick"), "quick");
  // A stream: 64 MiB each way in large reads, never handed over.
  EXPECT_TRUE(transferBothWays(hosts_.a(), hosts_.b(), server(), 64ull << 20));
  EXPECT_TRUE(closedOnBoth(2));
  EXPECT_EQ(metric(*a_, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}), 0);
  // Small messages on a connection that lives: handed over once old enough.
  ThreadServer srv(hosts_.b(), at(TwoHosts::kIp4B, 9002),
                   pingThen([](int fd) { (void)readToEof(fd); }));
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9002));
  ASSERT_TRUE(fd);
  std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(ping(fd.get()));
  EXPECT_TRUE(inKernel());
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_EQ(readToEof(fd.get()), "");
}

TEST_F(KernelRelayPair, AWindowTheMemoryBudgetCannotGiveKeepsTheDirectionWithTheWorker) {
  // Each worker's share of buffer_memory is two 64 KiB buffers: no room for a 256 KiB window.
  start("kernel_relay_after = \"0s\"\nbuffer_memory = 262144");
  ThreadServer srv(hosts_.b(), server(), pingThenEchoTheRest());
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  EXPECT_TRUE(eventually([&] {
    return metric(*a_, "dmm_sidecar_kernel_relay_refusals_total", {{"reason", "memory"}}) >= 1 &&
           metric(*b_, "dmm_sidecar_kernel_relay_refusals_total", {{"reason", "memory"}}) >= 1;
  }));
  tailComesBack(fd.get(), 'w');
  for (auto* s : {a_.get(), b_.get()})
    EXPECT_EQ(metric(*s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}), 0);
  EXPECT_TRUE(closedOnBoth());
}

TEST_F(KernelRelayPair, WindowsHoldAtMostHalfTheMemoryBudget) {
  // Each of the two workers' shares is 768 KiB: room for both 256 KiB windows of a connection,
  // but windows may hold only half of it (384 KiB), so one direction stays with the worker.
  start("kernel_relay_after = \"0s\"\nbuffer_memory = 1572864");
  ThreadServer srv(hosts_.b(), server(), pingThenEchoTheRest());
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  auto flows = [&](SidecarProcess& s) {
    return metric(s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}) +
           metric(s, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "downstream"}});
  };
  // The client speaks first: A's upstream goes raw and into A's kernel relay, and B's on
  // receiving the raw header; B's downstream then finds no room and stays framed (so A's,
  // which waits for B's raw header, is never tried).
  EXPECT_TRUE(eventually([&] {
    return metric(*b_, "dmm_sidecar_kernel_relay_refusals_total", {{"reason", "memory"}}) == 1;
  }));
  EXPECT_EQ(flows(*a_), 1);
  EXPECT_EQ(flows(*b_), 1);
  EXPECT_TRUE(eventually([&] { return metric(*a_, "dmm_sidecar_buffer_memory_bytes") == 262144; }))
      << "the one window in the kernel is charged, and nothing else is held";
  tailComesBack(fd.get(), 'h');
  EXPECT_TRUE(closedOnBoth());
  EXPECT_TRUE(eventually([&] { return metric(*a_, "dmm_sidecar_buffer_memory_bytes") == 0; }))
      << "the window is given back when the connection ends";
}

TEST_F(KernelRelayPair, AFallbackToADirectConnectionIsHandedOverToo) {
  // No sidecar on B: A falls back to a direct connection, which the kernel relay carries.
  a_ = std::make_unique<SidecarProcess>(hosts_.a(),
                                        sidecarConfig(section("kernel_relay_after = \"0s\"")), "a");
  a_->installCapture();
  ThreadServer srv(hosts_.b(), server(), pingThenEchoTheRest());
  UniqueFd fd = connectTcp(hosts_.a(), server());
  ASSERT_TRUE(fd);
  ASSERT_TRUE(ping(fd.get()));
  EXPECT_TRUE(eventually([&] {
    return metric(*a_, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "upstream"}}) == 1 &&
           metric(*a_, "dmm_sidecar_kernel_relay_flows_total", {{"direction", "downstream"}}) == 1;
  }));
  tailComesBack(fd.get(), 't');
  EXPECT_TRUE(eventually([&] {
    return metric(*a_, "dmm_sidecar_connections_total",
                  {{"role", "outbound"}, {"stack", "direct"}, {"outcome", "closed"}}) == 1;
  }));
}

}  // namespace
}  // namespace dmm::testbed
