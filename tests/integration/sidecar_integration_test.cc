// The sidecar core end to end: two hosts in network namespaces joined by a veth pair, real
// iptables REDIRECT capture on host A, two real dmm-sidecar processes, real sockets.

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <thread>

#include "common/socket_util.h"
#include "proxy/handshake_codec.h"
#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

namespace handshake = dmm::proxy::handshake;

constexpr std::uint64_t kBig = 256ull << 20;  // 256 MiB
constexpr const char* kKey = "integration-test-key-0123456789";

// `timeouts` adds keys to the [timeouts] table (TOML does not allow defining it twice).
std::string securitySection(const std::string& key = kKey, const std::string& timeouts = {}) {
  return "[security]\npsk = \"" + key + "\"\n\n[timeouts]\nconnect = \"2s\"\nhandshake = \"2s\"\n" +
         timeouts + "\n";
}

class SidecarPair : public HostPairTest {
 protected:
  static void SetUpTestSuite() {
    rlimit rl{};
    ::getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }

  // B first, so A's first connection finds it.
  void startB(const std::string& extra = {}, const std::string& timeouts = {}) {
    b_ = std::make_unique<SidecarProcess>(
        hosts_.b(), sidecarConfig(securitySection(kKey, timeouts) + extra), "b");
  }
  void startA(const std::string& extra = {}, const std::string& key = kKey,
              const std::string& timeouts = {}, const std::string& log_format = "plain") {
    a_ = std::make_unique<SidecarProcess>(
        hosts_.a(), sidecarConfig(securitySection(key, timeouts) + extra, log_format), "a");
    a_->installCapture();
  }
  double metricA(const std::string& name, const std::map<std::string, std::string>& labels) {
    return a_->metric(name, labels).value_or(-1);
  }
  double metricB(const std::string& name, const std::map<std::string, std::string>& labels) {
    return b_->metric(name, labels).value_or(-1);
  }
  // Waits for a counter to reach `want` (metrics are updated when a connection closes).
  bool waitMetric(SidecarProcess& s, const std::string& name,
                  const std::map<std::string, std::string>& labels, double want) {
    return eventually([&] { return s.metric(name, labels).value_or(-1) >= want; }, 5s);
  }

  // 256 MiB client -> server, then 256 MiB back, checksummed, through both running sidecars.
  void transferBothWays();
};

// Connects from `from` to `to`, sends `payload` if any, and checks that the connection then
// ends in a reset with nothing received: what a refused captured connection looks like (its
// connect() already succeeded, to the sidecar).
::testing::AssertionResult endsInResetWithNoData(const Netns& from, const SocketAddress& to,
                                                 const std::string& payload = {}) {
  UniqueFd fd = connectTcp(from, to);
  if (!fd) return ::testing::AssertionFailure() << "connect to " << to.toString() << " failed";
  // On a loaded machine the reset can arrive before the payload is written: send() then
  // reports it (and consumes the socket's error, so that recv() would see a plain end).
  if (!payload.empty() && !writeAll(fd.get(), payload.data(), payload.size())) {
    if (errno == ECONNRESET) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "writing the payload failed: " << std::strerror(errno);
  }
  int err = 0;
  std::string got = readToEof(fd.get(), &err);
  if (!got.empty()) return ::testing::AssertionFailure() << "received " << got.size() << " bytes";
  if (err != ECONNRESET) {
    return ::testing::AssertionFailure()
           << "ended with " << (err != 0 ? std::strerror(err) : "a clean end of stream")
           << ", not a reset";
  }
  return ::testing::AssertionSuccess();
}

TEST_F(SidecarPair, Transfers256MiBEachWayByteExact) {
  startB();
  startA();
  transferBothWays();
  EXPECT_EQ(metricA("dmm_sidecar_splice_disabled_total", {}), 0);
}

TEST_F(SidecarPair, Transfers256MiBEachWayByteExactWithCopies) {
  // The read/write path that non-kernel stacks and splice-less kernels use.
  startB("[relay]\nsplice = false\n");
  startA("[relay]\nsplice = false\n");
  transferBothWays();
}

void SidecarPair::transferBothWays() {
  EXPECT_TRUE(testbed::transferBothWays(hosts_.a(), hosts_.b(), at(TwoHosts::kIp4B, 9000), kBig));
  // Carried by the kernel stack through B's sidecar, not around it.
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_GE(metricA("dmm_sidecar_relay_bytes_total",
                    {{"role", "outbound"}, {"stack", "kernel"}, {"direction", "upstream"}}),
            static_cast<double>(kBig));
  EXPECT_GE(metricB("dmm_sidecar_relay_bytes_total",
                    {{"role", "inbound"}, {"stack", "kernel"}, {"direction", "downstream"}}),
            static_cast<double>(kBig));
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_refused"}, {"action", "direct"}}),
      0);
}

TEST_F(SidecarPair, ClientHalfCloseThenFullReply) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000),
                      [](UniqueFd conn) { answerAfterEof(conn.get()); });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  EXPECT_TRUE(halfCloseThenFullAnswer(fd.get()));
}

