#include "proxy/tunnel_framing.h"

#include <algorithm>
#include <cstring>

namespace dmm::proxy::framing {

Decoder::Result Decoder::decodeInPlace(std::span<std::byte> data) {
  Result r;
  std::size_t in = 0;
  if (raw_) {
    r.payload = r.consumed = data.size();
    r.raw = true;
    return r;
  }
  while (in < data.size() && !ended_) {
    if (frame_left_ > 0) {
      auto n = std::min<std::size_t>(frame_left_, data.size() - in);
      if (r.payload != in) std::memmove(data.data() + r.payload, data.data() + in, n);
      r.payload += n;
      in += n;
      frame_left_ -= static_cast<std::uint32_t>(n);
      continue;
    }
    header_[header_got_++] = data[in++];
    if (header_got_ < kHeaderSize) continue;
    header_got_ = 0;
    auto u = [this](int i) { return static_cast<std::uint32_t>(header_[i]); };
    std::uint32_t length = u(0) << 24 | u(1) << 16 | u(2) << 8 | u(3);
    if (length == kRawHeader && allow_raw_) {
      // The rest of the direction is unframed: what follows in `data` is payload too.
      raw_ = true;
      std::size_t rest = data.size() - in;
      if (r.payload != in && rest > 0)
        std::memmove(data.data() + r.payload, data.data() + in, rest);
      r.payload += rest;
      in = data.size();
      break;
    }
    if (length > kMaxPayload) {
      r.error = true;
      break;
    }
    if (length == 0) ended_ = true;
    frame_left_ = length;
  }
  r.consumed = in;
  r.end = ended_;
  r.raw = raw_;
  return r;
}

}  // namespace dmm::proxy::framing
