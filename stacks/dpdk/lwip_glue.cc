// lwIP's platform functions for the dpdk stack kind (stacks/dpdk/lwip/arch/cc.h), sys_now(),
// the checksum routine and the retransmission hook.

#include <spdlog/spdlog.h>
#include <sys/random.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "lwip/init.h"
#include "lwip/prot/tcp.h"
#include "lwip/tcp.h"
#include "stacks/dpdk/channel.h"
#include "stacks/dpdk/instance.h"
#include "stacks/dpdk/lwip_core.h"

namespace dmm::stacks::dpdk {

std::mutex& coreLock() {
  static std::mutex m;
  return m;
}

void initLwipOnce() {
  static bool done = false;
  if (done) return;
  lwip_init();
  done = true;
}

std::uint32_t nowMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint32_t>(static_cast<std::uint64_t>(ts.tv_sec) * 1000u +
                                    static_cast<std::uint64_t>(ts.tv_nsec) / 1000000u);
}

}  // namespace dmm::stacks::dpdk

extern "C" {

u32_t sys_now(void) {
  return dmm::stacks::dpdk::nowMs();
}

void dmm_lwip_diag(const char* fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  spdlog::debug("lwip: {}", line);
}

void dmm_lwip_assert(const char* message, const char* file, int line) {
  // An lwIP invariant broke: its state cannot be trusted any more. Fail loudly; systemd
  // restarts the service.
  spdlog::critical("lwip assertion failed at {}:{}: {}", file, line, message);
  spdlog::default_logger()->flush();
  std::abort();
}

uint32_t dmm_lwip_rand(void) {
  uint32_t v = 0;
  if (getrandom(&v, sizeof v, 0) != sizeof v) v = static_cast<uint32_t>(std::rand());
  return v;
}

uint16_t dmm_lwip_chksum(const void* data, int len) {
  // lwIP wants the folded, non-inverted 16-bit one's complement sum of the bytes paired as
  // they lie in memory (bytes 0-1, 2-3, ...; an odd last byte as if followed by a zero). The
  // sum of the 32-bit words in memory order, folded, is the same number; 64-bit accumulators
  // cannot overflow for any frame, and four of them keep the adds independent. About 4x
  // DPDK 22.11's rte_raw_cksum (a 16-bit loop), which took a fifth of the poll thread's time.
  const auto* p = static_cast<const unsigned char*>(data);
  auto n = static_cast<size_t>(len);
  uint64_t a = 0, b = 0, c = 0, d = 0;
  while (n >= 16) {
    uint32_t w[4];
    std::memcpy(w, p, 16);
    a += w[0];
    b += w[1];
    c += w[2];
    d += w[3];
    p += 16;
    n -= 16;
  }
  uint64_t sum = a + b + c + d;
  while (n >= 4) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    sum += w;
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    sum += h;
    p += 2;
    n -= 2;
  }
  if (n == 1) {
    uint16_t h = 0;
    std::memcpy(&h, p, 1);  // the byte first in memory, its partner zero
    sum += h;
  }
  sum = (sum & 0xffffffffu) + (sum >> 32);
  sum = (sum & 0xffffffffu) + (sum >> 32);
  sum = (sum & 0xffffu) + (sum >> 16);
  sum = (sum & 0xffffu) + (sum >> 16);
  sum = (sum & 0xffffu) + (sum >> 16);
  return static_cast<uint16_t>(sum);
}

uint32_t* dmm_lwip_tcp_out_hook(const struct pbuf* p, const struct tcp_hdr* hdr,
                                const struct tcp_pcb* pcb, uint32_t* opts) {
  // Segments that occupy sequence space (data, SYN, FIN) go out in sequence order the first
  // time, so one that does not start past the highest such segment sent before is a
  // retransmission. Bare ACKs, RSTs and keepalives are not counted.
  // The channel is the pcb's extension argument (a pcb accepted from the listener has none
  // until the stack takes it; its callback_arg is the listener's).
  if (pcb == nullptr || pcb->ext_args[0].data == nullptr) return opts;
  bool occupies =
      p->tot_len > TCPH_HDRLEN_BYTES(hdr) || (TCPH_FLAGS(hdr) & (TCP_SYN | TCP_FIN)) != 0;
  if (!occupies) return opts;
  auto* ch = static_cast<dmm::stacks::dpdk::Channel*>(pcb->ext_args[0].data);
  std::uint32_t seq = lwip_ntohl(hdr->seqno);
  if (ch->seq_valid && static_cast<std::int32_t>(seq - ch->max_seq_sent) <= 0) {
    ch->instance->countRetransmission();
  } else {
    ch->max_seq_sent = seq;
    ch->seq_valid = true;
  }
  return opts;
}

}  // extern "C"
