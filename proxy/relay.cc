#include "proxy/relay.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/log.h"
#include "common/socket_util.h"
#include "proxy/worker.h"

namespace dmm::proxy {

using stacks::CloseType;
using stacks::IoResult;
using Status = stacks::IoResult::Status;

namespace {

Relay::Clock::time_point nowTime() {
  return Relay::Clock::now();
}

}  // namespace

void Relay::start(Worker& worker, const Info& info,
                  std::unique_ptr<stacks::StackConnection> downstream,
                  std::unique_ptr<stacks::StackConnection> upstream,
                  std::span<const std::byte> preload,
                  std::unique_ptr<stacks::StackConnection> control) {
  auto& faults = worker.context().faults;
  if (faults.armed() && info.stack < worker.context().stacks.size()) {
    // A reset or a stall drawn for the stack's connection (proxy/faults.h).
    auto& tunnel = info.tunnel_is_upstream ? upstream : downstream;
    tunnel = faults.wrapRelayed(worker.loop(), info.stack, std::move(tunnel));
  }
  // The relay owns itself from here: it hands itself to deferDelete() when it finishes.
  auto* relay = new Relay(worker, info, std::move(downstream), std::move(upstream));
  if (control) {
    relay->control_ = std::move(control);
    relay->control_->setCallbacks(*relay);
  }
  worker.relayStarted(*relay);
  worker.metrics().connectionOpened(info.role);  // finish() closes it in the same place
  if (info.early_bytes > 0) {
    relay->flows_[0].bytes += info.early_bytes;
    worker.metrics()
        .bytes(info.role, info.stack, Direction::kUpstream)
        .Increment(static_cast<double>(info.early_bytes));
  }
  if (!preload.empty() && !relay->preload(preload)) {
    relay->fail(Step{Status::kError, 0, EPROTO, false});
    return;
  }
  if (relay->control_ && !relay->checkControl()) return;
  // Readiness edges may have fired during the handshake: read whatever may hold bytes.
  if (!relay->pump(relay->flows_[0])) return;
  if (!relay->pump(relay->flows_[1])) return;
  relay->settle();
}

Relay::Relay(Worker& worker, const Info& info, std::unique_ptr<stacks::StackConnection> downstream,
             std::unique_ptr<stacks::StackConnection> upstream)
    : worker_(worker),
      info_(info),
      downstream_(std::move(downstream)),
      upstream_(std::move(upstream)),
      last_active_(nowTime()) {
  downstream_->setCallbacks(*this);
  upstream_->setCallbacks(*this);
  bool splice = worker_.config().splice && worker_.spliceUsable() && downstream_->fd() >= 0 &&
                upstream_->fd() >= 0;
  flows_[0].src = downstream_.get();
  flows_[0].dst = upstream_.get();
  flows_[1].src = upstream_.get();
  flows_[1].dst = downstream_.get();
  for (auto& f : flows_) {
    f.splice = splice;
    f.src_readable = f.src->mayBeReadable();
    // Sockets both (whether TCP ones is up to attach()); not the fault wrapper, which has none.
    f.may_offload = worker_.kernelRelay() != nullptr && f.src->fd() >= 0 && f.dst->fd() >= 0;
  }
  if (info_.framed) {
    // flows_[0] goes towards upstream: it encodes when upstream is the tunnel.
    flows_[0].encode = info_.tunnel_is_upstream;
    flows_[1].decode = info_.tunnel_is_upstream;
    flows_[0].decode = !info_.tunnel_is_upstream;
    flows_[1].encode = !info_.tunnel_is_upstream;
    for (auto& f : flows_)
      f.decoder = framing::Decoder(info_.raw_frames);
  }
}

bool Relay::preload(std::span<const std::byte> bytes) {
  Flow& f = flows_[0];
  const std::size_t reserve = f.encode ? framing::kHeaderSize : 0;
  if (bytes.size() + reserve > worker_.buffers().bufferSize() || !acquireSpace(f)) return false;
  std::memcpy(f.buffer + reserve, bytes.data(), bytes.size());
  std::size_t held = bytes.size();
  if (f.decode) {
    long payload = decodeRead(f, f.buffer, bytes.size());
    if (payload < 0) return false;
    held = static_cast<std::size_t>(payload);
  } else if (f.encode) {
    framing::putHeader(f.buffer, static_cast<std::uint32_t>(bytes.size()));
    held += reserve;
    f.bytes += bytes.size();  // encode flows count payload as it is taken
    worker_.metrics()
        .bytes(info_.role, info_.stack, Direction::kUpstream)
        .Increment(static_cast<double>(bytes.size()));
  }
  f.head = 0;
  f.pending = static_cast<std::uint32_t>(held);
  if (f.pending == 0) releaseSpace(f);
  return true;
}

Relay::~Relay() {
  for (auto& f : flows_)
    releaseSpace(f);
}

bool Relay::checkControl() {
  for (;;) {
    std::byte buf[64];
    auto r = control_->read(buf);
    switch (r.status) {
      case Status::kOk:
        if (std::find(buf, buf + r.bytes, kPeerDone) != buf + r.bytes) peer_done_ = true;
        continue;
      case Status::kWouldBlock:
        return true;
      default:
        if (peer_done_) return true;  // its relay ended cleanly, ours finishes on its own
        spdlog::debug("conn {:x}: the peer sidecar's control connection ended: peer gone",
                      info_.id);
        finish(Outcome::kReset, CloseType::kAbort);
        return false;
    }
  }
}

void Relay::onReadable(stacks::StackConnection& conn) {
  if (&conn == control_.get()) {
    if (!finished_) (void)checkControl();
    return;
  }
  Flow& f = &conn == downstream_.get() ? flows_[0] : flows_[1];
  f.src_readable = true;
  if (pump(f)) settle();
}

void Relay::onWritable(stacks::StackConnection& conn) {
  if (&conn == control_.get()) return;
  Flow& f = &conn == upstream_.get() ? flows_[0] : flows_[1];
  f.dst_writable = true;
  if (pump(f)) settle();
}

void Relay::resume() {
  if (finished_) return;
  if (!pump(flows_[0])) return;
  if (!pump(flows_[1])) return;
  settle();
}

bool Relay::acquireSpace(Flow& f) {
  if (f.buffer != nullptr) return true;
  f.buffer = worker_.buffers().get();
  f.head = 0;
  return f.buffer != nullptr;
}

void Relay::releaseSpace(Flow& f) {
  bool returned = false;
  if (f.pipe_read >= 0) {
    if (f.pending == 0) {
      worker_.pipes().put(f.pipe_read, f.pipe_write);
    } else {  // bytes left behind (reset or error): the pipe cannot be reused
      worker_.pipes().discard(f.pipe_read, f.pipe_write);
    }
    f.pipe_read = f.pipe_write = -1;
    returned = true;
  }
  if (f.buffer != nullptr) {
    worker_.buffers().put(f.buffer);
    f.buffer = nullptr;
    f.head = 0;
    returned = true;
  }
  if (returned) worker_.memoryReturned();
}

long Relay::decodeRead(Flow& f, std::byte* at, std::size_t n) {
  auto r = f.decoder.decodeInPlace({at, n});
  if (r.error) return -1;
  if (r.raw) {
    // The peer ended this direction's framing: the rest is plain bytes, ending with its FIN.
    f.decode = false;
    f.raw = true;
  }
  if (r.end) {
    f.src_eof = true;
    // Only the initiator speaks after an end frame (the next HELLO, once both directions have
    // ended); anything the responder sends after its end frame is a protocol error.
    if (r.consumed < n) {
      if (info_.role == Role::kOutbound) return -1;
      leftover_.insert(leftover_.end(), at + r.consumed, at + n);
    }
  }
  return static_cast<long>(r.payload);
}

Relay::Step Relay::readIn(Flow& f, std::size_t& taken) {
  auto size = static_cast<std::uint32_t>(worker_.buffers().bufferSize());
  const std::uint32_t reserve = f.encode ? framing::kHeaderSize : 0;
  // Keep the pending bytes contiguous: [head, head + pending). Compact when the tail is short.
  if (f.head > 0 && size - f.head - f.pending <= reserve) {
    std::memmove(f.buffer, f.buffer + f.head, f.pending);
    f.head = 0;
  }
  std::byte* tail = f.buffer + f.head + f.pending;
  auto r = f.src->read({tail + reserve, size - f.head - f.pending - reserve});
  if (r.status != Status::kOk) return {r.status, r.bytes, r.err, false};
  if (f.encode) {
    framing::putHeader(tail, static_cast<std::uint32_t>(r.bytes));
    f.pending += static_cast<std::uint32_t>(r.bytes + reserve);
    taken += r.bytes;  // encode flows count payload as it is taken
  } else if (f.decode) {
    long payload = decodeRead(f, tail, r.bytes);
    if (payload < 0) return {Status::kError, 0, EPROTO, false};
    f.pending += static_cast<std::uint32_t>(payload);
  } else {
    f.pending += static_cast<std::uint32_t>(r.bytes);
  }
  return {r.status, r.bytes, r.err, r.drained};
}

Relay::Step Relay::copyThrough(Flow& f, std::size_t& written) {
  auto scratch = worker_.scratch();
  const std::size_t reserve = f.encode ? framing::kHeaderSize : 0;
  auto r = f.src->read(scratch.subspan(reserve));
  if (r.status != Status::kOk) return {r.status, 0, r.err, false};
  std::size_t out_size = r.bytes + reserve;  // bytes to write: a frame, or the payload
  if (f.encode) {
    framing::putHeader(scratch.data(), static_cast<std::uint32_t>(r.bytes));
    written += r.bytes;  // encode flows count payload as it is taken
  } else if (f.decode) {
    long payload = decodeRead(f, scratch.data(), r.bytes);
    if (payload < 0) return {Status::kError, 0, EPROTO, false};
    out_size = static_cast<std::size_t>(payload);
  }
  std::size_t out = 0;
  if (f.dst_writable && out_size > 0) {
    auto w = f.dst->write(scratch.first(out_size));
    if (w.status == Status::kOk) {
      out = w.bytes;
    } else if (w.status == Status::kWouldBlock) {
      f.dst_writable = false;
    } else {
      return {w.status, 0, w.err, false};
    }
  }
  if (!f.encode) written += out;
  if (out < out_size) {  // keep what the destination could not take yet
    // pump() made sure a buffer could be had before this read (or holds one).
    if (!acquireSpace(f)) return {Status::kError, 0, ENOMEM, false};
    f.pending = static_cast<std::uint32_t>(out_size - out);
    f.head = 0;
    std::memcpy(f.buffer, scratch.data() + out, f.pending);
  }
  // A read that filled the scratch buffer means a stream: splice it from the next read on.
  if (r.bytes + reserve == scratch.size() && f.splice) f.bulk = true;
  return {Status::kOk, r.bytes, 0, r.drained};
}

Relay::Step Relay::readHeader(Flow& f) {
  std::byte header[framing::kHeaderSize];
  std::size_t want = f.decoder.headerWanted();
  auto r = f.src->read({header, want});
  if (r.status != Status::kOk) return {r.status, 0, r.err, false};
  if (decodeRead(f, header, r.bytes) != 0) return {Status::kError, 0, EPROTO, false};
  return {Status::kOk, r.bytes, 0, r.drained};
}

Relay::Step Relay::writeOut(Flow& f) {
  auto r = f.dst->write({f.buffer + f.head, f.pending});
  if (r.status == Status::kOk) {
    f.head += static_cast<std::uint32_t>(r.bytes);
    if (r.bytes == f.pending) f.head = 0;
  }
  return {r.status, r.bytes, r.err, false};
}

Relay::Step Relay::spliceIn(Flow& f) {
  std::size_t room = worker_.pipes().pipeSize() - f.pending;
  if (f.decode) room = std::min<std::size_t>(room, f.decoder.frameLeft());
  ssize_t n = ::splice(f.src->fd(), nullptr, f.pipe_write, nullptr, room,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
  if (n > 0) {
    f.pending += static_cast<std::uint32_t>(n);
    if (f.decode) f.decoder.took(static_cast<std::uint32_t>(n));
    // Small reads mean the stream slowed down: copy again once the pipe is empty.
    if (static_cast<std::size_t>(n) < kSmallRead) f.bulk = false;
    return {Status::kOk, static_cast<std::size_t>(n), 0, false};
  }
  // A framed tunnel ends with an end frame: a plain end of stream means it was cut.
  if (n == 0) return {f.decode ? Status::kReset : Status::kEof, 0, 0, false};
  auto r = IoResult::fromErrno(errno);
  return {r.status, 0, r.err, false};
}

Relay::Step Relay::spliceOut(Flow& f) {
  std::size_t len = f.encode ? std::min<std::size_t>(f.pending, f.frame_left) : f.pending;
  ssize_t n =
      ::splice(f.pipe_read, nullptr, f.dst->fd(), nullptr, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
  if (n > 0) {
    if (f.encode) f.frame_left -= static_cast<std::uint32_t>(n);
    return {Status::kOk, static_cast<std::size_t>(n), 0, false};
  }
  auto r = IoResult::fromErrno(n == 0 ? EPIPE : errno);
  return {r.status, 0, r.err, false};
}

Relay::Step Relay::flush(Flow& f, std::size_t& written) {
  std::size_t total = 0;
  while (f.dst_writable) {
    Step s{Status::kOk, 0, 0, false};
    if (f.header_off < f.header_len) {
      if (f.pipe_read >= 0 && f.pending > 0) {
        // A header for the pipe's bytes: MSG_MORE lets the kernel send it in one segment with
        // the spliced payload that follows, rather than as a 4-byte segment of its own.
        ssize_t n = ::send(f.dst->fd(), f.header + f.header_off, f.header_len - f.header_off,
                           MSG_MORE | MSG_NOSIGNAL);
        if (n >= 0) {
          s = {Status::kOk, static_cast<std::size_t>(n), 0, false};
        } else {
          auto r = IoResult::fromErrno(errno);
          s = {r.status, 0, r.err, false};
        }
      } else {
        auto r = f.dst->write({f.header + f.header_off, std::size_t{f.header_len} - f.header_off});
        s = {r.status, r.bytes, r.err, false};
      }
      if (s.status == Status::kOk) {
        f.header_off += static_cast<std::uint8_t>(s.bytes);
        if (f.header_off == f.header_len && f.end_frame) f.shut = true;
      }
    } else if (f.pending > 0) {
      const bool in_pipe = f.pipe_read >= 0;
      if (in_pipe && f.encode && f.frame_left == 0) {
        // The pipe's bytes go out as one frame: its header first.
        f.frame_left = f.pending;
        framing::putHeader(f.header, f.pending);
        f.header_len = framing::kHeaderSize;
        f.header_off = 0;
        continue;
      }
      s = in_pipe ? spliceOut(f) : writeOut(f);
      if (s.status == Status::kOk) {
        f.pending -= static_cast<std::uint32_t>(s.bytes);
        if (!f.encode || in_pipe) written += s.bytes;  // copied frames were counted when read
      }
    } else {
      break;
    }
    if (s.status == Status::kWouldBlock) {
      f.dst_writable = false;
      break;
    }
    if (s.status != Status::kOk) return s;
    total += s.bytes;
  }
  return {Status::kOk, total, 0, false};
}

bool Relay::pump(Flow& f) {
  if (finished_) return false;
  if (f.kernel) return pumpKernel(f);
  const std::size_t low = worker_.config().low_watermark;
  std::size_t moved = 0;
  for (;;) {
    bool progress = false;
    Step w = flush(f, moved);
    if (w.status != Status::kOk) {
      account(f, moved);  // what moved before the failure went through: count it
      fail(w);
      return false;
    }
    progress = w.bytes > 0;
    if (f.pending == 0) releaseSpace(f);

    if (!f.src_eof && f.src_readable) {
      const bool in_pipe = f.pipe_read >= 0;
      const std::size_t high =
          in_pipe ? worker_.pipes().pipeSize()
                  : worker_.buffers().bufferSize() - (f.encode ? framing::kHeaderSize : 0);
      if (f.pending >= high || (f.paused && f.pending > low)) {
        if (!f.paused) {
          f.paused = true;
          worker_.metrics().relayPaused(direction(f));
        }
      } else if (in_pipe && f.decode && f.decoder.frameLeft() == 0) {
        // The next frame header must be read, but bytes wait in the pipe: they go first.
      } else {
        f.paused = false;
        // Held bytes stay where they are (pipe or buffer) until written. An empty flow copies
        // through the scratch buffer, or splices when it carries bulk (a decode flow only
        // inside a frame's payload).
        bool use_pipe = in_pipe || (f.pending == 0 && f.splice && f.bulk &&
                                    (!f.decode || f.decoder.frameLeft() > 0));
        if (use_pipe && !in_pipe) {
          int err = worker_.pipes().get(f.pipe_read, f.pipe_write);
          if (err == ENOBUFS) {
            use_pipe = false;  // no budget for a pipe: copy this read
          } else if (err != 0) {
            // No pipe could be made (out of fds): this connection cannot go on.
            account(f, moved);
            fail(Step{Status::kError, 0, err, false});
            return false;
          }
        }
        // A copy may leave bytes the destination cannot take yet, which need a buffer: when
        // the memory budget cannot give one, the flow waits (unread bytes stay in the
        // source's socket) until buffers are returned.
        if (!use_pipe && f.buffer == nullptr && !worker_.buffers().canGet()) {
          worker_.memoryWait(*this);
          break;
        }
        // A bulk decode flow at a frame boundary reads just the next header, so the payload
        // after it is spliced rather than copied.
        const bool header_only = !use_pipe && f.decode && f.pending == 0 && f.splice && f.bulk &&
                                 f.decoder.frameLeft() == 0;
        Step s = use_pipe        ? spliceIn(f)
                 : header_only   ? readHeader(f)
                 : f.pending > 0 ? readIn(f, moved)
                                 : copyThrough(f, moved);
        if (s.status == Status::kOk) {
          progress = true;
          if (s.drained) f.src_readable = false;
          f.last_read_drained = s.drained;
          ++f.reads;
        } else if (s.status == Status::kWouldBlock) {
          // With bytes in the pipe, EAGAIN may mean "pipe full" rather than "socket empty"
          // (each skb fragment takes a pipe slot): keep the readiness and retry after a flush.
          if (!(use_pipe && f.pending > 0)) {
            f.src_readable = false;
            f.last_read_drained = true;
          }
        } else if (s.status == Status::kEof && !f.decode) {
          f.src_eof = true;
        } else if (s.status == Status::kEof) {
          // The framed tunnel closed without its end frame: the stream was cut.
          account(f, moved);
          fail(Step{Status::kReset, 0, ECONNRESET, false});
          return false;
        } else if (use_pipe && (s.err == EINVAL || s.err == ENOSYS) && f.pending == 0) {
          // splice() refused this pair: copy from now on, here and in this worker.
          releaseSpace(f);
          for (auto& other : flows_) {
            other.splice = false;
            other.bulk = false;
          }
          worker_.disableSplice();
          worker_.metrics().spliceDisabled();
          spdlog::warn("conn {:x}: splice() failed ({}), relaying with read/write copies", info_.id,
                       std::strerror(s.err));
          progress = true;
        } else {
          account(f, moved);
          fail(s);
          return false;
        }
      }
    }
    if (f.src_eof && f.pending == 0 && !f.shut) {
      if (!f.encode) {
        f.dst->shutdownWrite();
        f.shut = true;
      } else if (!f.end_frame && f.header_off == f.header_len) {
        framing::putHeader(f.header, 0);  // the end of this direction, in-band
        f.header_len = framing::kHeaderSize;
        f.header_off = 0;
        f.end_frame = true;
        progress = true;
      }
    }
    if (!progress) break;
    if (moved >= kWakeupBudget) {
      worker_.scheduleResume(*this);
      break;
    }
  }
  if (moved > 0) {
    account(f, moved);
    last_active_ = nowTime();
    worker_.relayActive(*this);
  }
  if (f.may_offload) return maybeOffload(f);
  return true;
}

bool Relay::maybeOffload(Flow& f) {
  // Between messages: the source read to empty (the kernel takes a segment whole, even one a
  // read took part of), nothing held, no header half written. A framed source waits for the
  // peer's raw header (decode turns off then). Streams stay here, with splice().
  if (f.kernel || f.decode || f.src_eof || f.shut || f.paused || f.pending > 0 ||
      f.header_off != f.header_len || !f.last_read_drained || f.bulk ||
      f.bytes > std::uint64_t{f.reads} * kMessageRead)
    return true;
  if (nowTime() - info_.started < worker_.config().kernel_relay_after) return true;
  if (f.encode && !info_.raw_frames) {  // the peer cannot take a raw direction: stay framed
    f.may_offload = false;
    return true;
  }
  if (!f.window_taken) {
    // What the kernel may queue for this direction, unaccounted by the kernel, counts against
    // relay.buffer_memory like the workers' own buffers (checked before the framing ends), up
    // to half of it: a storm of message flows must not leave no room to admit connections.
    if (!worker_.takeKernelWindow(worker_.config().kernel_relay_window)) {
      f.may_offload = false;
      worker_.metrics().kernelRelayRefused(Metrics::KernelRelayRefusal::kMemory);
      return true;
    }
    f.window_taken = true;
  }
  if (f.encode) {
    // The end of this direction's framing; the kernel's bytes follow it on the tunnel.
    framing::putHeader(f.header, framing::kRawHeader);
    f.header_len = framing::kHeaderSize;
    f.header_off = 0;
    f.encode = false;
    f.raw = true;
    std::size_t moved = 0;
    Step w = flush(f, moved);
    if (w.status != Status::kOk) {
      fail(w);
      return false;
    }
    if (f.header_off != f.header_len) return true;  // the rest once writable, then here again
  }
  f.may_offload = false;  // one try per flow
  auto flow = worker_.kernelRelay()->attach(f.src->fd(), f.dst->fd());
  if (!flow) {
    giveWindowBack(f);
    std::string_view why = flow.error().reason;
    worker_.metrics().kernelRelayRefused(
        why == "not_relayable"       ? Metrics::KernelRelayRefusal::kNotRelayable
        : why == "kernel_relay_full" ? Metrics::KernelRelayRefusal::kFull
                                     : Metrics::KernelRelayRefusal::kError);
    spdlog::debug("conn {:x}: the kernel relay did not take the {} direction: {} ({})", info_.id,
                  direction(f) == Direction::kUpstream ? "upstream" : "downstream", why,
                  std::strerror(flow.error().code));
    return true;
  }
  if (!kernel_) kernel_ = std::make_unique<KernelState>();
  kernelFlow(f) = *flow;
  kernel_->counted[index(f)] = 0;
  f.kernel = true;
  f.attached = true;
  spdlog::debug("conn {:x}: {} direction handed to the kernel relay", info_.id,
                direction(f) == Direction::kUpstream ? "upstream" : "downstream");
  worker_.metrics().kernelRelayAttached(direction(f));
  worker_.kernelFlowStarted(flow->cookie, *this);
  updateWatches();
  return true;
}

bool Relay::pumpKernel(Flow& f) {
  if (f.shut) return true;
  // No reads: the kernel takes the source's bytes. Its end of stream and errors on either
  // socket still show here, and are passed on as ever; readable bytes on the source mean the
  // flow passes (its target stopped taking them).
  pollfd p[2] = {{f.src->fd(), POLLIN | POLLRDHUP, 0}, {f.dst->fd(), 0, 0}};
  if (::poll(p, 2, 0) < 0) return true;  // EINTR: the next event or check looks again
  for (const auto& q : p) {
    if ((q.revents & POLLERR) != 0) {
      int err = net::socketError(q.fd);
      spdlog::debug("conn {:x}: kernel-relayed {} direction: error on its {}: {}", info_.id,
                    direction(f) == Direction::kUpstream ? "upstream" : "downstream",
                    q.fd == f.src->fd() ? "source" : "destination", std::strerror(err));
      countKernelBytes(f);
      fail(Step{Status::kReset, 0, err != 0 ? err : ECONNRESET, false});
      return false;
    }
  }
  if ((p[0].revents & POLLRDHUP) != 0) f.src_eof = true;
  KernelRelay& kernel = *worker_.kernelRelay();
  if (!f.passing && (p[0].revents & POLLIN) != 0 && kernel.passing(kernelFlow(f))) f.passing = true;
  if (!f.src_eof && !f.passing) return true;
  // The end of stream, or the bytes the source holds now, come after every byte the kernel
  // took: only once the destination has all of those.
  auto drained = kernel.drained(kernelFlow(f), f.dst->fd());
  if (!drained) {
    countKernelBytes(f);
    fail(Step{Status::kError, 0, drained.error().code, false});
    return false;
  }
  if (!*drained) {
    checkDrainLater();  // the destination is slow: look again shortly
    return true;
  }
  countKernelBytes(f);
  if (f.passing) {
    // Back to this process for the rest of the connection, with reads (the passed bytes are
    // where splice() does not look) that see the end of stream again themselves.
    f.kernel = false;
    f.splice = false;
    f.bulk = false;
    f.src_eof = false;
    f.src_readable = true;
    f.dst_writable = true;
    updateWatches();
    giveWindowBack(f);  // its bytes will wait in the worker's own buffers now
    worker_.metrics().kernelRelayDetached();
    worker_.metrics().kernelRelayHandedBack();
    spdlog::debug("conn {:x}: {} direction back from the kernel relay (its destination stalled)",
                  info_.id, direction(f) == Direction::kUpstream ? "upstream" : "downstream");
    return pump(f);
  }
  f.dst->shutdownWrite();
  f.shut = true;
  return true;
}

void Relay::updateWatches() {
  // flows_[0] reads downstream_ and writes upstream_; flows_[1] the other way round.
  downstream_->watch(!flows_[0].kernel, !flows_[1].kernel);
  upstream_->watch(!flows_[1].kernel, !flows_[0].kernel);
}

void Relay::checkDrainLater() {
  auto& k = *kernel_;
  if (!k.drain_timer) k.drain_timer = worker_.loop().newEvent(-1, 0, &Relay::onDrainCheck, this);
  if (evtimer_pending(k.drain_timer.get(), nullptr) != 0) return;
  timeval tv = toTimeval(k.drain_wait);
  event_add(k.drain_timer.get(), &tv);
  k.drain_wait = std::min(k.drain_wait * 2, kDrainWaitMax);
}

void Relay::onKernelEvent(std::uint64_t cookie, KernelRelay::Event event) {
  if (finished_) return;
  for (auto& f : flows_) {
    if (!f.kernel || kernelFlow(f).cookie != cookie) continue;
    if (event == KernelRelay::Event::kCredit) {
      // More credit, as far as the destination has taken what came before.
      if (auto granted = worker_.kernelRelay()->grant(kernelFlow(f), f.dst->fd()); !granted) {
        fail(Step{Status::kError, 0, granted.error().code, false});
        return;
      }
      return;
    }
    f.passing = true;
    if (pumpKernel(f)) settle();
    return;
  }
}

void Relay::onDrainCheck(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<Relay*>(arg);
  for (auto& f : self->flows_) {
    if (f.kernel && !self->pumpKernel(f)) return;
  }
  self->settle();
}

void Relay::giveWindowBack(Flow& f) {
  if (!f.window_taken) return;
  f.window_taken = false;
  worker_.giveKernelWindow(worker_.config().kernel_relay_window);
}

bool Relay::countKernelBytes(Flow& f) {
  if (!f.attached) return false;
  std::uint64_t total = worker_.kernelRelay()->moved(kernelFlow(f));
  auto& counted = kernel_->counted[index(f)];
  if (total <= counted) return false;
  auto fresh = static_cast<std::size_t>(total - counted);
  counted = total;
  account(f, fresh);
  return true;
}

void Relay::refreshKernelFlows() {
  if (finished_) return;
  bool moved = false;
  for (auto& f : flows_)
    moved = countKernelBytes(f) || moved;
  if (moved) {
    last_active_ = nowTime();
    worker_.relayActive(*this);
  }
}

void Relay::account(Flow& f, std::size_t& moved) {
  if (moved == 0) return;
  f.bytes += moved;
  worker_.metrics()
      .bytes(info_.role, info_.stack, direction(f))
      .Increment(static_cast<double>(moved));
  moved = 0;
}

void Relay::settle() {
  if (finished_) return;
  if (flows_[0].done() && flows_[1].done()) {
    finish(Outcome::kClosed, CloseType::kGraceful);
    return;
  }
  if (!half_closed_ && (flows_[0].done() || flows_[1].done())) {
    half_closed_ = true;
    // timeouts.half_closed counts from the half-close, not from the last byte before it; and
    // the half-closed list stays ordered by this time, which the sweep relies on.
    last_active_ = nowTime();
    worker_.relayActive(*this);  // moves it to the half-closed list
  }
}

void Relay::fail(const Step& step) {
  // A reset seen on one side is passed on as a reset to the other; so is any other failure,
  // because the stream is cut either way and a clean end would claim it was complete.
  Outcome outcome = step.status == Status::kReset ? Outcome::kReset : Outcome::kError;
  finish(outcome, CloseType::kAbort, step.err);
}

void Relay::expire(Outcome why) {
  // A clean end is honest only when nothing read is left undelivered. With bytes still held,
  // a FIN would tell the receiver that a truncated stream arrived whole: reset instead.
  bool undelivered = flows_[0].pending > 0 || flows_[1].pending > 0;
  for (auto& f : flows_) {
    if (!f.kernel || f.shut) continue;
    auto drained = worker_.kernelRelay()->drained(kernelFlow(f), f.dst->fd());
    if (!drained || !*drained) undelivered = true;  // the kernel still holds some
  }
  finish(why, undelivered ? CloseType::kAbort : CloseType::kGraceful);
}

void Relay::shutdown() {
  finish(Outcome::kShutdown, CloseType::kAbort);
}

std::string Relay::describe() const {
  const auto& stacks = worker_.context().stacks;
  const char* stack = info_.stack < stacks.size() ? stacks[info_.stack]->name().c_str() : "direct";
  auto age = std::chrono::duration<double>(nowTime() - info_.started).count();
  auto app = info_.facts.appName();
  return fmt::format("{:x} role={} stack={} rule={} policy={} dst={}{}{} up={} down={} age={:.1f}s",
                     info_.id, roleName(info_.role), stack, info_.ruleName(), info_.policyVersion(),
                     info_.destination.toString(), app.empty() ? "" : " app=", app, flows_[0].bytes,
                     flows_[1].bytes, age);
}

void Relay::finish(Outcome outcome, CloseType close, int err) {
  if (finished_) return;
  finished_ = true;
  // Counted before either side can see the close, so that whoever observes it finds it counted.
  worker_.metrics().connectionClosed(info_.role, info_.stack, outcome);
  if (kernel_) kernel_->drain_timer.reset();
  for (auto& f : flows_) {
    releaseSpace(f);
    giveWindowBack(f);
    if (!f.attached) continue;
    countKernelBytes(f);
    worker_.kernelRelay()->detach(kernelFlow(f));
    worker_.kernelFlowEnded(kernelFlow(f).cookie);
    if (f.kernel) worker_.metrics().kernelRelayDetached();
  }
  // A framed tunnel whose session ended cleanly carries the next one (not one whose framing
  // ended: its directions ended with FINs).
  std::unique_ptr<stacks::StackConnection> reusable;
  if (info_.framed && outcome == Outcome::kClosed && flows_[0].done() && flows_[1].done() &&
      !flows_[0].raw && !flows_[1].raw) {
    reusable = std::move(info_.tunnel_is_upstream ? upstream_ : downstream_);
    (info_.tunnel_is_upstream ? downstream_ : upstream_)->close(close);
  } else {
    downstream_->close(close);
    upstream_->close(close);
  }
  if (control_) {
    // The peer learns that this end finished cleanly (or not, by the reset).
    if (outcome == Outcome::kClosed) (void)control_->write({&kPeerDone, 1});
    control_->close(outcome == Outcome::kClosed ? CloseType::kGraceful : CloseType::kAbort);
  }
  worker_.relayEnded(*this);
  auto duration = std::chrono::duration<double>(nowTime() - info_.started).count();
  const auto& stacks = worker_.context().stacks;
  const char* stack = info_.stack < stacks.size() ? stacks[info_.stack]->name().c_str() : "direct";
  // The one line per connection: id, role, carrying stack, bytes each way, duration, cause.
  std::string line = fmt::format(
      "conn {:x} role={} stack={} rule={} policy={} dst={} up={} down={} duration={:.3f}s end={}",
      info_.id, roleName(info_.role), stack, info_.ruleName(), info_.policyVersion(),
      info_.destination.toString(), flows_[0].bytes, flows_[1].bytes, duration,
      outcomeName(outcome));
  // The initiator's id for the same connection, to find its line in the other host's log.
  if (info_.peer_id != 0) line += fmt::format(" peer_conn={:x}", info_.peer_id);
  if (outcome == Outcome::kError) {
    line += fmt::format(" error=\"{}\"", std::strerror(err));
    static log::RateLimiter limiter;
    log::limited(limiter, spdlog::level::warn, "{}", line);
  } else {
    spdlog::info("{}", line);
  }
  if (reusable) worker_.tunnelReleased(info_, std::move(reusable), std::move(leftover_));
  worker_.loop().deferDelete(std::unique_ptr<Deferrable>(this));
}

}  // namespace dmm::proxy
