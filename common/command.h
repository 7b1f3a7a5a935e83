#pragma once
// runCommand(): runs a program (no shell) with some bytes on its stdin and collects what it
// prints on stdout and stderr together. For the few places that drive system tools: the
// iptables capture helper, and the test bed.

#include <string>
#include <vector>

namespace dmm {

struct CommandResult {
  int status = -1;     // exit status; -1 when it could not be started or died of a signal
  std::string output;  // stdout and stderr, interleaved as written; why it could not start
};

// Runs argv[0] (looked up in PATH) with `input` on stdin, and waits for it to exit. Input and
// output are moved concurrently, so neither side can fill a pipe and stall the other.
CommandResult runCommand(const std::vector<std::string>& argv, const std::string& input = {});

}  // namespace dmm
