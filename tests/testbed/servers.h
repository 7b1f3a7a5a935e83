#pragma once
// Test servers that run inside a namespace on threads of the test process.

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "testbed/testbed.h"

namespace dmm::testbed {

// "10.0.0.1", 80 -> 10.0.0.1:80.
SocketAddress at(const char* ip, std::uint16_t port);

// A ThreadServer handler: reads to the client's end of stream, then writes it all back.
void echoHandler(UniqueFd conn);

// A client-first half-close, the server's side: reads to the client's end of stream, then
// answers "got N bytes\n" and 3 MiB (more than any one buffer or ring on the way).
void answerAfterEof(int fd);
// The client's side: 100,000 bytes, a half-close, and the whole answer back before the end of
// stream, without an error.
::testing::AssertionResult halfCloseThenFullAnswer(int fd);

// A request/response echo from `from` to `to` (send, half-close, read to EOF); returns what
// came back, or "<connect failed>" / "<write failed>".
std::string echoOnce(const Netns& from, const SocketAddress& to, const std::string& payload);

// One connection from `from` to a server this starts at `to` inside `server_ns`: `bytes` of
// a seeded stream up, the client's half-close, then `bytes` back; both directions checked
// byte-exact (length and SHA-256) and the end of stream clean. The client connects to `via`
// when given (a [[forward]] listener) instead of `to`.
::testing::AssertionResult transferBothWays(const Netns& from, const Netns& server_ns,
                                            const SocketAddress& to, std::uint64_t bytes,
                                            std::chrono::milliseconds connect_timeout = 30s,
                                            std::optional<SocketAddress> via = std::nullopt);

// `conns` connections from `from` to an echo server at `to`, all open at once before any
// sends: each then sends `each` bytes of its own pattern, half-closes, and must get exactly
// them back. Fails with how many did.
::testing::AssertionResult echoManyAtOnce(const Netns& from, const SocketAddress& to, int conns,
                                          std::size_t each,
                                          std::chrono::milliseconds connect_timeout = 30s);

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

// A ThreadServer handler for HTTP/1.x: answers every request with `body` (followed by " " and
// the request's path when `append_path`), "Connection: close", then waits for the client's end.
ThreadServer::Handler httpHandler(const std::string& body, bool append_path = false);

// nginx.conf for a reverse proxy on 127.0.0.1:8080 to `upstream` ("10.201.0.2:8081"), not
// daemonised, two workers, everything under `prefix` (which must exist).
std::string nginxProxyConf(const std::string& prefix, const std::string& upstream);

}  // namespace dmm::testbed
