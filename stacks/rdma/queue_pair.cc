#include "stacks/rdma/queue_pair.h"

#include <arpa/inet.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace dmm::stacks::rdma {

namespace {
constexpr int kPollBatch = 32;
constexpr std::uint64_t kSignalEvery = 32;  // work requests between two signaled ones at most
constexpr std::uint32_t kMinChunk = 4096;
}  // namespace

QueuePair::QueuePair(Worker& worker, rdma_cm_id* id, Role role)
    : worker_(worker),
      instance_(worker.instance()),
      counters_(instance_.counters()),
      id_(id),
      role_(role),
      state_(role == Role::kInitiator ? State::kResolving : State::kConnecting) {
  id_->context = this;
}

QueuePair::~QueuePair() {
  destroy();
}

void QueuePair::destroy() {
  linger_.reset();
  if (conn_ != nullptr) conn_->detach();
  conn_ = nullptr;
  if (qp_made_) {
    rdma_destroy_qp(id_);
    qp_made_ = false;
    counters_.queue_pairs.fetch_sub(1, std::memory_order_relaxed);
  }
  if (cq_ != nullptr) {
    (void)ibv_destroy_cq(cq_);
    cq_ = nullptr;
  }
  if (rx_.base != nullptr) instance_.rings().releaseReceive(rx_);
  if (tx_.base != nullptr) instance_.rings().releaseSend(tx_);
  rx_ = {};
  tx_ = {};
  if (id_ != nullptr) {
    id_->context = nullptr;
    (void)rdma_destroy_id(id_);
    id_ = nullptr;
  }
  if (slot_) {
    instance_.releaseSlot();
    slot_ = false;
  }
}

void QueuePair::holdSlot() {
  slot_ = true;
}

Status QueuePair::setUp() {
  const auto& o = instance_.options();
  if (id_->verbs != instance_.pd()->context)
    return Error{EHOSTUNREACH, "rdma_route_via_other_device"};
  cq_ = ibv_create_cq(id_->verbs, o.receive_depth + o.send_depth + 2, this,
                      worker_.completionChannel(), 0);
  if (cq_ == nullptr) return Error{errno, "ibv_create_cq"};
  if (ibv_req_notify_cq(cq_, 0) != 0) return Error{errno, "ibv_req_notify_cq"};
  ibv_qp_init_attr attr{};
  attr.send_cq = cq_;
  attr.recv_cq = cq_;
  attr.qp_type = IBV_QPT_RC;
  attr.sq_sig_all = 0;
  attr.cap.max_send_wr = o.send_depth;
  attr.cap.max_recv_wr = o.receive_depth;
  attr.cap.max_send_sge = 1;
  attr.cap.max_recv_sge = 1;
  attr.cap.max_inline_data = o.inline_size;
  if (rdma_create_qp(id_, instance_.pd(), &attr) != 0) {
    // A device with less inline room than asked: take none rather than fail.
    attr.cap.max_inline_data = 0;
    if (o.inline_size == 0 || rdma_create_qp(id_, instance_.pd(), &attr) != 0)
      return Error{errno, "rdma_create_qp"};
  }
  qp_made_ = true;
  counters_.queue_pairs.fetch_add(1, std::memory_order_relaxed);
  max_inline_ = attr.cap.max_inline_data;
  auto rx = instance_.rings().acquireReceive();
  if (!rx) return Error{errno != 0 ? errno : ENOMEM, "rdma_receive_ring"};
  rx_ = *rx;
  auto tx = instance_.rings().acquireSend();
  if (!tx) return Error{errno != 0 ? errno : ENOMEM, "rdma_send_ring"};
  tx_ = *tx;
  receives_to_post_ = o.receive_depth;
  postReceives();
  if (reset_) return Error{EIO, "ibv_post_recv"};
  return {};
}

