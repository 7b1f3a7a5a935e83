#include "proxy/capture.h"

#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <sstream>

#include "common/command.h"

namespace dmm::proxy {

namespace {

// <linux/netfilter_ipv6/ip6_tables.h> clashes with glibc's headers; the value is ABI.
constexpr int kIp6tSoOriginalDst = 80;

std::string describe(const std::vector<std::string>& argv, const CommandResult& r) {
  std::string cmd;
  for (const auto& a : argv)
    cmd += (cmd.empty() ? "" : " ") + a;
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n')
    out.pop_back();
  return "`" + cmd + "` failed (exit " + std::to_string(r.status) + "): " + out;
}

const SocketAddress* captureAddress(const Config& c, int family) {
  for (const auto& a : c.capture_listen) {
    if (a.family() == family) return &a;
  }
  return nullptr;
}

std::vector<int> families(const Config& c) {
  std::vector<int> out{AF_INET};
  if (c.capture_ipv6) out.push_back(AF_INET6);
  return out;
}

std::string tool(int family, bool restore) {
  std::string base = family == AF_INET ? "iptables" : "ip6tables";
  return restore ? base + "-restore" : base;
}

}  // namespace

std::optional<SocketAddress> originalDestination(int fd, int family) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  int rc = family == AF_INET6 ? ::getsockopt(fd, SOL_IPV6, kIp6tSoOriginalDst, &ss, &len)
                              : ::getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &ss, &len);
  if (rc != 0) return std::nullopt;
  return SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

std::string captureRuleset(const Config& c, int family) {
  const SocketAddress* listen = captureAddress(c, family);
  std::ostringstream r;
  const std::string chain = c.capture_chain;
  r << "*nat\n";
  r << ":" << chain << " - [0:0]\n";  // declares, and with --noflush empties, the chain
  r << "-A " << chain << " -m mark --mark 0x" << std::hex << c.mark << std::dec << " -j RETURN\n";
  r << "-A " << chain << " -m addrtype --dst-type LOCAL -j RETURN\n";
  for (const auto& cidr : c.capture_exclude) {
    if (cidr.family() == family) r << "-A " << chain << " -d " << cidr.toString() << " -j RETURN\n";
  }
  for (const auto& ports : c.capture_exclude_ports) {
    r << "-A " << chain << " -p tcp --dport " << ports.first;
    if (ports.last != ports.first) r << ":" << ports.last;
    r << " -j RETURN\n";
  }
  if (listen != nullptr) {
    for (const auto& cidr : c.capture_include) {
      if (cidr.family() != family) continue;
      r << "-A " << chain << " -p tcp -d " << cidr.toString() << " -j REDIRECT --to-ports "
        << listen->port() << "\n";
    }
    if (c.capture_include.empty()) {
      r << "-A " << chain << " -p tcp -j REDIRECT --to-ports " << listen->port() << "\n";
    }
  }
  r << "COMMIT\n";
  return r.str();
}

std::string installCaptureRules(const Config& c) {
  if (!c.capture_enabled) {
    // Rules pointing at a listener that will not be opened would black-hole every outgoing
    // TCP connection of this host.
    return "capture is disabled in the config ([capture] enabled = false); no rules installed";
  }
  for (int family : families(c)) {
    if (captureAddress(c, family) == nullptr) {
      return std::string("capture.listen has no ") + (family == AF_INET ? "IPv4" : "IPv6") +
             " address to redirect to (set capture.ipv6 = false to capture IPv4 only)";
    }
    std::vector<std::string> restore{tool(family, true), "-w", "--noflush"};
    auto r = runCommand(restore, captureRuleset(c, family));
    if (r.status != 0) return describe(restore, r);
    std::vector<std::string> check{
        tool(family, false), "-w", "-t", "nat", "-C", "OUTPUT", "-p", "tcp", "-j", c.capture_chain};
    if (runCommand(check).status != 0) {
      std::vector<std::string> add{
          tool(family, false), "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j",
          c.capture_chain};
      auto a = runCommand(add);
      if (a.status != 0) return describe(add, a);
    }
  }
  return {};
}

std::string removeCaptureRules(const Config& c) {
  // Both families whatever the config says now: capture.ipv6 may have been turned off since
  // the rules went in. A family the config does not capture is cleaned up best-effort, so a
  // host without ip6tables can still remove its IPv4 rules.
  for (int family : {AF_INET, AF_INET6}) {
    const bool required = family == AF_INET || c.capture_ipv6;
    std::vector<std::string> del{
        tool(family, false), "-w", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", c.capture_chain};
    // Every copy of the jump (a hand-made or older install may have added several); the bound
    // only guards against a tool that keeps succeeding.
    for (int i = 0; i < 1024 && runCommand(del).status == 0; ++i) {
    }
    std::vector<std::string> exists{tool(family, false), "-w", "-t", "nat", "-S", c.capture_chain};
    if (runCommand(exists).status != 0) continue;  // already gone (or no such tool)
    for (const char* op : {"-F", "-X"}) {
      std::vector<std::string> cmd{tool(family, false), "-w", "-t", "nat", op, c.capture_chain};
      auto r = runCommand(cmd);
      if (r.status != 0 && required) return describe(cmd, r);
    }
  }
  return {};
}

}  // namespace dmm::proxy
