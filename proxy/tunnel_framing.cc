#include "proxy/tunnel_framing.h"

#include <algorithm>
#include <cstring>

namespace dmm::proxy::framing {

Decoder::Result Decoder::decodeInPlace(std::span<std::byte> data) {
  Result r;
  std::size_t in = 0;
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
    if (length > kMaxPayload) {
      r.error = true;
      break;
    }
    if (length == 0) ended_ = true;
    frame_left_ = length;
  }
  r.consumed = in;
  r.end = ended_;
  return r;
}

}  // namespace dmm::proxy::framing
