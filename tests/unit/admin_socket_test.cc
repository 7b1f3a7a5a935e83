// The admin socket: AdminServer on a real EventLoop thread and a real Unix socket in a temp
// dir, talked to with adminRequest() and with raw sockets where a misbehaving client is needed.

#include "proxy/admin_socket.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <stdexcept>
#include <thread>

namespace dmm::proxy {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// 10 MB with every byte value, newlines and NULs included, so that any loss or reordering shows.
const std::string& bigReply() {
  static const std::string text = [] {
    std::string s(10 * 1000 * 1000, '\0');
    std::uint32_t x = 12345;
    for (char& c : s) {
      x = x * 1103515245 + 12345;
      c = static_cast<char>(x >> 24);
    }
    return s;
  }();
  return text;
}

std::string encode(const std::vector<std::string>& args) {
  std::string s;
  for (const auto& a : args) {
    s += a;
    s += '\0';
  }
  return s;
}

sockaddr_un unixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), std::min(path.size(), sizeof addr.sun_path - 1));
  return addr;
}

UniqueFd connectRaw(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr = unixAddress(path);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return {};
  return fd;
}

bool sendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// Everything until EOF; nullopt if the peer neither sends nor closes within timeout.
std::optional<std::string> readAll(int fd, std::chrono::milliseconds timeout) {
  std::string s;
  const auto deadline = Clock::now() + timeout;
  char buf[65536];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) != 1) return std::nullopt;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) return std::nullopt;
    if (n == 0) return s;
    s.append(buf, static_cast<std::size_t>(n));
  }
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

class AdminSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/dmm_admin_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/admin.sock";
  }

  void TearDown() override {
    stop();
    std::filesystem::remove_all(dir_);
  }

  AdminServer::Handler handler() {
    return [this](const std::vector<std::string>& args, std::string& out) {
      return handle(args, out);
    };
  }

  // A server on path_ and the loop on its own thread.
  void start(std::chrono::milliseconds timeout = AdminServer::kDefaultClientTimeout) {
    server_ = std::make_unique<AdminServer>(loop_, handler(), timeout);
    ASSERT_EQ(server_->listen(path_), "");
    thread_ = std::thread([this] { loop_.run(); });
  }

  void stop() {
    if (thread_.joinable()) {
      loop_.exit();
      thread_.join();
    }
    server_.reset();
    loop_.collectGarbage();
  }

  std::size_t clientCount() {
    std::promise<std::size_t> count;
    loop_.post([&] { count.set_value(server_->clientCount()); });
    return count.get_future().get();
  }

  // On the loop thread. "status N" returns N, "big" answers 10 MB, "throw" throws; anything
  // else is echoed back in the request's own encoding, so that empty arguments show.
  int handle(const std::vector<std::string>& args, std::string& out) {
    ++calls_;
    if (args.size() == 2 && args[0] == "status") {
      out = "told to return " + args[1] + "\n";
      return std::stoi(args[1]);
    }
    if (args.size() == 1 && args[0] == "big") {
      out = bigReply();
      return 0;
    }
    if (args.size() == 1 && args[0] == "throw") {
      out = "partial\n";
      throw std::runtime_error("boom");
    }
    out = encode(args);
    return 0;
  }

  int request(const std::vector<std::string>& args, std::string& out) {
    std::string error;
    int status = adminRequest(path_, args, out, error, 10s);
    if (status < 0) {
      ADD_FAILURE() << error;
    } else {
      EXPECT_EQ(error, "");
    }
    return status;
  }

  std::string dir_;
  std::string path_;
  EventLoop loop_;
  std::unique_ptr<AdminServer> server_;
  std::thread thread_;
  std::atomic<int> calls_{0};
};

TEST_F(AdminSocketTest, EchoesArgumentsExactly) {
  start();
  const std::vector<std::string> args = {"echo",  "", "héllo wörld ✓ 日本", "a b\nc", "",
                                         "--x=1", ""};
  std::string out;
  EXPECT_EQ(request(args, out), 0);
  EXPECT_EQ(out, encode(args));
  // No arguments at all is a request too (the handler prints its usage).
  EXPECT_EQ(request({}, out), 0);
  EXPECT_EQ(out, "");
  EXPECT_EQ(calls_, 2);
}

TEST_F(AdminSocketTest, PassesStatusCodesThrough) {
  start();
  std::string out;
  for (int n : {0, 1, 2, 7, 255}) {
    EXPECT_EQ(request({"status", std::to_string(n)}, out), n);
    EXPECT_EQ(out, "told to return " + std::to_string(n) + "\n");
  }
  // What cannot be an exit status is a failure.
  EXPECT_EQ(request({"status", "256"}, out), kAdminFailed);
  EXPECT_EQ(request({"status", "-3"}, out), kAdminFailed);
  // A throwing handler does not take the loop down; the client learns why.
  EXPECT_EQ(request({"throw"}, out), kAdminFailed);
  EXPECT_EQ(out, "partial\ninternal error: boom\n");
  EXPECT_EQ(request({"still", "alive"}, out), 0);
}

