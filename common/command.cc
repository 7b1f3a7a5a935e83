#include "common/command.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/unique_fd.h"

extern char** environ;

namespace dmm {

CommandResult runCommand(const std::vector<std::string>& argv, const std::string& input) {
  CommandResult result;
  if (argv.empty()) return result;
  // stdin is a socket pair rather than a pipe: send(MSG_NOSIGNAL) to a child that exited
  // without reading gets EPIPE instead of raising SIGPIPE in a caller that did not ignore it.
  int in_pipe[2];
  int out_pipe[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in_pipe) != 0) {
    result.output = std::string("socketpair: ") + std::strerror(errno);
    return result;
  }
  UniqueFd in_read(in_pipe[0]);
  UniqueFd in_write(in_pipe[1]);
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
    result.output = std::string("pipe: ") + std::strerror(errno);
    return result;
  }
  UniqueFd out_read(out_pipe[0]);
  UniqueFd out_write(out_pipe[1]);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in_read.get(), 0);
  posix_spawn_file_actions_adddup2(&actions, out_write.get(), 1);
  posix_spawn_file_actions_adddup2(&actions, out_write.get(), 2);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  in_read.reset();
  out_write.reset();
  if (rc != 0) {
    result.output = argv[0] + ": " + std::strerror(rc);
    return result;
  }

  ::shutdown(in_write.get(), SHUT_RD);  // our end only writes
  std::size_t written = 0;
  if (input.empty()) in_write.reset();
  char buf[4096];
  while (out_read) {
    pollfd fds[2] = {{out_read.get(), POLLIN, 0}, {in_write.get(), POLLOUT, 0}};
    nfds_t n = in_write ? 2 : 1;
    if (::poll(fds, n, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (in_write && (fds[1].revents & (POLLOUT | POLLERR | POLLHUP)) != 0) {
      ssize_t w = ::send(in_write.get(), input.data() + written, input.size() - written,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) written += static_cast<std::size_t>(w);
      if (w < 0 && errno != EAGAIN && errno != EINTR) in_write.reset();  // the child is gone
      if (written == input.size()) in_write.reset();                     // EOF on its stdin
    }
    if ((fds[0].revents & (POLLIN | POLLERR | POLLHUP)) != 0) {
      ssize_t r = ::read(out_read.get(), buf, sizeof buf);
      if (r > 0) {
        result.output.append(buf, static_cast<std::size_t>(r));
      } else if (r == 0 || errno != EINTR) {
        out_read.reset();  // EOF: every writer of the pipe is gone
      }
    }
  }
  in_write.reset();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

}  // namespace dmm
