#include "common/unix_listener.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace dmm::net {

namespace {

std::string errnoText(int err) {
  return std::strerror(err);
}

// mkdir -p of the directory holding path; the directories it creates get 0755 whatever the
// umask, so that the socket's own mode decides who may connect.
std::string makeParentDirectories(const std::string& path) {
  const std::size_t last = path.rfind('/');
  if (last == std::string::npos || last == 0) return {};
  const std::string parent = path.substr(0, last);
  for (std::size_t pos = 1; pos <= parent.size(); ++pos) {
    if (pos != parent.size() && parent[pos] != '/') continue;
    const std::string dir = parent.substr(0, pos);
    if (::mkdir(dir.c_str(), 0755) == 0) {
      if (::chmod(dir.c_str(), 0755) != 0)
        return "cannot set the mode of " + dir + ": " + errnoText(errno);
      continue;
    }
    if (errno != EEXIST) return "cannot create " + dir + ": " + errnoText(errno);
  }
  return {};
}

// Whether something accepts connections on the socket file at path: 0 when it does (or when
// it listens with a full backlog), ECONNREFUSED when the file is a leftover, else the errno.
int probeSocket(const sockaddr_un& addr) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!probe) return errno;
  while (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    if (errno == EINTR) continue;
    return errno == EAGAIN ? 0 : errno;  // EAGAIN: a listener whose backlog is full
  }
  return 0;
}

}  // namespace

bool unixAddress(const std::string& path, sockaddr_un& addr) {
  addr = sockaddr_un{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) return false;
  std::memcpy(addr.sun_path, path.data(), path.size());
  return true;
}

UnixListener::~UnixListener() {
  close();
}

UnixListener::UnixListener(UnixListener&& other) noexcept
    : fd_(std::move(other.fd_)), path_(std::move(other.path_)), dev_(other.dev_), ino_(other.ino_) {
  other.path_.clear();
}

UnixListener& UnixListener::operator=(UnixListener&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = std::move(other.fd_);
    path_ = std::move(other.path_);
    dev_ = other.dev_;
    ino_ = other.ino_;
    other.path_.clear();
  }
  return *this;
}

std::string UnixListener::listen(const std::string& path, mode_t mode, int backlog,
                                 const std::string& what) {
  if (fd_) return "already listening on " + path_;
  sockaddr_un addr{};
  if (!unixAddress(path, addr)) {
    return what + " path '" + path + "' is empty or longer than " +
           std::to_string(sizeof addr.sun_path - 1) + " bytes";
  }
  if (auto error = makeParentDirectories(path); !error.empty()) return error;

  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return path + ": exists and is not a socket; not replacing it";
    const int probe = probeSocket(addr);
    if (probe == 0) return path + ": already in use (another dmm-sidecar is serving it)";
    if (probe != ECONNREFUSED) return "cannot check " + path + ": " + errnoText(probe);
    // A socket file nobody listens on: the leftover of a daemon that did not remove it.
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return "cannot remove the stale socket " + path + ": " + errnoText(errno);
    spdlog::info("{} {}: removed a stale socket file", what, path);
  } else if (errno != ENOENT) {
    return "cannot stat " + path + ": " + errnoText(errno);
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return "socket: " + errnoText(errno);
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    if (err == EADDRINUSE) return path + ": already in use (created by someone else meanwhile)";
    return "cannot bind " + path + ": " + errnoText(err);
  }
  // From here the file is ours; remove it if we fail. Nobody can connect before listen(), so
  // the mode the umask gave the file at bind() is never used.
  auto fail = [&path](std::string why) {
    ::unlink(path.c_str());
    return why;
  };
  if (::stat(path.c_str(), &st) != 0) return fail("cannot stat " + path + ": " + errnoText(errno));
  if (::chmod(path.c_str(), mode) != 0)
    return fail("cannot set the mode of " + path + ": " + errnoText(errno));
  if (::listen(fd.get(), backlog) != 0) return fail("listen on " + path + ": " + errnoText(errno));
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  path_ = path;
  fd_ = std::move(fd);
  return {};
}

void UnixListener::close() {
  if (!fd_) return;
  fd_.reset();
  // Only the file we made: if another server replaced it meanwhile, it is theirs.
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
    ::unlink(path_.c_str());
  }
}

}  // namespace dmm::net
