#include "stacks/dpdk/instance.h"

#include <pthread.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_ring.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <poll.h>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>

#include "lwip/etharp.h"
#include "lwip/init.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/tcp.h"
#include "lwip/timeouts.h"
#include "netif/ethernet.h"
#include "stacks/dpdk/dpdk_connection.h"
#include "stacks/dpdk/lwip_core.h"
#include "stacks/dpdk/tsan_annotations.h"

static_assert(TCP_WND == dmm::stacks::dpdk::kRingBytes, "the rx ring is lwIP's receive window");
static_assert(TCP_SND_BUF == dmm::stacks::dpdk::kRingBytes, "the tx ring is lwIP's send buffer");

namespace dmm::stacks::dpdk {

namespace {

constexpr std::uint8_t kPreambleMagic[4] = {'D', 'M', 'M', 'd'};
constexpr std::uint8_t kAckByte = 'K';
constexpr std::uint32_t kPreambleTimeoutMs = 5000;
constexpr std::uint8_t kPollInterval = 25;  // tcp_poll: 25 slow ticks of 20 ms

// The value of `key` in DPDK devargs ("net_memif0,role=server,socket=/run/x.sock"), if given.
std::optional<std::string_view> devarg(std::string_view devargs, std::string_view key) {
  std::size_t at = devargs.find(',');
  while (at != std::string_view::npos) {
    std::size_t next = devargs.find(',', at + 1);
    std::string_view arg =
        devargs.substr(at + 1, next == std::string_view::npos ? next : next - at - 1);
    if (arg.size() > key.size() && arg.starts_with(key) && arg[key.size()] == '=')
      return arg.substr(key.size() + 1);
    at = next;
  }
  return std::nullopt;
}

// memif's own reading of its role (the default is client; "master" is the older name).
bool isMemifServer(std::string_view devargs) {
  auto role = devarg(devargs, "role");
  return role && (role->find("server") != std::string_view::npos ||
                  role->find("master") != std::string_view::npos);
}

// A memif server binds its socket file when the port is probed, and fails if the file exists.
// One left by a server that died (nothing accepts on it any more) is removed first; a live one
// is left alone, and the probe fails as it should.
void removeStaleMemifSocket(const std::string& name, std::string_view devargs) {
  if (!devargs.starts_with("net_memif") || !isMemifServer(devargs)) return;
  auto abstract = devarg(devargs, "socket-abstract");  // memif's default: yes (no file)
  if (!abstract || abstract->find("no") == std::string_view::npos) return;
  std::string path(devarg(devargs, "socket").value_or("/run/memif.sock"));
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return;
  sockaddr_un sun{};
  if (path.size() >= sizeof sun.sun_path) return;
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) == 0 ||
      errno != ECONNREFUSED)
    return;
  if (::unlink(path.c_str()) == 0)
    spdlog::info("dpdk stack {}: removed the stale memif socket {} (its server is gone)", name,
                 path);
}

std::uint64_t monoNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

ip4_addr_t toLwip(const IpAddress& ip) {
  ip4_addr_t a;
  std::memcpy(&a.addr, ip.bytes(), 4);  // network order, as lwIP keeps it
  return a;
}

// ---- the EAL: once per process ----

std::mutex eal_mutex;
bool eal_started = false;
std::vector<std::string> eal_args_used;
std::string eal_error;

