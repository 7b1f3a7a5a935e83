#include "proxy/inbound_session.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/log.h"
#include "common/socket_util.h"
#include "proxy/classify.h"
#include "proxy/relay.h"
#include "proxy/session_util.h"
#include "stacks/kernel/kernel_connection.h"

namespace dmm::proxy {

using stacks::CloseType;
using stacks::IoResult;
using stacks::kernel::KernelConnection;

void InboundSession::start(Worker& worker, UniqueFd control) {
  auto* session = new InboundSession(worker, std::move(control));
  session->armTimer(worker.config().handshake_timeout);
}

InboundSession::InboundSession(Worker& worker, UniqueFd control)
    : Session(worker),
      // Nothing may follow a HELLO before our REPLY: one read can take it whole.
      reader_(handshake::MessageType::kHello, worker.config().max_header_bytes, true) {
  // Registering the socket reports bytes that already arrived as a first readable edge.
  control_ = std::make_unique<KernelConnection>(worker.loop(), std::move(control), *this, false);
}

InboundSession::InboundSession(Worker& worker, std::unique_ptr<stacks::StackConnection> control)
    : Session(worker),
      control_(std::move(control)),
      reader_(handshake::MessageType::kHello, worker.config().max_header_bytes, true) {
  control_->setCallbacks(*this);
}

void InboundSession::resume(Worker& worker, std::unique_ptr<stacks::StackConnection> control,
                            std::size_t stack, std::vector<std::byte> leftover) {
  auto* session = new InboundSession(worker, std::move(control));
  session->reused_ = true;
  session->tuned_for_ = stack;
  session->armTimer(worker.config().tunnel_keepalive);
  if (!leftover.empty()) {
    auto step = session->reader_.feed(leftover);
    if (step != FrameReader::Step::kWouldBlock) {
      session->onReaderStep(step);
      return;
    }
  }
  // The relay may have consumed the readiness edge of bytes still in the socket.
  session->readHello();
}

InboundSession::~InboundSession() {
  cancelData();
}

void InboundSession::onReadable(stacks::StackConnection& conn) {
  if (&conn != control_.get()) return;
  if (state_ == State::kReadingHello) {
    readHello();
  } else if (state_ == State::kAwaitingData) {
    // Nothing more is due on the control connection before the data connection comes: the
    // initiator gave up (closed, reset) or broke the protocol.
    std::byte b[1];
    auto r = control_->read(b);
    if (r.status != stacks::IoResult::Status::kWouldBlock) drop(RejectionLabel::kTimeout, false);
  }
}

void InboundSession::onDataConnection(std::unique_ptr<stacks::StackConnection> conn) {
  expecting_ = false;
  if (state_ != State::kAwaitingData) {
    conn->close(CloseType::kAbort);
    return;
  }
  data_ = std::move(conn);
  startRelay();
}

void InboundSession::cancelData() {
  if (!expecting_) return;
  expecting_ = false;
  worker_.context().stacks[chosen_stack_]->cancelData(worker_.loop(), token_);
}

void InboundSession::onWritable(stacks::StackConnection& conn) {
  if (&conn == control_.get() && (state_ == State::kAccepting || state_ == State::kRejecting))
    flushReply();
}

void InboundSession::readHello() {
  onReaderStep(reader_.read(*control_));
}

void InboundSession::onReaderStep(FrameReader::Step step) {
  switch (step) {
    case FrameReader::Step::kWouldBlock:
      return;
    case FrameReader::Step::kEof:
      // A connection that closes having sent nothing is a probe, not a handshake (or, reused,
      // the peer closing its idle connection).
      drop(RejectionLabel::kMalformed, !reader_.empty());
      return;
    case FrameReader::Step::kError:
      drop(RejectionLabel::kMalformed, false);
      return;
    case FrameReader::Step::kBadPrefix:
      switch (reader_.prefixError()) {
        case handshake::PrefixError::kBadMagic:
          drop(RejectionLabel::kBadMagic, true);  // not our protocol: no answer
          return;
        case handshake::PrefixError::kUnsupportedVersion:
          reject(handshake::RejectReason::kUnsupportedVersion);
          return;
        case handshake::PrefixError::kTooLarge:
          reject(handshake::RejectReason::kTooLarge);
          return;
        default:
          reject(handshake::RejectReason::kMalformed);
          return;
      }
    case FrameReader::Step::kDone:
      onHello();
      return;
  }
}

bool InboundSession::allowed(const SocketAddress& dst) {
  const auto& config = worker_.config();
  // Our own ports are never a destination: a session delivered to the tunnel or capture
  // listener would loop back into this sidecar.
  for (const auto* list : {&config.tunnel_listen, &config.capture_listen}) {
    for (const auto& l : *list) {
      if (l.port() == dst.port() && (l.ip() == dst.ip() || l.ip().isUnspecified() ||
                                     worker_.localAddresses().isLocal(dst.ip(), Clock::now())))
        return false;
    }
  }
  for (const auto& rule : config.inbound_allow) {
    if (rule.matches(dst)) return true;
  }
  // By default: this host's own addresses, except loopback (services bound to loopback chose
  // not to be reachable from other hosts; allow them explicitly if wanted).
  return config.allow_local && !dst.ip().isLoopback() &&
         worker_.localAddresses().isLocal(dst.ip(), Clock::now());
}

void InboundSession::onHello() {
  auto& ctx = worker_.context();
  const auto& config = ctx.config;
  auto keys = [&config](std::string_view key_id) -> std::span<const std::uint8_t> {
    if (key_id == config.key_id) return config.psk;
    return {};
  };
  auto result = handshake::decodeHello(reader_.frame(), keys, config.max_header_bytes);
  if (result.error != handshake::RejectReason::kNone) {
    reject(result.error);
    return;
  }
  hello_ = std::move(result.hello);
  hello_valid_ = true;
  // Early data (framed session bytes right behind the HELLO) comes only with framing, which
  // this side must agree to; otherwise nothing may follow a HELLO before our REPLY.
  if (!reader_.surplus().empty() &&
      !(hello_.framing >= handshake::kFramingV1 && config.tunnel_reuse)) {
    reject(handshake::RejectReason::kMalformed);
    return;
  }

  auto now_ms = static_cast<std::int64_t>(unixMillis());
  auto skew = static_cast<std::int64_t>(config.max_clock_skew.count());
  auto age = now_ms - static_cast<std::int64_t>(hello_.timestamp_ms);
  if (age > skew || age < -skew) {
    reject(handshake::RejectReason::kStale);
    return;
  }
  switch (ctx.replay.insert(hello_.nonce, Clock::now())) {
    case ReplayCache::Insert::kNew:
      break;
    case ReplayCache::Insert::kReplayed:
      reject(handshake::RejectReason::kReplayed);
      return;
    case ReplayCache::Insert::kFull:
      reject(handshake::RejectReason::kOverloaded);
      return;
  }
  if (!allowed(hello_.original_dst)) {
    reject(handshake::RejectReason::kDestinationNotAllowed);
    return;
  }
  if (worker_.memoryExhausted()) {
    // Out of buffer memory: the initiator takes the session elsewhere (peer_overloaded).
    worker_.metrics().memoryRefused(Role::kInbound);
    reject(handshake::RejectReason::kOverloaded);
    return;
  }
  // This side's policy decides which of its instances it allows for this session; the first
  // offer, in the initiator's order, of a kind it allows (and runs healthy) is chosen.
  policy_ = ctx.policy.current();
  policy::Facts facts;
  facts.role = policy::Role::kInbound;
  facts.dst = hello_.original_dst;
  if (hello_.qos < policy::kQosClasses.size()) facts.qos = hello_.qos;
  facts.peer = policy::PeerSidecar::kYes;
  std::uint32_t offered = 0;
  for (const auto& o : hello_.offers)
    offered |= 1u << static_cast<unsigned>(o.kind);
  facts.peer_stacks = stackKindNames(offered);
  // The initiator's RTT: sampled (TCP_INFO) on a fresh control connection and remembered for
  // the peer; a reused one asks the table instead of the kernel (one syscall less per session).
  auto peer = control_->peerAddress();
  if (peer && !reused_) {
    auto rtt = net::tcpSmoothedRtt(control_->fd());
    ctx.peers.markSidecar(peer->ip(), offered, rtt);
    facts.rtt = config.rtt.classify(rtt);
  } else if (peer) {
    facts.rtt = config.rtt.classify(ctx.peers.facts(peer->ip(), Clock::now()).rtt);
  }
  decision_ = policy_->classify(facts);
  facts_ = std::move(facts);
  worker_.ruleMetrics(decision_.ruleName())
      .decisions[static_cast<std::size_t>(Role::kInbound)]
      ->Increment();
  bool found = false;
  for (std::size_t i = 0; i < hello_.offers.size() && !found; ++i) {
    for (std::size_t j : decision_.action->stacks) {
      auto& stack = *ctx.stacks[j];
      if (stack.kind() != handshake::stackKindName(hello_.offers[i].kind) || !stack.healthy())
        continue;
      if (stack.has(stacks::kOwnDataPath)) {
        // The instance expects the initiator's data connection with a fresh token; one that
        // cannot (the peer's instance is not reachable from it, it is full) is passed over.
        worker_.randomBytes(token_);
        auto params = stack.expectData(worker_.loop(), token_, hello_.offers[i].params, *this);
        if (!params) {
          spdlog::debug("conn {:x}: stack {} cannot take offer {}: {}", id_, stack.name(), i,
                        params.error().reason);
          continue;
        }
        chosen_params_ = std::move(*params);
        own_data_path_ = true;
        expecting_ = true;
      }
      chosen_offer_ = static_cast<std::uint8_t>(i);
      chosen_stack_ = j;
      stack_chosen_ = true;
      found = true;
      break;
    }
  }
  if (!found) {
    reject(handshake::RejectReason::kNoCommonStack);
    return;
  }
  auto fd = net::connectTcp(hello_.original_dst, config.mark);
  if (!fd) {
    reject(handshake::RejectReason::kDestinationUnreachable);
    return;
  }
  state_ = State::kConnecting;
  server_ = std::make_unique<KernelConnection>(worker_.loop(), std::move(*fd), *this, true);
  armTimer(config.connect_timeout);
}

void InboundSession::onConnected(stacks::StackConnection& conn) {
  if (&conn != server_.get() || state_ != State::kConnecting) return;
  const auto& config = worker_.config();
  handshake::Reply reply;
  reply.accepted = true;
  reply.chosen_index = chosen_offer_;
  reply.chosen_name = worker_.context().stacks[chosen_stack_]->name();
  // Framed data, and the connection kept for the peer's next session, when both want it (not
  // for a session on a data connection of its own: the control connection is its liveness).
  framed_ = hello_.framing >= handshake::kFramingV1 && config.tunnel_reuse && !own_data_path_;
  if (framed_) reply.framing = std::min(hello_.framing, handshake::kFramingV2);
  raw_frames_ = framed_ && reply.framing == handshake::kFramingV2;
  if (own_data_path_) {
    reply.token = token_;
    reply.chosen_params = chosen_params_;
  }
  reply.stack_kinds = worker_.context().stackKinds;
  writer_.set(handshake::encodeReply(reply, config.psk, hello_.nonce));
  state_ = State::kAccepting;
  armTimer(config.handshake_timeout);
  flushReply();
}

void InboundSession::onConnectFailed(stacks::StackConnection& conn, Error error) {
  if (&conn != server_.get() || state_ != State::kConnecting) return;
  spdlog::debug("conn {:x}: delivering to {} failed: {}", id_, hello_.original_dst.toString(),
                std::strerror(error.code));
  reject(handshake::RejectReason::kDestinationUnreachable);
}

void InboundSession::reject(handshake::RejectReason reason) {
  const auto& config = worker_.config();
  worker_.metrics().rejection(Role::kInbound, rejectionLabel(reason));
  worker_.metrics().connectionFailed(
      Role::kInbound, stack_chosen_ ? chosen_stack_ : worker_.metrics().noStack(),
      reason == handshake::RejectReason::kDestinationUnreachable ? Outcome::kConnectFailed
                                                                 : Outcome::kRefused);
  auto peer = control_->peerAddress();
  spdlog::info("conn {:x} role=inbound peer={} dst={} end=refused reason={} peer_conn={:x}", id_,
               peer ? peer->toString() : "-",
               hello_valid_ ? hello_.original_dst.toString() : std::string("-"),
               handshake::reasonName(reason), hello_valid_ ? hello_.connection_id : 0);
  if (server_) server_->close(CloseType::kAbort);
  cancelData();
  handshake::Reply reply;
  reply.accepted = false;
  reply.reason = reason;
  // Without an authenticated HELLO there is no nonce to bind the reply to; a zero nonce makes
  // the reply unverifiable for the initiator, which then refuses rather than falls back.
  handshake::Nonce nonce = hello_valid_ ? hello_.nonce : handshake::Nonce{};
  writer_.set(handshake::encodeReply(reply, config.psk, nonce));
  state_ = State::kRejecting;
  armTimer(config.handshake_timeout);
  flushReply();
}

void InboundSession::flushReply() {
  switch (writer_.write(*control_)) {
    case FrameWriter::Step::kWouldBlock:
      return;
    case FrameWriter::Step::kError:
      drop(RejectionLabel::kMalformed, false);
      return;
    case FrameWriter::Step::kDone:
      break;
  }
  if (state_ == State::kAccepting && own_data_path_) {
    // The initiator opens the data connection now; the control connection stays beside it.
    state_ = State::kAwaitingData;
    armTimer(worker_.config().handshake_timeout + worker_.config().connect_timeout);
    if (data_) startRelay();
  } else if (state_ == State::kAccepting) {
    startRelay();
  } else {
    control_->close(CloseType::kGraceful);
    end();
  }
}

void InboundSession::startRelay() {
  auto& ctx = worker_.context();
  if (reused_) worker_.metrics().tunnelReused(Role::kInbound);
  // A reused connection is already tuned for the stack it carried.
  std::unique_ptr<stacks::StackConnection> liveness;
  auto adopted = own_data_path_ ? Result<std::unique_ptr<stacks::StackConnection>>(std::move(data_))
                 : reused_ && tuned_for_ == chosen_stack_
                     ? Result<std::unique_ptr<stacks::StackConnection>>(std::move(control_))
                     : ctx.stacks[chosen_stack_]->adopt(std::move(control_));
  if (own_data_path_) liveness = std::move(control_);
  if (!adopted) {
    static log::RateLimiter limiter;
    log::limited(limiter, spdlog::level::warn, "conn {:x}: stack {} cannot carry the session: {}",
                 id_, ctx.stacks[chosen_stack_]->name(), adopted.error().reason);
    worker_.metrics().connectionFailed(Role::kInbound, chosen_stack_, Outcome::kError);
    if (server_) server_->close(CloseType::kAbort);
    end();
    return;
  }
  (void)net::setNoDelay(server_->fd(), true);  // see OutboundSession::startRelay
  worker_.metrics().handshakeDone(Role::kInbound,
                                  std::chrono::duration<double>(Clock::now() - started_).count());
  Relay::Info info;
  info.id = id_;
  info.peer_id = hello_.connection_id;
  info.role = Role::kInbound;
  info.stack = chosen_stack_;
  info.destination = hello_.original_dst;
  info.started = started_;
  info.framed = framed_;
  info.raw_frames = raw_frames_;
  info.tunnel_is_upstream = false;
  info.policy = policy_;
  info.rule = decision_.rule;
  info.facts = ClassifiedFacts::of(facts_);
  end();
  Relay::start(worker_, info, std::move(*adopted), std::move(server_), reader_.surplus(),
               std::move(liveness));
}

void InboundSession::drop(RejectionLabel label, bool count) {
  if (count) {
    worker_.metrics().rejection(Role::kInbound, label);
    auto peer = control_ ? control_->peerAddress() : std::nullopt;
    spdlog::info("conn {:x} role=inbound peer={} end=dropped reason={}", id_,
                 peer ? peer->toString() : "-", rejectionLabelName(label));
  }
  cancelData();
  if (control_) control_->close(CloseType::kAbort);
  if (server_) server_->close(CloseType::kAbort);
  if (data_) data_->close(CloseType::kAbort);
  end();
}

void InboundSession::shutdown() {
  worker_.metrics().connectionFailed(Role::kInbound,
                                     stack_chosen_ ? chosen_stack_ : worker_.metrics().noStack(),
                                     Outcome::kShutdown);
  cancelData();
  if (control_) control_->close(CloseType::kAbort);
  if (server_) server_->close(CloseType::kAbort);
  if (data_) data_->close(CloseType::kAbort);
  end();
}

void InboundSession::drainIdle() {
  // A reused connection with nothing of a HELLO yet: the peer's next session opens a fresh
  // one to wherever it goes now (its pool retries a HELLO that crosses this close).
  if (state_ == State::kReadingHello && reused_ && reader_.empty())
    drop(RejectionLabel::kTimeout, false);
}

void InboundSession::onTimeout() {
  switch (state_) {
    case State::kReadingHello:
      // A reused connection the peer left idle: closing it is housekeeping, not a rejection.
      drop(RejectionLabel::kTimeout, !(reused_ && reader_.empty()));
      break;
    case State::kConnecting:
      reject(handshake::RejectReason::kDestinationUnreachable);
      break;
    case State::kAccepting:
    case State::kAwaitingData:
      drop(RejectionLabel::kTimeout, true);
      break;
    case State::kRejecting:
      // Already counted with its reason; the reply just could not be written in time.
      drop(RejectionLabel::kTimeout, false);
      break;
  }
}

}  // namespace dmm::proxy