Hello QueuePair::hello(const SessionToken& session) const {
  Hello h;
  h.receives = instance_.options().receive_depth;
  h.token = session;
  h.ring_address = reinterpret_cast<std::uintptr_t>(rx_.base);
  h.rkey = rx_.mr->rkey;
  h.ring_size = rx_.size;
  return h;
}

void QueuePair::setPeer(const Hello& peer) {
  peer_ring_ = peer.ring_address;
  peer_rkey_ = peer.rkey;
  peer_ring_size_ = peer.ring_size;
  message_credits_ = peer.receives;
}

// ---- connection setup ------------------------------------------------------------------------

void QueuePair::onAddressResolved() {
  if (rdma_resolve_route(id_, static_cast<int>(instance_.options().resolve_timeout_ms)) != 0)
    onConnectFailed(errno, "rdma_resolve_route");
}

void QueuePair::onRouteResolved() {
  if (auto s = setUp(); !s) {
    spdlog::debug("rdma stack {}: cannot set up a queue pair: {}", instance_.name(),
                  s.error().reason);
    onConnectFailed(s.error().code, "rdma_setup");
    return;
  }
  auto bytes = encodeHello(hello(token));
  rdma_conn_param param{};
  param.private_data = bytes.data();
  param.private_data_len = static_cast<std::uint8_t>(bytes.size());
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  if (rdma_connect(id_, &param) != 0) {
    onConnectFailed(errno, "rdma_connect");
    return;
  }
  state_ = State::kConnecting;
}

void QueuePair::onEstablished(std::span<const std::uint8_t> private_data) {
  if (state_ != State::kConnecting) return;
  if (role_ == Role::kInitiator) {
    auto peer = decodeHello(private_data);
    if (!peer) {
      counters_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
      onConnectFailed(EPROTO, "rdma_bad_accept");
      return;
    }
    setPeer(*peer);
  }
  state_ = State::kConnected;
  if (role_ == Role::kInitiator) {
    if (conn_ != nullptr && conn_->callbacks() != nullptr) conn_->callbacks()->onConnected(*conn_);
  } else if (acceptor != nullptr) {
    DataAcceptor* a = acceptor;
    acceptor = nullptr;
    a->onDataConnection(std::make_unique<RdmaConnection>(*this, nullptr));
  } else {
    tearDown();  // nobody waits for it any more
    return;
  }
  // Whatever arrived before ESTABLISHED was processed: report and deliver it now.
  if (state_ == State::kConnected) {
    pump();
    maybeSendCredit();
    deliver();
  }
}

void QueuePair::onConnectFailed(int err, const char* reason) {
  if (state_ != State::kResolving && state_ != State::kConnecting) return;
  state_ = State::kFailed;
  if (role_ == Role::kInitiator && conn_ != nullptr && conn_->callbacks() != nullptr) {
    conn_->callbacks()->onConnectFailed(*conn_, Error{err != 0 ? err : EIO, reason});
  } else if (role_ == Role::kResponder) {
    tearDown();
  }
}

void QueuePair::onDisconnected() {
  if (state_ == State::kDead) return;
  if (state_ != State::kConnected) {
    onConnectFailed(ECONNRESET, "rdma_disconnected");
    return;
  }
  // Completions the peer produced before it left come first: its last bytes and its FIN.
  poll();
  peer_gone_ = true;
  if (!fin_received_) reset_ = true;
  notify_readable_ = true;
  notify_writable_ = true;
  if (conn_ == nullptr) {
    tearDown();
    return;
  }
  deliver();
}

// ---- completions ----------------------------------------------------------------------------

void QueuePair::onCompletions() {
  if (state_ == State::kDead || cq_ == nullptr) return;
  (void)ibv_req_notify_cq(cq_, 0);
  poll();
  if (state_ == State::kConnected) {
    pump();
    maybeSendCredit();
  }
  if (closing_ && (fin_done_ || reset_ || peer_gone_)) {
    tearDown();
    return;
  }
  deliver();
}

