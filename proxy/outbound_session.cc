#include "proxy/outbound_session.h"

#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>

#include "common/socket_util.h"
#include "proxy/capture.h"
#include "proxy/relay.h"
#include "proxy/session_util.h"
#include "proxy/tunnel_framing.h"
#include "stacks/kernel/kernel_connection.h"

namespace dmm::proxy {

using stacks::CloseType;
using stacks::IoResult;
using stacks::kernel::KernelConnection;

namespace {

FallbackReason reasonForConnectError(int err) {
  switch (err) {
    case ECONNREFUSED:
      return FallbackReason::kPeerRefused;
    case ETIMEDOUT:
      return FallbackReason::kPeerTimeout;
    default:
      return FallbackReason::kPeerUnreachable;
  }
}

}  // namespace

void OutboundSession::startCaptured(Worker& worker, UniqueFd client) {
  auto local = net::localAddress(client.get());
  auto destination = local ? originalDestination(client.get(), local->family()) : std::nullopt;
  if (!destination) {
    worker.metrics().captureRefused(false);
    spdlog::debug("captured connection without an original destination refused");
    (void)net::setAbortOnClose(client.get(), true);
    return;
  }
  if (*destination == *local) {
    // An original destination equal to our own listener means the connection was not
    // redirected: refuse it, or we would dial ourselves forever.
    worker.metrics().captureRefused(true);
    spdlog::debug("connection straight to the capture listener {} refused (loop)",
                  local->toString());
    (void)net::setAbortOnClose(client.get(), true);
    return;
  }
  start(worker, std::move(client), *destination);
}

void OutboundSession::start(Worker& worker, UniqueFd client, const SocketAddress& destination) {
  auto* session = new OutboundSession(worker, std::move(client), destination);
  session->begin();
}

OutboundSession::OutboundSession(Worker& worker, UniqueFd client, const SocketAddress& destination)
    : Session(worker),
      destination_(destination),
      peer_(destination.ip(), worker.config().tunnel_port),
      reader_(handshake::MessageType::kReply, worker.config().max_header_bytes) {
  client_ = std::make_unique<KernelConnection>(worker.loop(), std::move(client), *this, false);
}

OutboundSession::~OutboundSession() = default;

void OutboundSession::retireUpstream() {
  if (!upstream_) return;
  upstream_->close(CloseType::kAbort);
  retired_.push_back(std::move(upstream_));
}

void OutboundSession::begin() {
  auto& ctx = worker_.context();
  if (ctx.peers.knownNoSidecar(destination_.ip(), Clock::now())) {
    fallBack(FallbackReason::kCachedNoSidecar, false);
    return;
  }
  connectPeer();
}

void OutboundSession::connectPeer() {
  const auto& config = worker_.config();
  if (config.tunnel_reuse) {
    auto pooled = worker_.tunnels().take(peer_);
    if (pooled.conn) {
      upstream_ = std::move(pooled.conn);
      upstream_->setCallbacks(*this);
      reused_ = true;
      tuned_for_ = pooled.stack;
      sendHello();
      return;
    }
  }
  auto fd = net::connectTcp(peer_, config.mark);
  if (!fd) {
    fallBack(reasonForConnectError(fd.error().code), true);
    return;
  }
  state_ = State::kConnectingPeer;
  upstream_ = std::make_unique<KernelConnection>(worker_.loop(), std::move(*fd), *this, true);
  armTimer(config.connect_timeout);
}

void OutboundSession::onConnected(stacks::StackConnection& conn) {
  if (&conn != upstream_.get()) return;
  if (state_ == State::kConnectingPeer) {
    sendHello();
  } else if (state_ == State::kConnectingDirect) {
    startRelay(std::move(upstream_), worker_.metrics().directStack());
  }
}

void OutboundSession::onConnectFailed(stacks::StackConnection& conn, Error error) {
  if (&conn != upstream_.get()) return;
  if (state_ == State::kConnectingPeer) {
    fallBack(reasonForConnectError(error.code), true);
  } else if (state_ == State::kConnectingDirect) {
    refuse(Outcome::kConnectFailed, worker_.metrics().directStack(), std::strerror(error.code));
  }
}

void OutboundSession::sendHello() {
  const auto& ctx = worker_.context();
  handshake::Hello hello;
  worker_.randomBytes(nonce_);
  hello.nonce = nonce_;
  hello.timestamp_ms = unixMillis();
  hello.original_dst = destination_;
  hello.key_id = ctx.config.key_id;
  hello.connection_id = id_;
  if (ctx.config.tunnel_reuse) hello.framing = handshake::kFramingV1;
  offered_stacks_.clear();
  for (std::size_t i = 0; i < ctx.stacks.size() && hello.offers.size() < handshake::kMaxOffers;
       ++i) {
    const auto& stack = *ctx.stacks[i];
    auto kind = handshake::stackKindFromName(stack.kind());
    if (!kind || !stack.healthy()) continue;
    hello.offers.push_back({*kind, stack.name(), stack.advertise()});
    offered_stacks_.push_back(i);
  }
  if (hello.offers.empty()) {
    fallBack(FallbackReason::kPeerNoCommonStack, false);
    return;
  }
  auto frame = handshake::encodeHello(hello, ctx.config.psk);
  if (reused_ && early_.empty()) {
    // This peer frames (it did on this connection before): the client's first bytes can go
    // with the HELLO as early data, saving the peer a wake-up and the session a round trip.
    // They are kept until the REPLY, for a fallback or a retry.
    std::byte buf[kEarlyDataMax];
    auto r = client_->read(buf);
    if (r.status == IoResult::Status::kOk) {
      early_.assign(buf, buf + r.bytes);
    } else if (r.status == IoResult::Status::kReset || r.status == IoResult::Status::kError) {
      refuse(Outcome::kReset, worker_.metrics().noStack(), "client reset");
      return;
    }
  }
  early_sent_ = reused_ && !early_.empty();
  if (early_sent_) {
    std::size_t at = frame.size();
    frame.resize(at + framing::kHeaderSize + early_.size());
    framing::putHeader(reinterpret_cast<std::byte*>(frame.data() + at),
                       static_cast<std::uint32_t>(early_.size()));
    std::memcpy(frame.data() + at + framing::kHeaderSize, early_.data(), early_.size());
  }
  writer_.set(std::move(frame));
  state_ = State::kHandshaking;
  // The peer answers only once it has reached the destination, which may take it up to its
  // own timeouts.connect; waiting less would mistake a slow destination for a missing sidecar.
  armTimer(ctx.config.handshake_timeout + ctx.config.connect_timeout);
  flushHello();
}

void OutboundSession::flushHello() {
  if (writer_.write(*upstream_) == FrameWriter::Step::kError) {
    if (retryFresh()) return;
    fallBack(FallbackReason::kPeerClosed, true);
  }
}

bool OutboundSession::retryFresh() {
  if (!reused_) return false;
  reused_ = false;
  early_sent_ = false;  // sent on the dead connection only: the relay sends them
  retireUpstream();
  reader_ = FrameReader(handshake::MessageType::kReply, worker_.config().max_header_bytes);
  connectPeer();
  return true;
}

void OutboundSession::onWritable(stacks::StackConnection& conn) {
  if (&conn == upstream_.get() && state_ == State::kHandshaking) flushHello();
}

void OutboundSession::onReadable(stacks::StackConnection& conn) {
  // The client's bytes wait in its socket until the relay starts; only the reply matters here.
  if (&conn == upstream_.get() && state_ == State::kHandshaking) readReply();
}

void OutboundSession::readReply() {
  const auto& config = worker_.config();
  switch (reader_.read(*upstream_)) {
    case FrameReader::Step::kWouldBlock:
      return;
    case FrameReader::Step::kEof:
    case FrameReader::Step::kError:
      if (retryFresh()) return;
      fallBack(FallbackReason::kPeerClosed, true);
      return;
    case FrameReader::Step::kBadPrefix:
      if (reader_.prefixError() == handshake::PrefixError::kUnsupportedVersion) {
        fallBack(FallbackReason::kPeerUnsupportedVersion, false);
      } else {
        fallBack(FallbackReason::kPeerProtocolError, true);
      }
      return;
    case FrameReader::Step::kDone:
      break;
  }
  auto result =
      handshake::decodeReply(reader_.frame(), config.psk, nonce_, config.max_header_bytes);
  if (result.error == handshake::RejectReason::kAuthFailed) {
    // The peer could not prove it holds our key (or says we could not): never fall back
    // around an authentication failure, or anyone could force the downgrade.
    worker_.metrics().rejection(Role::kOutbound, RejectionLabel::kAuthFailed);
    refuse(Outcome::kRefused, worker_.metrics().noStack(), "peer authentication failed");
    return;
  }
  if (result.error != handshake::RejectReason::kNone) {
    fallBack(FallbackReason::kPeerProtocolError, true);
    return;
  }
  onReply(result.reply);
}

void OutboundSession::onReply(const handshake::Reply& reply) {
  auto& ctx = worker_.context();
  ctx.peers.markSidecar(destination_.ip());
  if (reply.accepted) {
    if (reply.chosen_index >= offered_stacks_.size()) {
      fallBack(FallbackReason::kPeerProtocolError, false);
      return;
    }
    std::size_t stack_index = offered_stacks_[reply.chosen_index];
    framed_ = reply.framing == handshake::kFramingV1 && ctx.config.tunnel_reuse;
    if (reused_) worker_.metrics().tunnelReused(Role::kOutbound);
    // A reused connection is already tuned for the stack it carried.
    auto adopted = reused_ && tuned_for_ == stack_index
                       ? Result<std::unique_ptr<stacks::StackConnection>>(std::move(upstream_))
                       : ctx.stacks[stack_index]->adopt(std::move(upstream_));
    if (!adopted) {
      refuse(Outcome::kError, stack_index, adopted.error().reason);
      return;
    }
    startRelay(std::move(*adopted), stack_index);
    return;
  }
  worker_.metrics().rejection(Role::kOutbound, rejectionLabel(reply.reason));
  switch (reply.reason) {
    case handshake::RejectReason::kUnsupportedVersion:
      fallBack(FallbackReason::kPeerUnsupportedVersion, false);
      return;
    case handshake::RejectReason::kNoCommonStack:
      fallBack(FallbackReason::kPeerNoCommonStack, false);
      return;
    case handshake::RejectReason::kOverloaded:
      fallBack(FallbackReason::kPeerOverloaded, false);
      return;
    case handshake::RejectReason::kDestinationUnreachable:
      refuse(Outcome::kConnectFailed, worker_.metrics().noStack(),
             "peer could not reach destination");
      return;
    default:
      refuse(Outcome::kRefused, worker_.metrics().noStack(), handshake::reasonName(reply.reason));
      return;
  }
}

void OutboundSession::fallBack(FallbackReason reason, bool no_sidecar) {
  auto& ctx = worker_.context();
  const auto& config = ctx.config;
  retireUpstream();
  if (no_sidecar) {
    ctx.peers.markNoSidecar(destination_.ip(), config.no_sidecar_ttl, Clock::now());
    // Logged once per peer per no_sidecar_ttl: later connections hit the cache quietly.
    spdlog::warn(
        "no usable sidecar at {} ({}); {} for {}", peer_.toString(), fallbackReasonName(reason),
        config.fallback == FallbackMode::kDirect ? "connecting directly" : "refusing connections",
        formatDuration(config.no_sidecar_ttl));
  }
  bool direct = config.fallback == FallbackMode::kDirect;
  worker_.metrics().fallback(reason, direct);
  if (!direct) {
    refuse(Outcome::kRefused, worker_.metrics().noStack(), fallbackReasonName(reason));
    return;
  }
  connectDirect();
}

void OutboundSession::connectDirect() {
  const auto& config = worker_.config();
  auto fd = net::connectTcp(destination_, config.mark);
  if (!fd) {
    refuse(Outcome::kConnectFailed, worker_.metrics().directStack(),
           std::strerror(fd.error().code));
    return;
  }
  state_ = State::kConnectingDirect;
  upstream_ = std::make_unique<KernelConnection>(worker_.loop(), std::move(*fd), *this, true);
  armTimer(config.connect_timeout);
}

void OutboundSession::startRelay(std::unique_ptr<stacks::StackConnection> upstream,
                                 std::size_t stack) {
  // The relay forwards what it reads as soon as it reads it; Nagle on a leg would hold a small
  // segment behind an unacknowledged one and add the peer's delayed ACK (~40 ms) to every
  // request/response round. The tunnel leg follows its stack instance's own `nodelay`.
  (void)net::setNoDelay(client_->fd(), true);
  if (stack == worker_.metrics().directStack()) (void)net::setNoDelay(upstream->fd(), true);
  if (stack != worker_.metrics().directStack()) {
    // Only connections the peer sidecar carries had a handshake to time.
    worker_.metrics().handshakeDone(Role::kOutbound,
                                    std::chrono::duration<double>(Clock::now() - started_).count());
  }
  Relay::Info info;
  info.id = id_;
  info.role = Role::kOutbound;
  info.stack = stack;
  info.destination = destination_;
  info.started = started_;
  info.framed = framed_ && stack != worker_.metrics().directStack();
  info.tunnel_is_upstream = true;
  info.peer = peer_;
  end();
  // Early bytes already carried by the peer are only counted; otherwise (a fallback, a retry
  // on a new connection) they go out first.
  bool carried = early_sent_ && info.framed;
  if (carried) info.early_bytes = early_.size();
  Relay::start(worker_, info, std::move(client_), std::move(upstream),
               carried ? std::span<const std::byte>() : std::span<const std::byte>(early_));
}

void OutboundSession::refuse(Outcome outcome, std::size_t stack, const char* why) {
  // Counted before the client can see the reset, so that whoever observes it finds it counted.
  worker_.metrics().connectionFailed(Role::kOutbound, stack, outcome);
  // The client's connect() already succeeded (to us): a reset is the closest we can come to
  // the refusal it would have seen.
  if (client_) client_->close(CloseType::kAbort);
  retireUpstream();
  spdlog::info("conn {:x} role=outbound dst={} end={} reason=\"{}\"", id_, destination_.toString(),
               outcomeName(outcome), why);
  end();
}

void OutboundSession::shutdown() {
  auto& metrics = worker_.metrics();
  metrics.connectionFailed(
      Role::kOutbound,
      state_ == State::kConnectingDirect ? metrics.directStack() : metrics.noStack(),
      Outcome::kShutdown);
  if (client_) client_->close(CloseType::kAbort);
  retireUpstream();
  end();
}

void OutboundSession::onTimeout() {
  switch (state_) {
    case State::kConnectingPeer:
    case State::kHandshaking:
      fallBack(FallbackReason::kPeerTimeout, true);
      break;
    case State::kConnectingDirect:
      refuse(Outcome::kConnectFailed, worker_.metrics().directStack(), "connect timed out");
      break;
  }
}

}  // namespace dmm::proxy
