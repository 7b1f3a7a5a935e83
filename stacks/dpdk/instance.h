#pragma once
// Instance: one running dpdk stack instance: its port, its lwIP network interface, its poll
// thread, its listener for data connections and the queues to and from the workers.
//
// Poll thread, one iteration:
//   rx_burst (no lock) -> [core lock] ethernet input into lwIP; the commands workers queued;
//   lwIP's timers; transmit what lwIP produced (every instance's buffered frames) [unlock]
//   -> events for workers are queued as lwIP calls back, and their eventfds written once
//   -> idle: spin a little, then sleep (ppoll on the instance's eventfd, growing to
//      idle_sleep_us) unless busy_poll.
// lwIP is one state per process, shared by every instance; the core lock (lwip_core.h) lets
// one poll thread run it at a time. Workers never take it: they only touch channels and rings.

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "common/unique_fd.h"
#include "stacks/dpdk/channel.h"
#include "stacks/dpdk/dpdk_stack.h"

struct rte_ring;
struct rte_mempool;
struct rte_mbuf;
struct netif;
struct pbuf;

namespace dmm::stacks::dpdk {

// Events for one worker loop from one instance: a ring of channels and an eventfd.
struct LoopQueue {
  Instance* instance = nullptr;
  EventLoop* loop = nullptr;
  rte_ring* ring = nullptr;  // channels with pending events (each holds a reference)
  UniqueFd efd;
  EventPtr event;
  std::atomic<bool> armed{true};  // the worker is (or will be) waiting: write efd on enqueue
};

// A responder's expectation of a data connection (Stack::expectData).
struct Expectation {
  LoopQueue* queue = nullptr;
  DataAcceptor* acceptor = nullptr;  // worker thread only; nullptr once cancelled
  // A data connection presented the token (poll thread, under the instance's expect mutex). The
  // expectation stays listed until the worker hands the connection over (settle()), so that a
  // cancel() in between still reaches it.
  bool claimed = false;
  SessionToken token{};
};

// Counters the poll thread keeps, read by the metrics at scrape time.
struct InstanceCounters {
  std::atomic<std::uint64_t> retransmissions{0};
  std::atomic<std::uint64_t> active{0};
  std::atomic<std::uint64_t> accepted{0};
  std::atomic<std::uint64_t> refused{0};  // unknown token, bad preamble, full
  std::atomic<std::uint64_t> busy_ns{0};
  std::atomic<std::uint64_t> total_ns{0};
  std::atomic<std::uint64_t> tx_dropped{0};  // frames the port did not take
  std::atomic<std::uint64_t> rx_bad_checksum{0};
  std::atomic<std::uint64_t> port_restarts{0};  // a memif client reconnecting (maintainLink())
  std::atomic<double> busy_ratio{0};            // over the last second
};

// The port's counters (generic DPDK xstats).
struct PortStats {
  double rx_packets = 0, tx_packets = 0, rx_bytes = 0, tx_bytes = 0;
  double rx_missed = 0, rx_nombuf = 0, rx_errors = 0, tx_errors = 0;
};

class Instance {
 public:
  // Probes and starts the port and the poll thread; nullptr and `error` on failure.
  static std::unique_ptr<Instance> start(const std::string& name, const DpdkOptions& options,
                                         std::string& error);
  ~Instance();

  const std::string& name() const { return name_; }
  const DpdkOptions& options() const { return options_; }
  std::uint16_t portId() const { return port_id_; }
  bool linkUp() const;
  const InstanceCounters& counters() const { return counters_; }
  PortStats portStats() const;
  std::string describe() const;

  // Worker side (any worker thread).
  LoopQueue& queueFor(EventLoop& loop);
  Channel* newChannel();  // with both rings; nullptr when out of memory or at max_connections
  void command(Channel& ch, std::uint32_t cmds, bool wake = true);
  Result<std::shared_ptr<Expectation>> expect(EventLoop& loop, const SessionToken& token,
                                              DataAcceptor& acceptor);
  void cancel(const SessionToken& token);
  // The worker took the connection claimed for `e` (kEvAccepted): forget the expectation.
  void settle(const Expectation& e);
  void channelFreed() { channels_.fetch_sub(1, std::memory_order_relaxed); }

