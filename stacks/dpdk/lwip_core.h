#pragma once
// The process's one lwIP state (lwIP keeps its pcbs, timers and interfaces in globals). Poll
// threads run lwIP only while they hold coreLock(); nothing else calls into lwIP.

#include <cstdint>
#include <mutex>

namespace dmm::stacks::dpdk {

std::mutex& coreLock();
// lwip_init() once per process (call with the core lock held).
void initLwipOnce();
// Milliseconds on the monotonic clock, lwIP's sys_now().
std::uint32_t nowMs();

}  // namespace dmm::stacks::dpdk
