#include "stacks/dpdk/dpdk_stack.h"

#include <netinet/in.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>

#include "stacks/dpdk/dpdk_connection.h"
#include "stacks/dpdk/instance.h"
#include "stacks/kernel/kernel_stack.h"

namespace dmm::stacks::dpdk {

DpdkStack::DpdkStack(std::string name, const DpdkOptions& options)
    : name_(std::move(name)), options_(options) {}

DpdkStack::~DpdkStack() = default;

void DpdkStack::start() {
  std::string error;
  instance_ = Instance::start(name_, options_, error);
  if (!instance_) {
    failure_ = error;
    spdlog::error("dpdk stack {} is down: {}; its connections take the policy's next candidate",
                  name_, error);
  }
}

bool DpdkStack::healthy() const {
  return instance_ != nullptr;
}

std::string DpdkStack::status() const {
  if (!instance_) return "(" + failure_ + ")";
  return instance_->describe();
}

void DpdkStack::samples(std::vector<StackSample>& out) const {
  if (!instance_) return;
  const auto& c = instance_->counters();
  auto st = instance_->portStats();
  auto u = [](const std::atomic<std::uint64_t>& a) {
    return static_cast<double>(a.load(std::memory_order_relaxed));
  };
  out.push_back({"dmm_sidecar_dpdk_port_rx_packets_total", "Frames the DPDK port received", true,
                 st.rx_packets});
  out.push_back(
      {"dmm_sidecar_dpdk_port_tx_packets_total", "Frames the DPDK port sent", true, st.tx_packets});
  out.push_back(
      {"dmm_sidecar_dpdk_port_rx_bytes_total", "Bytes the DPDK port received", true, st.rx_bytes});
  out.push_back(
      {"dmm_sidecar_dpdk_port_tx_bytes_total", "Bytes the DPDK port sent", true, st.tx_bytes});
  const char* drops =
      "Frames dropped: rx_missed (the port's queue was full), rx_no_mbuf (no "
      "packet buffer), tx_full (the port did not take them)";
  out.push_back(
      {"dmm_sidecar_dpdk_port_dropped_total", drops, true, st.rx_missed, "reason", "rx_missed"});
  out.push_back(
      {"dmm_sidecar_dpdk_port_dropped_total", drops, true, st.rx_nombuf, "reason", "rx_no_mbuf"});
  out.push_back(
      {"dmm_sidecar_dpdk_port_dropped_total", drops, true, u(c.tx_dropped), "reason", "tx_full"});
  const char* errors = "Frames in error, by direction (the port's counters) and bad checksums";
  out.push_back(
      {"dmm_sidecar_dpdk_port_errors_total", errors, true, st.rx_errors, "direction", "rx"});
  out.push_back(
      {"dmm_sidecar_dpdk_port_errors_total", errors, true, st.tx_errors, "direction", "tx"});
  out.push_back({"dmm_sidecar_dpdk_port_errors_total", errors, true, u(c.rx_bad_checksum),
                 "direction", "rx_checksum"});
  out.push_back({"dmm_sidecar_dpdk_tcp_retransmitted_segments_total",
                 "TCP segments the instance sent again (timeouts and fast retransmits)", true,
                 u(c.retransmissions)});
  out.push_back({"dmm_sidecar_dpdk_connections", "Data connections of the instance open now", false,
                 u(c.active)});
  out.push_back({"dmm_sidecar_dpdk_data_connections_total",
                 "Incoming data connections, by result: accepted (a known token), refused "
                 "(unknown token, bad or late preamble, full)",
                 true, u(c.accepted), "result", "accepted"});
  out.push_back({"dmm_sidecar_dpdk_data_connections_total",
                 "Incoming data connections, by result: accepted (a known token), refused "
                 "(unknown token, bad or late preamble, full)",
                 true, u(c.refused), "result", "refused"});
  out.push_back({"dmm_sidecar_dpdk_poll_busy_seconds_total",
                 "Time the poll thread spent in iterations that did work", true,
                 u(c.busy_ns) / 1e9});
  out.push_back({"dmm_sidecar_dpdk_poll_seconds_total", "Time the poll thread ran", true,
                 u(c.total_ns) / 1e9});
  out.push_back({"dmm_sidecar_dpdk_poll_busy_ratio",
                 "Share of the last second the poll thread spent doing work (0-1)", false,
                 c.busy_ratio.load(std::memory_order_relaxed)});
  out.push_back({"dmm_sidecar_dpdk_link_up", "1 when the port's link is up", false,
                 instance_->linkUp() ? 1.0 : 0.0});
  out.push_back({"dmm_sidecar_dpdk_port_restarts_total",
                 "Times the poll thread restarted the port to reconnect it (a memif client "
                 "whose server went away)",
                 true, u(c.port_restarts)});
}

Result<std::unique_ptr<StackConnection>> DpdkStack::connect(EventLoop& loop,
                                                            const ConnectOptions& options,
                                                            ConnectionCallbacks& callbacks) {
  if (!instance_) return Error{ENETDOWN, "dpdk_down"};
  return kernel::connectControl(loop, options, callbacks);
}

Result<std::unique_ptr<StackConnection>> DpdkStack::adopt(std::unique_ptr<StackConnection>) {
  return Error{EOPNOTSUPP, "dpdk_carries_its_own_connection"};
}

std::vector<std::uint8_t> DpdkStack::advertise() const {
  return encodeEndpoint({options_.address, options_.data_port});
}

Result<std::vector<std::uint8_t>> DpdkStack::expectData(EventLoop& loop, const SessionToken& token,
                                                        std::span<const std::uint8_t> offer_params,
                                                        DataAcceptor& acceptor) {
  if (!instance_) return Error{ENETDOWN, "dpdk_down"};
  auto peer = decodeEndpoint(offer_params);
  if (!peer || !peer->address.isV4()) return Error{EINVAL, "bad_offer_params"};
  // This instance can take the peer's connection only if the peer's instance is on its
  // subnet or behind its gateway.
  auto subnet =
      Cidr::parse(options_.address.toString() + "/" + std::to_string(options_.prefix_length));
  if (!options_.gateway && subnet && !subnet->contains(peer->address))
    return Error{EHOSTUNREACH, "peer_not_on_subnet"};
  auto e = instance_->expect(loop, token, acceptor);
  if (!e) return e.error();
  return advertise();
}

void DpdkStack::cancelData(EventLoop&, const SessionToken& token) {
  if (instance_) instance_->cancel(token);
}

Result<std::unique_ptr<StackConnection>> DpdkStack::connectData(
    EventLoop& loop, std::span<const std::uint8_t> peer_params, const SessionToken& token,
    ConnectionCallbacks& callbacks) {
  if (!instance_) return Error{ENETDOWN, "dpdk_down"};
  auto peer = decodeEndpoint(peer_params);
  if (!peer || !peer->address.isV4()) return Error{EINVAL, "bad_peer_params"};
  Channel* ch = instance_->newChannel();
  if (ch == nullptr) return Error{EAGAIN, "dpdk_full"};
  ch->remote = SocketAddress(peer->address, peer->port);
  ch->token = token;
  ch->queue = &instance_->queueFor(loop);
  ch->retain();  // the poll thread's, held by the pcb it makes
  auto conn = std::make_unique<DpdkConnection>(*ch, &callbacks);
  instance_->command(*ch, kCmdConnect);
  return std::unique_ptr<StackConnection>(std::move(conn));
}

std::unique_ptr<StackOptions> DpdkStackFactory::parseOptions(TomlTable& table) const {
  auto o = std::make_unique<DpdkOptions>();
  const auto errors_before = table.diagnostics().errorCount();
  if (auto v = table.getList<std::string>(
          "eal_args", "a string",
          [](std::string_view s) -> std::optional<std::string> { return std::string(s); })) {
    o->eal_args = *v;
  }
  if (auto v = table.getString("port")) {
    if (v->empty())
      table.error("port", "must name a DPDK device, e.g. \"net_af_packet0,iface=eth1\"");
    o->port = *v;
  } else {
    table.requireKey("port");
  }
  if (auto v = table.getString("address")) {
    auto slash = v->find('/');
    auto ip = IpAddress::parse(std::string_view(*v).substr(0, slash));
    int prefix = 24;
    bool ok = ip && ip->isV4() && !ip->isUnspecified();
    if (ok && slash != std::string::npos) {
      auto digits = v->substr(slash + 1);
      ok = !digits.empty() && digits.size() <= 2 &&
           digits.find_first_not_of("0123456789") == std::string::npos;
      if (ok) prefix = std::stoi(digits);
      ok = ok && prefix >= 1 && prefix <= 32;
    }
    if (!ok) {
      table.error("address",
                  "\"" + *v + "\" is not an IPv4 address with a prefix, e.g. \"10.0.0.1/24\"");
    } else {
      o->address = *ip;
      o->prefix_length = static_cast<std::uint8_t>(prefix);
    }
  } else {
    table.requireKey("address");
  }
  if (auto v = table.getString("gateway")) {
    auto ip = IpAddress::parse(*v);
    if (!ip || !ip->isV4()) {
      table.error("gateway", "\"" + *v + "\" is not an IPv4 address");
    } else {
      o->gateway = *ip;
    }
  }
  if (auto v = table.getInt("data_port", 1, 65535)) o->data_port = static_cast<std::uint16_t>(*v);
  if (auto v = table.getInt("max_connections", 1, 1 << 20))
    o->max_connections = static_cast<std::uint32_t>(*v);
  if (auto v = table.getInt("mbufs", 1023, 1 << 22)) o->mbufs = static_cast<std::uint32_t>(*v);
  if (auto v = table.getInt("rx_descriptors", 64, 16384))
    o->rx_descriptors = static_cast<std::uint16_t>(*v);
  if (auto v = table.getInt("tx_descriptors", 64, 16384))
    o->tx_descriptors = static_cast<std::uint16_t>(*v);
  if (auto v = table.getBool("busy_poll")) o->busy_poll = *v;
  if (auto v = table.getInt("idle_spin_us", 0, 100000))
    o->idle_spin_us = static_cast<std::uint32_t>(*v);
  if (auto v = table.getInt("idle_sleep_us", 1, 100000))
    o->idle_sleep_us = static_cast<std::uint32_t>(*v);
  if (auto v = table.getInt("cpu", -1, 4095)) o->cpu = static_cast<int>(*v);
  if (table.diagnostics().errorCount() != errors_before) return nullptr;
  return o;
}

Result<std::unique_ptr<Stack>> DpdkStackFactory::create(std::string name,
                                                        const StackOptions& options) const {
  const auto& o = dynamic_cast<const DpdkOptions&>(options);
  auto stack = std::make_unique<DpdkStack>(std::move(name), o);
  stack->start();
  return std::unique_ptr<Stack>(std::move(stack));
}

}  // namespace dmm::stacks::dpdk
