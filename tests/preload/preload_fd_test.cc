// The shim at the level of file descriptors: preload_probe, an ordinary program, runs under
// LD_PRELOAD=libdmm-preload.so on host A of the two-host test bed and checks what an
// application sees (flags, the non-blocking contract under poll, epoll and select, names,
// options, dup, fork, exec, threads). Here a small Unix server plays the sidecar: it checks the
// preamble and the kernel's credentials and echoes the stream. That is all it does; carrying
// connections through real sidecars is preload_integration_test.cc's business.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "preload/preamble.h"
#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

// What the stand-in sidecar saw of one connection.
struct Seen {
  preload::Preamble preamble;
  pid_t pid = 0;
  uid_t uid = 0;
};

class StandInSidecar {
 public:
  explicit StandInSidecar(const std::string& path) : path_(path) {
    listen_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(::bind(listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listen_.get(), 256), 0);
    acceptor_ = std::thread([this] { acceptLoop(); });
  }
  ~StandInSidecar() {
    stop_ = true;
    acceptor_.join();
    std::lock_guard lock(mutex_);
    for (auto& t : handlers_)
      t.join();
    ::unlink(path_.c_str());
  }
  std::vector<Seen> seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }
  int bad() const { return bad_.load(); }

 private:
  void acceptLoop() {
    while (!stop_) {
      pollfd p{listen_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) != 1) continue;
      UniqueFd conn(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) continue;
      std::lock_guard lock(mutex_);
      handlers_.emplace_back([this, c = std::move(conn)]() mutable { serve(std::move(c)); });
    }
  }
  void serve(UniqueFd conn) {
    setTimeouts(conn.get(), 10s);
    ucred cred{};
    socklen_t len = sizeof(cred);
    ::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len);
    std::vector<std::uint8_t> head;
    preload::DecodeResult r;
    while (r.status == preload::DecodeResult::Status::kIncomplete) {
      std::uint8_t b = 0;
      if (::read(conn.get(), &b, 1) != 1) break;  // a byte at a time: nothing read past it
      head.push_back(b);
      r = preload::decodePreamble(head);
    }
    if (r.status != preload::DecodeResult::Status::kOk) {
      ++bad_;
      return;
    }
    {
      std::lock_guard lock(mutex_);
      seen_.push_back({r.preamble, cred.pid, cred.uid});
    }
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(conn.get(), buf, sizeof(buf));
      if (n <= 0 || !writeAll(conn.get(), buf, static_cast<std::size_t>(n))) break;
    }
  }

  std::string path_;
  UniqueFd listen_;
  std::atomic<bool> stop_{false};
  std::atomic<int> bad_{0};
  std::mutex mutex_;
  std::vector<Seen> seen_;
  std::vector<std::thread> handlers_;
  std::thread acceptor_;
};

class PreloadFd : public ::testing::Test {
 protected:
  // Runs the probe on host A under the shim; `env` adds or overrides DMM_PRELOAD_* variables.
  CommandResult probe(const std::vector<std::string>& args,
                      const std::vector<std::string>& env = {}) {
    std::vector<std::string> argv{"env",
                                  "-u",
                                  "DMM_PRELOAD_CONFIG",
                                  std::string("LD_PRELOAD=") + DMM_PRELOAD_LIB,
                                  "DMM_PRELOAD_SOCKET=" + socket_,
                                  "DMM_PRELOAD_FALLBACK=refuse",
                                  "DMM_PRELOAD_CONFIG=" + dir_.path() + "/none.conf"};
    argv.insert(argv.end(), env.begin(), env.end());
    argv.push_back(DMM_PRELOAD_PROBE);
    argv.insert(argv.end(), args.begin(), args.end());
    return hosts_.a().exec(argv);
  }
  // The probe's scenario against B's address with the stand-in sidecar; it must pass, print
  // nothing, and have been seen by the stand-in `connections` times with this destination.
  void expectScenario(const std::string& scenario, int connections, const std::string& arg = {},
                      const char* dst = TwoHosts::kIp4B) {
    StandInSidecar sidecar(socket_);
    std::vector<std::string> args{scenario, dst, "9000"};
    if (!arg.empty()) args.push_back(arg);
    CommandResult r = probe(args);
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(r.output, "");
    // A connection the probe closed without a round trip may still be in the stand-in's hands.
    eventually([&] { return static_cast<int>(sidecar.seen().size()) >= connections; }, 5s);
    auto seen = sidecar.seen();
    EXPECT_EQ(static_cast<int>(seen.size()), connections);
    for (const auto& s : seen) {
      char ip[INET6_ADDRSTRLEN] = "";
      ::inet_ntop(s.preamble.destination.family, s.preamble.destination.address, ip, sizeof(ip));
      EXPECT_EQ(std::string(ip), dst);
      EXPECT_EQ(s.preamble.destination.port, 9000);
      EXPECT_EQ(s.uid, ::getuid());
      EXPECT_GT(s.pid, 0);
    }
    EXPECT_EQ(sidecar.bad(), 0);
  }

