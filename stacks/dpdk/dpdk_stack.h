#pragma once
// The dpdk stack kind: TCP over a DPDK port with lwIP as the TCP/IP engine (README.md here).
// An instance owns one port (a PCI NIC, or a net_af_packet / net_af_xdp / net_memif virtual
// device), an IPv4 address on it, and a poll thread that runs the port and lwIP. Workers talk to
// it through lock-free rings with eventfd wake-ups. Sessions flow on a data connection of the
// instance's own (kOwnDataPath); the handshake runs on a kernel control connection beside it.
//
// DPDK and lwIP headers stay out of this header: the instance lives in instance.h.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/socket_address.h"
#include "stacks/endpoint.h"
#include "stacks/stack.h"

namespace dmm::stacks::dpdk {

struct DpdkOptions : StackOptions {
  // EAL arguments. The EAL is per process: every dpdk instance of a config must give the same.
  std::vector<std::string> eal_args{"--no-huge", "-m", "512", "--no-pci"};
  std::string port;  // devargs: "net_af_packet0,iface=eth1" or a PCI address "0000:03:00.0"
  IpAddress address;
  std::uint8_t prefix_length = 24;
  std::optional<IpAddress> gateway;
  std::uint16_t data_port = 7301;        // where peers open data connections to this instance
  std::uint32_t max_connections = 4096;  // data connections at once (each up to 2 rings)
  std::uint32_t mbufs = 16383;           // the port's packet buffer pool
  std::uint16_t rx_descriptors = 1024;
  std::uint16_t tx_descriptors = 1024;
  bool busy_poll = false;              // spin when idle (a dedicated core) instead of sleeping
  std::uint32_t idle_spin_us = 100;    // idle this long, the poll thread still polls
  std::uint32_t idle_sleep_us = 1000;  // the longest sleep of an idle poll thread
  int cpu = -1;                        // pin the poll thread to this CPU (-1: not pinned)
};

class Instance;

class DpdkStack final : public Stack {
 public:
  DpdkStack(std::string name, const DpdkOptions& options);
  ~DpdkStack() override;

  // Starts the EAL (once per process), the port and the poll thread. A failure leaves the
  // instance down (healthy() false, status() says why) rather than stopping the sidecar.
  void start();

  const std::string& name() const override { return name_; }
  std::string_view kind() const override { return "dpdk"; }
  std::uint32_t capabilities() const override {
    return kNeedsPollThread | kHalfClose | kOwnDataPath;
  }
  // The control connection: a kernel connection to the peer's tunnel port.
  Result<std::unique_ptr<StackConnection>> connect(EventLoop& loop, const ConnectOptions& options,
                                                   ConnectionCallbacks& callbacks) override;
  Result<std::unique_ptr<StackConnection>> adopt(std::unique_ptr<StackConnection> control) override;
  std::vector<std::uint8_t> advertise() const override;
  bool healthy() const override;
  Result<std::vector<std::uint8_t>> expectData(EventLoop& loop, const SessionToken& token,
                                               std::span<const std::uint8_t> offer_params,
                                               DataAcceptor& acceptor) override;
  void cancelData(EventLoop& loop, const SessionToken& token) override;
  Result<std::unique_ptr<StackConnection>> connectData(EventLoop& loop,
                                                       std::span<const std::uint8_t> peer_params,
                                                       const SessionToken& token,
                                                       ConnectionCallbacks& callbacks) override;
  std::string status() const override;
  void samples(std::vector<StackSample>& out) const override;

  // For metrics; nullptr while the instance is down.
  Instance* instance() const { return instance_.get(); }

 private:
  std::string name_;
  DpdkOptions options_;
  std::unique_ptr<Instance> instance_;
  std::string failure_;  // why start() failed
};

class DpdkStackFactory final : public StackFactory {
 public:
  std::string_view kind() const override { return "dpdk"; }
  std::unique_ptr<StackOptions> parseOptions(TomlTable& table) const override;
  Result<std::unique_ptr<Stack>> create(std::string name,
                                        const StackOptions& options) const override;
};

}  // namespace dmm::stacks::dpdk
