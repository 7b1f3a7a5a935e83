#include "proxy/metrics_server.h"

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <prometheus/text_serializer.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <sstream>

#include "common/log.h"
#include "common/socket_util.h"
#include "proxy/process_metrics.h"
#include "proxy/stack_metrics.h"

namespace dmm::proxy {

MetricsServer::MetricsServer(EventLoop& loop, std::shared_ptr<prometheus::Registry> registry,
                             const std::vector<std::unique_ptr<stacks::Stack>>& stacks)
    : registry_(std::move(registry)),
      stacks_(stacks),
      http_(evhttp_new(loop.base())),
      resume_(loop.newEvent(-1, 0, &MetricsServer::onResume, this)) {
  evhttp_set_allowed_methods(http_, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
  evhttp_set_timeout(http_, 10);
  evhttp_set_gencb(http_, &MetricsServer::onRequest, this);
}

MetricsServer::~MetricsServer() {
  servers().erase(http_);
  if (http_ != nullptr) evhttp_free(http_);
}

std::string MetricsServer::listen(const SocketAddress& address) {
  net::ListenOptions options;
  options.reuse_port = false;
  options.backlog = 128;
  auto fd = net::listenTcp(address, options);
  if (!fd) return std::string(fd.error().reason) + ": " + std::strerror(fd.error().code);
  // evhttp owns the socket from here.
  evhttp_bound_socket* bound = evhttp_accept_socket_with_handle(http_, fd->get());
  if (bound == nullptr) return "evhttp_accept_socket";
  fd->release();
  listener_ = evhttp_bound_socket_get_listener(bound);
  evconnlistener_set_error_cb(listener_, &MetricsServer::onAcceptError);
  servers()[http_] = this;
  return {};
}

std::map<evhttp*, MetricsServer*>& MetricsServer::servers() {
  static std::map<evhttp*, MetricsServer*> all;  // main loop thread only
  return all;
}

void MetricsServer::onAcceptError(evconnlistener* listener, void* http) {
  // The listener's user pointer is evhttp's own (the evhttp), which leads back to the server.
  int err = EVUTIL_SOCKET_ERROR();
  if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) return;
  evconnlistener_disable(listener);
  if (auto it = servers().find(static_cast<evhttp*>(http)); it != servers().end()) {
    static constexpr timeval kPause{0, 100'000};
    event_add(it->second->resume_.get(), &kPause);
  }
  static log::RateLimiter limiter;
  log::limited(limiter, spdlog::level::warn,
               "metrics endpoint: accept failed: {}; pausing it for 100ms", std::strerror(err));
}

void MetricsServer::onResume(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<MetricsServer*>(arg);
  if (self->listener_ != nullptr) evconnlistener_enable(self->listener_);
}

void MetricsServer::onRequest(evhttp_request* request, void* arg) {
  auto* self = static_cast<MetricsServer*>(arg);
  const char* uri = evhttp_request_get_uri(request);
  std::string_view path = uri != nullptr ? uri : "";
  path = path.substr(0, path.find('?'));
  evbuffer* body = evbuffer_new();
  if (path != "/metrics") {
    evbuffer_add_printf(body, "not found: metrics are at /metrics\n");
    evhttp_send_reply(request, HTTP_NOTFOUND, "Not Found", body);
    evbuffer_free(body);
    return;
  }
  std::ostringstream text;
  auto families = self->registry_->Collect();
  auto process = collectProcessMetrics();
  families.insert(families.end(), process.begin(), process.end());
  auto stack = collectStackMetrics(self->stacks_);
  families.insert(families.end(), stack.begin(), stack.end());
  prometheus::TextSerializer().Serialize(text, families);
  std::string page = text.str();
  evbuffer_add(body, page.data(), page.size());
  evhttp_add_header(evhttp_request_get_output_headers(request), "Content-Type",
                    "text/plain; version=0.0.4; charset=utf-8");
  evhttp_send_reply(request, HTTP_OK, "OK", body);
  evbuffer_free(body);
}

}  // namespace dmm::proxy