bool startEal(const std::vector<std::string>& args, std::string& error) {
  std::lock_guard lock(eal_mutex);
  if (eal_started) {
    if (args != eal_args_used) {
      error = "eal_args differ from those the EAL was started with (it is one per process)";
      return false;
    }
    return true;
  }
  if (!eal_error.empty()) {
    error = eal_error;
    return false;
  }
  std::vector<std::string> argv{"dmm-sidecar"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto has = [&](std::string_view flag) {
    return std::any_of(args.begin(), args.end(),
                       [&](const std::string& a) { return a.rfind(flag, 0) == 0; });
  };
  // Defaults that suit a daemon beside others: its own runtime directory, one lcore (the poll
  // threads are ours, registered below), no telemetry socket, quiet logs.
  if (!has("--file-prefix"))
    argv.push_back("--file-prefix=dmm-sidecar-" + std::to_string(getpid()));
  if (!has("-l") && !has("--lcores") && !has("-c")) argv.push_back("-l0");
  if (!has("--no-telemetry") && !has("--telemetry")) argv.push_back("--no-telemetry");
  if (!has("--log-level")) argv.push_back("--log-level=*:warning");
  // On hugepages: unlink the page files once mapped, so that a sidecar that dies (its prefix
  // has its PID) leaves none behind in the hugetlbfs mount.
  if (!has("--no-huge") && !has("--huge-unlink") && !has("--in-memory"))
    argv.push_back("--huge-unlink");
  // Under systemd DPDK keeps its runtime files in $RUNTIME_DIRECTORY/dpdk/<prefix>: our unit's
  // own /run/dmm-sidecar. systemd joins several RuntimeDirectory= entries with ':', which DPDK
  // would take as one path: keep the first.
  if (const char* rd = std::getenv("RUNTIME_DIRECTORY"); rd != nullptr) {
    std::string first(rd);
    if (auto colon = first.find(':'); colon != std::string::npos) {
      first.resize(colon);
      (void)setenv("RUNTIME_DIRECTORY", first.c_str(), 1);
    }
  }
  std::vector<char*> raw;
  for (auto& a : argv)
    raw.push_back(a.data());
  raw.push_back(nullptr);
  // rte_eal_init() pins the calling thread to its main lcore; the sidecar's threads keep the
  // affinity they had.
  cpu_set_t before;
  CPU_ZERO(&before);
  bool saved = pthread_getaffinity_np(pthread_self(), sizeof before, &before) == 0;
  int rc = rte_eal_init(static_cast<int>(raw.size() - 1), raw.data());
  if (saved) (void)pthread_setaffinity_np(pthread_self(), sizeof before, &before);
  if (rc < 0) {
    eal_error = std::string("rte_eal_init failed: ") + rte_strerror(rte_errno);
    error = eal_error;
    return false;
  }
  eal_started = true;
  eal_args_used = args;
  return true;
}

// ---- lwIP callbacks: trampolines into the instance ----

err_t netifInit(netif* n) {
  n->name[0] = 'd';
  n->name[1] = 'p';
  n->output = etharp_output;
  n->linkoutput = [](netif* nif, pbuf* p) -> err_t {
    return static_cast<Instance*>(nif->state)->transmit(p) ? ERR_OK : ERR_MEM;
  };
  n->mtu = 1500;
  n->hwaddr_len = ETH_HWADDR_LEN;
  n->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_ETHERNET | NETIF_FLAG_LINK_UP;
  return ERR_OK;
}

Channel& chanOf(void* arg) {
  return *static_cast<Channel*>(arg);
}

err_t onAcceptCb(void* arg, tcp_pcb* pcb, err_t err) {
  return static_cast<err_t>(static_cast<Instance*>(arg)->onAccept(pcb, err));
}
err_t onConnectedCb(void* arg, tcp_pcb*, err_t) {
  return static_cast<err_t>(chanOf(arg).instance->onConnected(chanOf(arg)));
}
err_t onRecvCb(void* arg, tcp_pcb*, pbuf* p, err_t err) {
  return static_cast<err_t>(chanOf(arg).instance->onRecv(chanOf(arg), p, err));
}
err_t onSentCb(void* arg, tcp_pcb*, u16_t len) {
  return static_cast<err_t>(chanOf(arg).instance->onSent(chanOf(arg), len));
}
void onErrCb(void* arg, err_t err) {
  if (arg != nullptr) chanOf(arg).instance->onError(chanOf(arg), err);
}
err_t onPollCb(void* arg, tcp_pcb*) {
  return static_cast<err_t>(chanOf(arg).instance->onPoll(chanOf(arg)));
}
void onDestroyedCb(u8_t, void* data) {
  if (data != nullptr) chanOf(data).instance->onPcbDestroyed(chanOf(data));
}
const tcp_ext_arg_callbacks kExtCallbacks = {onDestroyedCb, nullptr};

void attach(tcp_pcb* pcb, Channel& ch) {
  tcp_arg(pcb, &ch);
  tcp_recv(pcb, onRecvCb);
  tcp_sent(pcb, onSentCb);
  tcp_err(pcb, onErrCb);
  tcp_poll(pcb, onPollCb, kPollInterval);
  tcp_ext_arg_set_callbacks(pcb, 0, &kExtCallbacks);
  tcp_ext_arg_set(pcb, 0, &ch);
  tcp_nagle_disable(pcb);
}

// Received frames stay in their mbufs: the pbuf lives in the mbuf's private area.
struct MbufPbuf {
  pbuf_custom custom;
};

void freeMbufPbuf(pbuf* p) {
  auto* priv = reinterpret_cast<std::byte*>(p);
  auto* m = reinterpret_cast<rte_mbuf*>(priv - sizeof(rte_mbuf));
  rte_pktmbuf_free(m);
}

int errnoOf(err_t err) {
  switch (err) {
    case ERR_RST:
      return ECONNRESET;
    case ERR_ABRT:
      return ECONNABORTED;
    case ERR_CLSD:
      return ECONNRESET;
    case ERR_TIMEOUT:
      return ETIMEDOUT;
    case ERR_RTE:
      return EHOSTUNREACH;
    case ERR_MEM:
    case ERR_BUF:
      return ENOMEM;
    default:
      return EIO;
  }
}

}  // namespace

// ---- ByteRing and Channel ----

ByteRing::~ByteRing() {
  release();
}

bool ByteRing::allocate(std::size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  data_ = static_cast<std::byte*>(p);
  size_ = size;
  return true;
}

void ByteRing::release() {
  if (data_ != nullptr) munmap(data_, size_);
  data_ = nullptr;
}

std::size_t ByteRing::put(std::span<const std::byte> bytes) {
  std::uint64_t head = head_.load(std::memory_order_relaxed);
  std::size_t n = std::min(bytes.size(), freeSpace());
  if (n == 0) return 0;  // (memcpy with a null pointer is undefined even for 0 bytes)
  std::size_t at = static_cast<std::size_t>(head & (size_ - 1));
  std::size_t first = std::min(n, size_ - at);
  std::memcpy(data_ + at, bytes.data(), first);
  if (n > first) std::memcpy(data_, bytes.data() + first, n - first);
  head_.store(head + n, std::memory_order_release);
  return n;
}

std::size_t ByteRing::get(std::span<std::byte> out) {
  std::uint64_t tail = tail_.load(std::memory_order_relaxed);
  std::size_t n = std::min(out.size(), used());
  if (n == 0) return 0;  // (memcpy with a null pointer is undefined even for 0 bytes)
  std::size_t at = static_cast<std::size_t>(tail & (size_ - 1));
  std::size_t first = std::min(n, size_ - at);
  std::memcpy(out.data(), data_ + at, first);
  if (n > first) std::memcpy(out.data() + first, data_, n - first);
  tail_.store(tail + n, std::memory_order_seq_cst);
  return n;
}

std::span<const std::byte> ByteRing::contiguous(std::uint64_t pos, std::size_t max) const {
  std::size_t at = static_cast<std::size_t>(pos & (size_ - 1));
  return {data_ + at, std::min(max, size_ - at)};
}

