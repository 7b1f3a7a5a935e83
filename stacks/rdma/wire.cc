#include "stacks/rdma/wire.h"

#include <cstring>

namespace dmm::stacks::rdma {

namespace {
constexpr std::uint32_t typeBits(MessageType t) {
  return static_cast<std::uint32_t>(t) << 30;
}
void put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}
void put32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i)
    p[i] = static_cast<std::uint8_t>(v >> (24 - 8 * i));
}
void put64(std::uint8_t* p, std::uint64_t v) {
  put32(p, static_cast<std::uint32_t>(v >> 32));
  put32(p + 4, static_cast<std::uint32_t>(v));
}
std::uint32_t get32(const std::uint8_t* p) {
  return std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 | std::uint32_t{p[2]} << 8 | p[3];
}
constexpr char kMagic[4] = {'D', 'M', 'M', 'r'};
}  // namespace

std::uint32_t encodeData(std::uint32_t bytes) {
  return typeBits(MessageType::kData) | (bytes & kMaxDataBytes);
}

std::uint32_t encodeCredit(std::uint32_t messages, std::uint32_t bytes) {
  return typeBits(MessageType::kCredit) | (messages & kMaxCreditMessages) << 22 |
         (bytes & kMaxCreditBytes);
}

std::uint32_t encodeFin() {
  return typeBits(MessageType::kFin);
}

std::optional<Message> decodeImm(std::uint32_t imm) {
  const std::uint32_t payload = imm & kMaxDataBytes;
  switch (imm >> 30) {
    case 0:
      if (payload == 0) return std::nullopt;
      return Message{MessageType::kData, payload, 0};
    case 1:
      return Message{MessageType::kCredit, payload & kMaxCreditBytes, payload >> 22};
    case 2:
      if (payload != 0) return std::nullopt;
      return Message{MessageType::kFin, 0, 0};
    default:
      return std::nullopt;
  }
}

std::array<std::uint8_t, kHelloSize> encodeHello(const Hello& h) {
  std::array<std::uint8_t, kHelloSize> out{};
  std::memcpy(out.data(), kMagic, 4);
  out[4] = kWireVersion;
  put16(out.data() + 6, h.receives);
  std::memcpy(out.data() + 8, h.token.data(), h.token.size());
  put64(out.data() + 24, h.ring_address);
  put32(out.data() + 32, h.rkey);
  put32(out.data() + 36, h.ring_size);
  return out;
}

std::optional<Hello> decodeHello(std::span<const std::uint8_t> bytes) {
  if (bytes.size() < kHelloSize || std::memcmp(bytes.data(), kMagic, 4) != 0 ||
      bytes[4] != kWireVersion || bytes[5] != 0)
    return std::nullopt;
  Hello h;
  h.receives = static_cast<std::uint16_t>(bytes[6] << 8 | bytes[7]);
  std::memcpy(h.token.data(), bytes.data() + 8, h.token.size());
  h.ring_address = std::uint64_t{get32(bytes.data() + 24)} << 32 | get32(bytes.data() + 28);
  h.rkey = get32(bytes.data() + 32);
  h.ring_size = get32(bytes.data() + 36);
  const bool pow2 = h.ring_size != 0 && (h.ring_size & (h.ring_size - 1)) == 0;
  if (!pow2 || h.ring_size < 4096 || h.ring_size > (1u << 30) || h.receives == 0)
    return std::nullopt;
  return h;
}

}  // namespace dmm::stacks::rdma
