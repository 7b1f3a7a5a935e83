#pragma once
// MetricsServer: serves GET /metrics (Prometheus text format 0.0.4) from a registry, on the
// main thread's event loop with libevent's evhttp.
//
// Why not prometheus-cpp's Exposer: it runs civetweb, whose master thread polls with a fixed
// 2-second quantum, so every stop (and so every restart) of the daemon took two seconds
// (measured with Debian's prometheus-cpp 1.0.1: destroying an idle Exposer took 1.91 s in each
// of three runs), and it adds three threads. evhttp is part of the event library we already
// use; prometheus-cpp still keeps the registry and writes the text format.

#include <event2/http.h>
#include <event2/listener.h>
#include <prometheus/registry.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/event_loop.h"
#include "common/socket_address.h"
#include "common/unique_fd.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class MetricsServer {
 public:
  // `stacks`: the instances whose own metrics are added at each scrape (they outlive this).
  MetricsServer(EventLoop& loop, std::shared_ptr<prometheus::Registry> registry,
                const std::vector<std::unique_ptr<stacks::Stack>>& stacks);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds and starts serving; returns an empty string or why it failed.
  std::string listen(const SocketAddress& address);

 private:
  static void onRequest(evhttp_request* request, void* arg);
  // evhttp's listener on an accept() error: out of descriptors, pause it for 100 ms (libevent
  // would otherwise retry at once, spinning a core, since the connection stays in the backlog).
  static void onAcceptError(evconnlistener* listener, void* arg);
  static void onResume(evutil_socket_t, short, void* arg);
  static std::map<evhttp*, MetricsServer*>& servers();

  std::shared_ptr<prometheus::Registry> registry_;
  const std::vector<std::unique_ptr<stacks::Stack>>& stacks_;
  evhttp* http_ = nullptr;
  evconnlistener* listener_ = nullptr;  // owned by http_
  EventPtr resume_;
};

}  // namespace dmm::proxy
