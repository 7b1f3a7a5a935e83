#pragma once
// The rdma kind: a session's data over an RDMA reliable-connected queue pair between the two
// sidecars' instances, set up with librdmacm and moved with libibverbs (README.md here). An
// instance is one local address on an RDMA device (a RoCE interface's IP). Sessions flow on a
// data connection of the instance's own (kOwnDataPath); the handshake runs on a kernel control
// connection beside it. No thread polls: the completion and rdma_cm channels are file
// descriptors on the workers' event loops.

#include <cstdint>
#include <memory>
#include <string>

#include "common/socket_address.h"
#include "stacks/endpoint.h"
#include "stacks/stack.h"

namespace dmm::stacks::rdma {

struct RdmaOptions : StackOptions {
  IpAddress address;          // a local address on the RDMA device (its RoCE netdev's IP)
  std::uint16_t port = 7401;  // the rdma_cm port where peers open data connections
  std::uint32_t ring_size = 512 * 1024;     // bytes per direction per connection (power of two)
  std::uint32_t max_connections = 1024;     // data connections at once
  std::uint16_t receive_depth = 128;        // receives posted per queue pair (message credits)
  std::uint16_t send_depth = 128;           // send queue entries per queue pair
  std::uint32_t inline_size = 256;          // largest write sent inline (the device may cap it)
  std::uint32_t resolve_timeout_ms = 2000;  // rdma_cm address and route resolution
  std::uint32_t linger_ms = 30000;  // a gracefully closed connection's unsent bytes wait this long
};

class Instance;

class RdmaStack final : public Stack {
 public:
  RdmaStack(std::string name, const RdmaOptions& options);
  ~RdmaStack() override;

  // Opens the device behind `address`, its protection domain and the listener. A failure
  // leaves the instance down (healthy() false, status() says why); the sidecar still serves.
  void start();

  const std::string& name() const override { return name_; }
  std::string_view kind() const override { return "rdma"; }
  std::uint32_t capabilities() const override { return kHalfClose | kOwnDataPath | kIpv6; }
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

 private:
  std::string name_;
  RdmaOptions options_;
  std::unique_ptr<Instance> instance_;
  std::string failure_;  // why start() failed
};

class RdmaStackFactory final : public StackFactory {
 public:
  std::string_view kind() const override { return "rdma"; }
  std::unique_ptr<StackOptions> parseOptions(TomlTable& table) const override;
  Result<std::unique_ptr<Stack>> create(std::string name,
                                        const StackOptions& options) const override;
};

}  // namespace dmm::stacks::rdma