TEST_F(SidecarPair, ServerSpeaksFirstAndHalfClosesFirst) {
  startB();
  startA();
  std::atomic<std::size_t> server_got{0};  // written by the server's thread (TSan found it plain)
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [&](UniqueFd conn) {
    std::string banner = "220 hello from the server\r\n";
    writeAll(conn.get(), banner.data(), banner.size());
    ::shutdown(conn.get(), SHUT_WR);            // the server is done talking...
    server_got = readToEof(conn.get()).size();  // ...but still listens to the client
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  // Read the banner without having sent anything, then the server's EOF.
  EXPECT_EQ(readToEof(fd.get()), "220 hello from the server\r\n");
  // Our direction is still open: send after the server's half-close.
  std::string late(200000, 'l');
  ASSERT_TRUE(writeAll(fd.get(), late.data(), late.size()));
  ::shutdown(fd.get(), SHUT_WR);
  ASSERT_TRUE(eventually([&] { return server_got.load() == late.size(); }));
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
}

TEST_F(SidecarPair, ServerResetReachesClientAsReset) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
    readExactly(conn.get(), 5);
    linger l{1, 0};
    ::setsockopt(conn.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    conn.reset();  // RST
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "hello", 5));
  int err = 0;
  std::string rest = readToEof(fd.get(), &err);
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(err, ECONNRESET) << "a reset must arrive as a reset, not as a clean end of stream";
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "reset"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "reset"}}, 1));
}

TEST_F(SidecarPair, PeerSidecarKilledMidTransferFailsTheClientPromptly) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
    receiveStream(conn.get());  // a slow-enough sink: it reads everything until the end
  });
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
  std::this_thread::sleep_for(500ms);  // data is flowing
  auto killed_at = std::chrono::steady_clock::now();
  b_->process().signal(SIGKILL);
  bool failed = eventually([&] { return send_errno.load() != 0; }, 5s);
  done = true;
  sender.join();
  ASSERT_TRUE(failed) << "the client kept sending into a dead path";
  EXPECT_TRUE(send_errno == ECONNRESET || send_errno == EPIPE) << std::strerror(send_errno);
  EXPECT_LT(failed_at - killed_at, 3s);
}

TEST_F(SidecarPair, NoPeerSidecarFallsBackDirectAndRemembers) {
  // B runs no sidecar at all.
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "first"), "first");
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_refused"}, {"action", "direct"}}),
      1);
  // The second connection does not probe again.
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "second"), "second");
  EXPECT_EQ(metricA("dmm_sidecar_fallbacks_total",
                    {{"reason", "cached_no_sidecar"}, {"action", "direct"}}),
            1);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "direct"}, {"outcome", "closed"}}, 2));
  // No handshake took place, so none was timed.
  EXPECT_EQ(metricA("dmm_sidecar_handshake_duration_seconds_count", {{"role", "outbound"}}), 0);
}

TEST_F(SidecarPair, FallbackRefuseModeRefuses) {
  startA("[fallback]\nmode = \"refuse\"\n");
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at(TwoHosts::kIp4B, 9000)));
  EXPECT_EQ(server.accepted(), 0);
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_refused"}, {"action", "refuse"}}),
      1);
  EXPECT_EQ(metricA("dmm_sidecar_connections_total",
                    {{"role", "outbound"}, {"stack", "none"}, {"outcome", "refused"}}),
            1);
}

TEST_F(SidecarPair, WrongKeyIsRejectedAndNeverReachesTheServer) {
  startB();
  startA({}, "a-different-key-0123456789abcdef");
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at(TwoHosts::kIp4B, 9000), "secret"));
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(server.accepted(), 0);
  EXPECT_EQ(metricB("dmm_sidecar_handshake_rejections_total",
                    {{"role", "inbound"}, {"reason", "auth_failed"}}),
            1);
  EXPECT_EQ(metricA("dmm_sidecar_handshake_rejections_total",
                    {{"role", "outbound"}, {"reason", "auth_failed"}}),
            1);
  EXPECT_EQ(metricA("dmm_sidecar_connections_total",
                    {{"role", "outbound"}, {"stack", "none"}, {"outcome", "refused"}}),
            1);
  EXPECT_EQ(metricB("dmm_sidecar_connections_total",
                    {{"role", "inbound"}, {"stack", "none"}, {"outcome", "refused"}}),
            1);
  // An authentication failure is never worked around by a direct connection.
  for (const char* reason : {"peer_refused", "peer_closed", "peer_protocol_error"}) {
    EXPECT_EQ(metricA("dmm_sidecar_fallbacks_total", {{"reason", reason}, {"action", "direct"}}),
              0);
  }
}

TEST_F(SidecarPair, SlowHeaderTimesOut) {
  startB();
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 17002));
  ASSERT_TRUE(fd);
  // A valid prefix, one byte per second: the 2 s handshake timeout must end it.
  const unsigned char prefix[] = {'D', 'M', 'M', 'H', 1, 1, 0, 0, 0, 0, 0, 64};
  auto start = std::chrono::steady_clock::now();
  bool closed = false;
  for (unsigned char c : prefix) {
    if (::send(fd.get(), &c, 1, MSG_NOSIGNAL) != 1) {
      closed = true;
      break;
    }
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 1000) == 1) {
      char buf[64];
      if (::recv(fd.get(), buf, sizeof buf, 0) <= 0) {
        closed = true;
        break;
      }
    }
  }
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(closed);
  EXPECT_LT(elapsed, 4s);
  EXPECT_GE(elapsed, 1500ms);
  EXPECT_EQ(metricB("dmm_sidecar_handshake_rejections_total",
                    {{"role", "inbound"}, {"reason", "timeout"}}),
            1);
}

