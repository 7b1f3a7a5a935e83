#pragma once
// The kernel stack kind: connections over the host's own TCP/IP stack. An instance is a set of
// socket tunings (TCP_NODELAY, congestion control, buffer sizes); several may coexist. Data of
// a kernel-carried session flows on the handshake's own TCP connection, so the instance has
// nothing to advertise in the offer.

#include <cstdint>
#include <string>

#include "stacks/stack.h"

namespace dmm::stacks::kernel {

struct KernelOptions : StackOptions {
  bool nodelay = true;
  std::string congestion;           // TCP_CONGESTION, empty: the system default
  std::int64_t send_buffer = 0;     // SO_SNDBUF bytes, 0: kernel autotuning
  std::int64_t receive_buffer = 0;  // SO_RCVBUF bytes, 0: kernel autotuning
  // The local address this instance's connections leave from (peers of its family); picks the
  // interface and path, e.g. one instance per NIC. Unset: the routing table decides.
  std::optional<IpAddress> source;
};

class KernelStack final : public Stack {
 public:
  KernelStack(std::string name, KernelOptions options);

  const std::string& name() const override { return name_; }
  std::string_view kind() const override { return "kernel"; }
  std::uint32_t capabilities() const override { return kCanSplice | kIpv6 | kHalfClose; }
  Result<std::unique_ptr<StackConnection>> connect(EventLoop& loop, const ConnectOptions& options,
                                                   ConnectionCallbacks& callbacks) override;
  Result<std::unique_ptr<StackConnection>> adopt(std::unique_ptr<StackConnection> control) override;
  std::vector<std::uint8_t> advertise() const override { return {}; }

  // Applies this instance's socket options to `fd`.
  Status tune(int fd) const;

 private:
  std::string name_;
  KernelOptions options_;
};

// The control connection of a stack that carries data on connections of its own (dpdk, rdma):
// a kernel TCP connection to the peer's tunnel port, TCP_NODELAY, SO_MARK from `options`.
Result<std::unique_ptr<StackConnection>> connectControl(EventLoop& loop,
                                                        const ConnectOptions& options,
                                                        ConnectionCallbacks& callbacks);

class KernelStackFactory final : public StackFactory {
 public:
  std::string_view kind() const override { return "kernel"; }
  std::unique_ptr<StackOptions> parseOptions(TomlTable& table) const override;
  Result<std::unique_ptr<Stack>> create(std::string name,
                                        const StackOptions& options) const override;
};

}  // namespace dmm::stacks::kernel
