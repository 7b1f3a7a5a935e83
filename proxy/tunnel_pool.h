#pragma once
// TunnelPool: one worker's idle sidecar-to-sidecar connections, kept after a framed session
// ended cleanly so the next session to the same peer skips the TCP handshake (and, in the
// kernel, a whole connection's setup and teardown). Most recently used first; at most
// tunnel.max_idle per worker; closed after tunnel.idle_timeout, which must stay below the
// peers' tunnel.keepalive so that this side, not the peer, ends an idle connection. A pooled
// connection that becomes readable was closed (or broken) by the peer and is dropped at once.
// Loop thread only.

#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "common/event_loop.h"
#include "common/socket_address.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class TunnelPool {
 public:
  using Clock = std::chrono::steady_clock;

  TunnelPool(EventLoop& loop, std::size_t max_idle) : loop_(loop), max_idle_(max_idle) {}
  ~TunnelPool();
  TunnelPool(const TunnelPool&) = delete;
  TunnelPool& operator=(const TunnelPool&) = delete;

  // The most recently pooled connection to `peer` over stack instance `stack` (tuned for it, and
  // on its path), or nullptr.
  std::unique_ptr<stacks::StackConnection> take(const SocketAddress& peer, std::size_t stack);
  // Keeps `conn` (its callbacks are taken over), or closes it when the pool is full.
  void put(const SocketAddress& peer, std::size_t stack,
           std::unique_ptr<stacks::StackConnection> conn, Clock::time_point now);
  // Closes connections idle for `timeout` or longer.
  void sweep(Clock::time_point now, std::chrono::milliseconds timeout);
  void clear();

 private:
  struct Entry final : Deferrable, stacks::ConnectionCallbacks {
    TunnelPool* pool = nullptr;
    SocketAddress peer;
    std::size_t stack = 0;
    std::unique_ptr<stacks::StackConnection> conn;
    Clock::time_point since;
    void onConnected(stacks::StackConnection&) override {}
    void onConnectFailed(stacks::StackConnection&, Error) override {}
    void onReadable(stacks::StackConnection&) override { pool->drop(this); }
    void onWritable(stacks::StackConnection&) override {}
  };
  // Closes and forgets `e` (deleted once the running callback has returned).
  void drop(Entry* e);

  EventLoop& loop_;
  std::size_t max_idle_;
  std::vector<std::unique_ptr<Entry>> entries_;  // oldest first
};

}  // namespace dmm::proxy
