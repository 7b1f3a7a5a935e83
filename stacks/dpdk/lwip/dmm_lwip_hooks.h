/* lwIP hooks of the dpdk stack kind (implemented in stacks/dpdk/lwip_glue.cc). */
#ifndef DMM_LWIP_HOOKS_H
#define DMM_LWIP_HOOKS_H

#include <stdint.h>

struct pbuf;
struct tcp_hdr;
struct tcp_pcb;

#ifdef __cplusplus
extern "C" {
#endif
/* Called for every TCP segment lwIP builds (data, SYN, FIN, ACK, RST, probes), first
 * transmissions and retransmissions alike: counts retransmissions per instance. Returns `opts`
 * unchanged. */
uint32_t* dmm_lwip_tcp_out_hook(const struct pbuf* p, const struct tcp_hdr* hdr,
                                const struct tcp_pcb* pcb, uint32_t* opts);
#ifdef __cplusplus
}
#endif

#define LWIP_HOOK_TCP_OUT_ADD_TCPOPTS(p, hdr, pcb, opts) dmm_lwip_tcp_out_hook(p, hdr, pcb, opts)

#endif
