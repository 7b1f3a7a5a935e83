#pragma once
// The integration test bed: simulated hosts as network namespaces joined by veth pairs, real
// processes started inside them, sockets created inside them from the test process, and the
// sidecar's metrics read over HTTP. Everything a test creates is removed when its owner goes
// out of scope: namespaces (and with them their iptables rules and veths), processes (killed
// by PID), temporary files.

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/command.h"
#include "common/socket_address.h"
#include "common/unique_fd.h"

namespace dmm::testbed {

using namespace std::chrono_literals;

using ::dmm::CommandResult;
// Runs argv (no shell), collecting stdout+stderr (common/command.h).
inline CommandResult run(const std::vector<std::string>& argv) {
  return runCommand(argv);
}
// Runs argv and fails the current test (with the output) when it exits non-zero.
void mustRun(const std::vector<std::string>& argv);

// A unique prefix for names this test process creates (namespaces, temp dirs).
std::string uniqueName(const std::string& what);

// A temporary directory removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string write(const std::string& name, const std::string& content) const;

 private:
  std::string path_;
};

class Netns {
 public:
  explicit Netns(std::string name);
  // The namespace this process runs in, neither made nor deleted (the RDMA tests: Soft-RoCE
  // works only in the initial namespace of its guest).
  static std::unique_ptr<Netns> current();
  ~Netns();
  Netns(const Netns&) = delete;
  Netns& operator=(const Netns&) = delete;

  // "" for current().
  const std::string& name() const { return name_; }
  // Runs fn with the calling thread inside this namespace (sockets made there stay there).
  void enter(const std::function<void()>& fn) const;
  // A socket of this namespace.
  UniqueFd socket(int family, int type, int protocol = 0) const;
  // `ip netns exec <name> argv...`
  CommandResult exec(const std::vector<std::string>& argv) const;
  void mustExec(const std::vector<std::string>& argv) const;

 private:
  Netns() = default;
  std::string name_;
  int fd_ = -1;
};

// A child process, killed (by PID) and reaped when the object goes away.
class Process {
 public:
  // Starts argv inside `ns` (nullptr: this namespace); stdout+stderr go to `log_path`.
  // `listen_fds` are passed as systemd socket activation does: as fds 3, 4, ... with
  // LISTEN_FDS and LISTEN_PID (this child's PID) in the environment.
  Process(const Netns* ns, const std::vector<std::string>& argv, const std::string& log_path,
          const std::vector<int>& listen_fds = {});
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  bool running();
  void signal(int sig);
  // Waits for exit up to `timeout`; returns the exit status (or -1 on timeout / signal).
  int wait(std::chrono::milliseconds timeout = 10s);
  std::string log() const;

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
  std::string log_path_;
};

// Two hosts, A and B, on one veth link with IPv4 and IPv6 addresses.
class TwoHosts {
 public:
  TwoHosts();
  Netns& a() { return a_; }
  Netns& b() { return b_; }
  // The veth device of each host.
  const std::string& devA() const { return dev_a_; }
  const std::string& devB() const { return dev_b_; }
  static constexpr const char* kIp4A = "10.201.0.1";
  static constexpr const char* kIp4B = "10.201.0.2";
  static constexpr const char* kIp6A = "fd00:201::1";
  static constexpr const char* kIp6B = "fd00:201::2";

 private:
  Netns a_;
  Netns b_;
  std::string dev_a_;
  std::string dev_b_;
};

// The path of the dmm-sidecar binary under test.
std::string sidecarBinary();

