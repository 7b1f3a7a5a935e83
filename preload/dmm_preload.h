/* dmm_preload.h: what an application may tell libdmm-preload.so, the DMM sidecar's LD_PRELOAD
 * capture shim. C and C++; depends on nothing.
 *
 * The QoS hint of one connection, set on its TCP socket before connect():
 *
 *   #include <dmm_preload.h>
 *   setsockopt(fd, SOL_DMM, DMM_SO_QOS, "latency", strlen("latency"));
 *
 * The value is one of "default", "latency", "bulk", "background" (a trailing NUL is allowed).
 * It overrides DMM_PRELOAD_QOS for that socket and travels to the sidecar in the preamble,
 * where the policy can match on it (match.qos). getsockopt at the same level and option reads
 * the hint the socket will use (the per-socket one, else the configured one, else "").
 *
 * Errors: EINVAL for a value outside the list, EISCONN once the socket is connected through
 * the sidecar, ENOPROTOOPT on a socket that is not an IPv4/IPv6 stream socket and whenever the
 * shim is not loaded (the kernel does not know the level): an application can call it
 * unconditionally and ignore the error.
 */
#pragma once

#define SOL_DMM 0x444d
#define DMM_SO_QOS 1
