#include "testbed/testbed.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <iostream>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

extern char** environ;

namespace dmm::testbed {

namespace {

std::string joined(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv)
    out += (out.empty() ? "" : " ") + a;
  return out;
}

std::string hex(const unsigned char* data, std::size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr); }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  void update(const void* data, std::size_t n) { EVP_DigestUpdate(ctx_, data, n); }
  std::string hexDigest() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_, md, &len);
    return hex(md, len);
  }

 private:
  EVP_MD_CTX* ctx_;
};

}  // namespace

void mustRun(const std::vector<std::string>& argv) {
  auto r = run(argv);
  if (r.status != 0)
    ADD_FAILURE() << "`" << joined(argv) << "` exited " << r.status << ":\n" << r.output;
}

std::string uniqueName(const std::string& what) {
  static std::atomic<int> counter{0};
  return "dmmt" + std::to_string(::getpid() % 100000) + "-" + std::to_string(++counter) + what;
}

// ---- TempDir ---------------------------------------------------------------------------------

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "dmm-test-XXXXXX").string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string TempDir::write(const std::string& name, const std::string& content) const {
  std::string p = path_ + "/" + name;
  std::ofstream out(p, std::ios::binary);
  out << content;
  return p;
}

// ---- Netns -----------------------------------------------------------------------------------

Netns::Netns(std::string name) : name_(std::move(name)) {
  run({"ip", "netns", "del", name_});  // a leftover of a crashed run
  mustRun({"ip", "netns", "add", name_});
  mustRun({"ip", "-n", name_, "link", "set", "lo", "up"});
  fd_ = ::open(("/run/netns/" + name_).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) ADD_FAILURE() << "open /run/netns/" << name_ << ": " << std::strerror(errno);
}

std::unique_ptr<Netns> Netns::current() {
  std::unique_ptr<Netns> ns(new Netns());
  ns->fd_ = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (ns->fd_ < 0) ADD_FAILURE() << "open /proc/self/ns/net: " << std::strerror(errno);
  return ns;
}

Netns::~Netns() {
  if (fd_ >= 0) ::close(fd_);
  if (!name_.empty()) run({"ip", "netns", "del", name_});
}

void Netns::enter(const std::function<void()>& fn) const {
  int self = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  if (self < 0 || ::setns(fd_, CLONE_NEWNET) != 0) {
    ADD_FAILURE() << "setns into " << name_ << ": " << std::strerror(errno);
    if (self >= 0) ::close(self);
    return;
  }
  fn();
  if (::setns(self, CLONE_NEWNET) != 0) std::abort();  // would leave the thread elsewhere
  ::close(self);
}

UniqueFd Netns::socket(int family, int type, int protocol) const {
  UniqueFd fd;
  enter([&] { fd.reset(::socket(family, type | SOCK_CLOEXEC, protocol)); });
  return fd;
}

CommandResult Netns::exec(const std::vector<std::string>& argv) const {
  if (name_.empty()) return run(argv);
  std::vector<std::string> full{"ip", "netns", "exec", name_};
  full.insert(full.end(), argv.begin(), argv.end());
  return run(full);
}

void Netns::mustExec(const std::vector<std::string>& argv) const {
  auto r = exec(argv);
  if (r.status != 0) {
    ADD_FAILURE() << "[" << name_ << "] `" << joined(argv) << "` exited " << r.status << ":\n"
                  << r.output;
  }
}

// ---- Process ---------------------------------------------------------------------------------

