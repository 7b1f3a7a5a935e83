#include "testbed/servers.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <string>

namespace dmm::testbed {

SocketAddress at(const char* ip, std::uint16_t port) {
  return SocketAddress(*IpAddress::parse(ip), port);
}

void echoHandler(UniqueFd conn) {
  std::string data = readToEof(conn.get());
  writeAll(conn.get(), data.data(), data.size());
}

void answerAfterEof(int fd) {
  std::string request = readToEof(fd);
  std::string reply =
      "got " + std::to_string(request.size()) + " bytes\n" + std::string(3 << 20, 'r');
  writeAll(fd, reply.data(), reply.size());
}

::testing::AssertionResult halfCloseThenFullAnswer(int fd) {
  std::string request(100000, 'q');
  if (!writeAll(fd, request.data(), request.size()))
    return ::testing::AssertionFailure() << "the request could not be written";
  if (::shutdown(fd, SHUT_WR) != 0)
    return ::testing::AssertionFailure() << "shutdown: " << std::strerror(errno);
  int err = 0;
  std::string reply = readToEof(fd, &err);
  const std::string head = "got 100000 bytes\n";
  if (err != 0) return ::testing::AssertionFailure() << "read: " << std::strerror(err);
  if (reply.size() != head.size() + (3u << 20) || reply.rfind(head, 0) != 0)
    return ::testing::AssertionFailure()
           << "answer of " << reply.size() << " bytes, starting \"" << reply.substr(0, 20) << "\"";
  return ::testing::AssertionSuccess();
}

std::string echoOnce(const Netns& from, const SocketAddress& to, const std::string& payload) {
  UniqueFd fd = connectTcp(from, to);
  if (!fd) return "<connect failed>";
  if (!writeAll(fd.get(), payload.data(), payload.size())) return "<write failed>";
  ::shutdown(fd.get(), SHUT_WR);
  return readToEof(fd.get());
}

ThreadServer::ThreadServer(const Netns& ns, const SocketAddress& at, Handler handler)
    : listen_(listenTcp(ns, at)), handler_(std::move(handler)) {
  acceptor_ = std::thread([this] {
    while (!stop_) {
      pollfd p{listen_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) != 1) continue;
      UniqueFd conn(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) continue;
      setTimeouts(conn.get(), 20s);
      ++accepted_;
      std::lock_guard lock(mutex_);
      handlers_.emplace_back([this, c = std::move(conn)]() mutable { handler_(std::move(c)); });
    }
  });
}

ThreadServer::~ThreadServer() {
  stop();
}

void ThreadServer::stop() {
  stop_ = true;
  if (acceptor_.joinable()) acceptor_.join();
  std::lock_guard lock(mutex_);
  for (auto& t : handlers_) {
    if (t.joinable()) t.join();
  }
}

EchoServer::EchoServer(const Netns& ns, const SocketAddress& at)
    : listen_(listenTcp(ns, at)), wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  thread_ = std::thread([this] { loop(); });
}

EchoServer::~EchoServer() {
  stop_ = true;
  std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
  thread_.join();
}

void EchoServer::loop() {
  struct Conn {
    UniqueFd fd;
    std::string pending;
    bool eof = false;
  };
  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  ::fcntl(listen_.get(), F_SETFL, O_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = listen_.get();
  ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, listen_.get(), &ev);
  ev.data.fd = wake_.get();
  ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, wake_.get(), &ev);
  std::map<int, Conn> conns;
  std::vector<epoll_event> events(256);
  char buf[65536];
  while (!stop_) {
    int n = ::epoll_wait(ep.get(), events.data(), static_cast<int>(events.size()), 100);
    for (int i = 0; i < n; ++i) {
      int fd = events[static_cast<std::size_t>(i)].data.fd;
      if (fd == wake_.get()) continue;
      if (fd == listen_.get()) {
        for (;;) {
          int c = ::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (c < 0) break;
          ++accepted_;
          epoll_event cev{};
          cev.events = EPOLLIN | EPOLLOUT | EPOLLET;
          cev.data.fd = c;
          ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, c, &cev);
          conns[c].fd.reset(c);
        }
        continue;
      }
      auto it = conns.find(fd);
      if (it == conns.end()) continue;
      Conn& c = it->second;
      bool dead = false;
      for (;;) {
        if (!c.pending.empty()) {
          ssize_t w = ::send(fd, c.pending.data(), c.pending.size(), MSG_NOSIGNAL);
          if (w > 0) {
            c.pending.erase(0, static_cast<std::size_t>(w));
            continue;
          }
          if (w < 0 && errno == EAGAIN) break;
          dead = true;
          break;
        }
        if (c.eof) break;
        ssize_t r = ::recv(fd, buf, sizeof buf, 0);
        if (r > 0) {
          c.pending.append(buf, static_cast<std::size_t>(r));
        } else if (r == 0) {
          c.eof = true;
        } else if (errno == EAGAIN) {
          break;
        } else {
          dead = true;
          break;
        }
      }
      if (dead) {
        conns.erase(it);
      } else if (c.eof && c.pending.empty()) {
        ::shutdown(fd, SHUT_WR);
        conns.erase(it);  // closing after our FIN: the client has already sent its own
      }
    }
  }
}

