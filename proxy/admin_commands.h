#pragma once
// The commands of the admin socket (`dmm-sidecar ctl ...`), run on the main thread against the
// running Sidecar: status, connections, breakers, policy show/explain/diff/reload.

#include <string>
#include <vector>

#include "proxy/sidecar.h"

namespace dmm::proxy {

// Runs one command line; its text goes to `out`. Returns 0 (ok), 1 (the command failed) or 2
// (usage error).
int runAdminCommand(Sidecar& sidecar, const std::vector<std::string>& args, std::string& out);

}  // namespace dmm::proxy