void Channel::releaseRef() {
  if (refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  instance->channelFreed();
  delete this;
}

// ---- Instance ----

std::vector<Instance*>& Instance::all() {
  static std::vector<Instance*> instances;
  return instances;
}

Instance::Instance(std::string name, const DpdkOptions& options)
    : name_(std::move(name)), options_(options), netif_(std::make_unique<netif>()) {}

std::unique_ptr<Instance> Instance::start(const std::string& name, const DpdkOptions& options,
                                          std::string& error) {
  if (!startEal(options.eal_args, error)) return nullptr;
  std::unique_ptr<Instance> inst(new Instance(name, options));
  if (!inst->setUp(error)) return nullptr;
  inst->thread_ = std::thread([p = inst.get()] { p->run(); });
  return inst;
}

bool Instance::setUp(std::string& error) {
  std::string devname = options_.port.substr(0, options_.port.find(','));
  if (rte_eth_dev_get_port_by_name(devname.c_str(), &port_id_) != 0) {
    removeStaleMemifSocket(name_, options_.port);
    if (int rc = rte_dev_probe(options_.port.c_str()); rc != 0) {
      error = "probing port \"" + options_.port + "\" failed: " + rte_strerror(-rc);
      return false;
    }
    if (rte_eth_dev_get_port_by_name(devname.c_str(), &port_id_) != 0) {
      error = "port \"" + devname + "\" did not appear after probing";
      return false;
    }
  }
  rte_eth_dev_info info{};
  if (int rc = rte_eth_dev_info_get(port_id_, &info); rc != 0) {
    error = std::string("rte_eth_dev_info_get: ") + rte_strerror(-rc);
    return false;
  }
  static std::atomic<int> serial{0};
  std::string tag = "dmm" + std::to_string(serial.fetch_add(1));
  std::uint16_t priv = static_cast<std::uint16_t>(RTE_ALIGN(sizeof(MbufPbuf), RTE_MBUF_PRIV_ALIGN));
  pool_ = rte_pktmbuf_pool_create((tag + "p").c_str(), options_.mbufs, 256, priv,
                                  RTE_MBUF_DEFAULT_BUF_SIZE, static_cast<int>(rte_socket_id()));
  if (pool_ == nullptr) {
    error = std::string("mbuf pool: ") + rte_strerror(rte_errno);
    return false;
  }
  rte_eth_conf conf{};
  constexpr std::uint64_t kRxCk = RTE_ETH_RX_OFFLOAD_IPV4_CKSUM | RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
  constexpr std::uint64_t kTxCk = RTE_ETH_TX_OFFLOAD_IPV4_CKSUM | RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
  if ((info.rx_offload_capa & kRxCk) == kRxCk) {
    conf.rxmode.offloads |= kRxCk;
    rx_cksum_offload_ = true;
  }
  if ((info.tx_offload_capa & kTxCk) == kTxCk) {
    conf.txmode.offloads |= kTxCk;
    tx_cksum_offload_ = true;
  }
  if (int rc = rte_eth_dev_configure(port_id_, 1, 1, &conf); rc != 0) {
    error = std::string("rte_eth_dev_configure: ") + rte_strerror(-rc);
    return false;
  }
  port_configured_ = true;
  std::uint16_t nrx = options_.rx_descriptors;
  std::uint16_t ntx = options_.tx_descriptors;
  (void)rte_eth_dev_adjust_nb_rx_tx_desc(port_id_, &nrx, &ntx);
  int socket = rte_eth_dev_socket_id(port_id_);
  if (socket < 0) socket = static_cast<int>(rte_socket_id());
  if (int rc =
          rte_eth_rx_queue_setup(port_id_, 0, nrx, static_cast<unsigned>(socket), nullptr, pool_);
      rc != 0) {
    error = std::string("rx queue: ") + rte_strerror(-rc);
    return false;
  }
  if (int rc = rte_eth_tx_queue_setup(port_id_, 0, ntx, static_cast<unsigned>(socket), nullptr);
      rc != 0) {
    error = std::string("tx queue: ") + rte_strerror(-rc);
    return false;
  }
  // DPDK 22.11's memif tears its rings down from the interrupt thread when the peer leaves;
  // a burst racing that has crashed the server side (shared/notes/dpdk.md). The poll thread
  // does no burst on a memif port whose link is down (a flag read per iteration).
  guard_link_ = info.driver_name != nullptr && std::string_view(info.driver_name) == "net_memif";
  // A memif client connects to its server's socket only when the port starts, and never again
  // once that peer went away: the poll thread restarts the port until it is back
  // (maintainLink()). For the same reason a client may start before its server does.
  memif_client_ = guard_link_ && !isMemifServer(options_.port);
  if (int rc = rte_eth_dev_start(port_id_); rc == 0) {
    port_started_ = true;
  } else if (memif_client_) {
    spdlog::warn("dpdk stack {}: memif server not reachable yet ({}); retrying", name_,
                 options_.port);
    link_down_since_ns_ = monoNs();
  } else {
    error = std::string("rte_eth_dev_start: ") + rte_strerror(-rc);
    return false;
  }
  rte_ether_addr mac{};
  (void)rte_eth_macaddr_get(port_id_, &mac);

  commands_ = rte_ring_create((tag + "c").c_str(), options_.max_connections + 64, SOCKET_ID_ANY,
                              RING_F_SC_DEQ | RING_F_EXACT_SZ);
  if (commands_ == nullptr) {
    error = std::string("command ring: ") + rte_strerror(rte_errno);
    return false;
  }
  wake_fd_ = UniqueFd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_) {
    error = std::string("eventfd: ") + std::strerror(errno);
    return false;
  }

  std::lock_guard lock(coreLock());
  initLwipOnce();
  ip4_addr_t ip = toLwip(options_.address);
  ip4_addr_t mask;
  mask.addr = options_.prefix_length == 0 ? 0 : lwip_htonl(~0u << (32 - options_.prefix_length));
  ip4_addr_t gw{};
  if (options_.gateway) gw = toLwip(*options_.gateway);
  netif* n = netif_.get();
  if (netif_add(n, &ip, &mask, &gw, this, netifInit, ethernet_input) == nullptr) {
    error = "netif_add failed";
    return false;
  }
  all().push_back(this);  // from here on the destructor takes the interface out again
  std::memcpy(n->hwaddr, mac.addr_bytes, ETH_HWADDR_LEN);
  std::uint16_t ck = NETIF_CHECKSUM_ENABLE_ALL;
  if (rx_cksum_offload_)
    ck &= static_cast<std::uint16_t>(~(NETIF_CHECKSUM_CHECK_IP | NETIF_CHECKSUM_CHECK_TCP));
  if (tx_cksum_offload_)
    ck &= static_cast<std::uint16_t>(~(NETIF_CHECKSUM_GEN_IP | NETIF_CHECKSUM_GEN_TCP));
  NETIF_SET_CHECKSUM_CTRL(n, ck);
  netif_set_up(n);
  netif_set_link_up(n);
  if (all().size() == 1) netif_set_default(n);

  tcp_pcb* l = tcp_new();
  if (l == nullptr) {
    error = "tcp_new failed";
    return false;
  }
  tcp_bind_netif(l, n);
  if (tcp_bind(l, &ip, options_.data_port) != ERR_OK) {
    tcp_close(l);
    error = "cannot listen on " + options_.address.toString() + ":" +
            std::to_string(options_.data_port);
    return false;
  }
  listener_ = tcp_listen_with_backlog(l, TCP_DEFAULT_LISTEN_BACKLOG);
  tcp_arg(listener_, this);
  tcp_accept(listener_, onAcceptCb);
  spdlog::info(
      "dpdk stack {}: port {} ({}) mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {}/{}, "
      "data port {}, checksums rx {} tx {}",
      name_, port_id_, info.driver_name != nullptr ? info.driver_name : "?", mac.addr_bytes[0],
      mac.addr_bytes[1], mac.addr_bytes[2], mac.addr_bytes[3], mac.addr_bytes[4], mac.addr_bytes[5],
      options_.address.toString(), options_.prefix_length, options_.data_port,
      rx_cksum_offload_ ? "offloaded" : "software", tx_cksum_offload_ ? "offloaded" : "software");
  return true;
}

