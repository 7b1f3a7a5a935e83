// The preload shim end to end: real, unmodified programs (curl, redis-benchmark, python3,
// nginx, a forking client) run on host A under LD_PRELOAD=libdmm-preload.so, with no capture
// rules installed, and reach servers on host B through both real dmm-sidecar processes. The
// shim is told to refuse rather than go direct if the sidecar is missing, so a connection that
// did not go through the sidecar fails instead of passing unnoticed; the sidecars' metrics
// show which path and which policy rule carried each one.

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kConfig = R"(
[security]
psk = "preload-integration-key-0123456789"

[timeouts]
connect = "2s"
handshake = "2s"
)";

class PreloadShim : public HostPairTest {
 protected:
  void start(const std::map<std::string, std::string>& policy = {}) {
    b_ = std::make_unique<SidecarProcess>(hosts_.b(), sidecarConfig(kConfig), "b");
    a_ = std::make_unique<SidecarProcess>(hosts_.a(), sidecarConfig(kConfig), "a", policy);
  }
  // `env LD_PRELOAD=... DMM_PRELOAD_...=... argv...`: a program under the shim, pointed at A's
  // sidecar, refusing (not bypassing) when it is not there.
  std::vector<std::string> underShim(const std::vector<std::string>& argv,
                                     const std::vector<std::string>& env = {}) const {
    std::vector<std::string> full{"env", std::string("LD_PRELOAD=") + DMM_PRELOAD_LIB,
                                  "DMM_PRELOAD_SOCKET=" + a_->preloadSocket(),
                                  "DMM_PRELOAD_FALLBACK=refuse",
                                  "DMM_PRELOAD_CONFIG=" + dir_.path() + "/no-such.conf"};
    full.insert(full.end(), env.begin(), env.end());
    full.insert(full.end(), argv.begin(), argv.end());
    return full;
  }
  CommandResult runOnA(const std::vector<std::string>& argv,
                       const std::vector<std::string>& env = {}) {
    return hosts_.a().exec(underShim(argv, env));
  }
  double metricA(const std::string& name, const std::map<std::string, std::string>& labels) {
    return a_->metric(name, labels).value_or(-1);
  }
  double metricB(const std::string& name, const std::map<std::string, std::string>& labels) {
    return b_->metric(name, labels).value_or(-1);
  }
  // Closed outbound connections carried by A's kernel stack reach `n` (they are counted when
  // they close), and as many inbound ones on B.
  ::testing::AssertionResult carriedThroughBoth(double n) {
    auto outbound = [&] {
      return metricA("dmm_sidecar_connections_total",
                     {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}});
    };
    auto inbound = [&] {
      return metricB("dmm_sidecar_connections_total",
                     {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}});
    };
    if (!eventually([&] { return outbound() >= n && inbound() >= n; }, 10s)) {
      return ::testing::AssertionFailure() << "outbound kernel closed on A: " << outbound()
                                           << ", inbound on B: " << inbound() << ", wanted " << n;
    }
    return ::testing::AssertionSuccess();
  }
  double decisions(const char* rule) {
    return metricA("dmm_sidecar_policy_decisions_total", {{"role", "outbound"}, {"rule", rule}});
  }

  TempDir dir_;
};

