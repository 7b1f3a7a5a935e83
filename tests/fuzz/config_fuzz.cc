// libFuzzer target for the config loader (sidecar.toml): every refusal must be a diagnostic with
// its position, never a crash. Checks: a config is returned exactly when no error was reported,
// and a refusal names the file. The stack kinds are the kernel one (the kind-specific keys of
// dpdk and rdma have their own unit tests; their libraries are not built with the fuzzer).
//
//   build/tests/fuzz/config_fuzz -max_total_time=60 build/tests/fuzz/corpus/config \
//     tests/fuzz/corpus/config

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/diagnostics.h"
#include "proxy/config.h"
#include "stacks/kernel/kernel_stack.h"
#include "stacks/stack.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace dmm;
  static const stacks::StackRegistry* registry = [] {
    auto* r = new stacks::StackRegistry;
    r->add(std::make_unique<stacks::kernel::KernelStackFactory>());
    return r;
  }();
  std::string text(reinterpret_cast<const char*>(data), size);
  Diagnostics diags;
  auto config = proxy::loadConfigString(text, "fuzz.toml", *registry, diags);
  if (config.has_value() == (diags.errorCount() > 0)) std::abort();
  if (!config && diags.formatAll().find("fuzz.toml:") == std::string::npos) std::abort();
  return 0;
}