Instance::~Instance() {
  if (thread_.joinable()) {
    stop_.store(true);
    std::uint64_t one = 1;
    (void)::write(wake_fd_.get(), &one, sizeof one);
    thread_.join();
  }
  {
    std::lock_guard lock(coreLock());
    auto& v = all();
    if (auto it = std::find(v.begin(), v.end(), this); it != v.end()) {
      // The pcbs of this interface go with it (their channels are left to the process's end).
      v.erase(it);
      if (listener_ != nullptr) tcp_close(listener_);
      netif_remove(netif_.get());
      flushTx();
    }
  }
  if (port_started_) (void)rte_eth_dev_stop(port_id_);
  if (port_configured_) (void)rte_eth_dev_close(port_id_);
  // The workers' loops are gone by now (the sidecar stops them first): their events must not
  // be freed through a freed base.
  for (auto& [loop, q] : queues_)
    freeOrphanedEvent(q->event);
}

PortStats Instance::portStats() const {
  // The generic xstats every driver has ("rx_good_packets", ...): one call for names and
  // values, read at scrape time.
  PortStats st;
  int n = rte_eth_xstats_get(port_id_, nullptr, 0);
  if (n <= 0) return st;
  std::vector<rte_eth_xstat> values(static_cast<std::size_t>(n));
  std::vector<rte_eth_xstat_name> names(static_cast<std::size_t>(n));
  if (rte_eth_xstats_get_names(port_id_, names.data(), static_cast<unsigned>(n)) != n ||
      rte_eth_xstats_get(port_id_, values.data(), static_cast<unsigned>(n)) != n)
    return st;
  for (const auto& v : values) {
    if (v.id >= names.size()) continue;
    std::string_view name = names[v.id].name;
    auto x = static_cast<double>(v.value);
    if (name == "rx_good_packets")
      st.rx_packets = x;
    else if (name == "tx_good_packets")
      st.tx_packets = x;
    else if (name == "rx_good_bytes")
      st.rx_bytes = x;
    else if (name == "tx_good_bytes")
      st.tx_bytes = x;
    else if (name == "rx_missed_errors")
      st.rx_missed = x;
    else if (name == "rx_mbuf_allocation_errors")
      st.rx_nombuf = x;
    else if (name == "rx_errors")
      st.rx_errors = x;
    else if (name == "tx_errors")
      st.tx_errors = x;
  }
  return st;
}

void Instance::maintainLink(std::uint64_t now) {
  if (now < next_link_check_ns_) return;
  next_link_check_ns_ = now + kLinkCheckNs;
  if (port_started_ && linkUp()) {
    if (link_down_since_ns_ != 0) {
      spdlog::info("dpdk stack {}: memif link up again after {} ms", name_,
                   (now - link_down_since_ns_) / 1000000u);
      link_down_since_ns_ = 0;
      restart_backoff_ns_ = 0;
    }
    return;
  }
  if (link_down_since_ns_ == 0) {
    // Give a connection in progress (or a peer that is only restarting) its moment first.
    link_down_since_ns_ = now;
    next_restart_ns_ = now + kRestartMinNs;
    spdlog::warn("dpdk stack {}: memif link down; reconnecting to its server", name_);
    return;
  }
  if (now < next_restart_ns_) return;
  restart_backoff_ns_ =
      restart_backoff_ns_ == 0 ? kRestartMinNs : std::min(restart_backoff_ns_ * 2, kRestartMaxNs);
  next_restart_ns_ = now + restart_backoff_ns_;
  // Frames still queued for the port go first (they are dropped: the link is down).
  flushTx();
  if (port_started_) (void)rte_eth_dev_stop(port_id_);
  port_started_ = rte_eth_dev_start(port_id_) == 0;
  counters_.port_restarts.fetch_add(1, std::memory_order_relaxed);
}

bool Instance::linkUp() const {
  rte_eth_link link{};
  if (rte_eth_link_get_nowait(port_id_, &link) != 0) return false;
  return link.link_status == RTE_ETH_LINK_UP;
}

std::string Instance::describe() const {
  return options_.port + " " + options_.address.toString() + ":" +
         std::to_string(options_.data_port) +
         " connections=" + std::to_string(counters_.active.load()) +
         (linkUp() ? " link=up" : " link=down");
}

// ---- worker side ----

LoopQueue& Instance::queueFor(EventLoop& loop) {
  std::lock_guard lock(queues_mutex_);
  auto& q = queues_[&loop];
  if (q) return *q;
  q = std::make_unique<LoopQueue>();
  q->instance = this;
  q->loop = &loop;
  static std::atomic<int> serial{0};
  std::string ring_name = "dmmq" + std::to_string(serial.fetch_add(1));
  q->ring = rte_ring_create(ring_name.c_str(), options_.max_connections + 64, SOCKET_ID_ANY,
                            RING_F_SP_ENQ | RING_F_SC_DEQ | RING_F_EXACT_SZ);
  q->efd = UniqueFd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (q->ring == nullptr || !q->efd) {
    spdlog::critical("dpdk stack {}: cannot make a worker queue ({})", name_,
                     rte_strerror(rte_errno));
    std::abort();
  }
  q->event = loop.newEvent(q->efd.get(), EV_READ | EV_PERSIST, DpdkConnection::onQueue, q.get());
  event_add(q->event.get(), nullptr);
  return *q;
}

