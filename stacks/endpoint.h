#pragma once
// The offer/REPLY parameters of stacks that take data connections of their own (dpdk, rdma):
// where an instance takes them. Bytes: version 1, family (4 or 6), the address (4 or 16
// bytes), the port (big-endian): 8 bytes for IPv4, 20 for IPv6.

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "common/socket_address.h"

namespace dmm::stacks {

struct Endpoint {
  IpAddress address;
  std::uint16_t port = 0;
};

std::vector<std::uint8_t> encodeEndpoint(const Endpoint& e);
// nullopt unless `params` is exactly one endpoint with a port and a specified address.
std::optional<Endpoint> decodeEndpoint(std::span<const std::uint8_t> params);

}  // namespace dmm::stacks
