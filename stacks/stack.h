#pragma once
// The stack plug-in interface: how the proxy opens, reads, writes and closes a connection over
// one transport stack instance (kernel TCP, DPDK user-space TCP, RDMA), without knowing which.
//
//   StackFactory      registered by kind name; validates its [[stack]] options; creates Stacks
//   Stack             one named instance of a kind (several may coexist with different tuning)
//   StackConnection   one connection over an instance: non-blocking I/O, half-close, close types
//   ConnectionCallbacks  readiness and connect results, delivered on the owning worker's loop
//
// Threading: a StackConnection belongs to the worker loop it was created on; every method and
// every callback runs on that loop's thread. A Stack is shared by all workers and must be safe
// to call from any of them.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/event_loop.h"
#include "common/result.h"
#include "common/socket_address.h"
#include "common/toml_table.h"
#include "common/unique_fd.h"

namespace dmm::stacks {

// What a stack can do; the relay queries these instead of assuming (HAProxy's XPRT_CAN_SPLICE).
enum Capability : std::uint32_t {
  kCanSplice = 1u << 0,        // connections expose a kernel TCP socket usable with splice()
  kZeroCopy = 1u << 1,         // the stack can send from caller-owned memory
  kNeedsPollThread = 1u << 2,  // the stack runs its own poll thread (DPDK lcore, RDMA CQ)
  kIpv6 = 1u << 3,             // can carry IPv6 destinations and peers
  kHalfClose = 1u << 4,        // shutdownWrite() keeps the other direction open
  // Sessions flow on a data connection of the stack's own, opened after the handshake and bound
  // to the session with its token (connectData() / expectData()); the handshake's control
  // connection stays open beside it as the liveness channel.
  kOwnDataPath = 1u << 5,
};

// The handshake's SESSION_TOKEN: binds a data connection to the session that issued it.
using SessionToken = std::array<std::uint8_t, 16>;

enum class CloseType : std::uint8_t {
  kGraceful,  // flush what was written, then end the stream (FIN)
  kAbort,     // drop buffers and tell the peer the stream was cut (RST)
};

// The outcome of one non-blocking read() or write().
struct IoResult {
  enum class Status : std::uint8_t {
    kOk,          // `bytes` moved (> 0)
    kWouldBlock,  // nothing now; wait for the next onReadable()/onWritable()
    kEof,         // read only: the peer ended its direction (half-close or close)
    kReset,       // the peer reset the connection, or our write hit a closed one
    kError,       // any other failure; `err` has the errno
  };
  Status status = Status::kOk;
  std::size_t bytes = 0;
  int err = 0;
  // read only, with kOk: the connection is known to hold nothing more right now (a short read
  // with no end of stream or error pending), so the caller may wait for the next onReadable()
  // instead of reading again to see kWouldBlock. False means "unknown", never "more".
  bool drained = false;

  static IoResult ok(std::size_t n, bool drained = false) { return {Status::kOk, n, 0, drained}; }
  static IoResult wouldBlock() { return {Status::kWouldBlock, 0, 0}; }
  static IoResult eof() { return {Status::kEof, 0, 0}; }
  static IoResult fromErrno(int e);
};

class StackConnection;

// Events of a connection, delivered on its worker loop. Readiness is edge-triggered: after
// onReadable(), read until kWouldBlock, or remember that more may be waiting; the same holds
// for onWritable(). A callback may close the connection but must not delete it (hand it to
// EventLoop::deferDelete instead).
class ConnectionCallbacks {
 public:
  virtual ~ConnectionCallbacks() = default;
  // An outgoing connect() completed; the connection is writable.
  virtual void onConnected(StackConnection& conn) = 0;
  // An outgoing connect() failed (refused, unreachable, ...). The connection is dead.
  virtual void onConnectFailed(StackConnection& conn, Error error) = 0;
  virtual void onReadable(StackConnection& conn) = 0;
  virtual void onWritable(StackConnection& conn) = 0;
};

class StackConnection {
 public:
  // Destroying a connection that was not closed aborts it.
  virtual ~StackConnection() = default;