Channel* Instance::newChannel() {
  if (channels_.fetch_add(1, std::memory_order_relaxed) >= options_.max_connections) {
    channels_.fetch_sub(1, std::memory_order_relaxed);
    return nullptr;
  }
  auto* ch = new Channel(*this);
  if (!ch->rx.allocate(kRingBytes) || !ch->tx.allocate(kRingBytes)) {
    ch->releaseRef();
    return nullptr;
  }
  return ch;
}

void Instance::command(Channel& ch, std::uint32_t cmds, bool wake) {
  ch.commands.fetch_or(cmds, std::memory_order_acq_rel);
  if (!ch.in_poll_queue.exchange(true, std::memory_order_acq_rel)) {
    ch.retain();
    // The ring holds every channel at once (max_connections + slack), and a channel is in it
    // at most once: the enqueue cannot fail.
    void* obj = &ch;
    ringRelease(commands_);
    while (rte_ring_mp_enqueue(commands_, obj) != 0)
      std::this_thread::yield();
  }
  if (wake && sleeping_.load(std::memory_order_seq_cst)) {
    std::uint64_t one = 1;
    (void)::write(wake_fd_.get(), &one, sizeof one);
  }
}

Result<std::shared_ptr<Expectation>> Instance::expect(EventLoop& loop, const SessionToken& token,
                                                      DataAcceptor& acceptor) {
  auto e = std::make_shared<Expectation>();
  e->queue = &queueFor(loop);
  e->acceptor = &acceptor;
  e->token = token;
  std::lock_guard lock(expect_mutex_);
  if (expected_.size() >= options_.max_connections) return Error{EAGAIN, "dpdk_full"};
  if (!expected_.emplace(token, e).second) return Error{EEXIST, "token_in_use"};
  return e;
}

void Instance::cancel(const SessionToken& token) {
  std::lock_guard lock(expect_mutex_);
  if (auto it = expected_.find(token); it != expected_.end()) {
    it->second->acceptor = nullptr;
    expected_.erase(it);
  }
}

void Instance::settle(const Expectation& e) {
  std::lock_guard lock(expect_mutex_);
  if (auto it = expected_.find(e.token); it != expected_.end() && it->second.get() == &e)
    expected_.erase(it);
}

// ---- poll thread ----

