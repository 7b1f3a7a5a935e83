#pragma once
// What fault injection injects into one stack instance (proxy/faults.h has the whole story),
// and its [[fault]] / `ctl fault set` keys. No I/O here: the config loader and its fuzzer use it.

#include <array>
#include <cstdint>
#include <string>

#include "common/toml_table.h"

namespace dmm::proxy {

enum class Fault : std::uint8_t { kFailConnect, kDropHandshake, kReset, kStall, kCount };
const char* faultName(Fault f);

// How an injected connect failure looks to the session.
enum class ConnectFailure : std::uint8_t { kRefused, kUnreachable, kTimeout };
const char* connectFailureName(ConnectFailure f);

enum class StallDirection : std::uint8_t {
  kReceive,  // nothing more is read from the instance's connection
  kSend,     // nothing more is written to it
  kBoth,
};
const char* stallDirectionName(StallDirection d);

// What is injected into one stack instance.
struct FaultPlan {
  std::array<double, static_cast<std::size_t>(Fault::kCount)> probability{};  // 0..1 each
  ConnectFailure connect_failure = ConnectFailure::kRefused;
  std::uint64_t reset_after = 64 * 1024;  // bytes both ways before the reset
  StallDirection stall_direction = StallDirection::kReceive;
  std::uint64_t stall_after = 0;  // bytes both ways before the stall

  double& operator[](Fault f) { return probability[static_cast<std::size_t>(f)]; }
  double operator[](Fault f) const { return probability[static_cast<std::size_t>(f)]; }
  bool armed() const;
  // "fail_connect=1(refused) reset=0.5(after 65536 B)" or "off".
  std::string describe() const;
};

// Reads the plan's keys from a [[fault]] table (the caller reads `stack` and rejects unknown
// keys). Problems go to the table's diagnostics.
FaultPlan parseFaultPlan(TomlTable& table);

}  // namespace dmm::proxy
