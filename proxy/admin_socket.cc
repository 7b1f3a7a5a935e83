#include "proxy/admin_socket.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>

#include "common/unix_listener.h"

namespace dmm::proxy {

namespace {

constexpr int kBacklog = 64;
constexpr int kAcceptsPerWakeup = 64;
constexpr timeval kAcceptRetry{0, 100'000};  // after EMFILE: let fds free up, don't spin
constexpr std::size_t kReadChunk = 16 * 1024;
constexpr int kReadsPerWakeup = 16;
// A reply of many megabytes to a fast reader could otherwise keep the main loop to itself.
constexpr std::size_t kWriteBudgetPerWakeup = 1 << 20;

std::string errnoText(int err) {
  return std::strerror(err);
}

timeval toTimeval(std::chrono::milliseconds d) {
  return timeval{static_cast<time_t>(d.count() / 1000),
                 static_cast<suseconds_t>((d.count() % 1000) * 1000)};
}

// Waits until fd is ready for events or the deadline passes; false on timeout.
bool waitFor(int fd, short events, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left.count(), 60'000)));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return true;  // let the following call report it
  }
}

}  // namespace

// ---- one connection -----------------------------------------------------------------------

// Reads the request up to EOF (bounded), runs the handler, writes the reply as fast as the
// client takes it, closes. Owned by the server's list until it finishes, then by the loop's
// deferred deletion (it finishes inside its own callbacks).
class AdminServer::Client final : public Deferrable {
 public:
  Client(AdminServer& server, UniqueFd fd)
      : server_(server),
        fd_(std::move(fd)),
        read_event_(
            server.loop_.newEvent(fd_.get(), EV_READ | EV_PERSIST, &Client::onReadable, this)),
        write_event_(
            server.loop_.newEvent(fd_.get(), EV_WRITE | EV_PERSIST, &Client::onWritable, this)),
        timer_(server.loop_.newEvent(-1, 0, &Client::onTimeout, this)) {}

  void start() {
    event_add(read_event_.get(), nullptr);
    armTimer();
  }

 private:
  static void onReadable(evutil_socket_t, short, void* arg) {
    static_cast<Client*>(arg)->readSome();
  }
  static void onWritable(evutil_socket_t, short, void* arg) {
    static_cast<Client*>(arg)->writeSome();
  }
  static void onTimeout(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Client*>(arg);
    spdlog::debug("admin client closed: no {} within {} ms",
                  self->replying_ ? "progress writing the reply" : "complete request",
                  self->server_.client_timeout_.count());
    self->close();
  }

  void armTimer() {
    const timeval tv = toTimeval(server_.client_timeout_);
    event_add(timer_.get(), &tv);
  }

