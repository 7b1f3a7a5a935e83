#pragma once
// Test servers that run inside a namespace on threads of the test process.

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "testbed/testbed.h"

namespace dmm::testbed {

// Accepts connections and runs `handler` for each on its own thread, until destroyed.
class ThreadServer {
 public:
  using Handler = std::function<void(UniqueFd conn)>;
  ThreadServer(const Netns& ns, const SocketAddress& at, Handler handler);
  ~ThreadServer();
  // Stops accepting and waits for every handler to return. Idempotent.
  void stop();
  ThreadServer(const ThreadServer&) = delete;
  ThreadServer& operator=(const ThreadServer&) = delete;
  int accepted() const { return accepted_.load(); }

 private:
  UniqueFd listen_;
  Handler handler_;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::mutex mutex_;
  std::vector<std::thread> handlers_;
  std::thread acceptor_;
};

// An echo server on one epoll thread, for many concurrent connections: echoes every byte and
// half-closes after the client does, once everything is echoed.
class EchoServer {
 public:
  EchoServer(const Netns& ns, const SocketAddress& at);
  ~EchoServer();
  EchoServer(const EchoServer&) = delete;
  EchoServer& operator=(const EchoServer&) = delete;
  int accepted() const { return accepted_.load(); }

 private:
  void loop();
  UniqueFd listen_;
  UniqueFd wake_;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::thread thread_;
};

}  // namespace dmm::testbed