TEST_F(SidecarPair, GarbageHeadersAreRejectedAndCounted) {
  startB();
  {
    UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 17002));
    ASSERT_TRUE(fd);
    std::string http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    writeAll(fd.get(), http.data(), http.size());
    int err = 0;
    EXPECT_EQ(readToEof(fd.get(), &err), "");
  }
  {
    // Right magic and version, garbage body: answered with a "malformed" reject.
    UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 17002));
    ASSERT_TRUE(fd);
    std::string frame = {'D', 'M', 'M', 'H', 1, 1, 0, 0, 0, 0, 0, 20};
    frame += std::string(20, '\x7f');
    writeAll(fd.get(), frame.data(), frame.size());
    std::string reply = readToEof(fd.get());
    ASSERT_GE(reply.size(), handshake::kPrefixSize);
    EXPECT_EQ(reply.substr(0, 4), "DMMH");
  }
  {
    // A body larger than max_header_bytes is refused before it is read.
    UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 17002));
    ASSERT_TRUE(fd);
    std::string frame = {'D', 'M', 'M', 'H', 1, 1, 0, 0, 0, 0x10, 0, 0};
    writeAll(fd.get(), frame.data(), frame.size());
    readToEof(fd.get());
  }
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_handshake_rejections_total",
                         {{"role", "inbound"}, {"reason", "bad_magic"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_handshake_rejections_total",
                         {{"role", "inbound"}, {"reason", "malformed"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_handshake_rejections_total",
                         {{"role", "inbound"}, {"reason", "too_large"}}, 1));
}

// A HELLO from host A for the echo server on B, with a nonce of its own (`seed`).
handshake::Hello helloFromA(std::uint8_t seed) {
  handshake::Hello hello;
  for (std::size_t i = 0; i < hello.nonce.size(); ++i)
    hello.nonce[i] = static_cast<std::uint8_t>(i * 7 + seed);
  hello.timestamp_ms =
      static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  hello.original_dst = at(TwoHosts::kIp4B, 9000);
  hello.offers.push_back({handshake::StackKind::kKernel, "kernel", {}});
  return hello;
}

// Sends `frame` (a HELLO encoded with `psk` and `nonce`) to B's tunnel port from A and reads
// the REPLY.
handshake::ReplyResult exchangeHello(const Netns& from, const std::vector<std::uint8_t>& frame,
                                     const std::vector<std::uint8_t>& psk,
                                     const handshake::Nonce& nonce) {
  UniqueFd fd = connectTcp(from, at(TwoHosts::kIp4B, 17002));
  writeAll(fd.get(), frame.data(), frame.size());
  std::string head = readExactly(fd.get(), handshake::kPrefixSize);
  if (head.size() < handshake::kPrefixSize) return handshake::ReplyResult{};
  std::size_t body = (std::size_t(std::uint8_t(head[8])) << 24) |
                     (std::size_t(std::uint8_t(head[9])) << 16) |
                     (std::size_t(std::uint8_t(head[10])) << 8) | std::uint8_t(head[11]);
  std::string rest = readExactly(fd.get(), body);
  std::string all = head + rest;
  std::vector<std::uint8_t> reply(all.begin(), all.end());
  return handshake::decodeReply(reply, psk, nonce, 4096);
}

TEST_F(SidecarPair, ReplayedAndStaleHelloAreRejected) {
  startB();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  std::string key = kKey;
  std::vector<std::uint8_t> psk(key.begin(), key.end());
  handshake::Hello hello = helloFromA(1);
  auto frame = handshake::encodeHello(hello, psk);
  auto send_hello = [&](const std::vector<std::uint8_t>& bytes) {
    return exchangeHello(hosts_.a(), bytes, psk, hello.nonce);
  };
  auto first = send_hello(frame);
  ASSERT_EQ(first.error, handshake::RejectReason::kNone);
  EXPECT_TRUE(first.reply.accepted);
  auto again = send_hello(frame);
  ASSERT_EQ(again.error, handshake::RejectReason::kNone);
  EXPECT_FALSE(again.reply.accepted);
  EXPECT_EQ(again.reply.reason, handshake::RejectReason::kReplayed);

  hello.nonce[0] ^= 0xff;
  hello.timestamp_ms -= 10 * 60 * 1000;  // ten minutes old
  auto stale = send_hello(handshake::encodeHello(hello, psk));
  ASSERT_EQ(stale.error, handshake::RejectReason::kNone);
  EXPECT_FALSE(stale.reply.accepted);
  EXPECT_EQ(stale.reply.reason, handshake::RejectReason::kStale);
  EXPECT_EQ(metricB("dmm_sidecar_handshake_rejections_total",
                    {{"role", "inbound"}, {"reason", "replayed"}}),
            1);
  EXPECT_EQ(
      metricB("dmm_sidecar_handshake_rejections_total", {{"role", "inbound"}, {"reason", "stale"}}),
      1);
}

TEST_F(SidecarPair, DestinationOutsideInboundAllowlistIsRefused) {
  startB(
      "[inbound]\nallow_local = false\n[[inbound.allow]]\ncidr = \"10.201.0.2/32\"\nports = "
      "\"9000\"\n");
  startA();
  ThreadServer allowed(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  ThreadServer forbidden(hosts_.b(), at(TwoHosts::kIp4B, 9001), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "ok"), "ok");
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at(TwoHosts::kIp4B, 9001)));
  EXPECT_EQ(forbidden.accepted(), 0);
  EXPECT_EQ(metricB("dmm_sidecar_handshake_rejections_total",
                    {{"role", "inbound"}, {"reason", "destination_not_allowed"}}),
            1);
  // Not worked around by a direct connection either.
  EXPECT_EQ(metricA("dmm_sidecar_handshake_rejections_total",
                    {{"role", "outbound"}, {"reason", "destination_not_allowed"}}),
            1);
}

