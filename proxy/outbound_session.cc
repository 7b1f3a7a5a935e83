#include "proxy/outbound_session.h"

#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/log.h"
#include "common/sock_diag.h"
#include "common/socket_util.h"
#include "proxy/capture.h"
#include "proxy/classify.h"
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
    worker.metrics().captureRefused(Metrics::CaptureRefusal::kNoOriginalDestination);
    spdlog::debug("captured connection without an original destination refused");
    (void)net::setAbortOnClose(client.get(), true);
    return;
  }
  if (*destination == *local) {
    // An original destination equal to our own listener means the connection was not
    // redirected: refuse it, or we would dial ourselves forever.
    worker.metrics().captureRefused(Metrics::CaptureRefusal::kLoop);
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

void OutboundSession::startPreloaded(Worker& worker, UniqueFd client,
                                     const SocketAddress& destination, ClientIdentity who) {
  auto* session = new OutboundSession(worker, std::move(client), destination);
  session->identity_ = std::move(who);
  session->begin();
}

void OutboundSession::startPreloaded(Worker& worker,
                                     std::unique_ptr<stacks::StackConnection> client,
                                     const SocketAddress& destination, ClientIdentity who) {
  auto* session = new OutboundSession(worker, std::move(client), destination);
  session->identity_ = std::move(who);
  session->begin();
}

OutboundSession::OutboundSession(Worker& worker, UniqueFd client, const SocketAddress& destination)
    : Session(worker),
      destination_(destination),
      peer_(destination.ip(), worker.config().tunnel_port),
      reader_(handshake::MessageType::kReply, worker.config().max_header_bytes) {
  client_ = std::make_unique<KernelConnection>(worker.loop(), std::move(client), *this, false);
}

OutboundSession::OutboundSession(Worker& worker, std::unique_ptr<stacks::StackConnection> client,
                                 const SocketAddress& destination)
    : Session(worker),
      destination_(destination),
      peer_(destination.ip(), worker.config().tunnel_port),
      reader_(handshake::MessageType::kReply, worker.config().max_header_bytes) {
  client_ = std::move(client);
  client_->setCallbacks(*this);
}

OutboundSession::~OutboundSession() {
  // A probe granted to a candidate whose attempt never started (another won first, or the
  // session ended before) proved nothing: hand it back, or that breaker stays "probing" and its
  // stack is skipped toward this peer for good.
  for (std::size_t stack : probes_) {
    if (std::find(probes_started_.begin(), probes_started_.end(), stack) == probes_started_.end())
      worker_.context().peers.breakerAbandon(destination_.ip(), stack);
  }
}

void OutboundSession::retireUpstream() {
  if (data_) {
    data_->close(CloseType::kAbort);
    retired_.push_back(std::move(data_));
  }
  if (!upstream_) return;
  upstream_->close(CloseType::kAbort);
  retired_.push_back(std::move(upstream_));
}

void OutboundSession::begin() {
  auto& ctx = worker_.context();
  policy_ = ctx.policy.current();
  std::uint32_t peer_kinds = 0;
  facts_ = outboundFacts(ctx, destination_, std::nullopt, &peer_kinds);
  if (identity_) {
    facts_.uid = identity_->uid;
    facts_.app = identity_->app;
    facts_.qos = identity_->qos;
  } else if (policy_->usesUid()) {
    // The client socket's owner; REDIRECT keeps its 4-tuple as (client, original destination).
    if (auto client = client_->peerAddress())
      facts_.uid = net::socketOwnerUid(*client, destination_);
  }
  decision_ = policy_->classify(facts_);
  rule_metrics_ = &worker_.ruleMetrics(decision_.ruleName());
  rule_metrics_->decisions[static_cast<std::size_t>(Role::kOutbound)]->Increment();
  if (facts_.peer == policy::PeerSidecar::kNo) {
    fallBack(FallbackReason::kCachedNoSidecar, false);
    return;
  }
  // The candidates: the decision's stacks this side can offer now, without those the peer is
  // known not to run, and without those whose breaker toward the peer is open.
  bool skipped_by_breaker = false;
  bool skipped_down = false;
  auto now = Clock::now();
  for (std::size_t stack : decision_.action->stacks) {
    const auto& s = *ctx.stacks[stack];
    auto bit = stackKindBit(s.kind());
    if (bit == 0) continue;
    if (!s.healthy()) {
      rule_metrics_->attempt(stack, AttemptOutcome::kSkippedDown).Increment();
      skipped_down = true;
      continue;
    }
    if (peer_kinds != 0 && (peer_kinds & bit) == 0) continue;
    PeerTable::Transition t;
    auto verdict = ctx.peers.breakerCheck(destination_.ip(), stack, now, &t);
    if (t == PeerTable::Transition::kHalfOpened)
      worker_.metrics().breaker(stack, BreakerState::kHalfOpen);
    if (verdict == PeerTable::Verdict::kSkip) {
      rule_metrics_->attempt(stack, AttemptOutcome::kSkippedBreaker).Increment();
      skipped_by_breaker = true;
      continue;
    }
    candidates_.push_back(stack);
    if (verdict == PeerTable::Verdict::kProbe) probes_.push_back(stack);
  }
  if (candidates_.empty()) {
    fallBack(skipped_by_breaker ? FallbackReason::kBreakerOpen
             : skipped_down     ? FallbackReason::kStackDown
                                : FallbackReason::kPeerNoCommonStack,
             false);
    return;
  }
  state_ = State::kConnectingPeer;
  startNextAttempt();
}

bool OutboundSession::startNextAttempt() {
  auto& ctx = worker_.context();
  const auto& config = ctx.config;
  const auto& action = *decision_.action;
  while (next_candidate_ < candidates_.size()) {
    std::size_t stack = candidates_[next_candidate_++];
    auto attempt = std::make_unique<Attempt>();
    attempt->session = this;
    attempt->stack = stack;
    attempt->probe = std::find(probes_.begin(), probes_.end(), stack) != probes_.end();
    if (attempt->probe) probes_started_.push_back(stack);
    if (config.tunnel_reuse) {
      // An idle connection to the peer over this stack is an attempt established at once.
      auto pooled = worker_.tunnels().take(peer_, stack);
      if (pooled) {
        pooled->setCallbacks(*this);
        attempt->conn = std::move(pooled);
        reused_ = true;
        attempts_.push_back(std::move(attempt));
        onEstablished(attempts_.back().get());
        return true;
      }
    }
    if (ctx.faults.strike(stack, Fault::kFailConnect)) {
      auto how = ctx.faults.connectFailure(stack);
      spdlog::debug("conn {:x}: fault injected: stack {} connect {}", id_,
                    ctx.stacks[stack]->name(), connectFailureName(how));
      if (how != ConnectFailure::kTimeout) {
        attempts_.push_back(std::move(attempt));
        attemptFailed(attempts_.back().get(),
                      how == ConnectFailure::kRefused ? ECONNREFUSED : EHOSTUNREACH);
        return true;
      }
      // A connect that never completes: no connection, the attempt timer ends it.
    } else {
      stacks::ConnectOptions options;
      options.remote = peer_;
      options.mark = config.mark;
      auto conn = ctx.stacks[stack]->connect(worker_.loop(), options, *this);
      if (!conn) {
        // Known at once (no route, no memory): this candidate failed; try the next.
        attempts_.push_back(std::move(attempt));
        attemptFailed(attempts_.back().get(), conn.error().code);
        return true;
      }
      attempt->conn = std::move(*conn);
    }
    attempt->timer = worker_.loop().newEvent(-1, 0, onAttemptTimer, attempt.get());
    auto tv = toTimeval(action.attempt_timeout);
    evtimer_add(attempt->timer.get(), &tv);
    attempts_.push_back(std::move(attempt));
    if (action.mode == policy::Mode::kRace && next_candidate_ < candidates_.size()) {
      // Happy Eyeballs across stacks: the next candidate starts after the stagger delay
      // unless this one is established (or fails) first.
      if (!stagger_) stagger_ = worker_.loop().newEvent(-1, 0, onStaggerTimer, this);
      auto st = toTimeval(action.stagger);
      evtimer_add(stagger_.get(), &st);
    }
    return true;
  }
  return false;
}

void OutboundSession::onStaggerTimer(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<OutboundSession*>(arg);
  if (self->state_ == State::kConnectingPeer) self->startNextAttempt();
}

void OutboundSession::onAttemptTimer(evutil_socket_t, short, void* arg) {
  auto* attempt = static_cast<Attempt*>(arg);
  attempt->session->attemptFailed(attempt, ETIMEDOUT);
}

OutboundSession::Attempt* OutboundSession::findAttempt(const stacks::StackConnection& conn) {
  for (auto& a : attempts_) {
    if (a->conn.get() == &conn) return a.get();
  }
  return nullptr;
}

void OutboundSession::breakerResult(std::size_t stack, bool ok) {
  PeerTable::BreakerPolicy bp{worker_.config().breaker_failures, worker_.config().breaker_open_for};
  auto t = worker_.context().peers.breakerResult(destination_.ip(), stack, ok, bp, Clock::now());
  if (t == PeerTable::Transition::kOpened) {
    worker_.metrics().breaker(stack, BreakerState::kOpen);
    spdlog::warn("stack {} toward {}: circuit breaker open for {} after {} failed attempt(s)",
                 worker_.context().stacks[stack]->name(), peer_.ip().toString(),
                 formatDuration(worker_.config().breaker_open_for),
                 worker_.config().breaker_failures);
  } else if (t == PeerTable::Transition::kClosed) {
    worker_.metrics().breaker(stack, BreakerState::kClosed);
    spdlog::info("stack {} toward {}: circuit breaker closed",
                 worker_.context().stacks[stack]->name(), peer_.ip().toString());
  }
}

void OutboundSession::attemptFailed(Attempt* attempt, int err) {
  if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
    // Out of descriptors or memory here: not the peer's doing. No breaker, no "no sidecar"
    // mark and no fallback (a direct connection needs the same): the client is refused now,
    // and the next connection tries again.
    if (attempt->conn) retired_.push_back(std::move(attempt->conn));
    std::erase_if(attempts_, [attempt](const auto& a) { return a.get() == attempt; });
    refuse(Outcome::kError, worker_.metrics().noStack(), std::strerror(err));
    return;
  }
  AttemptOutcome outcome = err == ECONNREFUSED ? AttemptOutcome::kFailedRefused
                           : err == ETIMEDOUT  ? AttemptOutcome::kFailedTimeout
                                               : AttemptOutcome::kFailedUnreachable;
  rule_metrics_->attempt(attempt->stack, outcome).Increment();
  last_failure_ = reasonForConnectError(err);
  spdlog::debug("conn {:x}: stack {} toward {} failed: {}", id_,
                worker_.context().stacks[attempt->stack]->name(), peer_.toString(),
                std::strerror(err));
  breakerResult(attempt->stack, false);
  if (attempt->conn) {
    attempt->conn->close(CloseType::kAbort);
    retired_.push_back(std::move(attempt->conn));
  }
  std::erase_if(attempts_, [attempt](const auto& a) { return a.get() == attempt; });
  // The next candidate starts now: in a race a failure does not wait for the stagger.
  if (startNextAttempt()) return;
  if (attempts_.empty()) fallBack(last_failure_, true);
}

