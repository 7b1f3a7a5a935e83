#pragma once
// Moving one handshake frame over a non-blocking connection, for both session kinds (HELLO and
// REPLY each way); what to do with each outcome is the session's.
//
// FrameReader reads exactly one frame: the 12-byte prefix, then the body the prefix announces,
// and not one byte more, because what follows belongs to the session.
// FrameWriter writes one encoded frame, across as many writable edges as it takes.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "proxy/handshake_codec.h"
#include "stacks/stack.h"

namespace dmm::proxy {

class FrameReader {
 public:
  enum class Step {
    kWouldBlock,  // nothing more now; call again on the next readable edge
    kEof,         // the peer ended the stream before the frame was whole
    kError,       // a read failed (reset, ...)
    kBadPrefix,   // the prefix is wrong: see prefixError(); the body was not read
    kDone,        // frame() holds the whole frame
  };

  // `greedy`: read as much as a whole frame could be at once (one read for a whole HELLO);
  // bytes that came behind the frame are kept in surplus() (early session data, which the
  // session accepts or rejects).
  FrameReader(handshake::MessageType type, std::size_t max_body, bool greedy = false)
      : type_(type), max_body_(max_body), greedy_(greedy) {}

  // Reads what is available, up to the end of the frame.
  Step read(stacks::StackConnection& conn);
  // Takes bytes already received (by whoever had the connection before); what runs past the
  // end of the frame goes to surplus().
  Step feed(std::span<const std::byte> bytes);

  handshake::PrefixError prefixError() const { return prefix_error_; }
  const std::vector<std::uint8_t>& frame() const { return bytes_; }
  bool empty() const { return bytes_.empty(); }
  std::vector<std::byte>& surplus() { return surplus_; }

 private:
  handshake::MessageType type_;
  std::size_t max_body_;
  bool greedy_ = false;
  std::vector<std::uint8_t> bytes_;
  std::vector<std::byte> surplus_;
  std::size_t need_ = handshake::kPrefixSize;
  bool prefix_checked_ = false;
  handshake::PrefixError prefix_error_ = handshake::PrefixError::kNone;
  // With need_ bytes in: checks the prefix and sets need_ to the whole frame. kWouldBlock: go on.
  Step checkPrefix();
};

class FrameWriter {
 public:
  enum class Step { kWouldBlock, kError, kDone };

  // Starts writing `frame` (replacing anything not yet written).
  void set(std::vector<std::uint8_t> frame) {
    bytes_ = std::move(frame);
    done_ = 0;
  }
  // Writes what the connection takes now.
  Step write(stacks::StackConnection& conn);

 private:
  std::vector<std::uint8_t> bytes_;
  std::size_t done_ = 0;
};

}  // namespace dmm::proxy
