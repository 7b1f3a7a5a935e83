#include "proxy/fault_plan.h"

#include <fmt/format.h>

namespace dmm::proxy {

const char* faultName(Fault f) {
  switch (f) {
    case Fault::kFailConnect:
      return "fail_connect";
    case Fault::kDropHandshake:
      return "drop_handshake";
    case Fault::kReset:
      return "reset";
    case Fault::kStall:
      return "stall";
    default:
      return "unknown";
  }
}

const char* connectFailureName(ConnectFailure f) {
  switch (f) {
    case ConnectFailure::kRefused:
      return "refused";
    case ConnectFailure::kUnreachable:
      return "unreachable";
    case ConnectFailure::kTimeout:
      return "timeout";
  }
  return "unknown";
}

const char* stallDirectionName(StallDirection d) {
  switch (d) {
    case StallDirection::kReceive:
      return "receive";
    case StallDirection::kSend:
      return "send";
    case StallDirection::kBoth:
      return "both";
  }
  return "unknown";
}

bool FaultPlan::armed() const {
  for (double p : probability) {
    if (p > 0) return true;
  }
  return false;
}

std::string FaultPlan::describe() const {
  std::string out;
  for (std::size_t i = 0; i < probability.size(); ++i) {
    if (probability[i] <= 0) continue;
    auto f = static_cast<Fault>(i);
    std::string detail;
    if (f == Fault::kFailConnect) detail = connectFailureName(connect_failure);
    if (f == Fault::kReset) detail = fmt::format("after {} B", reset_after);
    if (f == Fault::kStall)
      detail = fmt::format("{} after {} B", stallDirectionName(stall_direction), stall_after);
    out += fmt::format("{}{}={:g}{}", out.empty() ? "" : " ", faultName(f), probability[i],
                       detail.empty() ? "" : "(" + detail + ")");
  }
  return out.empty() ? "off" : out;
}

FaultPlan parseFaultPlan(TomlTable& t) {
  FaultPlan plan;
  for (std::size_t i = 0; i < plan.probability.size(); ++i) {
    if (auto v = t.getNumber(faultName(static_cast<Fault>(i)), 0, 1)) plan.probability[i] = *v;
  }
  if (auto v = t.getString("connect_failure")) {
    if (*v == "refused") {
      plan.connect_failure = ConnectFailure::kRefused;
    } else if (*v == "unreachable") {
      plan.connect_failure = ConnectFailure::kUnreachable;
    } else if (*v == "timeout") {
      plan.connect_failure = ConnectFailure::kTimeout;
    } else {
      t.error("connect_failure", "\"" + *v + "\" is not one of refused, unreachable, timeout");
    }
  }
  constexpr std::int64_t kMaxBytes = std::int64_t{1} << 50;
  if (auto v = t.getInt("reset_after", 0, kMaxBytes))
    plan.reset_after = static_cast<std::uint64_t>(*v);
  if (auto v = t.getString("stall_direction")) {
    if (*v == "receive") {
      plan.stall_direction = StallDirection::kReceive;
    } else if (*v == "send") {
      plan.stall_direction = StallDirection::kSend;
    } else if (*v == "both") {
      plan.stall_direction = StallDirection::kBoth;
    } else {
      t.error("stall_direction", "\"" + *v + "\" is not one of receive, send, both");
    }
  }
  if (auto v = t.getInt("stall_after", 0, kMaxBytes))
    plan.stall_after = static_cast<std::uint64_t>(*v);
  return plan;
}

}  // namespace dmm::proxy
