#pragma once
// The admin socket: a Unix-domain stream socket the daemon serves on its main event loop, for
// `dmm-sidecar ctl ...`. One request and one reply per connection.
//
// Wire format (docs/admin.md):
//
//   client -> server   the arguments, each followed by one NUL byte ("conns\0--json\0"), then
//                      shutdown(SHUT_WR). No arguments is an empty request. At most
//                      kAdminMaxRequest bytes; an argument cannot contain NUL.
//   server -> client   "status <N>\n" then the command's output (any bytes), then close.
//                      N: 0 ok, 1 the command failed, 2 usage error (also: a request too large
//                      or not NUL-terminated). N is in 0..255: the CLI exits with it.
//
// Access control is the socket file's mode (root:root 0660 by default): whoever may connect
// may run every command. There is no authentication on the socket itself.

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/event_loop.h"
#include "common/unique_fd.h"
#include "common/unix_listener.h"

namespace dmm::proxy {

inline constexpr char kAdminSocketPath[] = "/run/dmm-sidecar/admin.sock";
inline constexpr std::size_t kAdminMaxRequest = 64 * 1024;  // bytes, NULs included
inline constexpr int kAdminOk = 0;
inline constexpr int kAdminFailed = 1;
inline constexpr int kAdminUsage = 2;

class AdminServer {
 public:
  // Runs one command: args as the client sent them (possibly none), output appended to out;
  // returns the status (kAdminOk, kAdminFailed, kAdminUsage; outside 0..255 becomes
  // kAdminFailed). Called on the loop thread, once per complete request. An exception it throws
  // becomes status 1 with "internal error: ...". It must not destroy the AdminServer.
  using Handler = std::function<int(const std::vector<std::string>& args, std::string& out)>;

  static constexpr std::size_t kMaxClients = 16;  // more are closed as soon as accepted
  static constexpr auto kDefaultClientTimeout = std::chrono::milliseconds(5000);

  // client_timeout: a client must have sent its whole request this long after it connected;
  // while its reply is written, it must take some of it at least once per this long. Otherwise
  // it is closed.
  AdminServer(EventLoop& loop, Handler handler,
              std::chrono::milliseconds client_timeout = kDefaultClientTimeout);
  // Closes the listener and every client, and removes the socket file if it is still the one
  // listen() made. Loop thread, or after the loop stopped.
  ~AdminServer();
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  // Creates the parent directory if missing (0755), replaces a stale socket file (a socket
  // nobody accepts on), binds, sets the file's mode, listens and starts accepting on the loop.
  // Refuses a path that is not a socket, or one another server listens on ("already in use").
  // Returns an empty string or why it failed. Once; loop thread or before the loop runs.
  std::string listen(const std::string& path, mode_t mode = 0660);

  std::size_t clientCount() const { return clients_.size(); }  // loop thread

 private:
  class Client;

  static void onAccept(evutil_socket_t fd, short what, void* arg);
  static void onAcceptRetry(evutil_socket_t fd, short what, void* arg);
  void finished(Client& client);  // removes it; it is destroyed later, on the loop

  EventLoop& loop_;
  Handler handler_;
  std::chrono::milliseconds client_timeout_;
  std::string path_;
  net::UnixListener listener_;
  EventPtr accept_event_;
  EventPtr accept_retry_;  // re-enables accepting after EMFILE/ENFILE
  std::vector<std::unique_ptr<Client>> clients_;
};

// The blocking client `dmm-sidecar ctl` uses: connects to path, sends args, reads the whole
// reply within timeout. Returns the reply's status with the output in out, or -1 with error
// set for a transport or protocol failure (no server, permission denied, timeout, a reply
// without a status line). Any thread; no event loop.
int adminRequest(const std::string& path, const std::vector<std::string>& args, std::string& out,
                 std::string& error,
                 std::chrono::milliseconds timeout = std::chrono::milliseconds(30000));

}  // namespace dmm::proxy
