#pragma once
// The rdma kind's wire format (README.md here, "Protocol"): the private data the two sides
// exchange in the rdma_cm connect and accept, and the 32-bit immediate that every message
// carries. Pure code, no verbs: tests/unit/rdma_wire_test.cc covers it.
//
//   imm = type:2 | payload:30 (host order here; network order on the wire)
//     DATA    payload = bytes written into the receiver's ring at its current tail (> 0)
//     CREDIT  payload = messages:8 | bytes:22  the receiver reposted that many receives and its
//             reader freed that many ring bytes since its last CREDIT
//     FIN     payload = 0                       no more DATA (half-close)

#include <array>
#include <cstdint>
#include <optional>
#include <span>

#include "stacks/stack.h"

namespace dmm::stacks::rdma {

enum class MessageType : std::uint8_t { kData = 0, kCredit = 1, kFin = 2 };

constexpr std::uint32_t kMaxDataBytes = (1u << 30) - 1;
constexpr std::uint32_t kMaxCreditMessages = (1u << 8) - 1;
constexpr std::uint32_t kMaxCreditBytes = (1u << 22) - 1;

struct Message {
  MessageType type = MessageType::kData;
  std::uint32_t bytes = 0;     // DATA: bytes written; CREDIT: ring bytes freed
  std::uint32_t messages = 0;  // CREDIT: receives reposted
};

std::uint32_t encodeData(std::uint32_t bytes);
std::uint32_t encodeCredit(std::uint32_t messages, std::uint32_t bytes);
std::uint32_t encodeFin();
// nullopt for the reserved type 3, a DATA of 0 bytes, or a FIN with a payload.
std::optional<Message> decodeImm(std::uint32_t imm);

// The private data of the connect (initiator -> responder) and of the accept (responder ->
// initiator): 40 bytes, under the 56 an RC connect request can carry.
//   "DMMr" | version | 0 | receives (BE16) | token (16) | ring address (BE64) | rkey (BE32) |
//   ring size (BE32)
// The token is zero in the accept.
struct Hello {
  std::uint16_t receives = 0;  // receives posted before the connect/accept: the first credits
  SessionToken token{};
  std::uint64_t ring_address = 0;  // where the peer writes DATA into this side's ring
  std::uint32_t rkey = 0;
  std::uint32_t ring_size = 0;
};
constexpr std::size_t kHelloSize = 40;
constexpr std::uint8_t kWireVersion = 1;

std::array<std::uint8_t, kHelloSize> encodeHello(const Hello& h);
// nullopt unless the bytes start with a Hello of this version with its reserved byte zero
// (rdma_cm may pad them) and its ring is usable: a power of two from 4 KiB to 1 GiB, and at least
// one receive.
std::optional<Hello> decodeHello(std::span<const std::uint8_t> bytes);

}  // namespace dmm::stacks::rdma