void Instance::run() {
  std::string tname = "dpdk-" + name_.substr(0, 10);
  pthread_setname_np(pthread_self(), tname.c_str());
  (void)prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us: idle sleeps are short
  (void)rte_thread_register();             // an lcore id: per-lcore mempool caches
  if (options_.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<unsigned>(options_.cpu), &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
  std::uint32_t idle = 0;
  std::uint64_t sleep_ns = 0;
  std::uint64_t last = monoNs();
  std::uint64_t window_start = last;
  std::uint64_t window_busy = 0;
  std::uint64_t last_work = last;
  const std::uint64_t spin_ns = options_.idle_spin_us * 1000ull;
  while (!stop_.load(std::memory_order_relaxed)) {
    bool worked = iterate();
    std::uint64_t now = monoNs();
    if (memif_client_) maintainLink(now);
    counters_.total_ns.fetch_add(now - last, std::memory_order_relaxed);
    if (worked) {
      counters_.busy_ns.fetch_add(now - last, std::memory_order_relaxed);
      window_busy += now - last;
    }
    last = now;
    if (now - window_start >= 1000000000u) {
      counters_.busy_ratio.store(
          static_cast<double>(window_busy) / static_cast<double>(now - window_start),
          std::memory_order_relaxed);
      window_start = now;
      window_busy = 0;
    }
    if (worked) {
      idle = 0;
      sleep_ns = 0;
      last_work = now;
      continue;
    }
    if (options_.busy_poll) continue;
    // Idle for less than idle_spin_us: keep polling (traffic usually resumes within a round
    // trip), yielding the core to whoever else wants it now and then. A sleep and its wake-up
    // cost two context switches, which under load took 40% of the thread.
    if (now - last_work < spin_ns) {
      if ((++idle & 15) == 0) sched_yield();
      continue;
    }
    // Idle for longer: sleep, growing from 5 us to idle_sleep_us; a worker's command wakes us
    // at once.
    sleep_ns = sleep_ns == 0
                   ? 5000
                   : std::min<std::uint64_t>(sleep_ns * 2, options_.idle_sleep_us * 1000ull);
    sleeping_.store(true, std::memory_order_seq_cst);
    if (rte_ring_empty(commands_)) {
      pollfd pfd{wake_fd_.get(), POLLIN, 0};
      timespec ts{static_cast<time_t>(sleep_ns / 1000000000u),
                  static_cast<long>(sleep_ns % 1000000000u)};
      (void)ppoll(&pfd, 1, &ts, nullptr);
      if ((pfd.revents & POLLIN) != 0) {
        std::uint64_t v;
        (void)::read(wake_fd_.get(), &v, sizeof v);
        sleep_ns = 0;
      }
    }
    sleeping_.store(false, std::memory_order_relaxed);
  }
}

bool Instance::iterate() {
  rte_mbuf* pkts[kBurst];
  std::uint16_t n = guard_link_ && !linkUp() ? 0 : rte_eth_rx_burst(port_id_, 0, pkts, kBurst);
  bool worked = n > 0;
  std::lock_guard lock(coreLock());
  for (std::uint16_t i = 0; i < n; ++i) {
    rte_mbuf* m = pkts[i];
    if (rx_cksum_offload_) {
      std::uint64_t f = m->ol_flags;
      if ((f & RTE_MBUF_F_RX_IP_CKSUM_MASK) == RTE_MBUF_F_RX_IP_CKSUM_BAD ||
          (f & RTE_MBUF_F_RX_L4_CKSUM_MASK) == RTE_MBUF_F_RX_L4_CKSUM_BAD) {
        counters_.rx_bad_checksum.fetch_add(1, std::memory_order_relaxed);
        rte_pktmbuf_free(m);
        continue;
      }
    }
    pbuf* p = nullptr;
    if (m->nb_segs == 1) {
      auto* pc = static_cast<pbuf_custom*>(rte_mbuf_to_priv(m));
      pc->custom_free_function = freeMbufPbuf;
      p = pbuf_alloced_custom(PBUF_RAW, m->data_len, PBUF_REF, pc, rte_pktmbuf_mtod(m, void*),
                              m->data_len);
    } else {
      p = pbuf_alloc(PBUF_RAW, static_cast<u16_t>(m->pkt_len), PBUF_RAM);
      if (p != nullptr) {
        const void* d = rte_pktmbuf_read(m, 0, m->pkt_len, p->payload);
        if (d != p->payload) std::memcpy(p->payload, d, m->pkt_len);
      }
      rte_pktmbuf_free(m);
    }
    if (p == nullptr) continue;
    if (netif_->input(p, netif_.get()) != ERR_OK) pbuf_free(p);
  }
  // The workers' commands.
  void* chs[64];
  unsigned got;
  unsigned budget = 1024;
  while (budget > 0 && (got = rte_ring_sc_dequeue_burst(commands_, chs, 64, nullptr)) > 0) {
    ringAcquire(commands_);
    worked = true;
    budget -= std::min(budget, got);
    for (unsigned i = 0; i < got; ++i) {
      auto* ch = static_cast<Channel*>(chs[i]);
      ch->in_poll_queue.store(false, std::memory_order_seq_cst);
      std::uint32_t cmds = ch->commands.exchange(0, std::memory_order_acq_rel);
      handleCommands(*ch, cmds);
      release_.push_back(ch);  // the queue's reference, dropped once lwIP is done with it
    }
  }
  sys_check_timeouts();
  for (Instance* inst : all()) {
    if (inst->tx_len_ > 0) {
      worked = true;
      inst->flushTx();
    }
    inst->wakeLoops();
    for (Channel* ch : inst->release_)
      ch->releaseRef();
    inst->release_.clear();
  }
  return worked;
}

void Instance::wakeLoops() {
  for (LoopQueue* q : wake_) {
    std::uint64_t one = 1;
    (void)::write(q->efd.get(), &one, sizeof one);
  }
  wake_.clear();
}

void Instance::post(Channel& ch, std::uint32_t events) {
  if (ch.queue == nullptr) return;
  ch.events.fetch_or(events, std::memory_order_acq_rel);
  if (!ch.in_worker_queue.exchange(true, std::memory_order_acq_rel)) {
    ch.retain();
    void* obj = &ch;
    // Sized for every channel at once; a channel is queued at most once.
    ringRelease(ch.queue->ring);
    (void)rte_ring_sp_enqueue(ch.queue->ring, obj);
    if (ch.queue->armed.exchange(false, std::memory_order_seq_cst))
      ch.queue->instance->wake_.push_back(ch.queue);
  }
}

bool Instance::transmit(pbuf* p) {
  rte_mbuf* m = rte_pktmbuf_alloc(pool_);
  if (m == nullptr) return false;
  char* d = rte_pktmbuf_append(m, p->tot_len);
  if (d == nullptr) {
    rte_pktmbuf_free(m);
    return false;
  }
  (void)pbuf_copy_partial(p, d, p->tot_len, 0);
  if (tx_cksum_offload_ && p->tot_len >= sizeof(rte_ether_hdr) + sizeof(rte_ipv4_hdr)) {
    auto* eth = rte_pktmbuf_mtod(m, rte_ether_hdr*);
    if (eth->ether_type == rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4)) {
      auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
      m->l2_len = sizeof(rte_ether_hdr);
      m->l3_len = static_cast<std::uint64_t>(rte_ipv4_hdr_len(ip));
      m->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM;
      ip->hdr_checksum = 0;
      if (ip->next_proto_id == IPPROTO_TCP) {
        auto* tcp = reinterpret_cast<rte_tcp_hdr*>(reinterpret_cast<std::byte*>(ip) + m->l3_len);
        m->ol_flags |= RTE_MBUF_F_TX_TCP_CKSUM;
        tcp->cksum = rte_ipv4_phdr_cksum(ip, m->ol_flags);
      }
    }
  }
  tx_buf_[tx_len_++] = m;
  if (tx_len_ == std::size(tx_buf_)) flushTx();
  return true;
}

void Instance::flushTx() {
  unsigned done = 0;
  // A memif port whose link is down gets nothing (the frames count as dropped; TCP resends).
  bool usable = !guard_link_ || linkUp();
  for (int tries = 0; usable && done < tx_len_ && tries < 4; ++tries)
    done +=
        rte_eth_tx_burst(port_id_, 0, tx_buf_ + done, static_cast<std::uint16_t>(tx_len_ - done));
  if (done < tx_len_) {
    counters_.tx_dropped.fetch_add(tx_len_ - done, std::memory_order_relaxed);
    rte_pktmbuf_free_bulk(tx_buf_ + done, tx_len_ - done);
  }
  tx_len_ = 0;
}

