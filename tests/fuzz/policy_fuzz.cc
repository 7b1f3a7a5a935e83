// libFuzzer target for the policy loader: policy.d/*.toml is written by operators and reloaded
// at run time (SIGHUP, `ctl reload`): a file must never crash or hang the sidecar, and every
// refusal must say why. Checks: the loader returns a policy exactly when it reported no error,
// every diagnostic has a position in the file, and a policy it returns classifies a connection.
//
//   build/tests/fuzz/policy_fuzz -max_total_time=60 build/tests/fuzz/corpus/policy \
//     tests/fuzz/corpus/policy

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/diagnostics.h"
#include "policy/policy.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace dmm;
  std::string text(reinterpret_cast<const char*>(data), size);
  policy::Environment env;
  env.stacks = {{"kernel", "kernel"}, {"dpdk0", "dpdk"}, {"rdma0", "rdma"}};
  env.kinds = {"kernel", "dpdk", "rdma"};
  Diagnostics diags;
  auto p = policy::loadPolicyStrings({{"fuzz.toml", text}}, env, 1, diags);
  if ((p == nullptr) != (diags.errorCount() > 0)) std::abort();
  if (p == nullptr && diags.formatAll().find("fuzz.toml:") == std::string::npos) std::abort();
  if (p != nullptr) {
    policy::Facts facts;
    facts.dst = *SocketAddress::parse("10.1.2.3:443");
    facts.uid = 1000;
    auto d = p->classify(facts);
    std::vector<std::string> trace;
    auto e = p->explain(facts, trace);
    if (d.rule != e.rule) std::abort();  // the index and the linear scan agree
  }
  return 0;
}
