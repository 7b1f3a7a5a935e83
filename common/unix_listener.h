#pragma once
// A listening Unix-domain stream socket at a path in the file system, as daemons make them:
// missing parent directories are created (0755), a stale socket file (nothing accepts on it)
// is replaced, anything else at the path is refused, the file gets the mode asked for before
// anyone can connect, and at the end the file is removed only if it is still ours.

#include <sys/stat.h>
#include <sys/un.h>

#include <string>

#include "common/unique_fd.h"

namespace dmm::net {

class UnixListener {
 public:
  UnixListener() = default;
  ~UnixListener();
  UnixListener(UnixListener&& other) noexcept;
  UnixListener& operator=(UnixListener&& other) noexcept;
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Listens at `path` with `mode`; `what` names the socket in messages ("admin socket").
  // Returns an empty string on success, else why not (nothing is left behind).
  std::string listen(const std::string& path, mode_t mode, int backlog, const std::string& what);
  int fd() const { return fd_.get(); }
  bool listening() const { return fd_.valid(); }
  const std::string& path() const { return path_; }
  // Closes the socket and removes the file, unless another server replaced it meanwhile.
  void close();

 private:
  UniqueFd fd_;
  std::string path_;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
};

// Fills addr for path; false when the path does not fit sun_path.
bool unixAddress(const std::string& path, sockaddr_un& addr);

}  // namespace dmm::net