void Instance::handleCommands(Channel& ch, std::uint32_t cmds) {
  if ((cmds & kCmdAbort) != 0) {
    ch.worker_gone = true;
    if (ch.pcb != nullptr) {
      tcp_pcb* pcb = ch.pcb;
      tcp_err(pcb, nullptr);
      tcp_abort(pcb);  // frees the pcb: onPcbDestroyed() drops the poll thread's reference
    }
    ch.phase = Channel::Phase::kDone;
    return;
  }
  if ((cmds & kCmdConnect) != 0) {
    ch.phase = Channel::Phase::kConnecting;
    tcp_pcb* pcb = tcp_new();
    ip4_addr_t dst = toLwip(ch.remote.ip());
    if (pcb == nullptr) {
      ch.error.store(ENOMEM);
      ch.phase = Channel::Phase::kDone;
      post(ch, kEvFailed);
      release_.push_back(&ch);  // no pcb will ever hold the poll thread's reference
      return;
    }
    ch.pcb = pcb;
    counters_.active.fetch_add(1, std::memory_order_relaxed);
    ch.counted = true;
    attach(pcb, ch);
    // lwIP 2.1.3 starts every pcb with a 3 s retransmission timeout; a lost SYN would then
    // outlast the policy's attempt_timeout. 1 s, as RFC 6298 has it.
    pcb->rto = static_cast<s16_t>(1000 / (2 * TCP_TMR_INTERVAL));  // slow-timer ticks
    tcp_bind_netif(pcb, netif_.get());
    err_t err = tcp_connect(pcb, &dst, ch.remote.port(), onConnectedCb);
    if (err != ERR_OK) {
      failConnect(ch, errnoOf(err));
      return;
    }
  }
  if (ch.pcb == nullptr) {
    // The connection is gone; a worker that still writes learns it from error.
    if ((cmds & kCmdSend) != 0 && ch.error.load() == 0) {
      ch.error.store(EPIPE);
      post(ch, kEvWritable);
    }
    return;
  }
  if ((cmds & kCmdConsumed) != 0) {
    std::uint64_t tail = ch.rx.tail();
    while (ch.rx_announced < tail) {
      auto step = static_cast<u16_t>(std::min<std::uint64_t>(tail - ch.rx_announced, 0xFFFF));
      tcp_recved(ch.pcb, step);
      ch.rx_announced += step;
    }
  }
  if ((cmds & kCmdShutdown) != 0) ch.fin_pending = true;
  if ((cmds & kCmdClose) != 0) {
    ch.fin_pending = true;
    ch.close_pending = true;
    ch.worker_gone = true;
  }
  if ((cmds & (kCmdSend | kCmdShutdown | kCmdClose)) != 0) pushTx(ch);
}

void Instance::pushTx(Channel& ch) {
  if (ch.pcb == nullptr || ch.phase != Channel::Phase::kOpen) return;
  std::uint64_t head = ch.tx.head();
  while (ch.tx_sent < head) {
    std::size_t room = tcp_sndbuf(ch.pcb);
    if (room == 0 || tcp_sndqueuelen(ch.pcb) + 4 >= TCP_SND_QUEUELEN) break;
    auto chunk = ch.tx.contiguous(ch.tx_sent, std::min<std::uint64_t>(head - ch.tx_sent, room));
    std::size_t len = std::min<std::size_t>(chunk.size(), 0xFFFF);
    err_t err = tcp_write(ch.pcb, chunk.data(), static_cast<u16_t>(len), 0);  // no copy
    if (err == ERR_MEM) break;
    if (err != ERR_OK) {
      abortChannel(ch, EPIPE);
      return;
    }
    ch.tx_sent += len;
  }
  finishIfDone(ch);
  if (ch.pcb != nullptr) tcp_output(ch.pcb);
}

void Instance::finishIfDone(Channel& ch) {
  if (!ch.fin_pending || ch.pcb == nullptr || ch.tx_sent != ch.tx.head()) return;
  err_t err = ch.close_pending ? tcp_close(ch.pcb) : tcp_shutdown(ch.pcb, 0, 1);
  if (err == ERR_OK) {
    ch.fin_pending = false;
    if (ch.close_pending) {
      // lwIP finishes the close on its own; received bytes from now on are answered with a
      // reset. The rings stay until every byte sent is acknowledged (detach()).
      tcp_recv(ch.pcb, nullptr);
      ch.close_pending = false;
    }
  }
  // ERR_MEM: retried from onSent()/onPoll().
}

void Instance::abortChannel(Channel& ch, int err) {
  if (ch.pcb == nullptr) return;
  tcp_pcb* pcb = ch.pcb;
  tcp_err(pcb, nullptr);
  tcp_abort(pcb);
  ch.error.store(err);
  ch.phase = Channel::Phase::kDone;
  post(ch, kEvReadable | kEvWritable);
}

int Instance::onAccept(tcp_pcb* pcb, int err) {
  if (err != ERR_OK || pcb == nullptr) return ERR_VAL;
  Channel* ch = newChannel();
  if (ch == nullptr) {
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    tcp_abort(pcb);
    return ERR_ABRT;
  }
  ch->pcb = pcb;
  ch->phase = Channel::Phase::kPreamble;
  ch->born_tick = nowMs();
  ch->counted = true;
  counters_.active.fetch_add(1, std::memory_order_relaxed);
  if (const ip_addr_t* rip = &pcb->remote_ip; rip != nullptr) {
    in_addr a{};
    a.s_addr = ip4_addr_get_u32(rip);
    ch->remote = SocketAddress(IpAddress::v4(a), pcb->remote_port);
  }
  attach(pcb, *ch);
  return ERR_OK;
}

int Instance::onConnected(Channel& ch) {
  // Present the token; the responder answers one byte once it has matched it.
  std::uint8_t pre[20];
  std::memcpy(pre, kPreambleMagic, 4);
  std::memcpy(pre + 4, ch.token.data(), ch.token.size());
  if (tcp_write(ch.pcb, pre, sizeof pre, TCP_WRITE_FLAG_COPY) != ERR_OK) {
    failConnect(ch, ENOMEM);
    return ERR_ABRT;
  }
  ch.extra_unacked = sizeof pre;
  ch.phase = Channel::Phase::kAwaitAck;
  tcp_output(ch.pcb);
  return ERR_OK;
}

bool Instance::deliverRx(Channel& ch, pbuf* p) {
  std::size_t stored = 0;
  for (pbuf* q = p; q != nullptr; q = q->next)
    stored += ch.rx.put({static_cast<const std::byte*>(q->payload), q->len});
  if (stored < p->tot_len) {
    // More than the window lwIP advertised: cannot happen with a conforming peer.
    abortChannel(ch, EPROTO);
    return false;
  }
  post(ch, kEvReadable);
  return true;
}

void Instance::failConnect(Channel& ch, int err) {
  ch.error.store(err);
  ch.phase = Channel::Phase::kDone;
  if (ch.pcb != nullptr) {
    tcp_pcb* pcb = ch.pcb;
    tcp_err(pcb, nullptr);
    tcp_abort(pcb);
  }
  post(ch, kEvFailed);
}

