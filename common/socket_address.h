#pragma once
// Addresses: an IPv4/IPv6 socket address, an IP prefix (CIDR) and a port range, with parsing
// from the text forms used in config files ("10.0.0.1:80", "[fd00::1]:80", "10.0.0.0/8",
// "8000-8080") and formatting for logs.

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <compare>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dmm {

// An IP address without a port, 16 bytes wide; IPv4 is stored in the first 4 bytes.
class IpAddress {
 public:
  IpAddress() = default;
  static IpAddress v4(const in_addr& a);
  static IpAddress v6(const in6_addr& a);
  static std::optional<IpAddress> parse(std::string_view text);  // "10.0.0.1" or "fd00::1"

  int family() const { return family_; }  // AF_INET, AF_INET6, or AF_UNSPEC when empty
  bool isV4() const { return family_ == AF_INET; }
  bool isV6() const { return family_ == AF_INET6; }
  const std::uint8_t* bytes() const { return bytes_.data(); }
  std::size_t size() const { return family_ == AF_INET ? 4 : family_ == AF_INET6 ? 16 : 0; }
  bool isLoopback() const;
  bool isUnspecified() const;  // 0.0.0.0 or ::
  std::string toString() const;

  friend bool operator==(const IpAddress&, const IpAddress&) = default;
  friend auto operator<=>(const IpAddress&, const IpAddress&) = default;

 private:
  int family_ = AF_UNSPEC;
  std::array<std::uint8_t, 16> bytes_{};
};

// An IPv4 or IPv6 address with a port, convertible to and from struct sockaddr.
class SocketAddress {
 public:
  SocketAddress() = default;
  SocketAddress(const IpAddress& ip, std::uint16_t port);
  // From a kernel-filled sockaddr; returns nullopt for families other than AF_INET/AF_INET6.
  static std::optional<SocketAddress> fromSockaddr(const sockaddr* sa, socklen_t len);
  // "1.2.3.4:80" or "[::1]:80". Port 0 is allowed only when allow_zero_port.
  static std::optional<SocketAddress> parse(std::string_view text, bool allow_zero_port = false);

  const IpAddress& ip() const { return ip_; }
  std::uint16_t port() const { return port_; }
  int family() const { return ip_.family(); }
  bool valid() const { return ip_.family() != AF_UNSPEC; }

  // Fills storage; returns the length to pass to bind()/connect().
  socklen_t toSockaddr(sockaddr_storage& storage) const;
  std::string toString() const;  // "1.2.3.4:80" / "[::1]:80"

  friend bool operator==(const SocketAddress&, const SocketAddress&) = default;
  friend auto operator<=>(const SocketAddress&, const SocketAddress&) = default;

 private:
  IpAddress ip_;
  std::uint16_t port_ = 0;
};

// An IP prefix such as 10.0.0.0/8 or fd00::/8. A bare address means a host prefix (/32, /128).
class Cidr {
 public:
  static std::optional<Cidr> parse(std::string_view text);
  bool contains(const IpAddress& ip) const;
  const IpAddress& network() const { return network_; }
  int prefixLength() const { return prefix_; }
  int family() const { return network_.family(); }
  std::string toString() const;

 private:
  IpAddress network_;  // host bits cleared
  int prefix_ = 0;
};

// An inclusive port range: "80" or "8000-8080".
struct PortRange {
  std::uint16_t first = 0;
  std::uint16_t last = 65535;
  static std::optional<PortRange> parse(std::string_view text);
  bool contains(std::uint16_t port) const { return port >= first && port <= last; }
  std::string toString() const;
};

}  // namespace dmm