TEST_F(PreloadShim, CurlThroughBothSidecarsAndThePolicySeesItsNameAndQos) {
  // The process name and the QoS hint come from the shim's side of the kernel (SO_PEERCRED,
  // /proc) and its preamble; each rule below can only match if they arrived.
  start({{"10-apps.toml",
          "[[rule]]\nname = \"wget\"\nmatch.app = [\"wget\"]\nstacks = [\"kernel\"]\n\n"
          "[[rule]]\nname = \"curl-latency\"\nmatch.app = [\"curl\"]\n"
          "match.qos = [\"latency\"]\nstacks = [\"kernel\"]\n\n"
          "[[rule]]\nname = \"curl\"\nmatch.app = [\"curl\"]\nstacks = [\"kernel\"]\n"}});
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 8081),
                      httpHandler("hello from B", /*append_path=*/true));
  const std::vector<std::string> curl{
      "curl", "-sS", "--noproxy", "*", "--max-time", "10", "http://10.201.0.2:8081/first"};
  CommandResult r = runOnA(curl);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "hello from B /first");
  auto second = curl;
  second.back() = "http://10.201.0.2:8081/second";
  r = runOnA(second, {"DMM_PRELOAD_QOS=latency"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "hello from B /second");
  EXPECT_EQ(server.accepted(), 2);
  EXPECT_TRUE(carriedThroughBoth(2));
  EXPECT_EQ(decisions("curl"), 1);
  EXPECT_EQ(decisions("curl-latency"), 1);
  EXPECT_EQ(decisions("wget"), -1);  // never matched: no series
  EXPECT_EQ(
      metricA("dmm_sidecar_fallbacks_total", {{"reason", "peer_refused"}, {"action", "direct"}}),
      0);
}

TEST_F(PreloadShim, CurlOverIpv6) {
  start();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp6B, 8081),
                      httpHandler("v6 on B", /*append_path=*/true));
  CommandResult r = runOnA(
      {"curl", "-sS", "--noproxy", "*", "--max-time", "10", "http://[fd00:201::2]:8081/six"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "v6 on B /six");
  EXPECT_TRUE(carriedThroughBoth(1));
}