void QueuePair::poll() {
  ibv_wc wcs[kPollBatch];
  for (;;) {
    int n = ibv_poll_cq(cq_, kPollBatch, wcs);
    if (n <= 0) break;
    for (int i = 0; i < n; ++i)
      handle(wcs[i]);
    if (n < kPollBatch) break;
  }
  postReceives();
}

void QueuePair::handle(const ibv_wc& wc) {
  if (wc.status != IBV_WC_SUCCESS) {
    // A flush follows the queue pair going to the error state (a disconnect, or an error
    // counted below): not an error of its own.
    if (wc.status != IBV_WC_WR_FLUSH_ERR) {
      auto s = static_cast<std::size_t>(wc.status);
      if (s < counters_.wc_errors.size())
        counters_.wc_errors[s].fetch_add(1, std::memory_order_relaxed);
      spdlog::debug("rdma stack {}: completion error: {}", instance_.name(),
                    ibv_wc_status_str(wc.status));
    }
    if (!reset_) {
      reset_ = true;
      notify_readable_ = true;
      notify_writable_ = true;
    }
    return;
  }
  if (wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
    counters_.rx_messages.fetch_add(1, std::memory_order_relaxed);
    ++receives_to_post_;
    ++unreported_messages_;
    auto m = decodeImm(ntohl(wc.imm_data));
    if (!m) {
      protocolError("unknown message");
      return;
    }
    switch (m->type) {
      case MessageType::kData:
        if (fin_received_ || rx_tail_ + m->bytes - rx_head_ > rx_.size) {
          protocolError("data beyond the ring or after FIN");
          return;
        }
        rx_tail_ += m->bytes;
        counters_.rx_bytes.fetch_add(m->bytes, std::memory_order_relaxed);
        notify_readable_ = true;
        empty_seen_ = false;
        break;
      case MessageType::kCredit:
        if (remote_freed_ + m->bytes > remote_written_) {
          protocolError("credit for bytes never written");
          return;
        }
        remote_freed_ += m->bytes;
        message_credits_ += m->messages;
        break;
      case MessageType::kFin:
        fin_received_ = true;
        notify_readable_ = true;
        empty_seen_ = false;
        break;
    }
  } else if (wc.opcode == IBV_WC_RDMA_WRITE) {
    // A signaled write completed, and with it every write before it (RC keeps order).
    sends_done_ = wc.wr_id;
    while (!signaled_.empty() && signaled_.front().seq <= wc.wr_id) {
      tx_head_ = signaled_.front().tx_pos;
      signaled_.pop_front();
    }
    if (fin_posted_ && wc.wr_id >= fin_seq_) fin_done_ = true;
    if (want_writable_ && tx_tail_ - tx_head_ < tx_.size) notify_writable_ = true;
  }
}

void QueuePair::protocolError(const char* what) {
  counters_.protocol_errors.fetch_add(1, std::memory_order_relaxed);
  spdlog::warn("rdma stack {}: protocol error from the peer ({}); resetting the connection",
               instance_.name(), what);
  reset_ = true;
  notify_readable_ = true;
  notify_writable_ = true;
  if (id_ != nullptr) (void)rdma_disconnect(id_);
}

void QueuePair::postReceives() {
  if (receives_to_post_ == 0 || !qp_made_ || state_ == State::kDead) return;
  ibv_recv_wr wrs[kPollBatch];
  while (receives_to_post_ > 0) {
    const auto n = std::min<std::uint32_t>(receives_to_post_, kPollBatch);
    for (std::uint32_t i = 0; i < n; ++i) {
      wrs[i] = ibv_recv_wr{};
      wrs[i].next = i + 1 < n ? &wrs[i + 1] : nullptr;
    }
    ibv_recv_wr* bad = nullptr;
    if (ibv_post_recv(id_->qp, wrs, &bad) != 0) {
      reset_ = true;
      return;
    }
    receives_to_post_ -= n;
  }
}