  TwoHosts hosts_;
  TempDir dir_;
  std::string socket_ = dir_.path() + "/preload.sock";
};

TEST_F(PreloadFd, KeepsFlagsAndTheNonBlockingContract) {
  expectScenario("flags", 2);
}

TEST_F(PreloadFd, NonBlockingConnectWithPoll) {
  expectScenario("nonblock-poll", 1);
}

TEST_F(PreloadFd, NonBlockingConnectWithSelect) {
  expectScenario("nonblock-select", 1);
}

TEST_F(PreloadFd, NonBlockingConnectWithEpollRegisteredBeforeOrAfter) {
  expectScenario("nonblock-epoll", 2);
}

TEST_F(PreloadFd, PeerIsTheOriginalDestinationAndSockNameIsSensible) {
  expectScenario("names", 2, TwoHosts::kIp4A);
}

TEST_F(PreloadFd, PeerAndSockNameOverIpv6) {
  expectScenario("names", 2, TwoHosts::kIp6A, TwoHosts::kIp6B);
}

TEST_F(PreloadFd, TcpOptionsSucceedHarmlesslyAndReadBack) {
  expectScenario("options", 1);
}

TEST_F(PreloadFd, QosHintBySetsockoptReachesThePreamble) {
  StandInSidecar sidecar(socket_);
  CommandResult r = probe({"qos", TwoHosts::kIp4B, "9000", "latency"},
                          {"DMM_PRELOAD_QOS=bulk"});  // the socket's own hint wins
  EXPECT_EQ(r.status, 0) << r.output;
  r = probe({"qos", TwoHosts::kIp4B, "9000", ""}, {"DMM_PRELOAD_QOS=background"});
  EXPECT_EQ(r.status, 0) << r.output;
  r = probe({"qos", TwoHosts::kIp4B, "9000", ""});
  EXPECT_EQ(r.status, 0) << r.output;
  auto seen = sidecar.seen();
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].preamble.qos, "latency");
  EXPECT_EQ(seen[1].preamble.qos, "background");
  EXPECT_EQ(seen[2].preamble.qos, "");
}

TEST_F(PreloadFd, ConfigurationSurvivesTheProgramClearingItsEnvironment) {
  expectScenario("clearenv", 1);
}

TEST_F(PreloadFd, DupsKeepTheOriginalDestination) {
  expectScenario("dup", 1);
}

TEST_F(PreloadFd, ForkAfterConnectTheChildUsesTheFd) {
  expectScenario("fork", 1);
}

TEST_F(PreloadFd, ExecKeepsAWorkingUnixStream) {
  expectScenario("exec", 1);
}

