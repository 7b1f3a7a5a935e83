#pragma once
// PreloadSession: a connection an application's LD_PRELOAD shim handed to the sidecar over the
// preload Unix socket. It reads the shim's preamble (preload/preamble.h: the original
// destination and a QoS hint) within timeouts.handshake, learns who the application is from
// the kernel (SO_PEERCRED: pid and uid; /proc/<pid>/comm: the process name), and hands the
// connection to an OutboundSession, which carries it like an iptables-captured one.
//
// The preamble is read with MSG_PEEK and then consumed exactly, so the application's first
// bytes stay in the socket for the relay.

#include "common/event_loop.h"
#include "common/unique_fd.h"
#include "proxy/worker.h"

namespace dmm::proxy {

class PreloadSession final : public Session {
 public:
  // Takes a connection accepted on the preload socket (worker thread).
  static void start(Worker& worker, UniqueFd client);
  ~PreloadSession() override;

  void shutdown() override;

 private:
  PreloadSession(Worker& worker, UniqueFd client);
  static void onEvent(evutil_socket_t fd, short what, void* arg);
  void readPreamble();
  void onTimeout() override;
  // Closes the connection: `why` (a bad preamble) is counted and logged at debug.
  void refuse(const std::string& why);

  UniqueFd client_;
  EventPtr event_;
};

}  // namespace dmm::proxy