  // Routes later events to `callbacks` (e.g. from the handshake to the relay).
  virtual void setCallbacks(ConnectionCallbacks& callbacks) = 0;
  virtual IoResult read(std::span<std::byte> buffer) = 0;
  virtual IoResult write(std::span<const std::byte> data) = 0;
  // Ends our direction after the data already written (half-close); reads continue.
  virtual void shutdownWrite() = 0;
  // Ends the connection; no callbacks after this.
  virtual void close(CloseType type) = 0;
  // The kernel socket when the stack has kCanSplice, -1 otherwise.
  virtual int fd() const { return -1; }
  // False when the connection is known to hold nothing to read until its next onReadable()
  // (its last read() found it empty); true when unknown. Lets a new owner skip a read that
  // would only see kWouldBlock.
  virtual bool mayBeReadable() const { return true; }
  virtual std::optional<SocketAddress> peerAddress() const = 0;
  // Which readiness the owner wants reported (a socket whose bytes the kernel relay moves must
  // not wake it per message: the kernel raises a readable wake-up for each segment it takes,
  // though nothing is left to read). The end of stream and errors are reported whatever is
  // asked. Optional; both on by default.
  virtual void watch(bool /*readable*/, bool /*writable*/) {}
};

// Receives the data connection a responder expected (Stack::expectData()), on the loop it
// registered with.
class DataAcceptor {
 public:
  virtual ~DataAcceptor() = default;
  virtual void onDataConnection(std::unique_ptr<StackConnection> conn) = 0;
};

// One metric sample a stack instance reports at scrape time (the proxy adds its stack label).
struct StackSample {
  const char* name;  // full metric name, dmm_sidecar_<kind>_...
  const char* help;
  bool counter;  // counter (else gauge)
  double value;
  const char* label = nullptr;  // an optional second label and its value
  const char* label_value = nullptr;
};

struct ConnectOptions {
  SocketAddress remote;
  std::uint32_t mark = 0;  // SO_MARK for kernel sockets (0: leave unset)
};

// One named instance of a stack kind. Shared by all workers.
class Stack {
 public:
  virtual ~Stack() = default;

  virtual const std::string& name() const = 0;
  virtual std::string_view kind() const = 0;
  virtual std::uint32_t capabilities() const = 0;
  bool has(Capability c) const { return (capabilities() & c) != 0; }

  // Starts a connection to options.remote on `loop`; the result arrives as onConnected() or
  // onConnectFailed(). Errors that are known at once are returned instead.
  virtual Result<std::unique_ptr<StackConnection>> connect(EventLoop& loop,
                                                           const ConnectOptions& options,
                                                           ConnectionCallbacks& callbacks) = 0;
  // Takes over the handshake's control connection to carry the session's data on it (what the
  // kernel kind does), applying the instance's tuning. Stacks that carry data on connections of
  // their own return an error.
  virtual Result<std::unique_ptr<StackConnection>> adopt(
      std::unique_ptr<StackConnection> control) = 0;
  // The connect parameters this instance puts into a handshake offer (opaque to other kinds).
  virtual std::vector<std::uint8_t> advertise() const = 0;
  // False while the instance cannot carry connections (device gone, port down).
  virtual bool healthy() const { return true; }

  // kOwnDataPath stacks only.
  // Responder: the peer offered this kind with `offer_params`; expect its data connection
  // presenting `token`, and hand it to `acceptor` on `loop` (the caller's). Returns this
  // instance's connect parameters for the REPLY, or an error when it cannot take the offer
  // (unreachable from here, full). `acceptor` must stay valid until the connection arrives or
  // cancelData().
  virtual Result<std::vector<std::uint8_t>> expectData(EventLoop& loop, const SessionToken& token,
                                                       std::span<const std::uint8_t> offer_params,
                                                       DataAcceptor& acceptor);
  // Responder: no longer expect `token` (timeout, control connection gone), on the `loop` that
  // expected it. No callback reaches `acceptor` afterwards, even for a data connection the
  // instance had already matched with the token and not yet handed over.
  virtual void cancelData(EventLoop& loop, const SessionToken& token);
  // Initiator: opens the data connection to the responder's `peer_params` (its REPLY) over
  // this instance and presents `token`. onConnected() when the responder accepted the token,
  // onConnectFailed() otherwise.
  virtual Result<std::unique_ptr<StackConnection>> connectData(
      EventLoop& loop, std::span<const std::uint8_t> peer_params, const SessionToken& token,
      ConnectionCallbacks& callbacks);
  // One line of state for `ctl stacks` and the start-up log ("" when there is nothing to say).
  virtual std::string status() const { return {}; }
  // The instance's own metrics, read at scrape time (any thread).
  virtual void samples(std::vector<StackSample>& out) const { (void)out; }
};

// Kind-specific options of one [[stack]] table, produced by the kind's factory.
class StackOptions {
 public:
  virtual ~StackOptions() = default;
};

class StackFactory {
 public:
  virtual ~StackFactory() = default;
  virtual std::string_view kind() const = 0;
  // Reads the kind's own keys from `table` (name and kind are read by the caller, which also
  // rejects unknown keys afterwards). Problems go to table.diagnostics(); returns nullptr then.
  virtual std::unique_ptr<StackOptions> parseOptions(TomlTable& table) const = 0;
  // Creates an instance; called once per [[stack]] at start-up.
  virtual Result<std::unique_ptr<Stack>> create(std::string name,
                                                const StackOptions& options) const = 0;
};

// Factories by kind name. Built once at start-up, read-only afterwards.
class StackRegistry {
 public:
  void add(std::unique_ptr<StackFactory> factory);
  const StackFactory* find(std::string_view kind) const;
  std::vector<std::string> kinds() const;

 private:
  std::vector<std::unique_ptr<StackFactory>> factories_;
};

// Registers the kinds built into this binary (kernel, and later dpdk and rdma).
void registerBuiltinStacks(StackRegistry& registry);

}  // namespace dmm::stacks