ThreadServer::Handler httpHandler(const std::string& body, bool append_path) {
  return [body, append_path](UniqueFd conn) {
    std::string request;
    char buf[4096];
    while (request.find("\r\n\r\n") == std::string::npos) {
      ssize_t n = ::read(conn.get(), buf, sizeof(buf));
      if (n <= 0) return;
      request.append(buf, static_cast<std::size_t>(n));
    }
    std::string reply_body = body;
    if (append_path) reply_body += " " + request.substr(4, request.find(' ', 4) - 4);
    std::string head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        "Content-Length: " +
        std::to_string(reply_body.size()) + "\r\nConnection: close\r\n\r\n";
    writeAll(conn.get(), head.data(), head.size());
    writeAll(conn.get(), reply_body.data(), reply_body.size());
    ::shutdown(conn.get(), SHUT_WR);
    readToEof(conn.get());
  };
}

std::string nginxProxyConf(const std::string& prefix, const std::string& upstream) {
  return R"(daemon off;
master_process on;
worker_processes 2;
user root;
pid )" + prefix +
         R"(/nginx.pid;
error_log )" +
         prefix + R"(/error.log info;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path )" +
         prefix + R"(/client_body;
  proxy_temp_path )" +
         prefix + R"(/proxy;
  fastcgi_temp_path )" +
         prefix + R"(/fastcgi;
  uwsgi_temp_path )" +
         prefix + R"(/uwsgi;
  scgi_temp_path )" +
         prefix + R"(/scgi;
  server {
    listen 127.0.0.1:8080;
    location / {
      proxy_pass http://)" +
         upstream + R"(;
      proxy_connect_timeout 5s;
    }
  }
}
)";
}

::testing::AssertionResult transferBothWays(const Netns& from, const Netns& server_ns,
                                            const SocketAddress& to, std::uint64_t bytes,
                                            std::chrono::milliseconds connect_timeout,
                                            std::optional<SocketAddress> via) {
  StreamDigest server_got;
  StreamDigest server_sent;
  ThreadServer server(server_ns, to, [&](UniqueFd conn) {
    server_got = receiveStream(conn.get());
    server_sent = sendStream(conn.get(), bytes, 7);
  });
  const SocketAddress& target = via ? *via : to;
  UniqueFd fd = connectTcp(from, target, connect_timeout);
  if (!fd) return ::testing::AssertionFailure() << "connect to " << target.toString() << " failed";
  auto sent = sendStream(fd.get(), bytes, 3);
  ::shutdown(fd.get(), SHUT_WR);
  int err = 0;
  auto got = receiveStream(fd.get(), &err);
  fd.reset();
  bool accepted = eventually([&] { return server.accepted() == 1; });
  server.stop();  // joins the handler: its digests are final
  if (err != 0) return ::testing::AssertionFailure() << "the client's read ended in error " << err;
  if (!accepted) return ::testing::AssertionFailure() << "the server accepted no connection";
  if (sent.bytes != bytes || server_got.bytes != bytes || server_got.sha256_hex != sent.sha256_hex)
    return ::testing::AssertionFailure()
           << "up: sent " << sent.bytes << ", the server got " << server_got.bytes << " (digests "
           << (server_got.sha256_hex == sent.sha256_hex ? "equal" : "differ") << ")";
  if (got.bytes != bytes || got.sha256_hex != server_sent.sha256_hex)
    return ::testing::AssertionFailure()
           << "down: the server sent " << server_sent.bytes << ", the client got " << got.bytes;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult echoManyAtOnce(const Netns& from, const SocketAddress& to, int conns,
                                          std::size_t each,
                                          std::chrono::milliseconds connect_timeout) {
  std::vector<UniqueFd> fds;
  for (int i = 0; i < conns; ++i) {
    fds.push_back(connectTcp(from, to, connect_timeout));
    if (!fds.back()) return ::testing::AssertionFailure() << "connection " << i << " failed";
  }
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < conns; ++i) {
    threads.emplace_back([&, i] {
      int fd = fds[static_cast<std::size_t>(i)].get();
      std::string payload(each, static_cast<char>('a' + i % 26));
      payload.replace(0, 8, std::to_string(10000000 + i));
      if (!writeAll(fd, payload.data(), payload.size())) return;
      ::shutdown(fd, SHUT_WR);
      if (readToEof(fd) == payload) ++ok;
    });
  }
  for (auto& t : threads)
    t.join();
  if (ok.load() != conns)
    return ::testing::AssertionFailure() << ok.load() << " of " << conns << " echoed exactly";
  return ::testing::AssertionSuccess();
}

}  // namespace dmm::testbed