Process::Process(const Netns* ns, const std::vector<std::string>& argv, const std::string& log_path,
                 const std::vector<int>& listen_fds)
    : log_path_(log_path) {
  std::vector<std::string> full;
  if (ns != nullptr && !ns->name().empty()) full = {"ip", "netns", "exec", ns->name()};
  if (!listen_fds.empty()) {
    // The shell learns its PID ($$) and execs the command in place, keeping it.
    full.insert(
        full.end(),
        {"sh", "-c",
         "LISTEN_PID=$$ LISTEN_FDS=" + std::to_string(listen_fds.size()) + " exec \"$@\"", "sh"});
  }
  full.insert(full.end(), argv.begin(), argv.end());
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  for (std::size_t i = 0; i < listen_fds.size(); ++i)
    posix_spawn_file_actions_adddup2(&actions, listen_fds[i], 3 + static_cast<int>(i));
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                   0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<char*> args;
  for (const auto& a : full)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  // `ip netns exec` execs the command in place, so this PID is the command's.
  int rc = ::posix_spawnp(&pid_, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "spawn " << joined(full) << ": " << std::strerror(rc);
    pid_ = -1;
  }
}

Process::~Process() {
  if (pid_ <= 0 || reaped_) return;
  signal(SIGTERM);
  if (wait(3s) == -1 && !reaped_) {
    signal(SIGKILL);
    wait(3s);
  }
}

bool Process::running() {
  if (pid_ <= 0 || reaped_) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    status_ = status;
    return false;
  }
  return true;
}

void Process::signal(int sig) {
  if (pid_ > 0 && !reaped_) ::kill(pid_, sig);
}

int Process::wait(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(10ms);
  }
  return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
}

std::string Process::log() const {
  std::ifstream in(log_path_);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// ---- TwoHosts --------------------------------------------------------------------------------

TwoHosts::TwoHosts() : a_(uniqueName("a")), b_(uniqueName("b")) {
  std::string va = "va" + std::to_string(::getpid() % 100000);
  std::string vb = "vb" + std::to_string(::getpid() % 100000);
  dev_a_ = va;
  dev_b_ = vb;
  mustRun({"ip", "link", "add", va, "netns", a_.name(), "type", "veth", "peer", "name", vb, "netns",
           b_.name()});
  a_.mustExec({"ip", "addr", "add", std::string(kIp4A) + "/24", "dev", va});
  b_.mustExec({"ip", "addr", "add", std::string(kIp4B) + "/24", "dev", vb});
  a_.mustExec({"ip", "-6", "addr", "add", std::string(kIp6A) + "/64", "dev", va, "nodad"});
  b_.mustExec({"ip", "-6", "addr", "add", std::string(kIp6B) + "/64", "dev", vb, "nodad"});
  a_.mustExec({"ip", "link", "set", va, "up"});
  b_.mustExec({"ip", "link", "set", vb, "up"});
}

// ---- sidecar -----------------------------------------------------------------------------------

std::string sidecarBinary() {
  if (const char* env = std::getenv("DMM_SIDECAR_BIN")) return env;
  return DMM_SIDECAR_BIN;
}

std::string sidecarConfig(const std::string& extra, const std::string& log_format) {
  // Tests add sections in `extra`; the sections here are the ones they do not repeat.
  return "[log]\nlevel = \"debug\"\nformat = \"" + log_format + "\"\n" + R"(
[sidecar]
workers = 2
drain_timeout = "1s"

[metrics]
listen = "127.0.0.1:17090"

)" + extra;
}