TEST_F(SidecarPair, Ipv6EndToEnd) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp6B, 9000), echoHandler);
  std::string payload(1 << 20, 'v');
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp6B, 9000), payload), payload);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
}

TEST_F(SidecarPair, ForwardListenerCarriesToItsDestinationWithoutIptables) {
  startB();
  // No capture at all on A: applications dial the forward listeners themselves.
  a_ = std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(securitySection() + R"(
[capture]
enabled = false
[[forward]]
listen = "127.0.0.1:15000"
destination = "10.201.0.2:9000"
[[forward]]
listen = "127.0.0.1:15001"
destination = "[fd00:201::2]:9000"
)"),
                                        "a");
  ThreadServer server4(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  ThreadServer server6(hosts_.b(), at(TwoHosts::kIp6B, 9000), echoHandler);
  std::string payload(1 << 20, 'f');
  EXPECT_EQ(echoOnce(hosts_.a(), at("127.0.0.1", 15000), payload), payload);
  EXPECT_EQ(echoOnce(hosts_.a(), at("127.0.0.1", 15001), "six"), "six");
  EXPECT_EQ(server4.accepted(), 1);
  EXPECT_EQ(server6.accepted(), 1);
  // Carried through B's sidecar on the kernel stack, not around it.
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 2));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 2));
}

TEST_F(SidecarPair, SequentialSessionsReuseOneTunnelConnection) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  for (int i = 0; i < 5; ++i) {
    std::string payload = "session " + std::to_string(i) + std::string(100000, 'r');
    EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), payload), payload);
  }
  EXPECT_EQ(server.accepted(), 5);
  // Every session after the first found an idle connection to B (A has two workers, so the
  // first on each worker opens one): each a clean end, each carried by B, none bypassing it.
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 5));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 5));
  double reused_a = metricA("dmm_sidecar_tunnel_reuses_total", {{"role", "outbound"}});
  EXPECT_GE(reused_a, 3);
  EXPECT_EQ(metricB("dmm_sidecar_tunnel_reuses_total", {{"role", "inbound"}}), reused_a);
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_closed"}, {"action", "direct"}}), 0);
}

TEST_F(SidecarPair, AnIdleConnectionThePeerClosedLeavesThePoolNoFallback) {
  // B drops idle connections after 300ms, long before A would: A sees its pooled connection
  // close, forgets it, and opens a new one for the next session without concluding that B has
  // no sidecar. (The race where B closes as A reuses is handled by a retry on a fresh
  // connection, OutboundSession::retryFresh; no test forces that timing.)
  startB("[tunnel]\nkeepalive = \"300ms\"\n");
  startA("[tunnel]\nidle_timeout = \"1h\"\n");
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "one"), "one");
  std::this_thread::sleep_for(800ms);
  for (int i = 0; i < 4; ++i)
    EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "again"), "again");
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                         {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 5));
  for (const char* reason : {"peer_closed", "peer_refused", "cached_no_sidecar"}) {
    EXPECT_EQ(metricA("dmm_sidecar_fallbacks_total", {{"reason", reason}, {"action", "direct"}}), 0)
        << reason;
  }
  // Closing an idle connection is housekeeping, not a rejected handshake.
  EXPECT_EQ(metricB("dmm_sidecar_handshake_rejections_total",
                    {{"role", "inbound"}, {"reason", "timeout"}}),
            0);
}

TEST_F(SidecarPair, EarlyDataSurvivesARejectOnAReusedConnection) {
  // B's replay cache is tiny, so once it fills, HELLOs on reused connections are rejected as
  // overloaded and A falls back direct. The client's first bytes went out with those HELLOs
  // as early data: the direct connection must still deliver every byte, in order.
  // ([security] comes from securitySection() in startB(), so B is configured here.)
  b_ = std::make_unique<SidecarProcess>(
      hosts_.b(),
      sidecarConfig("[security]\npsk = \"" + std::string(kKey) +
                    "\"\nreplay_cache_size = 1024\n\n[timeouts]\nconnect = \"2s\"\n"),
      "b");
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  int fallbacks_seen_at = -1;
  for (int i = 0; i < 2000 && fallbacks_seen_at < 0; ++i) {
    std::string payload = "request " + std::to_string(i) + std::string(3000, 'e');
    ASSERT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), payload), payload) << i;
    if (metricA("dmm_sidecar_fallbacks_total",
                {{"reason", "peer_overloaded"}, {"action", "direct"}}) >= 1)
      fallbacks_seen_at = i;
  }
  ASSERT_GE(fallbacks_seen_at, 0) << "the replay cache never filled";
  // A few more after the first fallback, all whole.
  for (int i = 0; i < 20; ++i) {
    std::string payload(5000, static_cast<char>('A' + i));
    EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), payload), payload);
  }
  EXPECT_GE(metricA("dmm_sidecar_tunnel_reuses_total", {{"role", "outbound"}}), 1);
}

TEST_F(SidecarPair, TheResponderAnswersTheLowerFramingVersion) {
  // v1 (reusable framed sessions), v2 (v1 plus a raw end of framing), and a version from the
  // future, which gets the highest this side knows.
  startB();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  std::string key = kKey;
  std::vector<std::uint8_t> psk(key.begin(), key.end());
  std::uint8_t seed = 10;
  for (auto [asked, answered] :
       {std::pair<std::uint8_t, std::uint8_t>{0, 0}, {1, 1}, {2, 2}, {7, 2}}) {
    handshake::Hello hello = helloFromA(seed++);
    hello.framing = asked;
    auto r = exchangeHello(hosts_.a(), handshake::encodeHello(hello, psk), psk, hello.nonce);
    ASSERT_EQ(r.error, handshake::RejectReason::kNone);
    ASSERT_TRUE(r.reply.accepted);
    EXPECT_EQ(r.reply.framing, answered) << "asked for " << int{asked};
  }
}

