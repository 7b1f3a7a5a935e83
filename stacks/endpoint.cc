#include "stacks/endpoint.h"

#include <netinet/in.h>

#include <cstring>

namespace dmm::stacks {

namespace {
constexpr std::uint8_t kEndpointVersion = 1;
}

std::vector<std::uint8_t> encodeEndpoint(const Endpoint& e) {
  const std::size_t n = e.address.size();
  std::vector<std::uint8_t> out(4 + n);
  out[0] = kEndpointVersion;
  out[1] = e.address.isV4() ? 4 : 6;
  std::memcpy(out.data() + 2, e.address.bytes(), n);
  out[2 + n] = static_cast<std::uint8_t>(e.port >> 8);
  out[3 + n] = static_cast<std::uint8_t>(e.port & 0xff);
  return out;
}

std::optional<Endpoint> decodeEndpoint(std::span<const std::uint8_t> params) {
  if (params.size() < 2 || params[0] != kEndpointVersion) return std::nullopt;
  Endpoint e;
  std::size_t n = 0;
  if (params[1] == 4 && params.size() == 8) {
    in_addr a{};
    std::memcpy(&a.s_addr, params.data() + 2, 4);
    e.address = IpAddress::v4(a);
    n = 4;
  } else if (params[1] == 6 && params.size() == 20) {
    in6_addr a{};
    std::memcpy(a.s6_addr, params.data() + 2, 16);
    e.address = IpAddress::v6(a);
    n = 16;
  } else {
    return std::nullopt;
  }
  e.port = static_cast<std::uint16_t>(params[2 + n] << 8 | params[3 + n]);
  if (e.port == 0 || e.address.isUnspecified()) return std::nullopt;
  return e;
}

}  // namespace dmm::stacks
