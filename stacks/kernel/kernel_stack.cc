#include "stacks/kernel/kernel_stack.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "common/socket_util.h"
#include "stacks/kernel/kernel_connection.h"

namespace dmm::stacks::kernel {

namespace {

bool congestionAvailable(const std::string& name) {
  std::ifstream in("/proc/sys/net/ipv4/tcp_available_congestion_control");
  if (!in) return true;  // cannot tell; the setsockopt will say
  std::string word;
  while (in >> word) {
    if (word == name) return true;
  }
  return false;
}

}  // namespace

KernelStack::KernelStack(std::string name, KernelOptions options)
    : name_(std::move(name)), options_(std::move(options)) {}

Status KernelStack::tune(int fd) const {
  if (auto s = net::setNoDelay(fd, options_.nodelay); !s) return s;
  if (!options_.congestion.empty()) {
    if (::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, options_.congestion.data(),
                     static_cast<socklen_t>(options_.congestion.size())) != 0) {
      return Error{errno, "tcp_congestion"};
    }
  }
  if (options_.send_buffer > 0) {
    int v = static_cast<int>(options_.send_buffer);
    if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) != 0)
      return Error{errno, "so_sndbuf"};
  }
  if (options_.receive_buffer > 0) {
    int v = static_cast<int>(options_.receive_buffer);
    if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v) != 0)
      return Error{errno, "so_rcvbuf"};
  }
  return {};
}

Result<std::unique_ptr<StackConnection>> KernelStack::connect(EventLoop& loop,
                                                              const ConnectOptions& options,
                                                              ConnectionCallbacks& callbacks) {
  auto fd = net::connectTcp(options.remote, options.mark, options_.source,
                            [this](int s) { return tune(s); });
  if (!fd) return fd.error();
  return std::unique_ptr<StackConnection>(
      std::make_unique<KernelConnection>(loop, std::move(*fd), callbacks, true));
}

Result<std::unique_ptr<StackConnection>> connectControl(EventLoop& loop,
                                                        const ConnectOptions& options,
                                                        ConnectionCallbacks& callbacks) {
  auto fd = net::connectTcp(options.remote, options.mark);
  if (!fd) return fd.error();
  (void)net::setNoDelay(fd->get(), true);
  return std::unique_ptr<StackConnection>(
      std::make_unique<KernelConnection>(loop, std::move(*fd), callbacks, true));
}

Result<std::unique_ptr<StackConnection>> KernelStack::adopt(
    std::unique_ptr<StackConnection> control) {
  if (control->fd() < 0) return Error{EINVAL, "not_a_kernel_connection"};
  if (auto s = tune(control->fd()); !s) return s.error();
  return control;
}

std::unique_ptr<StackOptions> KernelStackFactory::parseOptions(TomlTable& table) const {
  auto options = std::make_unique<KernelOptions>();
  const auto errors_before = table.diagnostics().errorCount();
  if (auto v = table.getBool("nodelay")) options->nodelay = *v;
  if (auto v = table.getString("congestion")) {
    if (v->empty() || v->size() >= 16) {
      table.error("congestion", "must name a congestion control algorithm, e.g. \"cubic\"");
    } else if (!congestionAvailable(*v)) {
      table.warning("congestion", "\"" + *v +
                                      "\" is not in tcp_available_congestion_control on this "
                                      "host; connections will fail to apply it");
    }
    options->congestion = *v;
  }
  constexpr std::int64_t kMaxBuffer = 1LL << 30;
  if (auto v = table.getInt("send_buffer", 0, kMaxBuffer)) options->send_buffer = *v;
  if (auto v = table.getInt("receive_buffer", 0, kMaxBuffer)) options->receive_buffer = *v;
  if (auto v = table.getString("source")) {
    if (auto ip = IpAddress::parse(*v)) {
      options->source = *ip;
    } else {
      table.error("source", "\"" + *v + "\" is not an IP address such as \"10.0.0.2\"");
    }
  }
  if (table.diagnostics().errorCount() != errors_before) return nullptr;
  return options;
}

Result<std::unique_ptr<Stack>> KernelStackFactory::create(std::string name,
                                                          const StackOptions& options) const {
  const auto& kernel_options = dynamic_cast<const KernelOptions&>(options);
  return std::unique_ptr<Stack>(std::make_unique<KernelStack>(std::move(name), kernel_options));
}

}  // namespace dmm::stacks::kernel
