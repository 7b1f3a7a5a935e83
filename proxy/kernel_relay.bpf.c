// The kernel relay's BPF program (proxy/kernel_relay.h): an sk_skb stream verdict attached to
// the `sources` sockhash. Every socket in `sources` has its received bytes taken by the kernel,
// in softirq context, and queued for sending on its target socket, without waking the sidecar.
//
//   sources : socket cookie -> the source socket itself (membership turns the verdict on)
//   targets : socket cookie of a source -> the socket its bytes go to
//   states  : socket cookie of a source -> what this program keeps: bytes redirected, whether
//             the flow fell back to the sidecar (passing), the credit epoch it asked for
//   credits : socket cookie of a source -> what the sidecar grants: the byte count the flow may
//             redirect up to, and its epoch
//   events  : a ring buffer to the sidecar's worker: "credit running low", "passing now"
//
// Flow control. The kernel's egress redirect does no memory accounting: bytes queued for a
// target that does not take them (a slow reader) pile up without bound. So a flow may redirect
// only up to its credit: the sidecar grants (bytes the target has taken) + a window, whenever
// asked. A flow that reaches its limit (the target is not taking them) passes from then on:
// its bytes stay with the source socket, charged to it (TCP's flow control stops the sender),
// and the sidecar relays them itself once the target has sent the rest. Passing never stops:
// that keeps the order of the bytes.
//
// An empty segment (a FIN's own) is dropped: it carries nothing, and queued on the target it
// would break it (the kernel's backlog takes a send of 0 bytes for a broken pipe). The sidecar
// sees the end of stream in the source's state and passes it on itself.
//
// Built with clang -target bpf by CMake; the object is embedded in the sidecar.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct flow_state {
  __u64 moved;    // bytes redirected
  __u32 passing;  // 1: every later segment is passed to the source's own queue
  __u32 asked;    // the credit epoch a "credit low" event was sent for
};

struct flow_credit {
  __u64 limit;  // `moved` may not go beyond this
  __u32 epoch;  // bumped by every grant
  __u32 low;    // ask for more once fewer than this many bytes are left
};

struct event {
  __u64 cookie;
  __u32 kind;  // 1: credit low, 2: passing
  __u32 pad;
};

struct {
  __uint(type, BPF_MAP_TYPE_SOCKHASH);
  __uint(max_entries, 1);  // set by the loader
  __type(key, __u64);
  __type(value, __u64);
} sources SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_SOCKHASH);
  __uint(max_entries, 1);  // set by the loader
  __type(key, __u64);
  __type(value, __u64);
} targets SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, 1);  // set by the loader
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __type(key, __u64);
  __type(value, struct flow_state);
} states SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, 1);  // set by the loader
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __type(key, __u64);
  __type(value, struct flow_credit);
} credits SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_RINGBUF);
  __uint(max_entries, 1 << 16);  // set by the loader
} events SEC(".maps");

static void notify(__u64 cookie, __u32 kind) {
  struct event e = {.cookie = cookie, .kind = kind};
  // A full ring drops the event: the flow then passes at its limit, which is safe.
  bpf_ringbuf_output(&events, &e, sizeof e, 0);
}

SEC("sk_skb/stream_verdict")
int dmm_relay(struct __sk_buff *skb) {
  if (skb->len == 0) return SK_DROP;
  __u64 cookie = bpf_get_socket_cookie(skb);
  struct flow_state *state = bpf_map_lookup_elem(&states, &cookie);
  struct flow_credit *credit = bpf_map_lookup_elem(&credits, &cookie);
  if (!state || !credit) return SK_PASS;  // not (or no longer) a flow: the sidecar reads it
  if (state->passing) return SK_PASS;
  __u64 moved = state->moved + skb->len;
  if (moved > credit->limit) {
    state->passing = 1;
    notify(cookie, 2);
    return SK_PASS;
  }
  if (credit->limit - moved < credit->low && state->asked != credit->epoch) {
    state->asked = credit->epoch;
    notify(cookie, 1);
  }
  // One socket's segments come here one at a time (under its lock): a plain add is safe.
  state->moved = moved;
  return bpf_sk_redirect_hash(skb, &targets, &cookie, 0);
}

char LICENSE[] SEC("license") = "GPL";
