#include "proxy/preload_session.h"

#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "common/log.h"
#include "policy/policy.h"
#include "preload/preamble.h"
#include "proxy/outbound_session.h"
#include "proxy/shm_connection.h"

namespace dmm::proxy {

namespace {

std::optional<SocketAddress> toSocketAddress(const preload::Endpoint& e) {
  sockaddr_storage ss{};
  if (e.family == AF_INET) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&ss);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(e.port);
    std::memcpy(&sin->sin_addr, e.address, 4);
    return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), sizeof(sockaddr_in));
  }
  auto* sin6 = reinterpret_cast<sockaddr_in6*>(&ss);
  sin6->sin6_family = AF_INET6;
  sin6->sin6_port = htons(e.port);
  std::memcpy(&sin6->sin6_addr, e.address, 16);
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), sizeof(sockaddr_in6));
}

// The process name the kernel keeps (comm: at most 15 characters), empty when unknown.
std::string processName(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
  std::string name;
  std::getline(in, name);
  return name;
}

}  // namespace

void PreloadSession::start(Worker& worker, UniqueFd client) {
  auto* session = new PreloadSession(worker, std::move(client));
  session->armTimer(worker.config().handshake_timeout);
  session->readPreamble();  // the preamble usually arrived with the connection
}

PreloadSession::PreloadSession(Worker& worker, UniqueFd client)
    : Session(worker), client_(std::move(client)) {
  // Edge-triggered: peeked bytes stay in the socket, so a level-triggered read event would
  // fire again at once while the preamble is incomplete.
  event_ = worker.loop().newEvent(client_.get(), EV_READ | EV_PERSIST | EV_ET,
                                  &PreloadSession::onEvent, this);
  event_add(event_.get(), nullptr);
}

PreloadSession::~PreloadSession() = default;

void PreloadSession::onEvent(evutil_socket_t, short, void* arg) {
  static_cast<PreloadSession*>(arg)->readPreamble();
}

void PreloadSession::readPreamble() {
  std::uint8_t buffer[preload::kMaxPreambleBytes];
  ssize_t n = ::recv(client_.get(), buffer, sizeof buffer, MSG_PEEK | MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return;
    refuse(std::string("read: ") + std::strerror(errno));
    return;
  }
  if (n == 0) {  // the application closed before saying where to
    event_.reset();
    client_.reset();
    end();
    return;
  }
  auto r =
      preload::decodePreamble(std::span<const std::uint8_t>(buffer, static_cast<std::size_t>(n)));
  if (r.status == preload::DecodeResult::Status::kIncomplete) return;
  if (r.status == preload::DecodeResult::Status::kInvalid) {
    refuse(r.error);
    return;
  }
  auto destination = toSocketAddress(r.preamble.destination);
  if (!destination) {
    refuse("destination is not an address");
    return;
  }
  // Consume exactly the preamble: what follows is the application's.
  ssize_t took = ::recv(client_.get(), buffer, r.consumed, MSG_DONTWAIT);
  if (took != static_cast<ssize_t>(r.consumed)) {
    refuse("the preamble could not be consumed");
    return;
  }
  ClientIdentity who;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(client_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    who.pid = cred.pid;
    who.uid = cred.uid;
    who.app = processName(cred.pid);
  }
  if (!r.preamble.qos.empty()) {
    who.qos = policy::qosFromName(r.preamble.qos);
    if (!who.qos) spdlog::debug("preload: unknown qos hint \"{}\" ignored", r.preamble.qos);
  }
  event_.reset();
  UniqueFd fd = std::move(client_);
  Worker& worker = worker_;
  auto id = id_;
  end();
  if (r.preamble.shm) {
    // The shim waits for one byte before it sends anything else: shared memory, or not.
    if (static_cast<std::int64_t>(worker.shmConnections()) <
        worker.config().preload_shm_connections) {
      auto conn = ShmConnection::create(worker.loop(), fd, worker.shmConnections());
      if (conn) {
        auto offered = (*conn)->offer();
        if (offered) {
          worker.metrics().preloadConnection(Metrics::PreloadPath::kSharedMemory);
          OutboundSession::startPreloaded(worker, std::move(*conn), *destination, std::move(who));
          return;
        }
        spdlog::debug("conn {:x}: shared memory not offered: {}: {}", id, offered.error().reason,
                      std::strerror(offered.error().code));
        fd = (*conn)->releaseSocket();
        worker.metrics().shmDeclined(Metrics::ShmDeclined::kError);
      } else {
        worker.metrics().shmDeclined(Metrics::ShmDeclined::kError);
        static log::RateLimiter limiter;
        log::limited(limiter, spdlog::level::warn,
                     "conn {:x}: no shared memory for a preloaded connection, the Unix stream "
                     "instead: {}: {}",
                     id, conn.error().reason, std::strerror(conn.error().code));
      }
    } else {
      worker.metrics().shmDeclined(Metrics::ShmDeclined::kLimit);
    }
    char reply = preload::shm::kReplyStream;
    if (::send(fd.get(), &reply, 1, MSG_DONTWAIT | MSG_NOSIGNAL) != 1) return;
  }
  worker.metrics().preloadConnection(Metrics::PreloadPath::kUnixStream);
  OutboundSession::startPreloaded(worker, std::move(fd), *destination, std::move(who));
}

void PreloadSession::refuse(const std::string& why) {
  worker_.metrics().captureRefused(Metrics::CaptureRefusal::kBadPreamble);
  static log::RateLimiter limiter;
  log::limited(limiter, spdlog::level::warn, "conn {:x}: preload connection refused: {}", id_, why);
  event_.reset();
  client_.reset();
  end();
}

void PreloadSession::onTimeout() {
  refuse("no whole preamble within timeouts.handshake");
}

void PreloadSession::shutdown() {
  event_.reset();
  client_.reset();
  end();
}

}  // namespace dmm::proxy
