// libFuzzer target for the preload preamble decoder, the bytes any local process can send to
// the sidecar's preload socket. Checks more than "no crash": what decodes re-encodes to the
// same bytes, the size consumed is within what was given, and an incomplete verdict never
// holds for more than kMaxPreambleBytes.
//
// Built with clang only (-DDMM_FUZZ=ON, the default when clang++ is found):
//   build/tests/fuzz/preamble_fuzz -max_total_time=60 build/tests/fuzz/corpus
//   tests/fuzz/corpus/preamble

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "preload/preamble.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using dmm::preload::DecodeResult;
  auto r = dmm::preload::decodePreamble(std::span<const std::uint8_t>(data, size));
  switch (r.status) {
    case DecodeResult::Status::kIncomplete:
      if (size >= dmm::preload::kMaxPreambleBytes) std::abort();
      break;
    case DecodeResult::Status::kInvalid:
      if (r.error.empty()) std::abort();
      break;
    case DecodeResult::Status::kOk: {
      if (r.consumed > size || r.consumed > dmm::preload::kMaxPreambleBytes) std::abort();
      // Skipped unknown fields aside, the decoded preamble encodes to a valid one that
      // decodes to the same values.
      std::vector<std::uint8_t> again;
      if (!dmm::preload::encodePreamble(r.preamble, again)) std::abort();
      auto r2 = dmm::preload::decodePreamble(again);
      if (r2.status != DecodeResult::Status::kOk || r2.consumed != again.size()) std::abort();
      const auto& a = r.preamble;
      const auto& b = r2.preamble;
      if (a.qos != b.qos || a.destination.family != b.destination.family ||
          a.destination.port != b.destination.port ||
          std::memcmp(a.destination.address, b.destination.address, 16) != 0) {
        std::abort();
      }
      break;
    }
  }
  return 0;
}
