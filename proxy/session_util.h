#pragma once
// Small pieces both session kinds use.

#include <chrono>
#include <cstdint>

#include "proxy/handshake_codec.h"
#include "proxy/metrics.h"

namespace dmm::proxy {

// Wall-clock milliseconds since the Unix epoch (the handshake's timestamp).
inline std::uint64_t unixMillis() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// The metric label of a handshake reject reason.
inline RejectionLabel rejectionLabel(handshake::RejectReason reason) {
  switch (reason) {
    case handshake::RejectReason::kMalformed:
      return RejectionLabel::kMalformed;
    case handshake::RejectReason::kUnsupportedVersion:
      return RejectionLabel::kUnsupportedVersion;
    case handshake::RejectReason::kAuthFailed:
      return RejectionLabel::kAuthFailed;
    case handshake::RejectReason::kStale:
      return RejectionLabel::kStale;
    case handshake::RejectReason::kReplayed:
      return RejectionLabel::kReplayed;
    case handshake::RejectReason::kDestinationNotAllowed:
      return RejectionLabel::kDestinationNotAllowed;
    case handshake::RejectReason::kDestinationUnreachable:
      return RejectionLabel::kDestinationUnreachable;
    case handshake::RejectReason::kNoCommonStack:
      return RejectionLabel::kNoCommonStack;
    case handshake::RejectReason::kOverloaded:
      return RejectionLabel::kOverloaded;
    case handshake::RejectReason::kTooLarge:
      return RejectionLabel::kTooLarge;
    default:
      return RejectionLabel::kUnknown;
  }
}

}  // namespace dmm::proxy