TEST_F(PreloadShim, CurlIsRefusedWhenTheSidecarIsGoneAndGoesDirectWhenAllowed) {
  start();
  ThreadServer server(hosts_.b(), at(TwoHosts::kIp4B, 8081),
                      httpHandler("direct", /*append_path=*/true));
  a_->process().signal(SIGTERM);
  ASSERT_EQ(a_->process().wait(5s), 0);
  const std::vector<std::string> curl{
      "curl", "-sS", "--noproxy", "*", "--max-time", "10", "http://10.201.0.2:8081/x"};
  CommandResult r = runOnA(curl);
  EXPECT_EQ(r.status, 7) << r.output;  // curl: failed to connect
  EXPECT_EQ(server.accepted(), 0);
  r = runOnA(curl, {"DMM_PRELOAD_FALLBACK=direct"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "direct /x");
  EXPECT_EQ(server.accepted(), 1);
}

TEST_F(PreloadShim, RedisBenchmarkAgainstRedisOnB) {
  start();
  Process redis(&hosts_.b(),
                {"redis-server", "--port", "6379", "--bind", TwoHosts::kIp4B, "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--dir", dir_.path()},
                dir_.path() + "/redis.log");
  ASSERT_TRUE(eventually(
      [&] { return connectTcp(hosts_.b(), at(TwoHosts::kIp4B, 6379), 200ms).valid(); }, 10s))
      << redis.log();
  // hiredis: non-blocking connects on its own event loop (epoll), 8 clients per test.
  CommandResult r = runOnA({"redis-benchmark", "-h", TwoHosts::kIp4B, "-p", "6379", "-n", "2000",
                            "-c", "8", "-t", "set,get", "-q"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("SET: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("GET: "), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("rror"), std::string::npos) << r.output;
  // The SETs landed (redis-cli runs on B, without the shim).
  CommandResult size =
      hosts_.b().exec({"redis-cli", "-h", TwoHosts::kIp4B, "-p", "6379", "dbsize"});
  EXPECT_EQ(size.output, "1\n") << size.output;  // redis-benchmark's one key, "key:__rand_int__"
  EXPECT_TRUE(carriedThroughBoth(16));
}

TEST_F(PreloadShim, PythonNonBlockingConnectWithSelectors) {
  start();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  std::string script = dir_.write("client.py", R"PY(
import errno, selectors, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
sel = selectors.DefaultSelector()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rc = s.connect_ex((host, port))
assert rc == errno.EINPROGRESS, "connect_ex: %d" % rc
sel.register(s, selectors.EVENT_WRITE)
assert sel.select(timeout=10), "never writable"
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
assert s.getpeername() == (host, port), s.getpeername()
assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
payload = bytes(range(256)) * 4096  # 1 MiB
sent, got = 0, bytearray()
sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
while len(got) < len(payload):
    events = sel.select(timeout=10)
    assert events, "stalled at %d sent, %d received" % (sent, len(got))
    for key, mask in events:
        if mask & selectors.EVENT_WRITE:
            try:
                sent += s.send(payload[sent:sent + 65536])
            except BlockingIOError:
                pass
            if sent == len(payload):
                s.shutdown(socket.SHUT_WR)
                sel.modify(s, selectors.EVENT_READ)
        if mask & selectors.EVENT_READ:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            assert chunk, "early end of stream at %d" % len(got)
            got += chunk
assert bytes(got) == payload
print("python ok", len(got))
)PY");
  CommandResult r = runOnA({"/usr/bin/python3", script, TwoHosts::kIp4B, "9000"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "python ok 1048576\n");
  EXPECT_EQ(server.accepted(), 1);
  EXPECT_TRUE(carriedThroughBoth(1));
}

TEST_F(PreloadShim, AClientThatForksAfterConnecting) {
  start();
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  // The child echoes over the inherited fd, then the parent does, on the same connection.
  CommandResult r = runOnA({DMM_PRELOAD_PROBE, "fork", TwoHosts::kIp4B, "9000"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "");
  EXPECT_EQ(server.accepted(), 1);
  EXPECT_TRUE(carriedThroughBoth(1));
}

TEST_F(PreloadShim, NginxReverseProxyWithItsUpstreamsThroughTheShim) {
  // The rule can only match connections of a process called nginx: its workers'.
  start({{"10-nginx.toml",
          "[[rule]]\nname = \"nginx-upstream\"\nmatch.app = [\"nginx\"]\n"
          "stacks = [\"kernel\"]\n"}});
  ThreadServer upstream(hosts_.b(), at(TwoHosts::kIp4B, 8081),
                        httpHandler("upstream on B", /*append_path=*/true));
  std::string prefix = dir_.path() + "/nginx";
  std::filesystem::create_directories(prefix);
  std::string conf = dir_.write("nginx.conf", nginxProxyConf(prefix, "10.201.0.2:8081"));
  Process nginx(&hosts_.a(),
                underShim({"nginx", "-p", prefix, "-c", conf, "-e", prefix + "/error.log"}),
                dir_.path() + "/nginx.out");
  ASSERT_TRUE(
      eventually([&] { return connectTcp(hosts_.a(), at("127.0.0.1", 8080), 200ms).valid(); }, 10s))
      << nginx.log();
  // The test's own requests to nginx are not under the shim (and loopback is never captured).
  constexpr int kRequests = 6;
  for (int i = 0; i < kRequests; ++i) {
    HttpResponse res = httpGet(hosts_.a(), at("127.0.0.1", 8080), "/r" + std::to_string(i), 10s);
    EXPECT_EQ(res.status, 200);
    EXPECT_EQ(res.body, "upstream on B /r" + std::to_string(i));
  }
  EXPECT_EQ(upstream.accepted(), kRequests);
  EXPECT_TRUE(carriedThroughBoth(kRequests));
  EXPECT_EQ(decisions("nginx-upstream"), kRequests);
  // Stopped by its PID: SIGQUIT, nginx's graceful stop, which waits for its workers.
  nginx.signal(SIGQUIT);
  EXPECT_EQ(nginx.wait(10s), 0);
  if (HasFailure()) {
    std::ifstream log(prefix + "/error.log");
    std::cerr << "---- nginx error.log ----\n" << log.rdbuf();
  }
}

}  // namespace
}  // namespace dmm::testbed