// A dmm-sidecar process in a namespace, with its config written to a temp dir. The
// constructor returns once its metrics endpoint answers (the listeners are bound by then).
// Unless the config has its own, [admin] socket and [policy] dir are added in the temp dir;
// `policy` files (name -> text) are written there before the start.
class SidecarProcess {
 public:
  SidecarProcess(const Netns& ns, const std::string& config_text, const std::string& name,
                 const std::map<std::string, std::string>& policy = {},
                 const std::vector<int>& listen_fds = {});
  ~SidecarProcess();
  const std::string& configPath() const { return config_path_; }
  const std::string& policyDir() const { return policy_dir_; }
  const std::string& adminSocket() const { return admin_socket_; }
  // The Unix socket the LD_PRELOAD shim connects to ([preload] socket).
  const std::string& preloadSocket() const { return preload_socket_; }
  // Writes (or replaces) one policy file; the sidecar sees it at its next reload.
  void writePolicy(const std::string& name, const std::string& text) const;
  // `dmm-sidecar ctl --socket <its socket> args...`
  CommandResult ctl(const std::vector<std::string>& args) const;
  Process& process() { return *process_; }
  // Where it serves its metrics, inside its namespace: the config's [metrics] listen
  // ("127.0.0.1:17090" in sidecarConfig()).
  const std::string& metricsAddress() const { return metrics_address_; }
  // The metrics page (empty if it cannot be read).
  std::string scrape() const;
  // The value of one sample, e.g. metric("dmm_sidecar_fallbacks_total",
  // {{"reason","peer_refused"},{"action","direct"}}); nullopt if absent.
  std::optional<double> metric(const std::string& name,
                               const std::map<std::string, std::string>& labels) const;
  // Installs / removes the capture rules with the binary's own helper.
  void installCapture() const;
  void removeCapture() const;
  std::string log() const { return process_->log(); }

 private:
  const Netns& ns_;
  TempDir dir_;
  std::string config_path_;
  std::string policy_dir_;
  std::string admin_socket_;
  std::string preload_socket_;
  std::unique_ptr<Process> process_;
  std::string metrics_address_;
};

// The common config of a test sidecar (debug logs in `log_format`, two workers, a 1 s drain on
// SIGTERM, metrics on 127.0.0.1:17090), plus `extra` TOML appended.
std::string sidecarConfig(const std::string& extra = {}, const std::string& log_format = "plain");

// The response to one HTTP/1.0 GET; status 0 when no response could be read.
struct HttpResponse {
  int status = 0;
  std::string body;
};
// GET `target` (e.g. "/metrics") from `to`, over a socket made inside `ns`.
HttpResponse httpGet(const Netns& ns, const SocketAddress& to, const std::string& target,
                     std::chrono::milliseconds timeout = 2s);

// Parses one sample value out of a Prometheus text page.
std::optional<double> metricValue(const std::string& page, const std::string& name,
                                  const std::map<std::string, std::string>& labels);

// A fixture with two hosts and a sidecar slot on each; when a test fails, both sidecars' logs
// are printed. Sidecars stop (a_ first) before the hosts go away.
class HostPairTest : public ::testing::Test {
 protected:
  void TearDown() override;

  TwoHosts hosts_;
  std::unique_ptr<SidecarProcess> b_;
  std::unique_ptr<SidecarProcess> a_;
};

// ---- sockets --------------------------------------------------------------------------------

// A blocking TCP connection from inside `ns` (with send/receive timeouts so nothing hangs).
UniqueFd connectTcp(const Netns& ns, const SocketAddress& to,
                    std::chrono::milliseconds timeout = 10s);
// A listening TCP socket inside `ns`.
UniqueFd listenTcp(const Netns& ns, const SocketAddress& at);
// Accepts one connection (blocking, with the timeout); invalid on timeout.
UniqueFd acceptOne(int listen_fd, std::chrono::milliseconds timeout = 10s);
void setTimeouts(int fd, std::chrono::milliseconds timeout);

bool writeAll(int fd, const void* data, std::size_t size);
// Reads until EOF. Returns what was read; `err` gets errno of a failing read (0 on clean EOF).
std::string readToEof(int fd, int* err = nullptr);
// Reads exactly n bytes (or fewer on EOF/error).
std::string readExactly(int fd, std::size_t n);

// A deterministic byte stream and its SHA-256, for large transfers.
struct StreamDigest {
  std::uint64_t bytes = 0;
  std::string sha256_hex;
};
// Writes `total` pseudo-random bytes (from `seed`), hashing what was sent.
StreamDigest sendStream(int fd, std::uint64_t total, std::uint32_t seed);
// Reads to EOF, hashing what was received; `err` as in readToEof.
StreamDigest receiveStream(int fd, int* err = nullptr);

// Waits until `probe` is true or the timeout passes.
bool eventually(const std::function<bool()>& probe, std::chrono::milliseconds timeout = 10s);

}  // namespace dmm::testbed
