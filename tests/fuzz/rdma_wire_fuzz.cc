// libFuzzer target for the rdma kind's wire format: the private data a peer's connect request or
// accept carries (decodeHello) and the immediate of every message (decodeImm), both from the
// other host. Checks: what decodes re-encodes to bytes that decode to the same.
//
//   build/tests/fuzz/rdma_wire_fuzz -max_total_time=60 build/tests/fuzz/corpus/rdma_wire \
//     tests/fuzz/corpus/rdma_wire

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "stacks/rdma/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace dmm::stacks::rdma;
  if (auto h = decodeHello(std::span(data, size))) {
    auto bytes = encodeHello(*h);
    if (std::memcmp(bytes.data(), data, kHelloSize) != 0) std::abort();
  }
  if (size >= 4) {
    std::uint32_t imm;
    std::memcpy(&imm, data, 4);
    if (auto m = decodeImm(imm)) {
      std::uint32_t again = 0;
      switch (m->type) {
        case MessageType::kData:
          again = encodeData(m->bytes);
          break;
        case MessageType::kCredit:
          again = encodeCredit(m->messages, m->bytes);
          break;
        case MessageType::kFin:
          again = encodeFin();
          break;
      }
      if (again != imm) std::abort();
    }
  }
  return 0;
}