  // Poll side (lwIP callbacks, under the core lock).
  void post(Channel& ch, std::uint32_t events);
  bool transmit(pbuf* p);  // netif linkoutput
  void flushTx();
  void countRetransmission() { counters_.retransmissions.fetch_add(1, std::memory_order_relaxed); }
  netif* lwipNetif() { return netif_.get(); }
  // lwIP callbacks (static trampolines in instance.cc call these).
  int onAccept(tcp_pcb* pcb, int err);
  int onConnected(Channel& ch);
  int onRecv(Channel& ch, pbuf* p, int err);
  int onSent(Channel& ch, std::uint32_t len);
  void onError(Channel& ch, int err);
  int onPoll(Channel& ch);
  void onPcbDestroyed(Channel& ch);
  static std::vector<Instance*>& all();  // started instances (core lock)

 private:
  Instance(std::string name, const DpdkOptions& options);
  bool setUp(std::string& error);
  // A memif client whose link is down restarts its port (which reconnects to the server's
  // socket): first after kRestartMinNs, then backing off to kRestartMaxNs between tries.
  void maintainLink(std::uint64_t now);
  void run();
  bool iterate();  // one poll iteration; true when it did work
  void handleCommands(Channel& ch, std::uint32_t cmds);
  void pushTx(Channel& ch);
  void finishIfDone(Channel& ch);
  bool deliverRx(Channel& ch, pbuf* p);  // false: aborted
  void failConnect(Channel& ch, int err);
  void abortChannel(Channel& ch, int err);
  void detach(Channel& ch);
  void wakeLoops();

  std::string name_;
  DpdkOptions options_;
  std::uint16_t port_id_ = 0;
  bool port_configured_ = false;  // rte_eth_dev_close() at the end
  bool port_started_ = false;     // poll thread (maintainLink()), then the destructor
  rte_mempool* pool_ = nullptr;
  std::unique_ptr<netif> netif_;
  tcp_pcb* listener_ = nullptr;
  bool rx_cksum_offload_ = false;
  bool tx_cksum_offload_ = false;
  // net_memif: no burst while the link is down (see setUp()).
  bool guard_link_ = false;
  // net_memif in the client role: reconnected by the poll thread (maintainLink()).
  bool memif_client_ = false;
  static constexpr std::uint64_t kLinkCheckNs = 100'000'000;
  static constexpr std::uint64_t kRestartMinNs = 500'000'000;
  static constexpr std::uint64_t kRestartMaxNs = 5'000'000'000;
  std::uint64_t next_link_check_ns_ = 0;
  std::uint64_t link_down_since_ns_ = 0;  // 0: up (or never checked)
  std::uint64_t next_restart_ns_ = 0;
  std::uint64_t restart_backoff_ns_ = 0;

  std::thread thread_;
  std::atomic<bool> stop_{false};
  UniqueFd wake_fd_;
  std::atomic<bool> sleeping_{false};
  rte_ring* commands_ = nullptr;  // channels with pending commands (MP/SC)
  std::atomic<std::uint32_t> channels_{0};

  std::mutex queues_mutex_;
  std::map<EventLoop*, std::unique_ptr<LoopQueue>> queues_;
  std::vector<LoopQueue*> wake_;  // poll thread: queues to wake at the end of an iteration

  std::mutex expect_mutex_;
  std::map<SessionToken, std::shared_ptr<Expectation>> expected_;

  static constexpr unsigned kBurst = 32;
  rte_mbuf* tx_buf_[kBurst * 2]{};
  unsigned tx_len_ = 0;
  std::vector<Channel*> release_;   // poll thread: references to drop after lwIP returns
  std::vector<Channel*> preamble_;  // responder channels still waiting for their token

  InstanceCounters counters_;
};

}  // namespace dmm::stacks::dpdk