TEST_F(SidecarPair, PlainAndFramingSidecarsInteroperate) {
  // A sidecar with reuse off speaks plain v1 sessions; either side may be the old one.
  for (bool a_reuses : {false, true}) {
    a_.reset();
    b_.reset();
    startB(a_reuses ? "[tunnel]\nreuse = false\n" : "");
    startA(a_reuses ? "" : "[tunnel]\nreuse = false\n");
    ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
      // Half-close both ways: the client's end, then the server's.
      std::string got = readToEof(conn.get());
      writeAll(conn.get(), got.data(), got.size());
      ::shutdown(conn.get(), SHUT_WR);
    });
    for (int i = 0; i < 3; ++i) {
      std::string payload(300000, static_cast<char>('a' + i));
      EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), payload), payload);
    }
    EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_connections_total",
                           {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 3));
    EXPECT_EQ(metricA("dmm_sidecar_tunnel_reuses_total", {{"role", "outbound"}}), 0);
  }
}

TEST_F(SidecarPair, ThousandConcurrentConnectionsByteExact) {
  startB();
  startA();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  constexpr int kConns = 1000;
  std::vector<UniqueFd> fds;
  fds.reserve(kConns);
  for (int i = 0; i < kConns; ++i) {
    UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 30s);
    ASSERT_TRUE(fd) << "connection " << i << ": " << std::strerror(errno);
    fds.push_back(std::move(fd));
  }
  // All open at once; now each sends its own payload and reads it back.
  auto payload = [](int i) {
    std::string p = "conn-" + std::to_string(i) + ":";
    p.resize(1000 + static_cast<std::size_t>(i % 7) * 500, static_cast<char>('a' + i % 26));
    return p;
  };
  for (int i = 0; i < kConns; ++i) {
    auto p = payload(i);
    ASSERT_TRUE(writeAll(fds[static_cast<std::size_t>(i)].get(), p.data(), p.size()));
  }
  EXPECT_TRUE(eventually([&] { return server.accepted() == kConns; }, 20s)) << server.accepted();
  for (int i = 0; i < kConns; ++i)
    ::shutdown(fds[static_cast<std::size_t>(i)].get(), SHUT_WR);
  int mismatches = 0;
  for (int i = 0; i < kConns; ++i) {
    if (readToEof(fds[static_cast<std::size_t>(i)].get()) != payload(i)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}},
                         kConns));
}

TEST_F(SidecarPair, DirectConnectionToCaptureListenerIsRefusedAsLoop) {
  startA();
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at("127.0.0.1", 17001)));
  EXPECT_EQ(metricA("dmm_sidecar_capture_refusals_total", {{"reason", "loop"}}), 1);
}

TEST_F(SidecarPair, CaptureRulesInstallAndRemoveIdempotently) {
  startA();  // installs once
  a_->installCapture();
  auto count_jumps = [&](const char* tool) {
    auto out = hosts_.a().exec({tool, "-w", "-t", "nat", "-S", "OUTPUT"}).output;
    std::size_t n = 0;
    for (std::size_t pos = 0; (pos = out.find("-j DMM_SIDECAR", pos)) != std::string::npos; ++pos)
      ++n;
    return n;
  };
  EXPECT_EQ(count_jumps("iptables"), 1u);
  EXPECT_EQ(count_jumps("ip6tables"), 1u);
  auto chain = hosts_.a().exec({"iptables", "-w", "-t", "nat", "-S", "DMM_SIDECAR"}).output;
  EXPECT_NE(chain.find("--mark 0x444d"), std::string::npos) << chain;
  EXPECT_NE(chain.find("REDIRECT --to-ports 17001"), std::string::npos) << chain;
  a_->removeCapture();
  a_->removeCapture();
  EXPECT_EQ(count_jumps("iptables"), 0u);
  EXPECT_EQ(count_jumps("ip6tables"), 0u);
  EXPECT_NE(hosts_.a().exec({"iptables", "-w", "-t", "nat", "-S", "DMM_SIDECAR"}).status, 0);
}

// Resident memory of a process, in KiB (0 if unreadable).
std::uint64_t rssKiB(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6));
  }
  return 0;
}

TEST_F(SidecarPair, ActiveConnectionsGaugeFollowsRelays) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  const std::map<std::string, std::string> out{{"role", "outbound"}};
  const std::map<std::string, std::string> in{{"role", "inbound"}};
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "ping", 4));
  EXPECT_TRUE(eventually([&] { return metricA("dmm_sidecar_active_connections", out) == 1; }));
  EXPECT_TRUE(eventually([&] { return metricB("dmm_sidecar_active_connections", in) == 1; }));
  ::shutdown(fd.get(), SHUT_WR);
  EXPECT_EQ(readToEof(fd.get()), "ping");
  EXPECT_TRUE(eventually([&] { return metricA("dmm_sidecar_active_connections", out) == 0; }));
  EXPECT_TRUE(eventually([&] { return metricB("dmm_sidecar_active_connections", in) == 0; }));
}