SidecarProcess::SidecarProcess(const Netns& ns, const std::string& config_text,
                               const std::string& name,
                               const std::map<std::string, std::string>& policy,
                               const std::vector<int>& listen_fds)
    : ns_(ns), metrics_address_("127.0.0.1:17090") {
  std::string text = config_text;
  if (auto m = text.find("\n[metrics]\nlisten = \""); m != std::string::npos) {
    auto start = m + std::string("\n[metrics]\nlisten = \"").size();
    metrics_address_ = text.substr(start, text.find('"', start) - start);
  }
  // The file system is shared by every namespace: each test sidecar gets its own socket and
  // policy directory.
  policy_dir_ = dir_.path() + "/" + name + "-policy.d";
  admin_socket_ = dir_.path() + "/" + name + "-admin.sock";
  // A test's own [policy] table (breaker settings) gets the directory too, unless it names one.
  auto policy_at = text.find("\n[policy]\n");
  if (policy_at == std::string::npos) {
    text += "\n[policy]\ndir = \"" + policy_dir_ + "\"\n";
  } else if (text.find("\ndir = ", policy_at) == std::string::npos) {
    text.insert(policy_at + 10, "dir = \"" + policy_dir_ + "\"\n");
  }
  if (text.find("\n[admin]") == std::string::npos && text.rfind("[admin]", 0) != 0)
    text += "\n[admin]\nsocket = \"" + admin_socket_ + "\"\n";
  preload_socket_ = dir_.path() + "/" + name + "-preload.sock";
  if (text.find("\n[preload]") == std::string::npos)
    text += "\n[preload]\nsocket = \"" + preload_socket_ + "\"\n";
  ::mkdir(policy_dir_.c_str(), 0755);
  for (const auto& [file, content] : policy)
    writePolicy(file, content);
  config_path_ = dir_.write(name + ".toml", text);
  process_ =
      std::make_unique<Process>(&ns, std::vector<std::string>{sidecarBinary(), "-c", config_path_},
                                dir_.path() + "/" + name + ".log", listen_fds);
  bool up = eventually(
      [&] {
        if (!process_->running()) return true;
        return !scrape().empty();
      },
      10s);
  if (!up || !process_->running()) {
    ADD_FAILURE() << "sidecar " << name << " did not start:\n" << process_->log();
  }
}

SidecarProcess::~SidecarProcess() = default;

void HostPairTest::TearDown() {
  if (HasFailure()) {
    if (a_) std::cerr << "---- sidecar A log ----\n" << a_->log();
    if (b_) std::cerr << "---- sidecar B log ----\n" << b_->log();
  }
}

void SidecarProcess::writePolicy(const std::string& name, const std::string& text) const {
  // Written aside and renamed, so a reload never reads half a file.
  std::string path = policy_dir_ + "/" + name;
  {
    std::ofstream out(path + ".tmp", std::ios::trunc);
    out << text;
  }
  ::rename((path + ".tmp").c_str(), path.c_str());
}

CommandResult SidecarProcess::ctl(const std::vector<std::string>& args) const {
  std::vector<std::string> argv{sidecarBinary(), "ctl", "--socket", admin_socket_};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv);
}

std::string SidecarProcess::scrape() const {
  auto response = httpGet(ns_, *SocketAddress::parse(metrics_address_), "/metrics");
  return response.status == 200 ? response.body : std::string();
}

std::optional<double> SidecarProcess::metric(
    const std::string& name, const std::map<std::string, std::string>& labels) const {
  return metricValue(scrape(), name, labels);
}

void SidecarProcess::installCapture() const {
  ns_.mustExec({sidecarBinary(), "capture", "install", "-c", config_path_});
}

void SidecarProcess::removeCapture() const {
  ns_.mustExec({sidecarBinary(), "capture", "remove", "-c", config_path_});
}

HttpResponse httpGet(const Netns& ns, const SocketAddress& to, const std::string& target,
                     std::chrono::milliseconds timeout) {
  UniqueFd fd = connectTcp(ns, to, timeout);
  if (!fd) return {};
  std::string request = "GET " + target + " HTTP/1.0\r\nHost: " + to.toString() + "\r\n\r\n";
  if (!writeAll(fd.get(), request.data(), request.size())) return {};
  std::string response = readToEof(fd.get());
  // "HTTP/1.x NNN reason\r\n" headers "\r\n\r\n" body
  auto body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.size() < 12 || body == std::string::npos)
    return {};
  HttpResponse out;
  out.status = std::atoi(response.substr(9, 3).c_str());
  out.body = response.substr(body + 4);
  return out;
}