TEST_F(PreloadFd, ThreadsConnectingConcurrently) {
  StandInSidecar sidecar(socket_);
  CommandResult r = probe({"threads", TwoHosts::kIp4B, "9000"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "connections 200\n");
  eventually([&] { return sidecar.seen().size() >= 200u; }, 5s);
  EXPECT_EQ(sidecar.seen().size(), 200u);
  EXPECT_EQ(sidecar.bad(), 0);
}

TEST_F(PreloadFd, NoSidecarGoesDirectByDefault) {
  // A real server on B: the connection goes there over TCP, untouched.
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  CommandResult r = probe({"direct", TwoHosts::kIp4B, "9000"}, {"DMM_PRELOAD_FALLBACK=direct"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "");
  EXPECT_EQ(server.accepted(), 2);
}

TEST_F(PreloadFd, NoSidecarWithFallbackRefuseIsConnectionRefused) {
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  CommandResult r = probe({"refused", TwoHosts::kIp4B, "9000"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(server.accepted(), 0);
  // A socket path that exists but is no listener (a stale file): refused the same way, at once.
  TempDir stale;
  std::string path = stale.write("stale.sock", "");
  auto t0 = std::chrono::steady_clock::now();
  r = probe({"refused", TwoHosts::kIp4B, "9000"}, {"DMM_PRELOAD_SOCKET=" + path});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
}

TEST_F(PreloadFd, AWedgedSidecarCostsAtMostTheTimeBound) {
  // A listener that never accepts, its backlog already full: a blocking connect() to it would
  // wait forever. The shim gives up after DMM_PRELOAD_TIMEOUT_MS and applies the fallback.
  UniqueFd wedged(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(::bind(wedged.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(wedged.get(), 0), 0);
  std::vector<UniqueFd> fillers;
  for (int i = 0; i < 64; ++i) {
    UniqueFd f(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (::connect(f.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) break;
    fillers.push_back(std::move(f));
  }
  ASSERT_FALSE(fillers.empty());
  ASSERT_LT(fillers.size(), 64u) << "the backlog never filled";
  auto t0 = std::chrono::steady_clock::now();
  // Two connects (blocking and non-blocking), each bounded by 300 ms.
  CommandResult r = probe({"refused", TwoHosts::kIp4B, "9000"}, {"DMM_PRELOAD_TIMEOUT_MS=300"});
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_GE(took, 550ms);
  EXPECT_LT(took, 3s);
  ::unlink(socket_.c_str());
}

TEST_F(PreloadFd, LoopbackIsNeverCaptured) {
  StandInSidecar sidecar(socket_);
  EchoServer server(hosts_.a(), at("127.0.0.1", 9001));
  CommandResult r = probe({"loopback", TwoHosts::kIp4B, "9000", "9001"},
                          {"DMM_PRELOAD_INCLUDE=127.0.0.0/8,0.0.0.0/0"});
  EXPECT_EQ(r.status, 0) << r.output;
  // The probe connects and closes; the server's accept may come after the probe is gone.
  EXPECT_TRUE(eventually([&] { return server.accepted() == 1; }, 5s));
  EXPECT_EQ(sidecar.seen().size(), 0u);
}

TEST_F(PreloadFd, TheSidecarItselfIsNeverCaptured) {
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  // A process that owns the socket at the configured path (SO_PEERCRED names it): direct,
  // even with fallback = refuse.
  CommandResult r = probe({"own-socket", TwoHosts::kIp4B, "9000"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "");
  EXPECT_EQ(server.accepted(), 4);
  // A process named dmm-sidecar: the shim stays out of its way from the start.
  StandInSidecar sidecar(socket_);
  std::string named = dir_.path() + "/dmm-sidecar";
  std::filesystem::copy_file(DMM_PRELOAD_PROBE, named);
  std::filesystem::permissions(named, std::filesystem::perms::owner_all);
  std::vector<std::string> argv{"env",
                                std::string("LD_PRELOAD=") + DMM_PRELOAD_LIB,
                                "DMM_PRELOAD_SOCKET=" + socket_,
                                "DMM_PRELOAD_FALLBACK=refuse",
                                named,
                                "direct",
                                TwoHosts::kIp4B,
                                "9000"};
  r = hosts_.a().exec(argv);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(server.accepted(), 6);
  EXPECT_EQ(sidecar.seen().size(), 0u);
}

TEST_F(PreloadFd, TheFilterDecidesWhatIsCaptured) {
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9000));
  {
    // Excluded: direct, the stand-in never hears of it.
    StandInSidecar sidecar(socket_);
    CommandResult r =
        probe({"direct", TwoHosts::kIp4B, "9000"}, {"DMM_PRELOAD_EXCLUDE=10.201.0.0/24"});
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(sidecar.seen().size(), 0u);
  }
  {
    // Not in the include list: direct too.
    StandInSidecar sidecar(socket_);
    CommandResult r = probe({"direct", TwoHosts::kIp4B, "9000"},
                            {"DMM_PRELOAD_INCLUDE=192.0.2.0/24,fd00:201::/64"});
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_EQ(sidecar.seen().size(), 0u);
  }
  EXPECT_EQ(server.accepted(), 4);
  // Included: captured (the stand-in echoes).
  expectScenario("silent", 1);
}

TEST_F(PreloadFd, NeverPrintsUnlessDebugIsAsked) {
  StandInSidecar sidecar(socket_);
  std::string bad_conf = dir_.write("bad.conf", "socket = relative\nnonsense\nqos = fast\n");
  std::vector<std::string> bad_env{"DMM_PRELOAD_CONFIG=" + bad_conf, "DMM_PRELOAD_QOS=warp",
                                   "DMM_PRELOAD_INCLUDE=10.0.0.0/99", "DMM_PRELOAD_TIMEOUT_MS=x"};
  CommandResult r = probe({"silent", TwoHosts::kIp4B, "9000"}, bad_env);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "");  // stdout and stderr
  // No sidecar and fallback direct: still nothing.
  EchoServer server(hosts_.b(), at(TwoHosts::kIp4B, 9002));
  r = probe({"direct", TwoHosts::kIp4B, "9002"},
            {"DMM_PRELOAD_FALLBACK=direct", "DMM_PRELOAD_SOCKET=" + dir_.path() + "/absent"});
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, "");
  // With debugging: the bad settings and the decision are reported, on stderr.
  bad_env.push_back("DMM_PRELOAD_DEBUG=1");
  r = probe({"silent", TwoHosts::kIp4B, "9000"}, bad_env);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("dmm-preload["), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("bad.conf:2: not key = value"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("DMM_PRELOAD_QOS: qos: 'warp'"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("10.201.0.2:9000 captured"), std::string::npos) << r.output;
  eventually([&] { return sidecar.seen().size() >= 2u; }, 5s);
  EXPECT_EQ(sidecar.seen().size(), 2u);
}

}  // namespace
}  // namespace dmm::testbed