void OutboundSession::cancelAttempts(const Attempt* keep) {
  for (auto& a : attempts_) {
    if (a.get() == keep) continue;
    rule_metrics_->attempt(a->stack, AttemptOutcome::kLostRace).Increment();
    // A cancelled probe proved nothing: let the next connection probe.
    if (a->probe) worker_.context().peers.breakerAbandon(destination_.ip(), a->stack);
    if (a->conn) {
      a->conn->close(CloseType::kAbort);
      retired_.push_back(std::move(a->conn));
    }
  }
  std::erase_if(attempts_, [keep](const auto& a) { return a.get() != keep; });
  if (stagger_) evtimer_del(stagger_.get());
}

void OutboundSession::onEstablished(Attempt* attempt) {
  cancelAttempts(attempt);
  winner_ = attempt->stack;
  winner_probe_ = attempt->probe;
  tuned_for_ = attempt->stack;  // its stack's connect() (or an earlier session) tuned it
  upstream_ = std::move(attempt->conn);
  attempts_.clear();
  sendHello();
}

void OutboundSession::onConnected(stacks::StackConnection& conn) {
  if (state_ == State::kConnectingPeer) {
    if (auto* a = findAttempt(conn)) onEstablished(a);
    return;
  }
  if (state_ == State::kConnectingData && &conn == data_.get()) {
    winnerDone(AttemptOutcome::kWon);
    auto data = std::move(data_);
    auto control = std::move(upstream_);
    startRelay(std::move(data), data_stack_, std::move(control));
    return;
  }
  if (&conn != upstream_.get()) return;
  if (state_ == State::kConnectingDirect) {
    startRelay(std::move(upstream_), worker_.metrics().directStack());
  }
}