std::optional<double> metricValue(const std::string& page, const std::string& name,
                                  const std::map<std::string, std::string>& labels) {
  std::istringstream in(page);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name, 0) != 0) continue;
    std::size_t after = name.size();
    if (after >= line.size() || (line[after] != '{' && line[after] != ' ')) continue;
    std::string label_text;
    std::size_t value_pos = after;
    if (line[after] == '{') {
      auto close = line.find('}', after);
      if (close == std::string::npos) continue;
      label_text = line.substr(after + 1, close - after - 1);
      value_pos = close + 1;
    }
    bool all = true;
    for (const auto& [k, v] : labels) {
      if (label_text.find(k + "=\"" + v + "\"") == std::string::npos) {
        all = false;
        break;
      }
    }
    if (!all) continue;
    try {
      return std::stod(line.substr(value_pos));
    } catch (...) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

// ---- sockets ---------------------------------------------------------------------------------

void setTimeouts(int fd, std::chrono::milliseconds timeout) {
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

UniqueFd connectTcp(const Netns& ns, const SocketAddress& to, std::chrono::milliseconds timeout) {
  UniqueFd fd = ns.socket(to.family(), SOCK_STREAM);
  if (!fd) return fd;
  setTimeouts(fd.get(), timeout);
  sockaddr_storage ss{};
  socklen_t len = to.toSockaddr(ss);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return UniqueFd();
  return fd;
}

UniqueFd listenTcp(const Netns& ns, const SocketAddress& at) {
  UniqueFd fd = ns.socket(at.family(), SOCK_STREAM);
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (at.family() == AF_INET6) ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  sockaddr_storage ss{};
  socklen_t len = at.toSockaddr(ss);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0 ||
      ::listen(fd.get(), 4096) != 0) {
    ADD_FAILURE() << "listen on " << at.toString() << ": " << std::strerror(errno);
    return UniqueFd();
  }
  return fd;
}

UniqueFd acceptOne(int listen_fd, std::chrono::milliseconds timeout) {
  pollfd p{listen_fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return UniqueFd();
  UniqueFd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
  if (fd) setTimeouts(fd.get(), timeout);
  return fd;
}

bool writeAll(int fd, const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

std::string readToEof(int fd, int* err) {
  std::string out;
  char buf[65536];
  if (err != nullptr) *err = 0;
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0) {
      return out;
    } else if (errno != EINTR) {
      if (err != nullptr) *err = errno;
      return out;
    }
  }
}

std::string readExactly(int fd, std::size_t n) {
  std::string out(n, '\0');
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, out.data() + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<std::size_t>(r);
  }
  out.resize(got);
  return out;
}

StreamDigest sendStream(int fd, std::uint64_t total, std::uint32_t seed) {
  Sha256 sha;
  std::vector<std::uint32_t> block(16384);
  std::uint32_t x = seed | 1u;
  StreamDigest d;
  while (d.bytes < total) {
    for (auto& w : block) {  // xorshift32
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      w = x;
    }
    std::size_t n = static_cast<std::size_t>(
        std::min<std::uint64_t>(total - d.bytes, block.size() * sizeof(std::uint32_t)));
    if (!writeAll(fd, block.data(), n)) break;
    sha.update(block.data(), n);
    d.bytes += n;
  }
  d.sha256_hex = sha.hexDigest();
  return d;
}

StreamDigest receiveStream(int fd, int* err) {
  Sha256 sha;
  StreamDigest d;
  std::vector<char> buf(1 << 16);
  if (err != nullptr) *err = 0;
  for (;;) {
    ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
    if (n > 0) {
      sha.update(buf.data(), static_cast<std::size_t>(n));
      d.bytes += static_cast<std::uint64_t>(n);
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      if (err != nullptr) *err = errno;
      break;
    }
  }
  d.sha256_hex = sha.hexDigest();
  return d;
}

bool eventually(const std::function<bool()>& probe, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (probe()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(20ms);
  }
}

}  // namespace dmm::testbed