int Instance::onRecv(Channel& ch, pbuf* p, int err) {
  if (p == nullptr) {  // the peer's FIN
    ch.rx_eof.store(true, std::memory_order_release);
    switch (ch.phase) {
      case Channel::Phase::kAwaitAck:  // the responder refused the token
        failConnect(ch, ECONNREFUSED);
        return ERR_ABRT;
      case Channel::Phase::kPreamble:
        counters_.refused.fetch_add(1, std::memory_order_relaxed);
        abortChannel(ch, ECONNRESET);
        return ERR_ABRT;
      default:
        post(ch, kEvReadable);
        return ERR_OK;
    }
  }
  if (err != ERR_OK) {
    pbuf_free(p);
    return ERR_OK;
  }
  tcp_pcb* pcb = ch.pcb;
  u16_t total = p->tot_len;
  u16_t skip = 0;  // bytes of p the stack itself consumes (preamble, acknowledgement)
  if (ch.phase == Channel::Phase::kPreamble) {
    skip = static_cast<u16_t>(std::min<std::size_t>(total, sizeof ch.preamble - ch.preamble_len));
    (void)pbuf_copy_partial(p, ch.preamble + ch.preamble_len, skip, 0);
    ch.preamble_len = static_cast<std::uint8_t>(ch.preamble_len + skip);
    if (ch.preamble_len == sizeof ch.preamble) {
      std::shared_ptr<Expectation> e;
      if (std::memcmp(ch.preamble, kPreambleMagic, 4) == 0) {
        SessionToken token;
        std::memcpy(token.data(), ch.preamble + 4, token.size());
        std::lock_guard lock(expect_mutex_);
        // Claimed, not erased: a session that gives up before its worker takes the
        // connection must still find (and cancel) it.
        if (auto it = expected_.find(token); it != expected_.end() && !it->second->claimed) {
          e = it->second;
          e->claimed = true;
        }
      }
      if (!e) {
        counters_.refused.fetch_add(1, std::memory_order_relaxed);
        pbuf_free(p);
        abortChannel(ch, ECONNREFUSED);
        return ERR_ABRT;
      }
      counters_.accepted.fetch_add(1, std::memory_order_relaxed);
      ch.expectation = e;
      ch.queue = e->queue;
      ch.retain();  // the worker's reference, taken by the DpdkConnection it makes
      ch.phase = Channel::Phase::kOpen;
      ch.extra_unacked = 1;
      (void)tcp_write(pcb, &kAckByte, 1, TCP_WRITE_FLAG_COPY);
      tcp_output(pcb);
      post(ch, kEvAccepted);
    }
  } else if (ch.phase == Channel::Phase::kAwaitAck) {
    std::uint8_t b = 0;
    (void)pbuf_copy_partial(p, &b, 1, 0);
    skip = 1;
    if (b != kAckByte) {
      pbuf_free(p);
      failConnect(ch, EPROTO);
      return ERR_ABRT;
    }
    ch.phase = Channel::Phase::kOpen;
    post(ch, kEvConnected | kEvWritable);
    pushTx(ch);
  }
  if (skip > 0) tcp_recved(pcb, skip);
  if (skip >= total) {
    pbuf_free(p);
    return ERR_OK;
  }
  if (ch.worker_gone || !ch.rx.allocated()) {  // nobody reads any more: drop
    tcp_recved(pcb, static_cast<u16_t>(total - skip));
    pbuf_free(p);
    return ERR_OK;
  }
  if (skip > 0) p = pbuf_free_header(p, skip);
  bool ok = deliverRx(ch, p);
  pbuf_free(p);
  return ok ? ERR_OK : ERR_ABRT;
}

int Instance::onSent(Channel& ch, std::uint32_t len) {
  // The preamble or the acknowledgement byte went first and was copied, not taken from the
  // ring: acknowledgements cover them before any ring byte.
  std::uint32_t extra = std::min(len, ch.extra_unacked);
  ch.extra_unacked -= extra;
  len -= extra;
  if (len > 0 && ch.tx.allocated()) ch.tx.setTail(std::min(ch.tx.tail() + len, ch.tx_sent));
  if (!ch.worker_gone && ch.want_writable.exchange(false, std::memory_order_seq_cst))
    post(ch, kEvWritable);
  pushTx(ch);
  if (ch.worker_gone && !ch.fin_pending && ch.tx.tail() == ch.tx_sent) detach(ch);
  return ERR_OK;
}

void Instance::detach(Channel& ch) {
  // The worker is gone and the peer has every byte: lwIP no longer references the rings, so
  // they go now rather than when the pcb leaves TIME_WAIT.
  if (ch.pcb != nullptr) {
    tcp_sent(ch.pcb, nullptr);
    tcp_recv(ch.pcb, nullptr);
    tcp_poll(ch.pcb, nullptr, 0);
  }
  ch.rx.release();
  ch.tx.release();
}

void Instance::onError(Channel& ch, int err) {
  // lwIP has freed the pcb (reset, too many retransmissions, aborted).
  ch.pcb = nullptr;
  auto was = ch.phase;
  ch.phase = Channel::Phase::kDone;
  ch.error.store(errnoOf(static_cast<err_t>(err)));
  if (was == Channel::Phase::kConnecting || was == Channel::Phase::kAwaitAck) {
    post(ch, kEvFailed);
  } else {
    post(ch, kEvReadable | kEvWritable);
  }
}

int Instance::onPoll(Channel& ch) {
  if (ch.phase == Channel::Phase::kPreamble && nowMs() - ch.born_tick > kPreambleTimeoutMs) {
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    tcp_pcb* pcb = ch.pcb;
    tcp_err(pcb, nullptr);
    tcp_abort(pcb);
    ch.phase = Channel::Phase::kDone;
    return ERR_ABRT;
  }
  pushTx(ch);  // retries what ran out of lwIP memory
  return ERR_OK;
}

void Instance::onPcbDestroyed(Channel& ch) {
  ch.pcb = nullptr;
  if (ch.phase != Channel::Phase::kDone) {
    // Gone without an error (TIME_WAIT over, or closed both ways): what was received stays
    // readable in the ring.
    ch.phase = Channel::Phase::kDone;
  }
  if (ch.counted) {
    ch.counted = false;
    counters_.active.fetch_sub(1, std::memory_order_relaxed);
  }
  release_.push_back(&ch);  // the poll thread's reference, after lwIP returns
}

}  // namespace dmm::stacks::dpdk