void OutboundSession::onConnectFailed(stacks::StackConnection& conn, Error error) {
  if (state_ == State::kConnectingPeer) {
    if (auto* a = findAttempt(conn)) attemptFailed(a, error.code);
    return;
  }
  if (state_ == State::kConnectingData && &conn == data_.get()) {
    dataPathFailed(error.code);
    return;
  }
  if (&conn != upstream_.get()) return;
  if (state_ == State::kConnectingDirect) {
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
  if (ctx.config.tunnel_reuse) hello.framing = handshake::kFramingV2;
  if (facts_.qos) hello.qos = *facts_.qos;
  // The candidates in the policy's order, the one whose connection won first: the receiver
  // picks the first it runs and its own policy allows.
  offered_stacks_.clear();
  auto offer = [&](std::size_t i) {
    const auto& stack = *ctx.stacks[i];
    auto kind = handshake::stackKindFromName(stack.kind());
    if (!kind || hello.offers.size() >= handshake::kMaxOffers) return;
    hello.offers.push_back({*kind, stack.name(), stack.advertise()});
    offered_stacks_.push_back(i);
  };
  offer(winner_);
  for (std::size_t i : candidates_) {
    if (i != winner_) offer(i);
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
  if (ctx.faults.strike(winner_, Fault::kDropHandshake)) {
    // Lost on the way: the peer never sees it and the session meets a silent peer.
    spdlog::debug("conn {:x}: fault injected: HELLO over {} dropped", id_,
                  ctx.stacks[winner_]->name());
    frame.clear();
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
  // The same candidate again, on a new connection (or the next idle one).
  candidates_.insert(candidates_.begin() + static_cast<std::ptrdiff_t>(next_candidate_), winner_);
  if (winner_probe_) probes_.push_back(winner_);
  state_ = State::kConnectingPeer;
  startNextAttempt();
  return true;
}

void OutboundSession::onWritable(stacks::StackConnection& conn) {
  if (&conn == upstream_.get() && state_ == State::kHandshaking) flushHello();
}

void OutboundSession::onReadable(stacks::StackConnection& conn) {
  // The client's bytes wait in its socket until the relay starts; only the reply matters here.
  if (&conn == upstream_.get() && state_ == State::kHandshaking) readReply();
  if (&conn == upstream_.get() && state_ == State::kConnectingData) {
    // Nothing is due on the control connection now: the responder gave up on the session.
    std::byte b[1];
    if (upstream_->read(b).status != IoResult::Status::kWouldBlock) dataPathFailed(ECONNRESET);
  }
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

void OutboundSession::connectData(std::size_t stack, const handshake::Reply& reply) {
  auto& ctx = worker_.context();
  if (!reply.token || reply.chosen_params.empty()) {
    // Accepted without what the data connection needs: not a peer we can work with.
    winnerDone(AttemptOutcome::kFailedClosed);
    fallBack(FallbackReason::kPeerProtocolError, false);
    return;
  }
  data_stack_ = stack;
  // The attempt's outcome and breaker belong to the stack that carries the data.
  winner_ = stack;
  winner_probe_ = std::find(probes_.begin(), probes_.end(), stack) != probes_.end();
  state_ = State::kConnectingData;
  if (ctx.faults.strike(stack, Fault::kFailConnect)) {
    auto how = ctx.faults.connectFailure(stack);
    spdlog::debug("conn {:x}: fault injected: data connection over {} {}", id_,
                  ctx.stacks[stack]->name(), connectFailureName(how));
    if (how != ConnectFailure::kTimeout) {
      dataPathFailed(how == ConnectFailure::kRefused ? ECONNREFUSED : EHOSTUNREACH);
      return;
    }
    armTimer(decision_.action->attempt_timeout);  // never completes: the timer ends it
    return;
  }
  auto conn =
      ctx.stacks[stack]->connectData(worker_.loop(), reply.chosen_params, *reply.token, *this);
  if (!conn) {
    dataPathFailed(conn.error().code);
    return;
  }
  data_ = std::move(*conn);
  armTimer(decision_.action->attempt_timeout);
}

void OutboundSession::dataPathFailed(int err) {
  auto& ctx = worker_.context();
  spdlog::debug("conn {:x}: data connection over {} failed: {}", id_,
                ctx.stacks[data_stack_]->name(), std::strerror(err));
  winnerDone(AttemptOutcome::kFailedDataPath);
  if (data_) {
    data_->close(CloseType::kAbort);
    retired_.push_back(std::move(data_));
  }
  retireUpstream();  // the responder drops its side of the session with it
  // The other candidates get a fresh handshake without this one.
  std::vector<std::size_t> rest;
  for (std::size_t c : candidates_) {
    if (c != data_stack_) rest.push_back(c);
  }
  candidates_ = std::move(rest);
  next_candidate_ = 0;
  winner_ = SIZE_MAX;
  winner_counted_ = false;
  reused_ = false;
  reader_ = FrameReader(handshake::MessageType::kReply, worker_.config().max_header_bytes);
  last_failure_ = FallbackReason::kDataPathFailed;
  state_ = State::kConnectingPeer;
  if (candidates_.empty() || !startNextAttempt()) {
    fallBack(FallbackReason::kDataPathFailed, false);
    return;
  }
  armTimer(ctx.config.handshake_timeout + ctx.config.connect_timeout);
}

void OutboundSession::winnerDone(AttemptOutcome outcome) {
  if (winner_ == SIZE_MAX || winner_counted_) return;
  winner_counted_ = true;
  rule_metrics_->attempt(winner_, outcome).Increment();
  // A reject is an answer: the stack reached the peer's sidecar.
  breakerResult(winner_, outcome == AttemptOutcome::kWon || outcome == AttemptOutcome::kRejected);
}

void OutboundSession::onReply(const handshake::Reply& reply) {
  auto& ctx = worker_.context();
  std::uint32_t kinds = 0;
  for (auto k : reply.stack_kinds) {
    if (k > 0 && k < 32) kinds |= 1u << k;
  }
  // The control connection's smoothed RTT: a handshake's worth of samples, smoothed further
  // per peer by the table. Sampled on fresh connections only (a reused one was sampled when
  // it was new), saving a syscall per session.
  ctx.peers.markSidecar(
      destination_.ip(), kinds,
      upstream_ && !reused_ ? net::tcpSmoothedRtt(upstream_->fd()) : std::nullopt);
  if (reply.accepted && reply.chosen_index < offered_stacks_.size() &&
      ctx.stacks[offered_stacks_[reply.chosen_index]]->has(stacks::kOwnDataPath)) {
    // Counted when its data connection is up (or not).
  } else {
    winnerDone(reply.accepted ? AttemptOutcome::kWon : AttemptOutcome::kRejected);
  }
  if (reply.accepted) {
    if (reply.chosen_index >= offered_stacks_.size()) {
      fallBack(FallbackReason::kPeerProtocolError, false);
      return;
    }
    std::size_t stack_index = offered_stacks_[reply.chosen_index];
    if (ctx.stacks[stack_index]->has(stacks::kOwnDataPath)) {
      connectData(stack_index, reply);
      return;
    }
    framed_ = (reply.framing == handshake::kFramingV1 || reply.framing == handshake::kFramingV2) &&
              ctx.config.tunnel_reuse;
    raw_frames_ = framed_ && reply.framing == handshake::kFramingV2;
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

policy::NoSidecar OutboundSession::noSidecarAction() const {
  auto action =
      decision_.action != nullptr ? decision_.action->no_sidecar : policy::NoSidecar::kDefault;
  if (action != policy::NoSidecar::kDefault) return action;
  return worker_.config().fallback == FallbackMode::kDirect ? policy::NoSidecar::kDirect
                                                            : policy::NoSidecar::kRefuse;
}

void OutboundSession::fallBack(FallbackReason reason, bool no_sidecar) {
  auto& ctx = worker_.context();
  const auto& config = ctx.config;
  if (state_ == State::kHandshaking) winnerDone(AttemptOutcome::kFailedClosed);
  cancelAttempts(nullptr);
  retireUpstream();
  bool direct = noSidecarAction() == policy::NoSidecar::kDirect;
  if (no_sidecar) {
    ctx.peers.markNoSidecar(destination_.ip(), config.no_sidecar_ttl, Clock::now());
    // Logged once per peer per no_sidecar_ttl: later connections hit the cache quietly.
    static log::RateLimiter limiter;
    log::limited(limiter, spdlog::level::warn, "no usable sidecar at {} ({}); {} for {}",
                 peer_.toString(), fallbackReasonName(reason),
                 direct ? "connecting directly" : "refusing connections",
                 formatDuration(config.no_sidecar_ttl));
  }
  worker_.metrics().fallback(reason, direct);
  if (rule_metrics_ != nullptr)
    rule_metrics_->fallbacks[static_cast<std::size_t>(reason)]->Increment();
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
                                 std::size_t stack,
                                 std::unique_ptr<stacks::StackConnection> control) {
  // The relay forwards what it reads as soon as it reads it; Nagle on a leg would hold a small
  // segment behind an unacknowledged one and add the peer's delayed ACK (~40 ms) to every
  // request/response round. The tunnel leg follows its stack instance's own `nodelay`.
  if (client_->fd() >= 0) (void)net::setNoDelay(client_->fd(), true);
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
  info.raw_frames = info.framed && raw_frames_;
  info.tunnel_is_upstream = true;
  info.peer = peer_;
  info.policy = policy_;
  info.rule = decision_.rule;
  info.facts = ClassifiedFacts::of(facts_);
  end();
  // Early bytes already carried by the peer are only counted; otherwise (a fallback, a retry
  // on a new connection) they go out first.
  bool carried = early_sent_ && info.framed;
  if (carried) info.early_bytes = early_.size();
  Relay::start(worker_, info, std::move(client_), std::move(upstream),
               carried ? std::span<const std::byte>() : std::span<const std::byte>(early_),
               std::move(control));
}

void OutboundSession::refuse(Outcome outcome, std::size_t stack, const char* why) {
  if (state_ == State::kHandshaking) winnerDone(AttemptOutcome::kRejected);
  cancelAttempts(nullptr);
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
  cancelAttempts(nullptr);
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
    case State::kConnectingData:
      dataPathFailed(ETIMEDOUT);
      break;
    case State::kConnectingDirect:
      refuse(Outcome::kConnectFailed, worker_.metrics().directStack(), "connect timed out");
      break;
  }
}

}  // namespace dmm::proxy
