#pragma once
// The byte pattern of the shared-memory tests: shm_client (under the shim) and the servers of
// preload_shm_test.cc (on host B) agree on every byte of a stream by its position, so either
// side can check what it receives where it lands. Header-only, no dependencies.

#include <cstddef>
#include <cstdint>

namespace dmm::shmtest {

inline std::uint64_t mix(std::uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Byte `pos` of stream `seed`.
inline unsigned char patternByte(std::uint64_t pos, std::uint32_t seed) {
  std::uint64_t w = mix((pos >> 3) + seed * 0x9e3779b97f4a7c15ULL);
  return static_cast<unsigned char>(w >> ((pos & 7) * 8));
}

inline void fillPattern(unsigned char* buf, std::size_t n, std::uint64_t pos, std::uint32_t seed) {
  for (std::size_t i = 0; i < n; ++i)
    buf[i] = patternByte(pos + i, seed);
}

// The index of the first byte of buf that is not stream `seed` at `pos`, or n.
inline std::size_t firstMismatch(const unsigned char* buf, std::size_t n, std::uint64_t pos,
                                 std::uint32_t seed) {
  for (std::size_t i = 0; i < n; ++i) {
    if (buf[i] != patternByte(pos + i, seed)) return i;
  }
  return n;
}

}  // namespace dmm::shmtest