// ---- sending ----------------------------------------------------------------------------------

bool QueuePair::sendQueueFull() const {
  return sends_posted_ - sends_done_ + 1 >= instance_.options().send_depth;
}

bool QueuePair::postWrite(std::uint32_t imm, const void* local, std::uint32_t length,
                          std::uint32_t lkey, bool inline_send, bool force_signal) {
  ibv_sge sge{};
  sge.addr = reinterpret_cast<std::uintptr_t>(local);
  sge.length = length;
  sge.lkey = lkey;
  ibv_send_wr wr{};
  const std::uint64_t seq = sends_posted_ + 1;
  wr.wr_id = seq;
  wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  wr.imm_data = htonl(imm);
  wr.wr.rdma.remote_addr = peer_ring_ + (remote_written_ & (peer_ring_size_ - 1));
  wr.wr.rdma.rkey = peer_rkey_;
  if (length > 0) {
    wr.sg_list = &sge;
    wr.num_sge = 1;
  }
  // Selective signaling: a completion frees send-ring space and send-queue entries for every
  // write before it, so one in kSignalEvery (or per quarter ring) is enough.
  const bool signal = force_signal || seq - last_signaled_ >= kSignalEvery ||
                      tx_posted_ - last_signaled_pos_ >= tx_.size / 4 ||
                      seq - sends_done_ >= instance_.options().send_depth / 2u;
  wr.send_flags = 0;
  if (signal) wr.send_flags |= IBV_SEND_SIGNALED;
  if (inline_send) wr.send_flags |= IBV_SEND_INLINE;
  ibv_send_wr* bad = nullptr;
  if (ibv_post_send(id_->qp, &wr, &bad) != 0) {
    spdlog::debug("rdma stack {}: ibv_post_send: {}", instance_.name(), std::strerror(errno));
    reset_ = true;
    notify_readable_ = true;
    notify_writable_ = true;
    return false;
  }
  sends_posted_ = seq;
  if (signal) {
    last_signaled_ = seq;
    last_signaled_pos_ = tx_posted_;
    signaled_.push_back({seq, tx_posted_});
  }
  --message_credits_;
  counters_.tx_messages.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void QueuePair::pump() {
  if (state_ != State::kConnected || reset_ || peer_gone_) return;
  bool stalled = false;
  while (tx_posted_ < tx_tail_) {
    if (message_credits_ < 2 || remoteSpace() == 0) {
      stalled = true;
      break;
    }
    if (sendQueueFull()) break;
    const std::uint64_t pending = tx_tail_ - tx_posted_;
    const std::uint32_t local_off = static_cast<std::uint32_t>(tx_posted_ & (tx_.size - 1));
    const std::uint32_t remote_off =
        static_cast<std::uint32_t>(remote_written_ & (peer_ring_size_ - 1));
    std::uint64_t chunk = std::min<std::uint64_t>(pending, remoteSpace());
    chunk = std::min<std::uint64_t>(chunk, tx_.size - local_off);
    chunk = std::min<std::uint64_t>(chunk, peer_ring_size_ - remote_off);
    chunk = std::min<std::uint64_t>(chunk, std::max(peer_ring_size_ / 4, kMinChunk));
    const auto n = static_cast<std::uint32_t>(chunk);
    tx_posted_ += n;
    if (!postWrite(encodeData(n), tx_.base + local_off, n, tx_.mr->lkey, false, false)) return;
    remote_written_ += n;
    counters_.tx_bytes.fetch_add(n, std::memory_order_relaxed);
  }
  if (stalled && !stalled_) counters_.credit_stalls.fetch_add(1, std::memory_order_relaxed);
  stalled_ = stalled;
  if (fin_wanted_ && !fin_posted_ && tx_posted_ == tx_tail_ && message_credits_ >= 2 &&
      !sendQueueFull()) {
    if (!postWrite(encodeFin(), nullptr, 0, 0, false, true)) return;
    fin_posted_ = true;
    fin_seq_ = sends_posted_;
  }
}

void QueuePair::maybeSendCredit() {
  if (state_ != State::kConnected || reset_ || peer_gone_) return;
  const auto& o = instance_.options();
  while (unreported_messages_ >= o.receive_depth / 4u || unreported_bytes_ >= rx_.size / 4u) {
    // The last credit goes only to a CREDIT that gives the peer receives back, so that the two
    // sides can never both sit on zero.
    if (message_credits_ == 0 || (message_credits_ == 1 && unreported_messages_ == 0)) return;
    if (sendQueueFull()) return;
    const auto m = std::min(unreported_messages_, kMaxCreditMessages);
    const auto b =
        static_cast<std::uint32_t>(std::min<std::uint64_t>(unreported_bytes_, kMaxCreditBytes));
    if (!postWrite(encodeCredit(m, b), nullptr, 0, 0, false, false)) return;
    unreported_messages_ -= m;
    unreported_bytes_ -= b;
  }
}

// ---- the relay's side -------------------------------------------------------------------------

IoResult QueuePair::read(std::span<std::byte> buffer) {
  const std::uint64_t avail = rx_tail_ - rx_head_;
  if (avail == 0) {
    if (fin_received_) return IoResult::eof();
    if (reset_) return {IoResult::Status::kReset, 0, ECONNRESET};
    empty_seen_ = true;
    return IoResult::wouldBlock();
  }
  if (buffer.empty()) return IoResult::ok(0);
  const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(avail, buffer.size()));
  const auto off = static_cast<std::uint32_t>(rx_head_ & (rx_.size - 1));
  const std::uint32_t first = std::min(n, rx_.size - off);
  std::memcpy(buffer.data(), rx_.base + off, first);
  if (n > first) std::memcpy(buffer.data() + first, rx_.base, n - first);
  rx_head_ += n;
  unreported_bytes_ += n;
  maybeSendCredit();
  const bool drained = rx_head_ == rx_tail_ && !fin_received_ && !reset_;
  if (drained) empty_seen_ = true;
  return IoResult::ok(n, drained);
}

