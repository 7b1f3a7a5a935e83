#pragma once
// ThreadSanitizer does not see the synchronisation of DPDK's rte_ring as Debian builds it (the
// generic memory model: volatile head and tail indexes ordered by rte_smp_wmb/rmb fences). The
// ring's own index accesses are suppressed (tests/tsan.supp); these annotations give TSan the
// happens-before edge the ring really provides to the data passed through it: release before
// an enqueue, acquire after a dequeue. No code at all outside a -fsanitize=thread build.

#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace dmm::stacks::dpdk {

inline void ringRelease([[maybe_unused]] void* ring) {
#if defined(__SANITIZE_THREAD__)
  __tsan_release(ring);
#endif
}

inline void ringAcquire([[maybe_unused]] void* ring) {
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(ring);
#endif
}

}  // namespace dmm::stacks::dpdk
