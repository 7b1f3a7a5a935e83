#pragma once
// Framed tunnel data (handshake framing v1, docs/handshake.md#framed-data): after a REPLY that
// accepts framing, each direction of the sidecar-to-sidecar connection is a sequence of frames
//
//   length (u32, big-endian) | payload (length bytes)
//
// and a frame of length 0 ends that direction (the half-close a TCP FIN would carry). Once both
// directions have ended, the connection is free for the next session's HELLO. A reset still
// travels as a TCP reset of the whole connection, which is then never reused.
//
// With framing v2 a sender may end the framing of its direction with the header kRawHeader:
// every byte after it is the session's, unframed, and the direction ends with the TCP FIN.
// A connection that carried it is never reused. It lets a long-lived session's bytes go
// through the kernel relay (kernel_relay.h), which cannot add or strip frame headers.

#include <cstddef>
#include <cstdint>
#include <span>

namespace dmm::proxy::framing {

inline constexpr std::size_t kHeaderSize = 4;
inline constexpr std::uint32_t kMaxPayload = 0x7fffffff;
inline constexpr std::uint32_t kRawHeader = 0x80000000;  // v2: the rest of the direction is raw

inline void putHeader(std::byte* at, std::uint32_t length) {
  at[0] = static_cast<std::byte>(length >> 24);
  at[1] = static_cast<std::byte>(length >> 16);
  at[2] = static_cast<std::byte>(length >> 8);
  at[3] = static_cast<std::byte>(length);
}

// Turns received frame bytes back into payload, incrementally, across arbitrary splits.
class Decoder {
 public:
  struct Result {
    std::size_t payload = 0;   // payload bytes now at the front of the buffer
    std::size_t consumed = 0;  // input bytes used; after an end-of-direction frame, the rest
                               // belongs to whatever follows (the next session's HELLO)
    bool end = false;          // the end-of-direction frame was decoded
    bool raw = false;          // the kRawHeader was decoded: every byte after it is payload
    bool error = false;        // a length above kMaxPayload (kRawHeader without `allow_raw`)
  };
  explicit Decoder(bool allow_raw = false) : allow_raw_(allow_raw) {}
  // Decodes `data` in place: its payload bytes are moved to the front, headers dropped. Stops
  // right after an end-of-direction frame. After a kRawHeader everything is payload.
  Result decodeInPlace(std::span<std::byte> data);
  // Payload bytes still due in the current frame; 0 at a frame boundary (or inside a header).
  std::uint32_t frameLeft() const { return frame_left_; }
  // `n` (<= frameLeft()) payload bytes were taken by other means (splice()).
  void took(std::uint32_t n) { frame_left_ -= n; }
  bool ended() const { return ended_; }
  bool raw() const { return raw_; }
  // Bytes of the current header still missing (at a frame boundary: a whole header).
  std::size_t headerWanted() const { return kHeaderSize - header_got_; }

 private:
  std::uint32_t frame_left_ = 0;
  std::byte header_[kHeaderSize]{};
  std::size_t header_got_ = 0;
  bool ended_ = false;
  bool allow_raw_ = false;
  bool raw_ = false;
};

}  // namespace dmm::proxy::framing
