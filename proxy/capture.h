#pragma once
// Capture: connections of local applications that iptables (nat OUTPUT REDIRECT) sent to the
// sidecar's capture listener, and the rules that do it.
//
// The rules live in a chain of their own (capture.chain, default DMM_SIDECAR) in the nat table
// of iptables and ip6tables, jumped to from OUTPUT for TCP. In order, the chain returns (skips
// capture) for: packets carrying the sidecar's SO_MARK (its own connections), local
// destinations (loopback and this host's addresses), excluded CIDRs and ports; then it redirects
// TCP to the included CIDRs (default: all) to the capture port. Installing flushes and refills
// the chain atomically (iptables-restore --noflush) and adds the OUTPUT jump once, so it is
// idempotent; removing deletes every jump and the chain, for IPv4 and IPv6 whatever the config
// says now, and succeeds if they are already gone. Installing refuses while capture is disabled.

#include <optional>
#include <string>
#include <vector>

#include "common/socket_address.h"
#include "proxy/config.h"

namespace dmm::proxy {

// The destination the application asked for before REDIRECT rewrote it (SO_ORIGINAL_DST /
// IP6T_SO_ORIGINAL_DST). nullopt when the connection has no NAT record.
std::optional<SocketAddress> originalDestination(int fd, int family);

// The iptables-restore input that fills the chain for one family (AF_INET or AF_INET6).
std::string captureRuleset(const Config& config, int family);

// Installs or removes the rules for IPv4 (and IPv6 unless capture.ipv6 = false). Returns an
// empty string on success, else what went wrong (the failing command and its output).
std::string installCaptureRules(const Config& config);
std::string removeCaptureRules(const Config& config);

}  // namespace dmm::proxy
