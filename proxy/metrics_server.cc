#include "proxy/metrics_server.h"

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <prometheus/text_serializer.h>

#include <cstring>
#include <sstream>

#include "common/socket_util.h"
#include "proxy/process_metrics.h"
#include "proxy/stack_metrics.h"

namespace dmm::proxy {

MetricsServer::MetricsServer(EventLoop& loop, std::shared_ptr<prometheus::Registry> registry,
                             const std::vector<std::unique_ptr<stacks::Stack>>& stacks)
    : registry_(std::move(registry)), stacks_(stacks), http_(evhttp_new(loop.base())) {
  evhttp_set_allowed_methods(http_, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
  evhttp_set_timeout(http_, 10);
  evhttp_set_gencb(http_, &MetricsServer::onRequest, this);
}

MetricsServer::~MetricsServer() {
  if (http_ != nullptr) evhttp_free(http_);
}

std::string MetricsServer::listen(const SocketAddress& address) {
  net::ListenOptions options;
  options.reuse_port = false;
  options.backlog = 128;
  auto fd = net::listenTcp(address, options);
  if (!fd) return std::string(fd.error().reason) + ": " + std::strerror(fd.error().code);
  // evhttp owns the socket from here.
  if (evhttp_accept_socket_with_handle(http_, fd->get()) == nullptr) return "evhttp_accept_socket";
  fd->release();
  return {};
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
