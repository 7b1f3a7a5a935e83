#pragma once
// Relay: moves bytes both ways between two connections until both directions have ended.
//
// Each direction (a "flow": upstream = downstream side -> upstream side, i.e. client to server)
// is independent:
//   - a flow reads into the worker's scratch buffer and writes straight on; only bytes the
//     destination cannot take now are kept, in a buffer from the worker's pool. Kernel-to-kernel
//     flows that carry bulk (a read filled the scratch buffer) switch to splice() through a pipe
//     from the worker's pool, and back to copying when reads get small: a copy is cheaper for
//     small messages, splice() for streams. Space is held only while bytes are in flight, so an
//     idle connection holds no buffer and no pipe;
//   - the bytes held per flow stay below the high watermark (relay.buffer_size): reading pauses
//     there and resumes at or below relay.low_watermark, so a slow reader stops its writer;
//   - end of stream is passed on as a half-close once everything read has been written;
//   - a reset on either side is passed on as a reset to the other;
//   - one wake-up moves at most kWakeupBudget bytes per flow, then yields to other connections;
//   - a flow between two kernel TCP sockets of a connection that has lived relay.kernel_relay_after
//     is handed to the kernel relay (kernel_relay.h) the next time it is between messages (its
//     source read to empty, nothing held): from then on the kernel moves its bytes without
//     waking this process, which still passes its end of stream or reset on. On a framed
//     tunnel it first ends the framing of its direction (framing v2's raw header); the
//     connection is then not reused.
// The relay owns both connections and itself: it deletes itself (deferred, on its loop) when
// it finishes. All of it runs on one worker thread.

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/event_loop.h"
#include "common/intrusive_list.h"
#include "common/socket_address.h"
#include "policy/policy.h"
#include "proxy/classify.h"
#include "proxy/kernel_relay.h"
#include "proxy/metrics.h"
#include "proxy/tunnel_framing.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class Worker;
struct TimeoutListTag;
struct ResumeListTag;
struct MemoryWaitTag;

