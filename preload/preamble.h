#pragma once
// The preload preamble: the first bytes an application's captured connection carries on the
// Unix socket to the sidecar, before any of the application's own bytes. It says where the
// application was connecting and what it asked for; who the application is (pid, uid, process
// name) the sidecar learns from the kernel (SO_PEERCRED, /proc), never from these bytes.
//
// Wire format, version 1 (all integers big-endian), at most kMaxPreambleBytes in all:
//
//   0  4  magic "DMMp"
//   4  1  version (1)
//   5  1  reserved, 0
//   6  2  N: length of the fields that follow
//   8  N  fields: type (1 byte), length (1 byte), value (length bytes)
//
// Fields:
//   0x01 destination (required, once): family (4 or 6), port (2), address (4 or 16 bytes)
//   0x02 qos (at most once): a class name, 1-32 bytes of [a-z0-9_-]
//   0x03 shm (at most once, empty): the shim asks for the shared-memory data path; a sidecar
//        that knows the field answers with one byte before anything else (shm_ring.h)
// A field of unknown type is skipped when its type is below 0x80 and makes the preamble
// invalid when it is 0x80 or above (a field this version must understand).
//
// Self-contained (the standard library only): the shim links it without the daemon's code.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace dmm::preload {

inline constexpr std::size_t kMaxPreambleBytes = 1024;
inline constexpr std::size_t kPreambleHeaderBytes = 8;
inline constexpr std::uint8_t kPreambleVersion = 1;

// An IPv4 or IPv6 endpoint in network byte order, as the application gave it.
struct Endpoint {
  int family = 0;  // AF_INET or AF_INET6
  std::uint8_t address[16] = {};
  std::uint16_t port = 0;  // host byte order
};

struct Preamble {
  Endpoint destination;
  std::string qos;   // empty: no hint
  bool shm = false;  // the shim asks for shared memory (preload stage 2)
};

// Appends the encoded preamble to `out`; false (nothing appended) when it cannot be encoded
// (bad family, a qos name that is too long or has characters outside [a-z0-9_-]).
bool encodePreamble(const Preamble& preamble, std::vector<std::uint8_t>& out);
// The same into a caller's buffer (the shim encodes without allocating); returns the size
// written, 0 when it cannot be encoded or `out` is too small.
std::size_t encodePreamble(const Preamble& preamble, std::span<std::uint8_t> out);

struct DecodeResult {
  enum class Status { kIncomplete, kOk, kInvalid };
  Status status = Status::kIncomplete;
  std::size_t consumed = 0;  // kOk: the preamble's size; the application's bytes follow
  Preamble preamble;
  std::string error;  // kInvalid: why
};

// Decodes the preamble at the start of `bytes`. kIncomplete: more bytes are needed (never
// for more than kMaxPreambleBytes in all); kInvalid: not a valid preamble (close the
// connection).
DecodeResult decodePreamble(std::span<const std::uint8_t> bytes);

}  // namespace dmm::preload