TEST_F(SidecarPair, SlowReaderPausesItsWriterAndMemoryStaysBounded) {
  // Copy mode, so that every byte a sidecar holds would show in its resident memory.
  startB("[relay]\nsplice = false\n");
  startA("[relay]\nsplice = false\n");
  std::atomic<bool> drain{false};
  StreamDigest server_got;
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [&](UniqueFd conn) {
    while (!drain)
      std::this_thread::sleep_for(10ms);     // a reader that stalls...
    server_got = receiveStream(conn.get());  // ...then takes everything
  });
  const std::uint64_t rss_a0 = rssKiB(a_->process().pid());
  const std::uint64_t rss_b0 = rssKiB(b_->process().pid());
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 30s);
  ASSERT_TRUE(fd);
  StreamDigest sent;
  std::thread sender([&] {
    sent = sendStream(fd.get(), kBig, 11);
    ::shutdown(fd.get(), SHUT_WR);
  });
  // Both relays stop reading when the stalled side backs up.
  const std::map<std::string, std::string> up{{"direction", "upstream"}};
  EXPECT_TRUE(eventually([&] { return metricB("dmm_sidecar_relay_pauses_total", up) >= 1; }));
  EXPECT_TRUE(eventually([&] { return metricA("dmm_sidecar_relay_pauses_total", up) >= 1; }));
  std::this_thread::sleep_for(1s);  // the client keeps pushing against the stall
  const std::uint64_t rss_a1 = rssKiB(a_->process().pid());
  const std::uint64_t rss_b1 = rssKiB(b_->process().pid());
  drain = true;
  sender.join();
  server.stop();
  EXPECT_EQ(sent.bytes, kBig);
  EXPECT_EQ(server_got.bytes, kBig);
  EXPECT_EQ(server_got.sha256_hex, sent.sha256_hex);
  // One connection in flight: what a sidecar may hold is its 64 KiB per-direction buffers, not
  // the megabytes the client pushed.
  EXPECT_LT(rss_a1 - std::min(rss_a1, rss_a0), 4096u) << rss_a0 << " -> " << rss_a1 << " KiB";
  EXPECT_LT(rss_b1 - std::min(rss_b1, rss_b0), 4096u) << rss_b0 << " -> " << rss_b1 << " KiB";
}

TEST_F(SidecarPair, IdleConnectionIsClosedAfterTheIdleTimeout) {
  startB();
  startA({}, kKey, "idle = \"1s\"\n");
  std::string server_got;
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000),
                      [&](UniqueFd conn) { server_got = readToEof(conn.get()); });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "hi", 2));
  auto start = std::chrono::steady_clock::now();
  int err = 0;
  EXPECT_EQ(readToEof(fd.get(), &err), "");  // the sidecar ends the silent connection
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(err, 0);
  EXPECT_GE(elapsed, 800ms);
  EXPECT_LT(elapsed, 4s);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "idle_timeout"}},
                         1));
  server.stop();
  EXPECT_EQ(server_got, "hi");  // the server saw the data, then a clean end
}

TEST_F(SidecarPair, HalfClosedConnectionIsClosedAfterItsTimeout) {
  startB();
  startA({}, kKey, "half_closed = \"1s\"\n");
  std::atomic<bool> release{false};
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [&](UniqueFd conn) {
    readToEof(conn.get());
    // Never answers and never closes: the client's half-closed connection would hang forever.
    while (!release)
      std::this_thread::sleep_for(10ms);
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "request", 7));
  ::shutdown(fd.get(), SHUT_WR);
  auto start = std::chrono::steady_clock::now();
  int err = 0;
  EXPECT_EQ(readToEof(fd.get(), &err), "");
  auto elapsed = std::chrono::steady_clock::now() - start;
  release = true;
  EXPECT_GE(elapsed, 800ms);
  EXPECT_LT(elapsed, 4s);
  EXPECT_TRUE(waitMetric(
      *a_, "dmm_sidecar_connections_total",
      {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "half_closed_timeout"}}, 1));
}

TEST_F(SidecarPair, SilentPeerTunnelPortFallsBackAfterTheConnectTimeout) {
  // B's firewall drops everything to the tunnel port: A's connect can only time out.
  hosts_.b().mustExec(
      {"iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "17002", "-j", "DROP"});
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "late"), "late");
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_GE(elapsed, 1800ms);  // timeouts.connect = 2s
  EXPECT_LT(elapsed, 5s);
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_timeout"}, {"action", "direct"}}),
      1);
  // The next connection does not wait again.
  start = std::chrono::steady_clock::now();
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "fast"), "fast");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  EXPECT_EQ(metricA("dmm_sidecar_fallbacks_total",
                    {{"reason", "cached_no_sidecar"}, {"action", "direct"}}),
            1);
}

TEST_F(SidecarPair, UnreachableDestinationIsRefusedNotWorkedAround) {
  startB();
  startA();
  // Nothing listens on B:9002.
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at(TwoHosts::kIp4B, 9002)));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_handshake_rejections_total",
                         {{"role", "inbound"}, {"reason", "destination_unreachable"}}, 1));
  EXPECT_EQ(metricA("dmm_sidecar_handshake_rejections_total",
                    {{"role", "outbound"}, {"reason", "destination_unreachable"}}),
            1);
  // A never learned which stack B would have used; B had chosen one.
  EXPECT_EQ(metricA("dmm_sidecar_connections_total",
                    {{"role", "outbound"}, {"stack", "none"}, {"outcome", "connect_failed"}}),
            1);
  EXPECT_EQ(metricB("dmm_sidecar_connections_total",
                    {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "connect_failed"}}),
            1);
}

