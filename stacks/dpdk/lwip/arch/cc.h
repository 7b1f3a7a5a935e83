/* lwIP's platform glue for the dpdk stack kind: diagnostics, assertions, randomness and the
 * checksum routine come from the project (stacks/dpdk/lwip_glue.cc). */
#ifndef DMM_LWIP_ARCH_CC_H
#define DMM_LWIP_ARCH_CC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
void dmm_lwip_diag(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void dmm_lwip_assert(const char* message, const char* file, int line) __attribute__((noreturn));
uint32_t dmm_lwip_rand(void);
uint16_t dmm_lwip_chksum(const void* data, int len);
#ifdef __cplusplus
}
#endif

#define LWIP_PLATFORM_DIAG(x) \
  do {                        \
    dmm_lwip_diag x;          \
  } while (0)
#define LWIP_PLATFORM_ASSERT(x) dmm_lwip_assert((x), __FILE__, __LINE__)
#define LWIP_RAND() dmm_lwip_rand()

#endif
