#pragma once
// KernelRelay: moves one direction of a relayed connection from a TCP socket to another inside
// the kernel, without waking the sidecar per message (BPF sockmap: kernel_relay.bpf.c).
//
// A relay direction ("flow") hands itself over once it is established and between messages
// (Relay::maybeOffload(), docs/architecture.md#kernel-relay): from attach() on, every segment
// the source receives is taken by the BPF verdict in softirq context and queued for sending on
// the target by a kernel worker. The sidecar no longer reads the source nor writes the target
// for that direction; it still sees the source's end of stream and errors and passes them on
// itself, once the target has sent every byte the kernel took (drained()).
//
// Flow control is the sidecar's: the kernel accounts nothing for bytes it queues on a target.
// A flow may redirect up to its credit; when the BPF side asks (an Event::kCredit), the owner
// grants the bytes the target has taken plus `window` (grant()). A flow whose target stopped
// taking bytes reaches its limit and *passes* (Event::kPassing): its later bytes stay queued on
// the source, charged to it, so TCP stops the sender. The owner then waits until the target has
// sent everything redirected (drained()) and relays the rest itself, reading the source with
// plain reads (not splice(): passed bytes sit where only a read finds them). A flow never goes
// back to the kernel once it passes, and at most `window` bytes per flow are ever queued
// unaccounted.
//
// Rules the caller keeps (each one is a way to lose or repeat bytes):
//   - before attach(): the source was last read to empty — the kernel takes a segment whole,
//     including any part a read already took — and every byte read from it was written to
//     the target's socket;
//   - after attach(): no write to the target for that direction; reads of the source only
//     once it passes and the target has drained;
//   - detach() only when the relay ends (a passing source dropped from the maps loses what
//     it holds).
//
// One per worker: its maps, its ring of events and its flows are the worker's alone.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/result.h"

namespace dmm::proxy {

class KernelRelay {
 public:
  struct Options {
    std::size_t max_flows = 65536;      // directions handed over at once
    std::uint32_t window = 256 * 1024;  // bytes a flow may have queued unaccounted
  };
  // Loads the program and creates the maps, then checks on a loopback socket pair that this
  // kernel moves bytes exactly as the design needs. nullptr and `why` when it cannot (no BPF,
  // no privileges, built without it, a kernel that fails the check); the sidecar then relays
  // every byte itself.
  static std::unique_ptr<KernelRelay> create(const Options& options, std::string& why);
  ~KernelRelay();
  KernelRelay(const KernelRelay&) = delete;
  KernelRelay& operator=(const KernelRelay&) = delete;

  struct Flow {
    std::uint64_t cookie = 0;    // the source socket's cookie (SO_COOKIE): the maps' key
    std::uint64_t dst_base = 0;  // the target's sent count (sentCount()) at attach()
  };
  // Hands `src`'s received bytes to `dst` (see the rules above) with one window of credit, and
  // makes the kernel take whatever already waits in `src`. Errors: `not_relayable` (not TCP,
  // not established), `kernel_relay_full`, others as errno.
  Result<Flow> attach(int src, int dst);
  // Bytes the kernel took from the source so far (all of them are, or will be, sent on dst).
  std::uint64_t moved(const Flow& flow) const;
  // The flow reached its credit: its bytes stay with the source from now on.
  bool passing(const Flow& flow) const;
  // Whether `dst` has taken every byte the kernel took from the source up to now.
  Result<bool> drained(const Flow& flow, int dst) const;
  // More credit: the bytes `dst` has taken plus the window.
  Status grant(const Flow& flow, int dst);
  // Stops the kernel moving this flow and forgets it (the relay is ending).
  void detach(const Flow& flow);

  enum class Event : std::uint32_t { kCredit = 1, kPassing = 2 };
  // Readable when events wait; then takeEvents() hands each to `fn` (source cookie, event).
  int eventFd() const;
  void takeEvents(const std::function<void(std::uint64_t, Event)>& fn);

 private:
  struct Maps;
  KernelRelay(std::unique_ptr<Maps> maps, const Options& options);
  std::string selfTest();

  std::unique_ptr<Maps> maps_;
  Options options_;
};

// A running count of the bytes a TCP socket has been given to send: its acknowledged bytes
// plus its send queue. Compared with itself only (it may include the SYN); it never counts
// more than the socket has taken.
Result<std::uint64_t> sentCount(int fd);

}  // namespace dmm::proxy