IoResult QueuePair::write(std::span<const std::byte> data) {
  if (reset_ || peer_gone_) return {IoResult::Status::kReset, 0, EPIPE};
  if (fin_wanted_) return {IoResult::Status::kError, 0, EPIPE};
  if (state_ != State::kConnected) return IoResult::wouldBlock();
  if (data.empty()) return IoResult::ok(0);
  const auto size = static_cast<std::uint32_t>(std::min<std::size_t>(data.size(), kMaxDataBytes));
  // Small writes with nothing queued before them go inline, straight from the caller's buffer.
  if (size <= max_inline_ && tx_posted_ == tx_tail_ && message_credits_ >= 2 &&
      remoteSpace() >= size &&
      peer_ring_size_ - (remote_written_ & (peer_ring_size_ - 1)) >= size && !sendQueueFull()) {
    if (!postWrite(encodeData(size), data.data(), size, 0, true, false))
      return {IoResult::Status::kReset, 0, EPIPE};
    remote_written_ += size;
    counters_.tx_bytes.fetch_add(size, std::memory_order_relaxed);
    return IoResult::ok(size);
  }
  const auto space = static_cast<std::uint32_t>(tx_.size - (tx_tail_ - tx_head_));
  if (space == 0) {
    want_writable_ = true;
    return IoResult::wouldBlock();
  }
  const std::uint32_t n = std::min(space, size);
  const auto off = static_cast<std::uint32_t>(tx_tail_ & (tx_.size - 1));
  const std::uint32_t first = std::min(n, tx_.size - off);
  std::memcpy(tx_.base + off, data.data(), first);
  if (n > first) std::memcpy(tx_.base, data.data() + first, n - first);
  tx_tail_ += n;
  if (n < size) want_writable_ = true;
  pump();
  return IoResult::ok(n);
}

