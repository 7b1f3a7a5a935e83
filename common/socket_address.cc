#include "common/socket_address.h"

#include <arpa/inet.h>

#include <charconv>
#include <cstring>

namespace dmm {

namespace {

std::optional<unsigned> parseUnsigned(std::string_view text, unsigned max) {
  unsigned value = 0;
  if (text.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size() || value > max) return std::nullopt;
  return value;
}

}  // namespace

IpAddress IpAddress::v4(const in_addr& a) {
  IpAddress ip;
  ip.family_ = AF_INET;
  std::memcpy(ip.bytes_.data(), &a, 4);
  return ip;
}

IpAddress IpAddress::v6(const in6_addr& a) {
  IpAddress ip;
  ip.family_ = AF_INET6;
  std::memcpy(ip.bytes_.data(), &a, 16);
  return ip;
}

std::optional<IpAddress> IpAddress::parse(std::string_view text) {
  if (text.size() >= INET6_ADDRSTRLEN) return std::nullopt;
  char buf[INET6_ADDRSTRLEN] = {};
  std::memcpy(buf, text.data(), text.size());
  in_addr a4{};
  if (inet_pton(AF_INET, buf, &a4) == 1) return v4(a4);
  in6_addr a6{};
  if (inet_pton(AF_INET6, buf, &a6) == 1) return v6(a6);
  return std::nullopt;
}

bool IpAddress::isLoopback() const {
  if (isV4()) return bytes_[0] == 127;
  if (isV6()) {
    static const in6_addr kLoop = IN6ADDR_LOOPBACK_INIT;
    return std::memcmp(bytes_.data(), &kLoop, 16) == 0;
  }
  return false;
}

bool IpAddress::isUnspecified() const {
  for (std::size_t i = 0; i < size(); ++i) {
    if (bytes_[i] != 0) return false;
  }
  return family_ != AF_UNSPEC;
}

std::string IpAddress::toString() const {
  char buf[INET6_ADDRSTRLEN] = {};
  if (family_ == AF_UNSPEC) return "-";
  inet_ntop(family_, bytes_.data(), buf, sizeof buf);
  return buf;
}

SocketAddress::SocketAddress(const IpAddress& ip, std::uint16_t port) : ip_(ip), port_(port) {}

std::optional<SocketAddress> SocketAddress::fromSockaddr(const sockaddr* sa, socklen_t len) {
  if (sa == nullptr) return std::nullopt;
  if (sa->sa_family == AF_INET && len >= static_cast<socklen_t>(sizeof(sockaddr_in))) {
    sockaddr_in sin{};
    std::memcpy(&sin, sa, sizeof sin);
    return SocketAddress(IpAddress::v4(sin.sin_addr), ntohs(sin.sin_port));
  }
  if (sa->sa_family == AF_INET6 && len >= static_cast<socklen_t>(sizeof(sockaddr_in6))) {
    sockaddr_in6 sin6{};
    std::memcpy(&sin6, sa, sizeof sin6);
    return SocketAddress(IpAddress::v6(sin6.sin6_addr), ntohs(sin6.sin6_port));
  }
  return std::nullopt;
}

std::optional<SocketAddress> SocketAddress::parse(std::string_view text, bool allow_zero_port) {
  std::string_view host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return std::nullopt;
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
    auto ip = IpAddress::parse(host);
    if (!ip || !ip->isV6()) return std::nullopt;
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return std::nullopt;
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return std::nullopt;  // v6 needs brackets
  }
  auto ip = IpAddress::parse(host);
  auto p = parseUnsigned(port, 65535);
  if (!ip || !p || (*p == 0 && !allow_zero_port)) return std::nullopt;
  return SocketAddress(*ip, static_cast<std::uint16_t>(*p));
}

socklen_t SocketAddress::toSockaddr(sockaddr_storage& storage) const {
  std::memset(&storage, 0, sizeof storage);
  if (ip_.isV4()) {
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port_);
    std::memcpy(&sin.sin_addr, ip_.bytes(), 4);
    std::memcpy(&storage, &sin, sizeof sin);
    return sizeof sin;
  }
  sockaddr_in6 sin6{};
  sin6.sin6_family = AF_INET6;
  sin6.sin6_port = htons(port_);
  std::memcpy(&sin6.sin6_addr, ip_.bytes(), 16);
  std::memcpy(&storage, &sin6, sizeof sin6);
  return sizeof sin6;
}

std::string SocketAddress::toString() const {
  if (ip_.isV6()) return "[" + ip_.toString() + "]:" + std::to_string(port_);
  return ip_.toString() + ":" + std::to_string(port_);
}

std::optional<Cidr> Cidr::parse(std::string_view text) {
  auto slash = text.find('/');
  auto ip = IpAddress::parse(text.substr(0, slash));
  if (!ip) return std::nullopt;
  unsigned max_len = ip->isV4() ? 32 : 128;
  unsigned len = max_len;
  if (slash != std::string_view::npos) {
    auto parsed = parseUnsigned(text.substr(slash + 1), max_len);
    if (!parsed) return std::nullopt;
    len = *parsed;
  }
  Cidr cidr;
  cidr.prefix_ = static_cast<int>(len);
  // Clear host bits so that "10.1.2.3/8" means 10.0.0.0/8.
  std::array<std::uint8_t, 16> bytes{};
  std::memcpy(bytes.data(), ip->bytes(), ip->size());
  for (unsigned bit = len; bit < max_len; ++bit) {
    bytes[bit / 8] = static_cast<std::uint8_t>(bytes[bit / 8] & ~(0x80u >> (bit % 8)));
  }
  if (ip->isV4()) {
    in_addr a{};
    std::memcpy(&a, bytes.data(), 4);
    cidr.network_ = IpAddress::v4(a);
  } else {
    in6_addr a{};
    std::memcpy(&a, bytes.data(), 16);
    cidr.network_ = IpAddress::v6(a);
  }
  return cidr;
}

bool Cidr::contains(const IpAddress& ip) const {
  if (ip.family() != network_.family()) return false;
  const auto* a = ip.bytes();
  const auto* n = network_.bytes();
  int full = prefix_ / 8;
  if (std::memcmp(a, n, static_cast<std::size_t>(full)) != 0) return false;
  int rest = prefix_ % 8;
  if (rest == 0) return true;
  auto mask = static_cast<std::uint8_t>(0xFFu << (8 - rest));
  return (a[full] & mask) == (n[full] & mask);
}

std::string Cidr::toString() const {
  return network_.toString() + "/" + std::to_string(prefix_);
}

std::optional<PortRange> PortRange::parse(std::string_view text) {
  auto dash = text.find('-');
  auto first = parseUnsigned(text.substr(0, dash), 65535);
  if (!first) return std::nullopt;
  auto last = first;
  if (dash != std::string_view::npos) last = parseUnsigned(text.substr(dash + 1), 65535);
  if (!last || *last < *first || *first == 0) return std::nullopt;
  return PortRange{static_cast<std::uint16_t>(*first), static_cast<std::uint16_t>(*last)};
}

std::string PortRange::toString() const {
  if (first == last) return std::to_string(first);
  return std::to_string(first) + "-" + std::to_string(last);
}

}  // namespace dmm