TEST_F(SidecarPair, SlowDestinationBehindThePeerIsRefusedNotMistakenForNoSidecar) {
  // B's firewall drops SYNs to port 9003: B's connect to the destination can only time out.
  // A must wait for B's verdict instead of deciding that B runs no sidecar.
  hosts_.b().mustExec(
      {"iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9003", "-j", "DROP"});
  startB();
  startA();
  EXPECT_TRUE(endsInResetWithNoData(hosts_.a(), at(TwoHosts::kIp4B, 9003)));
  EXPECT_TRUE(waitMetric(*b_, "dmm_sidecar_handshake_rejections_total",
                         {{"role", "inbound"}, {"reason", "destination_unreachable"}}, 1));
  EXPECT_EQ(metricA("dmm_sidecar_handshake_rejections_total",
                    {{"role", "outbound"}, {"reason", "destination_unreachable"}}),
            1);
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_timeout"}, {"action", "direct"}}),
      0);
  // B is still known to run a sidecar: the next connection is carried, not sent around it.
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "still carried"), "still carried");
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
}

TEST_F(SidecarPair, HalfClosedTimeoutCountsFromTheHalfClose) {
  startB();
  startA({}, kKey, "half_closed = \"1s\"\n");
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
    std::string request = readToEof(conn.get());
    std::this_thread::sleep_for(500ms);  // well within the half-closed timeout
    writeAll(conn.get(), request.data(), request.size());
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000));
  ASSERT_TRUE(fd);
  ASSERT_TRUE(writeAll(fd.get(), "request", 7));
  std::this_thread::sleep_for(1500ms);  // quiet for longer than the half-closed timeout...
  ::shutdown(fd.get(), SHUT_WR);        // ...then the client half-closes
  int err = 0;
  EXPECT_EQ(readToEof(fd.get(), &err), "request");
  EXPECT_EQ(err, 0);
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
}

TEST_F(SidecarPair, TimeoutWithUndeliveredBytesEndsInAResetNotAFalseEnd) {
  // The server streams to a client that stops reading: A holds bytes it can never deliver.
  // When A's idle timeout ends the connection, a FIN after the bytes already in the client's
  // socket would tell the client that the stream arrived whole.
  startB();
  startA({}, kKey, "idle = \"1s\"\n");
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), [](UniqueFd conn) {
    std::vector<char> block(1 << 16, 'z');
    while (::send(conn.get(), block.data(), block.size(), MSG_NOSIGNAL) > 0) {
    }
  });
  UniqueFd fd = connectTcp(hosts_.a(), at(TwoHosts::kIp4B, 9000), 20s);
  ASSERT_TRUE(fd);
  std::this_thread::sleep_for(2500ms);  // not reading, past A's idle timeout
  int err = 0;
  std::string got = readToEof(fd.get(), &err);
  EXPECT_GT(got.size(), 0u);
  EXPECT_EQ(err, ECONNRESET) << "the client was told a truncated stream (" << got.size()
                             << " bytes) ended normally";
  EXPECT_TRUE(waitMetric(*a_, "dmm_sidecar_connections_total",
                         {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "idle_timeout"}},
                         1));
}

// Write-write-read rounds: two small writes, then a one-byte answer once both arrived. A relay
// leg with Nagle on holds the second write until the first is acknowledged, and the server's
// delayed ACK makes that ~40 ms a round. The test's own sockets have TCP_NODELAY, so any stall
// is the sidecars'.
std::chrono::milliseconds writeWriteReadRounds(const Netns& from, const SocketAddress& to,
                                               int rounds) {
  UniqueFd fd = connectTcp(from, to);
  if (!fd) return std::chrono::hours(1);
  (void)net::setNoDelay(fd.get(), true);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    char answer = 0;
    if (!writeAll(fd.get(), "a", 1)) return std::chrono::hours(1);
    std::this_thread::sleep_for(1ms);  // two segments, not one
    if (!writeAll(fd.get(), "b", 1) || ::recv(fd.get(), &answer, 1, 0) != 1) {
      return std::chrono::hours(1);
    }
  }
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               start);
}

void pairThenAnswer(UniqueFd conn) {
  (void)net::setNoDelay(conn.get(), true);
  for (;;) {
    std::string two = readExactly(conn.get(), 2);
    if (two.size() != 2 || !writeAll(conn.get(), "!", 1)) return;
  }
}

TEST_F(SidecarPair, SmallWritesAreNotDelayedByNagleOnAnyLeg) {
  startB();
  startA();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), pairThenAnswer);
  // Carried: client -> A -> tunnel -> B -> server.
  auto carried = writeWriteReadRounds(hosts_.a(), at(TwoHosts::kIp4B, 9000), 50);
  EXPECT_LT(carried, 1000ms) << "50 rounds through both sidecars";
  b_.reset();  // no sidecar on B: the direct fallback leg
  auto direct = writeWriteReadRounds(hosts_.a(), at(TwoHosts::kIp4B, 9000), 50);
  EXPECT_LT(direct, 1000ms) << "50 rounds over the direct fallback";
}