  void readSome() {
    char buf[kReadChunk];
    for (int i = 0; i < kReadsPerWakeup; ++i) {
      const ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
      if (n > 0) {
        const auto size = static_cast<std::size_t>(n);
        // Past the limit the rest is read and dropped: closing with unread data would make
        // the client's read fail with ECONNRESET instead of returning our error reply.
        if (too_large_) continue;
        if (request_.size() + size > kAdminMaxRequest) {
          too_large_ = true;
          std::string().swap(request_);
          reply(kAdminUsage, "request too large: more than " + std::to_string(kAdminMaxRequest) +
                                 " bytes of arguments\n");
          if (closed_) return;
          continue;
        }
        request_.append(buf, size);
        continue;
      }
      if (n == 0) {
        eof_ = true;
        event_del(read_event_.get());
        if (!too_large_) {
          requestComplete();
        } else if (replyWritten()) {
          close();
        }
        return;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      spdlog::debug("admin client closed: read: {}", errnoText(errno));
      close();
      return;
    }
  }

  void requestComplete() {
    if (!request_.empty() && request_.back() != '\0') {
      reply(kAdminUsage, "malformed request: each argument must end with a NUL byte\n");
      return;
    }
    std::vector<std::string> args;
    for (std::size_t pos = 0; pos < request_.size();) {
      const std::size_t end = request_.find('\0', pos);
      args.emplace_back(request_, pos, end - pos);
      pos = end + 1;
    }
    std::string().swap(request_);
    std::string out;
    int status = kAdminFailed;
    try {
      status = server_.handler_(args, out);
    } catch (const std::exception& e) {
      // The loop thread must survive a failing command; the client learns what happened.
      spdlog::warn("admin command '{}' threw: {}", args.empty() ? "" : args[0], e.what());
      out += std::string("internal error: ") + e.what() + "\n";
      status = kAdminFailed;
    }
    if (status < 0 || status > 255) status = kAdminFailed;
    reply(status, std::move(out));
  }

  void reply(int status, std::string text) {
    header_ = "status " + std::to_string(status) + "\n";
    body_ = std::move(text);
    written_ = 0;
    replying_ = true;
    armTimer();
    writeSome();
  }

  bool replyWritten() const { return replying_ && written_ == header_.size() + body_.size(); }

  void writeSome() {
    const std::size_t total = header_.size() + body_.size();
    std::size_t budget = kWriteBudgetPerWakeup;
    bool progress = false;
    while (written_ < total && budget > 0) {
      iovec iov[2];
      std::size_t count = 0;
      if (written_ < header_.size()) {
        iov[count++] = {header_.data() + written_, header_.size() - written_};
        iov[count++] = {body_.data(), body_.size()};
      } else {
        const std::size_t offset = written_ - header_.size();
        iov[count++] = {body_.data() + offset, body_.size() - offset};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = count;
      const ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n >= 0) {
        const auto size = static_cast<std::size_t>(n);
        written_ += size;
        budget -= std::min(budget, size);
        progress = true;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      spdlog::debug("admin client closed: write: {}", errnoText(errno));
      close();
      return;
    }
    if (progress) armTimer();
    if (written_ < total) {
      // Full socket buffer (or this wake-up's budget spent): go on when it drains.
      if (event_pending(write_event_.get(), EV_WRITE, nullptr) == 0)
        event_add(write_event_.get(), nullptr);
      return;
    }
    event_del(write_event_.get());
    std::string().swap(body_);
    header_.clear();
    written_ = 0;
    // An oversized request is still being drained; the end of its input closes.
    if (eof_) close();
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    event_del(read_event_.get());
    event_del(write_event_.get());
    event_del(timer_.get());
    fd_.reset();
    server_.finished(*this);  // may destroy this after the current callback
  }

  AdminServer& server_;
  UniqueFd fd_;
  EventPtr read_event_;
  EventPtr write_event_;
  EventPtr timer_;
  std::string request_;
  bool too_large_ = false;  // over kAdminMaxRequest: drain the input, the reply is an error
  bool eof_ = false;
  bool replying_ = false;
  bool closed_ = false;
  std::string header_;  // "status N\n"
  std::string body_;
  std::size_t written_ = 0;  // of header_ then body_
};

// ---- the server ---------------------------------------------------------------------------

AdminServer::AdminServer(EventLoop& loop, Handler handler, std::chrono::milliseconds client_timeout)
    : loop_(loop), handler_(std::move(handler)), client_timeout_(client_timeout) {}

AdminServer::~AdminServer() {
  accept_event_.reset();
  accept_retry_.reset();
  clients_.clear();
  listener_.close();
}

std::string AdminServer::listen(const std::string& path, mode_t mode) {
  if (auto error = listener_.listen(path, mode, kBacklog, "admin socket"); !error.empty())
    return error;
  path_ = path;
  accept_event_ =
      loop_.newEvent(listener_.fd(), EV_READ | EV_PERSIST, &AdminServer::onAccept, this);
  accept_retry_ = loop_.newEvent(-1, 0, &AdminServer::onAcceptRetry, this);
  event_add(accept_event_.get(), nullptr);
  return {};
}

void AdminServer::onAccept(evutil_socket_t fd, short, void* arg) {
  auto* self = static_cast<AdminServer*>(arg);
  for (int i = 0; i < kAcceptsPerWakeup; ++i) {
    UniqueFd conn(::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (conn) {
      if (self->clients_.size() >= kMaxClients) {
        spdlog::warn("admin socket {}: {} clients already, closing a new one", self->path_,
                     kMaxClients);
        continue;
      }
      auto client = std::make_unique<Client>(*self, std::move(conn));
      Client& started = *client;
      self->clients_.push_back(std::move(client));
      started.start();
      continue;
    }
    const int err = errno;
    if (err == EAGAIN) return;
    if (err == EINTR || err == ECONNABORTED) continue;
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
      // The connection stays in the backlog; stop polling for a moment instead of spinning.
      spdlog::warn("admin socket {}: accept failed: {}; pausing it for 100ms", self->path_,
                   errnoText(err));
      event_del(self->accept_event_.get());
      event_add(self->accept_retry_.get(), &kAcceptRetry);
    } else {
      spdlog::warn("admin socket {}: accept failed: {}", self->path_, errnoText(err));
    }
    return;
  }
}

void AdminServer::onAcceptRetry(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<AdminServer*>(arg);
  if (self->accept_event_) event_add(self->accept_event_.get(), nullptr);
}

void AdminServer::finished(Client& client) {
  auto it = std::find_if(clients_.begin(), clients_.end(),
                         [&client](const auto& c) { return c.get() == &client; });
  if (it == clients_.end()) return;
  std::unique_ptr<Client> done = std::move(*it);
  clients_.erase(it);
  loop_.deferDelete(std::move(done));
}

// ---- the client ---------------------------------------------------------------------------

int adminRequest(const std::string& path, const std::vector<std::string>& args, std::string& out,
                 std::string& error, std::chrono::milliseconds timeout) {
  out.clear();
  error.clear();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  sockaddr_un addr{};
  if (!net::unixAddress(path, addr)) {
    error = "admin socket path '" + path + "' is empty or too long";
    return -1;
  }
  std::string request;
  for (const std::string& arg : args) {
    if (arg.find('\0') != std::string::npos) {
      error = "an argument contains a NUL byte, which the admin protocol cannot carry";
      return -1;
    }
    request += arg;
    request += '\0';
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    error = "socket: " + errnoText(errno);
    return -1;
  }
  while (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    if (err == EINTR) continue;
    // A non-blocking Unix connect answers EAGAIN at once when the backlog is full: retry.
    if (err == EAGAIN && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    error = "cannot connect to " + path + ": " + errnoText(err);
    if (err == ENOENT || err == ECONNREFUSED) error += " (is dmm-sidecar running?)";
    if (err == EACCES) error += " (the admin socket is for root and the socket file's group)";
    return -1;
  }

  std::size_t sent = 0;
  bool peer_closed = false;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n >= 0) {
      sent += static_cast<std::size_t>(n);
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      if (!waitFor(fd.get(), POLLOUT, deadline)) {
        error = "timed out sending the request to " + path;
        return -1;
      }
      continue;
    }
    if (err == EPIPE || err == ECONNRESET) {  // closed early; what it said may still be there
      peer_closed = true;
      break;
    }
    error = "cannot send to " + path + ": " + errnoText(err);
    return -1;
  }
  if (!peer_closed) ::shutdown(fd.get(), SHUT_WR);

  std::string reply;
  std::vector<char> buf(64 * 1024);
  for (;;) {
    const ssize_t n = ::recv(fd.get(), buf.data(), buf.size(), 0);
    if (n > 0) {
      reply.append(buf.data(), static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) break;
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      if (!waitFor(fd.get(), POLLIN, deadline)) {
        error = "timed out waiting for the reply from " + path;
        return -1;
      }
      continue;
    }
    // A server that closes without reading the request (too many clients) makes a Unix
    // socket report ECONNRESET rather than EOF: with nothing read, both mean "no reply".
    if (err == ECONNRESET && reply.empty()) break;
    error = "cannot read the reply from " + path + ": " + errnoText(err);
    return -1;
  }

  const std::size_t eol = reply.find('\n');
  if (eol == std::string::npos) {
    error = reply.empty() ? "dmm-sidecar closed the admin connection without a reply (too many "
                            "admin clients at once, or it is stopping)"
                          : "malformed reply from " + path + ": no status line";
    return -1;
  }
  constexpr std::string_view kPrefix = "status ";
  const std::string_view line(reply.data(), eol);
  const std::string_view digits =
      line.substr(0, kPrefix.size()) == kPrefix ? line.substr(kPrefix.size()) : "";
  int status = 0;
  bool valid = !digits.empty() && digits.size() <= 3;
  for (char c : digits) {
    if (c < '0' || c > '9') {
      valid = false;
      break;
    }
    status = status * 10 + (c - '0');
  }
  if (!valid || status > 255) {
    error = "malformed reply from " + path + ": bad status line";
    return -1;
  }
  reply.erase(0, eol + 1);
  out = std::move(reply);
  return status;
}

}  // namespace dmm::proxy
