#pragma once
// The daemon's side of systemd: readiness and state notifications (sd_notify), listening
// sockets handed over across restarts (the file descriptor store), and the capabilities the
// process holds. Outside systemd (no NOTIFY_SOCKET) every notification is a no-op and nothing
// is inherited, so the daemon runs the same by hand, in tests and under other supervisors.
//
// Restarts keep the listeners' backlog: after binding, the daemon stores a duplicate of every
// listening socket in systemd's fd store (FDSTORE=1, the unit sets FileDescriptorStoreMax=).
// systemd holds them while the old process drains and exits and passes them to the next one
// (LISTEN_FDS), which listens on the very same sockets: connections that arrive in between
// wait in the kernel's accept queue instead of being refused.

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/socket_address.h"
#include "common/unique_fd.h"

namespace dmm::proxy {

class ServiceManager {
 public:
  // Reads (and unsets) the environment systemd passed: NOTIFY_SOCKET stays for sd_notify,
  // LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES are taken. Call once, early, before opening fds.
  ServiceManager();

  // Whether a service manager listens to our notifications.
  bool supervised() const { return supervised_; }

  // Listening TCP sockets passed in by systemd, by address. take() hands out one for
  // `address` (close-on-exec and non-blocking again), or an empty fd when none is left.
  UniqueFd takeListener(const SocketAddress& address);
  std::size_t inheritedCount() const { return inherited_; }
  // Closes what nobody took (the config no longer listens there); returns how many.
  std::size_t closeUntaken();

  // Replaces the stored listeners with `fds` (FDSTOREREMOVE + FDSTORE). No-op when not
  // supervised. Returns an error message, empty on success.
  std::string storeListeners(const std::vector<int>& fds);

  void ready(std::string_view status);
  void reloading();
  void stopping(std::string_view status);
  void status(std::string_view status);

 private:
  void notify(const std::string& message);

  bool supervised_ = false;
  std::size_t inherited_ = 0;
  std::map<SocketAddress, std::vector<UniqueFd>> listeners_;
};

// The effective capabilities this process lacks among `wanted` (CAP_* numbers), by name.
std::vector<std::string> missingCapabilities(const std::vector<int>& wanted);

}  // namespace dmm::proxy
