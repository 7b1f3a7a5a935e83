#include "stacks/rdma/rdma_stack.h"

#include <spdlog/spdlog.h>

#include <cerrno>

#include "stacks/kernel/kernel_stack.h"
#include "stacks/rdma/instance.h"
#include "stacks/rdma/queue_pair.h"

namespace dmm::stacks::rdma {

namespace {

// Label values for dmm_sidecar_rdma_completion_errors_total{status}: ibv_wc_status in
// snake case (ibv_wc_status_str() gives sentences).
const char* statusLabel(std::size_t s) {
  static const char* const names[] = {"success",
                                      "loc_len_err",
                                      "loc_qp_op_err",
                                      "loc_eec_op_err",
                                      "loc_prot_err",
                                      "wr_flush_err",
                                      "mw_bind_err",
                                      "bad_resp_err",
                                      "loc_access_err",
                                      "rem_inv_req_err",
                                      "rem_access_err",
                                      "rem_op_err",
                                      "retry_exc_err",
                                      "rnr_retry_exc_err",
                                      "loc_rdd_viol_err",
                                      "rem_inv_rd_req_err",
                                      "rem_abort_err",
                                      "inv_eecn_err",
                                      "inv_eec_state_err",
                                      "fatal_err",
                                      "resp_timeout_err",
                                      "general_err",
                                      "tm_err",
                                      "tm_rndv_incomplete"};
  return s < std::size(names) ? names[s] : "other";
}

bool sameFamily(const IpAddress& a, const IpAddress& b) {
  return a.isV4() == b.isV4();
}

}  // namespace

RdmaStack::RdmaStack(std::string name, const RdmaOptions& options)
    : name_(std::move(name)), options_(options) {}

RdmaStack::~RdmaStack() = default;

void RdmaStack::start() {
  std::string error;
  instance_ = Instance::start(name_, options_, error);
  if (!instance_) {
    failure_ = error;
    spdlog::error("rdma stack {} is down: {}; its connections take the policy's next candidate",
                  name_, error);
  }
}

bool RdmaStack::healthy() const {
  return instance_ != nullptr && instance_->healthy();
}

std::string RdmaStack::status() const {
  if (!instance_) return "(" + failure_ + ")";
  return instance_->describe();
}

void RdmaStack::samples(std::vector<StackSample>& out) const {
  if (!instance_) return;
  const auto& c = instance_->counters();
  auto u = [](const std::atomic<std::uint64_t>& a) {
    return static_cast<double>(a.load(std::memory_order_relaxed));
  };
  const char* bytes = "Stream bytes the instance's queue pairs carried, by direction";
  out.push_back({"dmm_sidecar_rdma_bytes_total", bytes, true, u(c.tx_bytes), "direction", "tx"});
  out.push_back({"dmm_sidecar_rdma_bytes_total", bytes, true, u(c.rx_bytes), "direction", "rx"});
  const char* messages =
      "RDMA messages (writes with immediate: data, credit, FIN) posted (tx) and received (rx)";
  out.push_back(
      {"dmm_sidecar_rdma_messages_total", messages, true, u(c.tx_messages), "direction", "tx"});
  out.push_back(
      {"dmm_sidecar_rdma_messages_total", messages, true, u(c.rx_messages), "direction", "rx"});
  const char* errors =
      "Work completions with an error status, by ibv_wc_status (flushes after a queue pair "
      "went to the error state are not counted)";
  for (std::size_t s = 1; s < c.wc_errors.size(); ++s) {
    const double v = u(c.wc_errors[s]);
    // retry_exc_err (the peer stopped answering) is always shown; others once they happen.
    if (v > 0 || s == IBV_WC_RETRY_EXC_ERR)
      out.push_back(
          {"dmm_sidecar_rdma_completion_errors_total", errors, true, v, "status", statusLabel(s)});
  }
  out.push_back({"dmm_sidecar_rdma_credit_stalls_total",
                 "Times a sender had bytes to send and no credit for them (the peer's ring full "
                 "or its receives used up)",
                 true, u(c.credit_stalls)});
  out.push_back({"dmm_sidecar_rdma_registered_memory_bytes",
                 "Memory registered with the device (the connections' rings and idle send rings)",
                 false, u(c.registered_bytes)});
  out.push_back({"dmm_sidecar_rdma_queue_pairs", "Queue pairs of the instance open now", false,
                 u(c.queue_pairs)});
  const char* incoming =
      "Incoming data connections, by result: accepted (a known token), refused (unknown token, "
      "bad private data, full)";
  out.push_back({"dmm_sidecar_rdma_data_connections_total", incoming, true, u(c.accepted), "result",
                 "accepted"});
  out.push_back({"dmm_sidecar_rdma_data_connections_total", incoming, true, u(c.refused), "result",
                 "refused"});
  out.push_back({"dmm_sidecar_rdma_protocol_errors_total",
                 "Peers that broke the protocol (bad private data, writes beyond credit); each "
                 "resets its connection",
                 true, u(c.protocol_errors)});
}

Result<std::unique_ptr<StackConnection>> RdmaStack::connect(EventLoop& loop,
                                                            const ConnectOptions& options,
                                                            ConnectionCallbacks& callbacks) {
  if (!healthy()) return Error{ENETDOWN, "rdma_down"};
  return kernel::connectControl(loop, options, callbacks);
}

Result<std::unique_ptr<StackConnection>> RdmaStack::adopt(std::unique_ptr<StackConnection>) {
  return Error{EOPNOTSUPP, "rdma_carries_its_own_connection"};
}

std::vector<std::uint8_t> RdmaStack::advertise() const {
  return encodeEndpoint({options_.address, options_.port});
}

Result<std::vector<std::uint8_t>> RdmaStack::expectData(EventLoop& loop, const SessionToken& token,
                                                        std::span<const std::uint8_t> offer_params,
                                                        DataAcceptor& acceptor) {
  if (!healthy()) return Error{ENETDOWN, "rdma_down"};
  auto peer = decodeEndpoint(offer_params);
  if (!peer) return Error{EINVAL, "bad_offer_params"};
  if (!sameFamily(peer->address, options_.address)) return Error{EAFNOSUPPORT, "peer_family"};
  Worker* worker = instance_->workerFor(loop);
  if (worker == nullptr) return Error{EIO, "rdma_worker"};
  if (auto s = instance_->expect(*worker, token, acceptor); !s) return s.error();
  return advertise();
}

void RdmaStack::cancelData(EventLoop& loop, const SessionToken& token) {
  if (!instance_) return;
  if (Worker* worker = instance_->workerFor(loop)) instance_->cancel(*worker, token);
}

Result<std::unique_ptr<StackConnection>> RdmaStack::connectData(
    EventLoop& loop, std::span<const std::uint8_t> peer_params, const SessionToken& token,
    ConnectionCallbacks& callbacks) {
  if (!healthy()) return Error{ENETDOWN, "rdma_down"};
  auto peer = decodeEndpoint(peer_params);
  if (!peer) return Error{EINVAL, "bad_peer_params"};
  if (!sameFamily(peer->address, options_.address)) return Error{EAFNOSUPPORT, "peer_family"};
  Worker* worker = instance_->workerFor(loop);
  if (worker == nullptr) return Error{EIO, "rdma_worker"};
  auto qp = worker->connect(*peer, token);
  if (!qp) return qp.error();
  return std::unique_ptr<StackConnection>(std::make_unique<RdmaConnection>(**qp, &callbacks));
}

std::unique_ptr<StackOptions> RdmaStackFactory::parseOptions(TomlTable& table) const {
  auto o = std::make_unique<RdmaOptions>();
  const auto errors_before = table.diagnostics().errorCount();
  if (auto v = table.getString("address")) {
    auto ip = IpAddress::parse(*v);
    if (!ip || ip->isUnspecified()) {
      table.error("address", "\"" + *v +
                                 "\" is not an IP address of an RDMA device (its RoCE "
                                 "interface's address, e.g. \"192.168.77.1\")");
    } else {
      o->address = *ip;
    }
  } else {
    table.requireKey("address");
  }
  if (auto v = table.getInt("port", 1, 65535)) o->port = static_cast<std::uint16_t>(*v);
  if (auto v = table.getInt("ring_size", 4096, 1 << 26)) {
    if ((*v & (*v - 1)) != 0) {
      table.error("ring_size", "must be a power of two (4096 to 67108864)");
    } else {
      o->ring_size = static_cast<std::uint32_t>(*v);
    }
  }
  if (auto v = table.getInt("max_connections", 1, 1 << 20))
    o->max_connections = static_cast<std::uint32_t>(*v);
  if (auto v = table.getInt("receive_depth", 16, 1020))
    o->receive_depth = static_cast<std::uint16_t>(*v);
  if (auto v = table.getInt("send_depth", 64, 16384))
    o->send_depth = static_cast<std::uint16_t>(*v);
  if (auto v = table.getInt("inline_size", 0, 1024))
    o->inline_size = static_cast<std::uint32_t>(*v);
  if (auto v = table.getDuration("resolve_timeout")) {
    if (v->count() < 1 || v->count() > 60000) {
      table.error("resolve_timeout", "must be between 1ms and 60s");
    } else {
      o->resolve_timeout_ms = static_cast<std::uint32_t>(v->count());
    }
  }
  if (auto v = table.getDuration("linger")) {
    if (v->count() > 3600000) {
      table.error("linger", "must be at most 1h");
    } else {
      o->linger_ms = static_cast<std::uint32_t>(v->count());
    }
  }
  if (table.diagnostics().errorCount() != errors_before) return nullptr;
  return o;
}

Result<std::unique_ptr<Stack>> RdmaStackFactory::create(std::string name,
                                                        const StackOptions& options) const {
  const auto& o = dynamic_cast<const RdmaOptions&>(options);
  auto stack = std::make_unique<RdmaStack>(std::move(name), o);
  stack->start();
  return std::unique_ptr<Stack>(std::move(stack));
}

}  // namespace dmm::stacks::rdma
