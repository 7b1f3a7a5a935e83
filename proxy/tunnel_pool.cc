#include "proxy/tunnel_pool.h"

#include <algorithm>

namespace dmm::proxy {

// Outside any callback: entries can go at once (their connections close with a reset).
TunnelPool::~TunnelPool() = default;

std::unique_ptr<stacks::StackConnection> TunnelPool::take(const SocketAddress& peer,
                                                          std::size_t stack) {
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
    if ((*it)->peer != peer || (*it)->stack != stack) continue;
    auto conn = std::move((*it)->conn);
    entries_.erase(std::next(it).base());
    return conn;
  }
  return nullptr;
}

void TunnelPool::put(const SocketAddress& peer, std::size_t stack,
                     std::unique_ptr<stacks::StackConnection> conn, Clock::time_point now) {
  auto e = std::make_unique<Entry>();
  e->pool = this;
  e->peer = peer;
  e->stack = stack;
  e->since = now;
  e->conn = std::move(conn);
  e->conn->setCallbacks(*e);
  if (max_idle_ == 0) {
    // Called from inside the connection's own callback: it must outlive this call.
    e->conn->close(stacks::CloseType::kGraceful);
    loop_.deferDelete(std::move(e));
    return;
  }
  if (entries_.size() >= max_idle_) drop(entries_.front().get());  // least recently used
  entries_.push_back(std::move(e));
}

void TunnelPool::drop(Entry* e) {
  auto it = std::find_if(entries_.begin(), entries_.end(),
                         [e](const std::unique_ptr<Entry>& p) { return p.get() == e; });
  if (it == entries_.end()) return;
  // A clean end: the session on it is over, and the peer reads a FIN as "no more sessions".
  if (e->conn) e->conn->close(stacks::CloseType::kGraceful);
  std::unique_ptr<Deferrable> owned = std::move(*it);
  entries_.erase(it);
  loop_.deferDelete(std::move(owned));
}

void TunnelPool::sweep(Clock::time_point now, std::chrono::milliseconds timeout) {
  while (!entries_.empty() && now - entries_.front()->since >= timeout)
    drop(entries_.front().get());
}

void TunnelPool::clear() {
  while (!entries_.empty())
    drop(entries_.front().get());
}

}  // namespace dmm::proxy