TEST_F(SidecarPair, OneLogLinePerConnectionOnEachSideAndTheyCorrelate) {
  startB();
  startA({}, kKey, {}, "journal");  // A logs as under systemd: priority prefixes, no timestamps
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000), echoHandler);
  EXPECT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, 9000), "twelve bytes"), "twelve bytes");
  const std::regex a_line(
      R"(^<6>conn ([0-9a-f]+) role=outbound stack=kernel rule=default policy=1 )"
      R"(dst=10\.201\.0\.2:9000 up=12 down=12 )"
      R"(duration=[0-9.]+s end=closed$)");
  const std::regex b_line(R"(conn [0-9a-f]+ role=inbound stack=kernel rule=default policy=1 )"
                          R"(dst=10\.201\.0\.2:9000 up=12 down=12 )"
                          R"(duration=[0-9.]+s end=closed peer_conn=([0-9a-f]+)$)");
  std::string a_id;
  std::string b_peer;
  ASSERT_TRUE(eventually([&] {
    std::smatch m;
    std::istringstream a_log(a_->log());
    for (std::string line; std::getline(a_log, line);) {
      if (std::regex_match(line, m, a_line)) a_id = m[1];
    }
    std::istringstream b_log(b_->log());
    for (std::string line; std::getline(b_log, line);) {
      if (std::regex_search(line, m, b_line)) b_peer = m[1];
    }
    return !a_id.empty() && !b_peer.empty();
  })) << "A:\n"
      << a_->log() << "B:\n"
      << b_->log();
  EXPECT_EQ(a_id, b_peer) << "B's line names A's connection id";
  // Every line A wrote carries a journald priority prefix.
  std::istringstream a_log(a_->log());
  for (std::string line; std::getline(a_log, line);) {
    EXPECT_TRUE(std::regex_search(line, std::regex("^<[0-7]>"))) << line;
  }
}

TEST(SidecarCapture, InstallRefusesWhenCaptureIsDisabled) {
  // Rules redirecting to a listener that the config says not to open would black-hole every
  // outgoing TCP connection of the host.
  Netns ns(uniqueName("cap"));
  TempDir dir;
  std::string path =
      dir.write("off.toml", "[capture]\nenabled = false\n[security]\npsk = \"0123456789abcdef\"\n");
  auto r = ns.exec({sidecarBinary(), "capture", "install", "-c", path});
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("capture is disabled"), std::string::npos) << r.output;
  EXPECT_NE(ns.exec({"iptables", "-w", "-t", "nat", "-S", "DMM_SIDECAR"}).status, 0);
  EXPECT_EQ(ns.exec({"iptables", "-w", "-t", "nat", "-S", "OUTPUT"}).output.find("DMM_SIDECAR"),
            std::string::npos);
}

TEST(SidecarCapture, RemoveClearsBothFamiliesWhateverTheConfigSaysNow) {
  // Installed with IPv6 on; the operator then turns capture.ipv6 off and removes the rules.
  Netns ns(uniqueName("cap"));
  TempDir dir;
  const std::string key = "[security]\npsk = \"0123456789abcdef\"\n";
  std::string with_v6 = dir.write("v6.toml", key);
  std::string without_v6 = dir.write("v4.toml", "[capture]\nipv6 = false\n" + key);
  ns.mustExec({sidecarBinary(), "capture", "install", "-c", with_v6});
  ns.mustExec({sidecarBinary(), "capture", "install", "-c", with_v6});
  ASSERT_EQ(ns.exec({"ip6tables", "-w", "-t", "nat", "-S", "DMM_SIDECAR"}).status, 0);
  // Two stray jumps left by hand: removal takes every copy.
  for (const char* tool : {"iptables", "ip6tables"}) {
    for (int i = 0; i < 2; ++i) {
      ns.mustExec({tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "DMM_SIDECAR"});
    }
  }
  ns.mustExec({sidecarBinary(), "capture", "remove", "-c", without_v6});
  for (const char* tool : {"iptables", "ip6tables"}) {
    EXPECT_NE(ns.exec({tool, "-w", "-t", "nat", "-S", "DMM_SIDECAR"}).status, 0) << tool;
    EXPECT_EQ(ns.exec({tool, "-w", "-t", "nat", "-S", "OUTPUT"}).output.find("DMM_SIDECAR"),
              std::string::npos)
        << tool;
  }
  ns.mustExec({sidecarBinary(), "capture", "remove", "-c", without_v6});  // nothing left: fine
}

TEST(SidecarCli, ValidateReportsEveryErrorAsFileLineCol) {
  TempDir dir;
  std::string path =
      dir.write("bad.toml", "[sidecar]\nworkers = -1\nfoo = 1\n[timeouts]\nidle = \"forever\"\n");
  auto r = run({sidecarBinary(), "--mode", "validate", "-c", path});
  EXPECT_EQ(r.status, 2) << r.output;
  std::regex line_re("^" + path + ":[0-9]+:[0-9]+: error: .+$");
  int lines = 0;
  std::istringstream in(r.output);
  for (std::string line; std::getline(in, line);) {
    EXPECT_TRUE(std::regex_match(line, line_re)) << line;
    ++lines;
  }
  EXPECT_EQ(lines, 4) << r.output;  // workers, foo, idle, and the missing key
  std::string good = dir.write("good.toml", "[security]\npsk = \"0123456789abcdef\"\n");
  auto ok = run({sidecarBinary(), "--mode", "validate", "-c", good});
  EXPECT_EQ(ok.status, 0) << ok.output;
}

TEST(SidecarCli, VersionNamesTheCommitItWasBuiltFrom) {
  auto version = run({sidecarBinary(), "--version"});
  EXPECT_EQ(version.status, 0);
  EXPECT_EQ(version.output.rfind("dmm-sidecar ", 0), 0u) << version.output;
  auto head = run({"git", "-C", DMM_SOURCE_DIR, "rev-parse", "--short=12", "HEAD"});
  if (head.status != 0) GTEST_SKIP() << "sources are not a git checkout";
  head.output.resize(12);
  // Read at build time, not configure time: a rebuild after a commit must not report the old one.
  EXPECT_NE(version.output.find("(" + head.output), std::string::npos)
      << version.output << " vs HEAD " << head.output;
}

}  // namespace
}  // namespace dmm::testbed
