/* lwIP configuration of the dpdk stack kind (stacks/dpdk/README.md, "lwIP").
 *
 * lwIP runs without an OS (NO_SYS): raw API only, run to completion on the DPDK poll threads,
 * which call into it one at a time under the core lock (stacks/dpdk/lwip_core.h). No sockets,
 * no netconn, no threads of its own. Windows and buffers are sized for multi-gigabit links with
 * window scaling; memory comes from malloc (bounded by the instance's max_connections and these
 * windows), not from fixed pools, so a burst of connections cannot exhaust a pool. This file is
 * C and is read by lwIP's sources and by the stack's own files, which never include
 * <netinet/tcp.h> (it defines TCP_MSS to 512). */
#ifndef DMM_LWIPOPTS_H
#define DMM_LWIPOPTS_H

/* ---- system ---- */
#define NO_SYS 1
#define LWIP_TIMERS 1
#define SYS_LIGHTWEIGHT_PROT 0
#define LWIP_SOCKET 0
#define LWIP_NETCONN 0
#define LWIP_NETIF_API 0
#define LWIP_RAW 0
#define LWIP_UDP 0
#define LWIP_DHCP 0
#define LWIP_AUTOIP 0
#define LWIP_IGMP 0
#define LWIP_DNS 0
#define LWIP_STATS 0
#define LWIP_IPV4 1
#define LWIP_IPV6 0
#define LWIP_ICMP 1
#define LWIP_ARP 1
#define LWIP_ETHERNET 1
#define ARP_TABLE_SIZE 64
#define ARP_QUEUEING 1
#define ARP_QUEUE_LEN 256 /* frames per unresolved neighbour (connections opened at once) */
#define IP_REASSEMBLY 1
#define IP_FRAG 0
#define LWIP_NETIF_HOSTNAME 0
#define LWIP_NETIF_STATUS_CALLBACK 0
#define LWIP_NETIF_LINK_CALLBACK 0
#define LWIP_SINGLE_NETIF 0

/* ---- memory: malloc-backed heap and pools ---- */
#define MEM_LIBC_MALLOC 1
#define MEMP_MEM_MALLOC 1
#define MEM_ALIGNMENT 8
#define LWIP_SUPPORT_CUSTOM_PBUF 1 /* received frames stay in their DPDK mbufs */
#define PBUF_LINK_HLEN 14
#define ETH_PAD_SIZE 0
/* Upper bounds for the pools' bookkeeping (malloc backs them, so these do not reserve memory). */
#define MEMP_NUM_TCP_PCB 65535
#define MEMP_NUM_TCP_PCB_LISTEN 16
#define MEMP_NUM_TCP_SEG 65535
#define MEMP_NUM_PBUF 65535
#define PBUF_POOL_SIZE 4096
#define MEMP_NUM_REASSDATA 64

/* ---- TCP ---- */
#define LWIP_TCP 1
#define TCP_MSS 1460
#define LWIP_WND_SCALE 1
#define TCP_RCV_SCALE 4 /* windows up to 1 MiB */
/* Receive window = the per-connection receive ring (DMM_DPDK_RING_BYTES): bytes are acknowledged
 * into the ring and the window reopens only as the worker takes them out, so the ring never
 * overflows and a slow reader throttles the sender. */
#define DMM_DPDK_RING_BYTES (512 * 1024)
#define TCP_WND DMM_DPDK_RING_BYTES
/* The send buffer is the per-connection send ring: lwIP references its bytes (no copy) until
 * they are acknowledged. */
#define TCP_SND_BUF DMM_DPDK_RING_BYTES
#define TCP_SND_QUEUELEN ((4 * TCP_SND_BUF) / TCP_MSS)
#define TCP_SNDLOWAT (32 * 1024) /* below 0xffff - 4 * MSS, as lwIP requires */
#define TCP_WND_UPDATE_THRESHOLD (TCP_WND / 8)
#define TCP_QUEUE_OOSEQ 1
#define TCP_OOSEQ_MAX_BYTES TCP_WND
#define TCP_OOSEQ_MAX_PBUFS 512
#define LWIP_TCP_SACK_OUT 1
#define LWIP_TCP_MAX_SACK_NUM 4
#define TCP_OVERSIZE TCP_MSS
#define LWIP_TCP_TIMESTAMPS 0
#define LWIP_TCP_KEEPALIVE 1
#define TCP_LISTEN_BACKLOG 1
#define TCP_DEFAULT_LISTEN_BACKLOG 0xff
#define LWIP_CALLBACK_API 1
#define LWIP_TCP_PCB_NUM_EXT_ARGS 1 /* tells the stack when lwIP frees a pcb */
/* Timers: 10 ms fast timer (delayed ACKs), 20 ms slow timer (RTO granularity) instead of
 * 250/500 ms, for LAN round trips of tens of microseconds. */
#define TCP_TMR_INTERVAL 10
#define TCP_MAXRTX 8
#define TCP_SYNMAXRTX 4
/* TIME_WAIT of 2 x 5 s keeps the 16k ephemeral ports of an initiator from running out. */
#define TCP_MSL 5000UL

/* ---- checksums: per netif, following the port's offload capabilities ---- */
#define LWIP_CHECKSUM_CTRL_PER_NETIF 1
#define CHECKSUM_GEN_IP 1
#define CHECKSUM_GEN_TCP 1
#define CHECKSUM_GEN_ICMP 1
#define CHECKSUM_CHECK_IP 1
#define CHECKSUM_CHECK_TCP 1
#define CHECKSUM_CHECK_ICMP 1
#define LWIP_CHKSUM dmm_lwip_chksum /* DPDK's vectorised sum (lwip_glue.cc) */

/* ---- hooks ---- */
#define LWIP_HOOK_FILENAME "dmm_lwip_hooks.h"

#define LWIP_DEBUG 0

#endif
