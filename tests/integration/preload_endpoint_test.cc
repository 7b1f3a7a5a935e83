// The sidecar's preload endpoint, spoken to directly (the shim's own tests run real programs
// under LD_PRELOAD): a Unix connection with a preamble is carried to the peer sidecar like a
// captured one, the kernel's word on who connected (uid, process name) and the QoS hint reach
// the policy, and bad or slow preambles are refused and counted.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <sys/stat.h>

#include <csignal>
#include <cstring>
#include <fstream>
#include <string>

#include "preload/preamble.h"
#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kConfig = R"(
[security]
psk = "preload-endpoint-key-0123456789ab"

[timeouts]
handshake = "1s"
)";

// Unix sockets are not in any network namespace: the test connects from here.
UniqueFd connectUnix(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return {};
  setTimeouts(fd.get(), 10s);
  return fd;
}

std::vector<std::uint8_t> preamble(const char* ip, std::uint16_t port, std::string qos = {}) {
  preload::Preamble p;
  p.destination.family = AF_INET;
  ::inet_pton(AF_INET, ip, p.destination.address);
  p.destination.port = port;
  p.qos = std::move(qos);
  std::vector<std::uint8_t> out;
  EXPECT_TRUE(preload::encodePreamble(p, out));
  return out;
}

// This process's name as the kernel reports it to the sidecar.
std::string ownComm() {
  std::ifstream in("/proc/self/comm");
  std::string name;
  std::getline(in, name);
  return name;
}

class PreloadEndpoint : public HostPairTest {
 protected:
  void start(const std::map<std::string, std::string>& policy = {}) {
    b_ = std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(kConfig), "b");
    a_ = std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(kConfig), "a", policy);
  }
  // Sends a preamble for B's echo server, then `payload`, half-closes, and reads the answer.
  std::string roundTrip(const std::vector<std::uint8_t>& head, const std::string& payload) {
    UniqueFd fd = connectUnix(a_->preloadSocket());
    if (!fd) return "<connect failed>";
    std::string bytes(head.begin(), head.end());
    bytes += payload;
    if (!writeAll(fd.get(), bytes.data(), bytes.size())) return "<write failed>";
    ::shutdown(fd.get(), SHUT_WR);
    return readToEof(fd.get());
  }
  double metricA(const std::string& name, const std::map<std::string, std::string>& labels) {
    return a_->metric(name, labels).value_or(-1);
  }
};

TEST_F(PreloadEndpoint, CarriesTheConnectionThroughBothSidecars) {
  start();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  std::string payload(1 << 20, 'p');
  payload += "end";
  EXPECT_EQ(roundTrip(preamble(TwoHosts::kIp4B, 9000), payload), payload);
  EXPECT_EQ(server.accepted(), 1);
  EXPECT_TRUE(eventually(
      [&] {
        return metricA("dmm_sidecar_connections_total",
                       {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}) == 1;
      },
      5s));
  EXPECT_EQ(b_->metric("dmm_sidecar_connections_total",
                       {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}),
            1);
}

TEST_F(PreloadEndpoint, TheKernelsWordOnTheAppAndTheQosHintReachThePolicy) {
  // Rules in order: the app of another name, then this process by name and uid with the
  // latency hint, then a bulk rule. Only the second may match a latency connection.
  std::string uid = std::to_string(::getuid());
  start({{"10-apps.toml",
          "[[rule]]\nname = \"other-app\"\nmatch.app = [\"not-this-one\"]\n"
          "stacks = [\"kernel\"]\n\n"
          "[[rule]]\nname = \"this-app\"\nmatch.app = [\"" +
              ownComm() + "\"]\nmatch.uid = [" + uid +
              "]\nmatch.qos = [\"latency\"]\nstacks = [\"kernel\"]\n\n"
              "[[rule]]\nname = \"bulk\"\nmatch.qos = [\"bulk\"]\n"
              "stacks = [\"kernel\"]\n"}});
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  EXPECT_EQ(roundTrip(preamble(TwoHosts::kIp4B, 9000, "latency"), "fast"), "fast");
  EXPECT_EQ(roundTrip(preamble(TwoHosts::kIp4B, 9000, "bulk"), "slow"), "slow");
  EXPECT_EQ(roundTrip(preamble(TwoHosts::kIp4B, 9000), "plain"), "plain");
  auto decisions = [&](const char* rule) {
    return metricA("dmm_sidecar_policy_decisions_total", {{"role", "outbound"}, {"rule", rule}});
  };
  EXPECT_EQ(decisions("this-app"), 1);
  EXPECT_EQ(decisions("bulk"), 1);
  EXPECT_EQ(decisions("default"), 1);
  EXPECT_EQ(decisions("other-app"), -1);  // never decided anything: no series
}

TEST_F(PreloadEndpoint, ALiveConnectionShowsItsAppInCtlConnections) {
  start();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  UniqueFd fd = connectUnix(a_->preloadSocket());
  ASSERT_TRUE(fd.valid());
  auto head = preamble(TwoHosts::kIp4B, 9000);
  ASSERT_TRUE(writeAll(fd.get(), head.data(), head.size()));
  ASSERT_TRUE(writeAll(fd.get(), "ping", 4));
  ASSERT_EQ(readExactly(fd.get(), 4), "ping");  // relaying: the relay exists now
  auto listed = a_->ctl({"connections"});
  EXPECT_EQ(listed.status, 0);
  EXPECT_NE(listed.output.find(" app=" + ownComm() + " "), std::string::npos) << listed.output;
}

TEST_F(PreloadEndpoint, RefusesABadOrSlowPreambleAndCountsIt) {
  start();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  // Not a preamble at all: closed at once.
  EXPECT_EQ(roundTrip({'G', 'E', 'T', ' '}, "/ HTTP/1.0\r\n\r\n"), "");
  // Half a preamble, then nothing: closed after timeouts.handshake (1 s).
  auto head = preamble(TwoHosts::kIp4B, 9000);
  UniqueFd slow = connectUnix(a_->preloadSocket());
  ASSERT_TRUE(slow.valid());
  ASSERT_TRUE(writeAll(slow.get(), head.data(), 5));
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(readToEof(slow.get()), "");
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 800ms);
  EXPECT_EQ(metricA("dmm_sidecar_capture_refusals_total", {{"reason", "bad_preamble"}}), 2);
  EXPECT_EQ(server.accepted(), 0);
  // A preamble split across writes is fine.
  UniqueFd split = connectUnix(a_->preloadSocket());
  ASSERT_TRUE(split.valid());
  ASSERT_TRUE(writeAll(split.get(), head.data(), 3));
  ::usleep(50'000);
  ASSERT_TRUE(writeAll(split.get(), head.data() + 3, head.size() - 3));
  ASSERT_TRUE(writeAll(split.get(), "late", 4));
  ::shutdown(split.get(), SHUT_WR);
  EXPECT_EQ(readToEof(split.get()), "late");
}

TEST_F(PreloadEndpoint, TheSocketFileIsThereWhileServingAndGoneAfter) {
  start();
  struct stat st {};
  ASSERT_EQ(::stat(a_->preloadSocket().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0666u);
  a_->process().signal(SIGTERM);
  EXPECT_EQ(a_->process().wait(5s), 0);
  EXPECT_NE(::stat(a_->preloadSocket().c_str(), &st), 0);
  // A shim connecting now is refused at once (and goes direct), never left waiting.
  EXPECT_FALSE(connectUnix(a_->preloadSocket()).valid());
}

}  // namespace
}  // namespace dmm::testbed