class Relay final : public Deferrable,
                    public stacks::ConnectionCallbacks,
                    public ListHook<TimeoutListTag>,
                    public ListHook<ResumeListTag>,
                    public ListHook<MemoryWaitTag> {
 public:
  using Clock = std::chrono::steady_clock;

  struct Info {
    std::uint64_t id = 0;
    std::uint64_t peer_id = 0;  // inbound: the initiator's id for this connection (0: unknown)
    Role role = Role::kOutbound;
    std::size_t stack = 0;  // index of the carrying stack's metric label
    SocketAddress destination;
    Clock::time_point started;
    // The tunnel side frames its data (tunnel_framing.h) and is handed back to the worker for
    // the next session when this one ends cleanly.
    bool framed = false;
    bool tunnel_is_upstream = true;  // outbound: upstream; inbound: downstream
    bool raw_frames = false;         // framing v2: a direction may end its framing (raw header)
    SocketAddress peer;              // outbound: the peer sidecar (the pool's key)
    std::size_t early_bytes = 0;     // client bytes already sent with the HELLO (counted here)
    // The policy decision: the snapshot that classified the connection (kept alive with it),
    // the rule of that snapshot that decided (nullptr: the default action), and the facts
    // (for `ctl connections` and `ctl policy diff`).
    std::shared_ptr<const policy::Policy> policy;
    const policy::Rule* rule = nullptr;
    ClassifiedFacts facts;
    std::string_view ruleName() const {
      return rule != nullptr ? std::string_view(rule->name) : std::string_view("default");
    }
    std::uint64_t policyVersion() const { return policy ? policy->version() : 0; }
  };

  // Starts relaying between `downstream` (towards the client) and `upstream` (towards the
  // server). Both must be established. Bytes already waiting on either are picked up at once.
  // `preload`: bytes of the upstream direction read before the relay existed, moved first:
  // the client's early bytes (outbound) or framed early data behind the HELLO (inbound).
  // `control`: for stacks with a data connection of their own (kOwnDataPath), the handshake's
  // control connection, kept as the liveness channel: each side writes one byte (kPeerDone)
  // on it when its relay ends cleanly, then closes it; a control connection that ends without
  // that byte means the peer sidecar is gone, and the connection is reset.
  static void start(Worker& worker, const Info& info,
                    std::unique_ptr<stacks::StackConnection> downstream,
                    std::unique_ptr<stacks::StackConnection> upstream,
                    std::span<const std::byte> preload = {},
                    std::unique_ptr<stacks::StackConnection> control = nullptr);

  ~Relay() override;

  // Called by the worker's timeout sweep: ends the connection, with a reset if bytes are still
  // held undelivered (a clean end would claim a truncated stream was whole).
  void expire(Outcome why);
  // Called by the worker when this relay asked to continue after its wake-up budget.
  void resume();
  // One line for `ctl connections`: id, role, stack, rule, policy version, facts, bytes, age.
  std::string describe() const;
  const Info& info() const { return info_; }
  // Called when the worker stops: ends the connection at once.
  void shutdown();

  // Called by the worker's tick for relays with a flow in the kernel relay: brings their byte
  // counts (and the metric) up to date, and their activity, which the kernel's moves hide.
  void refreshKernelFlows();
  // An event of the kernel relay for the flow whose source has `cookie` (Worker routes them).
  void onKernelEvent(std::uint64_t cookie, KernelRelay::Event event);

  Clock::time_point lastActive() const { return last_active_; }
  bool halfClosed() const { return half_closed_; }

  // ConnectionCallbacks
  void onConnected(stacks::StackConnection&) override {}
  void onConnectFailed(stacks::StackConnection&, Error) override {}
  void onReadable(stacks::StackConnection& conn) override;
  void onWritable(stacks::StackConnection& conn) override;

  static constexpr std::size_t kWakeupBudget = 1024 * 1024;
  static constexpr std::byte kPeerDone{'B'};

 private:
  struct Flow {
    stacks::StackConnection* src = nullptr;
    stacks::StackConnection* dst = nullptr;
    int pipe_read = -1;  // splice mode: the pipe holding bytes in flight
    int pipe_write = -1;
    std::byte* buffer = nullptr;  // copy mode: the buffer holding bytes in flight
    std::uint32_t head = 0;       // copy mode: offset of the first pending byte
    std::uint32_t pending = 0;    // bytes read from src and not yet written to dst
    std::uint64_t bytes = 0;
    std::uint32_t reads = 0;       // reads that took bytes (their average size tells messages)
    std::uint32_t frame_left = 0;  // encode, pipe: pipe bytes the last header announced
    bool splice = false;           // splice() may be used for this flow
    bool bulk = false;             // reads are large: splice() from the next read on an empty flow
    bool src_readable = true;      // edge-triggered readiness not yet consumed
    bool dst_writable = true;
    bool src_eof = false;
    bool shut = false;    // end of stream passed on to dst
    bool paused = false;  // reading stopped at the high watermark
    // Framing (only on the tunnel's flows).
    bool encode = false;     // dst is the framed tunnel
    bool decode = false;     // src is the framed tunnel
    bool end_frame = false;  // the header is the end-of-direction frame
    bool raw = false;        // framing v2: this direction's framing has ended (raw header)
    std::uint8_t header_len = 0;
    std::uint8_t header_off = 0;
    std::byte header[framing::kHeaderSize]{};  // encode: a header still to write
    framing::Decoder decoder;
    // The kernel relay (its flow and counts in kernel_, made at the first hand-over).
    bool may_offload = false;        // not yet tried, and both ends are sockets
    bool last_read_drained = false;  // the last read left src empty (a hand-over needs it)
    bool kernel = false;             // the kernel moves this direction's bytes now
    bool attached = false;           // in the kernel relay's maps (until the relay ends)
    bool passing = false;            // the kernel relay gave it back (its target stalled)
    bool window_taken = false;       // its kernel relay window is charged to the memory budget
    bool done() const { return src_eof && pending == 0 && shut; }
  };
  struct Step {
    stacks::IoResult::Status status;
    std::size_t bytes;
    int err;
    bool drained;  // the source holds nothing more now (see IoResult::drained)
  };
  // A splice() read smaller than this ends bulk mode.
  static constexpr std::size_t kSmallRead = 4096;
  // Only a flow whose reads are messages (at most this on average) goes to the kernel relay: it
  // moves small messages without a wake-up, but streams more slowly than splice()
  // (bench/README.md).
  static constexpr std::size_t kMessageRead = 16 * 1024;

  Relay(Worker& worker, const Info& info, std::unique_ptr<stacks::StackConnection> downstream,
        std::unique_ptr<stacks::StackConnection> upstream);
  // Puts `bytes` ahead of everything in flows_[0]. False on a protocol error or no memory.
  bool preload(std::span<const std::byte> bytes);

  Direction direction(const Flow& f) const {
    return &f == &flows_[0] ? Direction::kUpstream : Direction::kDownstream;
  }
  // Moves what can move now. Returns false if the relay finished inside.
  bool pump(Flow& f);
  // Adds `moved` bytes to the flow and its metric, and zeroes it.
  void account(Flow& f, std::size_t& moved);
  // Appends to the held buffer; an encode flow adds the payload it took to `taken`.
  Step readIn(Flow& f, std::size_t& taken);
  // Decode flows in bulk: reads only what is missing of the next frame header.
  Step readHeader(Flow& f);
  // Writes what dst takes of: a pending frame header, then the held bytes.
  Step flush(Flow& f, std::size_t& written);
  // Decodes `n` bytes just read at `at` (a decode flow): payload stays at `at`, returns its
  // size, or -1 on a protocol error. Takes the end frame and what follows it.
  long decodeRead(Flow& f, std::byte* at, std::size_t n);
  // Reads into the worker's scratch buffer and writes straight to dst (adding to `written`);
  // what dst does not take is kept in a pooled buffer.
  Step copyThrough(Flow& f, std::size_t& written);
  Step writeOut(Flow& f);
  Step spliceIn(Flow& f);
  Step spliceOut(Flow& f);
  bool acquireSpace(Flow& f);  // the flow's copy buffer
  void releaseSpace(Flow& f);
  void fail(const Step& step);
  // Re-evaluates after a pump: finished, half-closed, activity.
  void settle();
  void finish(Outcome outcome, stacks::CloseType close, int err = 0);
  // Reads the liveness channel; false if the relay finished (the peer sidecar is gone).
  bool checkControl();
  // Hands `f` to the kernel relay if it is time and the flow is between messages (on a framed
  // tunnel, writes the raw header first). False if the relay finished inside.
  bool maybeOffload(Flow& f);
  // A flow in the kernel relay: sees the source's end of stream and errors on either socket,
  // and shuts the destination once the kernel has sent everything; a flow that passes comes
  // back here once it has. False if finished inside.
  bool pumpKernel(Flow& f);
  // Arms the check of a kernel flow waiting for its destination to drain.
  void checkDrainLater();
  // Tells each connection which readiness this relay still wants: reads where a flow in this
  // process takes from it, writes where one writes to it (see StackConnection::watch()).
  void updateWatches();
  // Adds the kernel's newly moved bytes of `f` to its count and the metric; true if any.
  bool countKernelBytes(Flow& f);
  // Gives the flow's kernel relay window back to the memory budget (if it holds one).
  void giveWindowBack(Flow& f);
  static void onDrainCheck(evutil_socket_t, short, void* arg);

  Worker& worker_;
  Info info_;
  std::unique_ptr<stacks::StackConnection> downstream_;
  std::unique_ptr<stacks::StackConnection> upstream_;
  Flow flows_[2];
  Clock::time_point last_active_;
  bool half_closed_ = false;
  bool finished_ = false;
  std::vector<std::byte> leftover_;  // inbound: bytes after the end frame (the next HELLO)
  std::unique_ptr<stacks::StackConnection> control_;  // the liveness channel (see start())
  bool peer_done_ = false;                            // it carried kPeerDone
  // What a relay with a flow in the kernel relay needs, made at the first hand-over: most
  // relays never have one, and an idle connection's memory counts.
  struct KernelState {
    KernelRelay::Flow flows[2];
    std::uint64_t counted[2] = {0, 0};  // of the kernel's bytes, those already in `bytes`
    // A kernel flow whose source ended (or that passes) waits for the kernel to send the
    // rest: checked again after drain_wait, which doubles up to kDrainWaitMax.
    EventPtr drain_timer;
    std::chrono::milliseconds drain_wait{1};
  };
  static constexpr std::chrono::milliseconds kDrainWaitMax{100};
  std::unique_ptr<KernelState> kernel_;
  std::size_t index(const Flow& f) const { return &f == &flows_[0] ? 0 : 1; }
  KernelRelay::Flow& kernelFlow(const Flow& f) { return kernel_->flows[index(f)]; }
};

}  // namespace dmm::proxy
