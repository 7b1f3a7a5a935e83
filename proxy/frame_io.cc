#include "proxy/frame_io.h"

#include <algorithm>

namespace dmm::proxy {

using stacks::IoResult;

FrameReader::Step FrameReader::read(stacks::StackConnection& conn) {
  for (;;) {
    if (bytes_.size() < need_) {
      std::size_t have = bytes_.size();
      bytes_.resize(greedy_ ? handshake::kPrefixSize + max_body_ : need_);
      auto r = conn.read(std::as_writable_bytes(std::span(bytes_).subspan(have)));
      bytes_.resize(have + (r.status == IoResult::Status::kOk ? r.bytes : 0));
      switch (r.status) {
        case IoResult::Status::kOk:
          break;
        case IoResult::Status::kWouldBlock:
          return Step::kWouldBlock;
        case IoResult::Status::kEof:
          return Step::kEof;
        default:
          return Step::kError;
      }
      if (bytes_.size() < need_) continue;
    }
    auto s = checkPrefix();
    if (s == Step::kBadPrefix) return s;
    if (bytes_.size() >= need_ && prefix_checked_) {
      // Greedy: what came behind the frame is kept for whoever reads on.
      surplus_.insert(surplus_.end(), reinterpret_cast<std::byte*>(bytes_.data() + need_),
                      reinterpret_cast<std::byte*>(bytes_.data() + bytes_.size()));
      bytes_.resize(need_);
      return Step::kDone;
    }
  }
}

FrameReader::Step FrameReader::checkPrefix() {
  if (prefix_checked_) return Step::kDone;
  handshake::Prefix prefix{};
  prefix_error_ = handshake::parsePrefix(
      std::span<const std::uint8_t, handshake::kPrefixSize>(bytes_.data(), handshake::kPrefixSize),
      type_, max_body_, prefix);
  if (prefix_error_ != handshake::PrefixError::kNone) return Step::kBadPrefix;
  prefix_checked_ = true;
  need_ = handshake::kPrefixSize + prefix.body_length;
  return bytes_.size() == need_ ? Step::kDone : Step::kWouldBlock;
}

FrameReader::Step FrameReader::feed(std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    if (bytes_.size() == need_ && prefix_checked_) {  // past the frame: kept for the session
      surplus_.insert(surplus_.end(), bytes.begin(), bytes.end());
      return Step::kDone;
    }
    std::size_t take = std::min(need_ - bytes_.size(), bytes.size());
    auto* p = reinterpret_cast<const std::uint8_t*>(bytes.data());
    bytes_.insert(bytes_.end(), p, p + take);
    bytes = bytes.subspan(take);
    if (bytes_.size() < need_) return Step::kWouldBlock;
    if (auto s = checkPrefix(); s == Step::kBadPrefix) return s;
  }
  return bytes_.size() == need_ && prefix_checked_ ? Step::kDone : Step::kWouldBlock;
}

FrameWriter::Step FrameWriter::write(stacks::StackConnection& conn) {
  while (done_ < bytes_.size()) {
    auto r = conn.write(std::as_bytes(std::span(bytes_).subspan(done_)));
    if (r.status == IoResult::Status::kWouldBlock) return Step::kWouldBlock;
    if (r.status != IoResult::Status::kOk) return Step::kError;
    done_ += r.bytes;
  }
  return Step::kDone;
}

}  // namespace dmm::proxy