TEST_F(AdminSocketTest, DeliversATenMegabyteReplyComplete) {
  start();
  std::string out;
  EXPECT_EQ(request({"big"}, out), 0);
  EXPECT_EQ(out.size(), bigReply().size());
  EXPECT_TRUE(out == bigReply());
}

TEST_F(AdminSocketTest, ALargeReplyToASlowReaderDoesNotHoldUpOthers) {
  start();
  UniqueFd slow = connectRaw(path_);
  ASSERT_TRUE(slow);
  ASSERT_TRUE(sendAll(slow.get(), encode({"big"})));
  ::shutdown(slow.get(), SHUT_WR);
  // The server's write to the slow client fills the socket buffer and waits; a blocking write
  // would hang the loop here.
  std::this_thread::sleep_for(100ms);
  std::string out;
  const auto t0 = Clock::now();
  EXPECT_EQ(request({"quick"}, out), 0);
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(out, encode({"quick"}));
  auto reply = readAll(slow.get(), 10s);
  ASSERT_TRUE(reply);
  EXPECT_TRUE(*reply == "status 0\n" + bigReply());
}

TEST_F(AdminSocketTest, RejectsAnOversizedRequest) {
  start();
  std::string out;
  // Exactly at the limit: 65535 bytes and the NUL.
  const std::vector<std::string> at_limit = {std::string(kAdminMaxRequest - 1, 'a')};
  EXPECT_EQ(request(at_limit, out), 0);
  EXPECT_EQ(out, encode(at_limit));
  EXPECT_EQ(calls_, 1);
  // One byte more, and far more (many socket buffers: the server must drain, not deadlock).
  for (std::size_t size : {kAdminMaxRequest, std::size_t{4} << 20}) {
    EXPECT_EQ(request({std::string(size, 'b')}, out), kAdminUsage);
    EXPECT_NE(out.find("request too large"), std::string::npos) << out;
  }
  EXPECT_EQ(calls_, 1);
}

TEST_F(AdminSocketTest, RejectsARequestNotEndingInNul) {
  start();
  UniqueFd c = connectRaw(path_);
  ASSERT_TRUE(c);
  ASSERT_TRUE(sendAll(c.get(), std::string("conns\0abc", 9)));
  ::shutdown(c.get(), SHUT_WR);
  auto reply = readAll(c.get(), 5s);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->rfind("status 2\nmalformed request", 0), 0u) << *reply;
  EXPECT_EQ(calls_, 0);
}

TEST_F(AdminSocketTest, ASecondServerOnTheSamePathIsAlreadyInUse) {
  start();
  {
    EventLoop other_loop;
    AdminServer second(other_loop, handler());
    std::string error = second.listen(path_);
    EXPECT_NE(error.find("already in use"), std::string::npos) << error;
  }
  // The failed second server took nothing away from the first.
  EXPECT_TRUE(exists(path_));
  std::string out;
  EXPECT_EQ(request({"first"}, out), 0);
  EXPECT_EQ(out, encode({"first"}));
}

