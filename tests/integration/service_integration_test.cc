// The daemon as a service: graceful stop (drain on SIGTERM) and listening sockets handed over
// the way systemd passes them (LISTEN_FDS), so that a restart keeps their backlog. The systemd
// side itself (Type=notify, the fd store, the unit) is tested in a booted container by
// tests/package/.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <chrono>
#include <regex>
#include <string>

#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kForwardConfig = R"(
[security]
psk = "service-test-key-0123456789abcdef"

[capture]
enabled = false

[[forward]]
listen = "127.0.0.1:15000"
destination = "10.201.0.2:9000"
)";

class ServicePair : public HostPairTest {
 protected:
  // A with one forward listener to B's echo server on 9000; `drain` replaces the test bed's.
  void start(const std::string& drain, const std::vector<int>& listen_fds = {}) {
    b_ = std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(kForwardConfig), "b");
    std::string config = sidecarConfig(kForwardConfig);
    config = std::regex_replace(config, std::regex("drain_timeout = \"1s\""),
                                "drain_timeout = \"" + drain + "\"");
    a_ = std::make_unique<SidecarProcess>(hosts_.a(), config, "a",
                                          std::map<std::string, std::string>{}, listen_fds);
  }
  // One round trip on an open connection.
  static bool echoes(int fd, const std::string& text) {
    return writeAll(fd, text.data(), text.size()) && readExactly(fd, text.size()) == text;
  }
};

TEST_F(ServicePair, SigtermDrainsOpenConnectionsThenExits) {
  start("20s");
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  UniqueFd open = connectTcp(hosts_.a(), at("127.0.0.1", 15000));
  ASSERT_TRUE(open.valid());
  ASSERT_TRUE(echoes(open.get(), "before"));

  a_->process().signal(SIGTERM);
  // No new connections: the listener closes at once (a probe that got in first is served).
  EXPECT_TRUE(eventually(
      [&] {
        UniqueFd probe = connectTcp(hosts_.a(), at("127.0.0.1", 15000), 1s);
        return !probe.valid();
      },
      5s));
  // The established one is still carried, both ways.
  EXPECT_TRUE(a_->process().running());
  EXPECT_TRUE(echoes(open.get(), "during the drain"));
  // It ends; the drain is over long before its 20 s.
  auto closed_at = std::chrono::steady_clock::now();
  ::shutdown(open.get(), SHUT_WR);
  EXPECT_EQ(readToEof(open.get()), "");
  EXPECT_EQ(a_->process().wait(5s), 0) << "exit status";
  EXPECT_LT(std::chrono::steady_clock::now() - closed_at, 3s);
  EXPECT_NE(a_->log().find("draining"), std::string::npos);
}

TEST_F(ServicePair, DrainTimeoutClosesWhatIsStillOpen) {
  start("1s");
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  UniqueFd open = connectTcp(hosts_.a(), at("127.0.0.1", 15000));
  ASSERT_TRUE(open.valid());
  ASSERT_TRUE(echoes(open.get(), "hello"));
  auto sent = std::chrono::steady_clock::now();
  a_->process().signal(SIGTERM);
  EXPECT_EQ(a_->process().wait(5s), 0);
  auto took = std::chrono::steady_clock::now() - sent;
  EXPECT_GE(took, 900ms);
  EXPECT_LT(took, 4s);
  // The connection was closed by the sidecar, not left hanging.
  int err = 0;
  readToEof(open.get(), &err);
  EXPECT_NE(a_->log().find("drain timeout: closing 1 connections"), std::string::npos);
}

TEST_F(ServicePair, SecondSigtermStopsAtOnce) {
  start("30s");
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  UniqueFd open = connectTcp(hosts_.a(), at("127.0.0.1", 15000));
  ASSERT_TRUE(echoes(open.get(), "hello"));
  a_->process().signal(SIGTERM);
  ASSERT_TRUE(eventually([&] { return a_->log().find("draining") != std::string::npos; }, 5s));
  EXPECT_TRUE(a_->process().running());
  auto sent = std::chrono::steady_clock::now();
  a_->process().signal(SIGTERM);
  EXPECT_EQ(a_->process().wait(5s), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - sent, 3s);
}

TEST_F(ServicePair, InheritedListenerServesConnectionsQueuedBeforeStart) {
  // What a restart under systemd looks like: the listening socket outlives the process, and a
  // client that connected while no sidecar ran waits in its backlog, then is served.
  // As the sidecar makes its listeners (SO_REUSEPORT: the second worker binds its own beside).
  UniqueFd listener = hosts_.a().socket(AF_INET, SOCK_STREAM);
  int one = 1;
  ::setsockopt(listener.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  sockaddr_storage ss{};
  socklen_t len = at("127.0.0.1", 15000).toSockaddr(ss);
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&ss), len), 0);
  ASSERT_EQ(::listen(listener.get(), 16), 0);
  UniqueFd early = connectTcp(hosts_.a(), at("127.0.0.1", 15000));
  ASSERT_TRUE(early.valid());
  ASSERT_TRUE(writeAll(early.get(), "queued", 6));

  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  start("1s", {listener.get()});
  EXPECT_EQ(readExactly(early.get(), 6), "queued");
  EXPECT_NE(a_->log().find("took over 1 listening sockets"), std::string::npos);
  // The same socket, not a second one bound beside it: closing ours leaves only the sidecar's.
  listener.reset();
  EXPECT_EQ(echoOnce(hosts_.a(), at("127.0.0.1", 15000), "later"), "later");
  EXPECT_EQ(server.accepted(), 2);
}

TEST_F(ServicePair, LogLevelChangesAtRuntimeThroughTheAdminSocket) {
  start("1s");
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  auto shown = a_->ctl({"log", "level"});
  EXPECT_EQ(shown.status, 0);
  EXPECT_EQ(shown.output, "log level debug\n");  // the test bed's config

  auto set = a_->ctl({"log", "level", "warning"});
  EXPECT_EQ(set.status, 0) << set.output;
  EXPECT_EQ(set.output, "log level warning\n");
  auto closed = [&](double n) {
    return eventually(
        [&] {
          return a_->metric("dmm_sidecar_connections_total",
                            {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}})
                     .value_or(0) >= n;
        },
        5s);
  };
  EXPECT_EQ(echoOnce(hosts_.a(), at("127.0.0.1", 15000), "quiet"), "quiet");
  // Counted first, logged next in the same worker callback: `ctl connections` waits for a task
  // on every worker loop, so once it answers that callback is over.
  ASSERT_TRUE(closed(1));
  ASSERT_EQ(a_->ctl({"connections"}).status, 0);
  ASSERT_TRUE(a_->ctl({"log", "level", "info"}).status == 0);
  EXPECT_EQ(echoOnce(hosts_.a(), at("127.0.0.1", 15000), "loud"), "loud");
  ASSERT_TRUE(closed(2));
  ASSERT_EQ(a_->ctl({"connections"}).status, 0);
  // Connection lines are logged at info when they close: only the second one's is there.
  std::regex line("role=outbound .* up=(\\d+) ");
  std::string log = a_->log();
  std::vector<std::string> ups;
  for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it)
    ups.push_back((*it)[1]);
  EXPECT_EQ(ups, std::vector<std::string>{"4"}) << log;
  EXPECT_NE(log.find("log level info (was warning), set through the admin socket"),
            std::string::npos);
  EXPECT_NE(a_->ctl({"log", "level", "loud"}).status, 0);
}

}  // namespace
}  // namespace dmm::testbed