void QueuePair::shutdownWrite() {
  if (fin_wanted_) return;
  fin_wanted_ = true;
  pump();
}

void QueuePair::release(CloseType type) {
  conn_ = nullptr;
  if (state_ == State::kDead) return;
  if (type == CloseType::kAbort || state_ != State::kConnected || reset_ || peer_gone_) {
    tearDown();
    return;
  }
  closing_ = true;
  fin_wanted_ = true;
  pump();
  if (fin_done_) {
    tearDown();
    return;
  }
  // The unsent bytes and the FIN wait for the peer's credits, at most linger_ms.
  linger_ = worker_.loop().newEvent(-1, 0, &QueuePair::onLinger, this);
  auto tv = toTimeval(std::chrono::milliseconds(instance_.options().linger_ms));
  event_add(linger_.get(), &tv);
}

void QueuePair::onLinger(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<QueuePair*>(arg);
  spdlog::debug("rdma stack {}: a closed connection's unsent bytes timed out",
                self->instance_.name());
  self->tearDown();
}

void QueuePair::tearDown() {
  if (state_ == State::kDead) return;
  if (id_ != nullptr && (state_ == State::kConnected || state_ == State::kConnecting))
    (void)rdma_disconnect(id_);
  state_ = State::kDead;
  if (conn_ != nullptr) conn_->detach();
  conn_ = nullptr;
  worker_.retire(this);
}

void QueuePair::deliver() {
  const bool readable = notify_readable_;
  const bool writable = notify_writable_;
  notify_readable_ = false;
  notify_writable_ = false;
  if (conn_ == nullptr || state_ != State::kConnected) return;
  if (writable) want_writable_ = false;
  if (readable && conn_->callbacks() != nullptr) conn_->callbacks()->onReadable(*conn_);
  // The readable callback may have closed the connection.
  if (writable && conn_ != nullptr && conn_->callbacks() != nullptr)
    conn_->callbacks()->onWritable(*conn_);
}

std::optional<SocketAddress> QueuePair::peerAddress() const {
  if (id_ == nullptr) return std::nullopt;
  const sockaddr* sa = rdma_get_peer_addr(id_);
  if (sa == nullptr) return std::nullopt;
  return SocketAddress::fromSockaddr(
      sa, sa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
}

// ---- RdmaConnection ---------------------------------------------------------------------------

RdmaConnection::RdmaConnection(QueuePair& qp, ConnectionCallbacks* callbacks)
    : qp_(&qp), callbacks_(callbacks) {
  qp.attach(this);
}

RdmaConnection::~RdmaConnection() {
  if (qp_ != nullptr) qp_->release(CloseType::kAbort);
}

IoResult RdmaConnection::read(std::span<std::byte> buffer) {
  if (qp_ == nullptr) return {IoResult::Status::kError, 0, EBADF};
  return qp_->read(buffer);
}

IoResult RdmaConnection::write(std::span<const std::byte> data) {
  if (qp_ == nullptr) return {IoResult::Status::kError, 0, EBADF};
  return qp_->write(data);
}

void RdmaConnection::shutdownWrite() {
  if (qp_ != nullptr) qp_->shutdownWrite();
}

void RdmaConnection::close(CloseType type) {
  if (qp_ == nullptr) return;
  QueuePair* qp = qp_;
  qp_ = nullptr;
  callbacks_ = nullptr;
  qp->release(type);
}

bool RdmaConnection::mayBeReadable() const {
  return qp_ != nullptr && qp_->mayBeReadable();
}

std::optional<SocketAddress> RdmaConnection::peerAddress() const {
  if (qp_ == nullptr) return std::nullopt;
  return qp_->peerAddress();
}

}  // namespace dmm::stacks::rdma