TEST_F(AdminSocketTest, ReplacesAStaleSocketFile) {
  {
    // What a killed daemon leaves: a socket file nothing listens on.
    UniqueFd raw(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr = unixAddress(path_);
    ASSERT_EQ(::bind(raw.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  ASSERT_TRUE(S_ISSOCK(st.st_mode));
  start();
  std::string out;
  EXPECT_EQ(request({"fresh"}, out), 0);
  EXPECT_EQ(out, encode({"fresh"}));
}

TEST_F(AdminSocketTest, LeavesAFileThatIsNotASocket) {
  std::ofstream(path_) << "precious\n";
  AdminServer server(loop_, handler());
  std::string error = server.listen(path_);
  EXPECT_NE(error.find("not a socket"), std::string::npos) << error;
  std::ifstream in(path_);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "precious");
}

TEST_F(AdminSocketTest, CreatesTheParentDirectoryAndSetsTheMode) {
  path_ = dir_ + "/run/dmm-sidecar/admin.sock";
  const mode_t old_umask = ::umask(077);  // the modes must not depend on it
  server_ = std::make_unique<AdminServer>(loop_, handler());
  std::string error = server_->listen(path_, 0640);
  ::umask(old_umask);
  ASSERT_EQ(error, "");
  struct stat st {};
  ASSERT_EQ(::stat((dir_ + "/run/dmm-sidecar").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  // The default mode.
  AdminServer other(loop_, handler());
  ASSERT_EQ(other.listen(dir_ + "/other.sock"), "");
  ASSERT_EQ(::lstat((dir_ + "/other.sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
}

// The errno of a connect() to path by a child process running as nobody, 0 if it connected.
int connectErrnoAsNobody(const std::string& path) {
  sockaddr_un addr = unixAddress(path);
  pid_t pid = ::fork();
  if (pid == 0) {
    // Only async-signal-safe calls: the loop thread runs in the parent.
    if (::setresgid(65534, 65534, 65534) != 0 || ::setresuid(65534, 65534, 65534) != 0)
      ::_exit(255);
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) ::_exit(254);
    ::_exit(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 ? 0 : errno);
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

TEST_F(AdminSocketTest, TheSocketModeDecidesWhoMayConnect) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to try as another user";
  start();
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);       // mkdtemp's 0700 would refuse on its own
  EXPECT_EQ(connectErrnoAsNobody(path_), EACCES);  // root:root 0660
  ASSERT_EQ(::chmod(path_.c_str(), 0666), 0);
  EXPECT_EQ(connectErrnoAsNobody(path_), 0);
}

TEST_F(AdminSocketTest, RemovesTheSocketFileOnDestruction) {
  start();
  ASSERT_TRUE(exists(path_));
  stop();
  EXPECT_FALSE(exists(path_));
}

TEST_F(AdminSocketTest, DoesNotRemoveASocketFileThatIsNotItsOwn) {
  start();
  // Someone replaced the file meanwhile (say, an operator started a second daemon after
  // removing ours): it is not ours to remove.
  ASSERT_EQ(::unlink(path_.c_str()), 0);
  UniqueFd raw(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr = unixAddress(path_);
  ASSERT_EQ(::bind(raw.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  stop();
  EXPECT_TRUE(exists(path_));
}

TEST_F(AdminSocketTest, ClosesAClientThatSendsNothing) {
  start(200ms);
  UniqueFd idle = connectRaw(path_);
  ASSERT_TRUE(idle);
  UniqueFd partial = connectRaw(path_);
  ASSERT_TRUE(partial);
  ASSERT_TRUE(sendAll(partial.get(), "half a requ"));  // and never the end of it
  const auto t0 = Clock::now();
  auto reply = readAll(idle.get(), 3s);
  const auto elapsed = Clock::now() - t0;
  ASSERT_TRUE(reply) << "not closed within 3 s";
  EXPECT_EQ(*reply, "");
  EXPECT_GE(elapsed, 150ms);
  EXPECT_LT(elapsed, 2s);
  reply = readAll(partial.get(), 3s);
  ASSERT_TRUE(reply) << "not closed within 3 s";
  EXPECT_EQ(*reply, "");
  EXPECT_EQ(calls_, 0);
  EXPECT_EQ(clientCount(), 0u);
}

TEST_F(AdminSocketTest, ClosesClientsBeyondTheLimit) {
  start();
  std::vector<UniqueFd> idle;
  for (std::size_t i = 0; i < AdminServer::kMaxClients; ++i) {
    idle.push_back(connectRaw(path_));
    ASSERT_TRUE(idle.back());
  }
  for (int i = 0; i < 200 && clientCount() < AdminServer::kMaxClients; ++i)
    std::this_thread::sleep_for(10ms);
  ASSERT_EQ(clientCount(), AdminServer::kMaxClients);
  std::string out;
  std::string error;
  EXPECT_EQ(adminRequest(path_, {"one", "too", "many"}, out, error, 5s), -1);
  EXPECT_NE(error.find("without a reply"), std::string::npos) << error;
  // Slots free up as clients leave.
  idle.clear();
  int status = -1;
  for (int i = 0; i < 200 && status != 0; ++i) {
    status = adminRequest(path_, {"again"}, out, error, 5s);
    if (status != 0) std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(status, 0) << error;
  EXPECT_EQ(out, encode({"again"}));
}

TEST(AdminRequest, SaysWhyItCannotConnect) {
  std::string out;
  std::string error;
  const std::string path = ::testing::TempDir() + "/dmm-no-such-dir/admin.sock";
  EXPECT_EQ(adminRequest(path, {"x"}, out, error), -1);
  EXPECT_EQ(error,
            "cannot connect to " + path + ": No such file or directory (is dmm-sidecar running?)");
  EXPECT_EQ(adminRequest(path, {std::string("a\0b", 3)}, out, error), -1);
  EXPECT_NE(error.find("NUL"), std::string::npos) << error;
}

TEST(AdminRequest, RejectsAReplyWithoutAStatusLine) {
  // A server speaking something else: the client must not take its bytes for output.
  std::string dir = ::testing::TempDir() + "/dmm_admin_bad_XXXXXX";
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  const std::string path = dir + "/bad.sock";
  UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr = unixAddress(path);
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(listener.get(), 4), 0);
  std::thread server([&] {
    for (const char* answer : {"HTTP/1.0 200 OK\r\n\r\n", "status 12x\nout", "status 0"}) {
      UniqueFd c(::accept(listener.get(), nullptr, nullptr));
      (void)readAll(c.get(), 5s);
      sendAll(c.get(), answer);
    }
  });
  std::string out;
  std::string error;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(adminRequest(path, {"x"}, out, error, 5s), -1);
    EXPECT_NE(error.find("malformed reply"), std::string::npos) << error;
  }
  server.join();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dmm::proxy
