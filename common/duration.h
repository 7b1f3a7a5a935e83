#pragma once
// Durations as written in config files: "250ms", "5s", "2m", "1h", or compounds like "1m30s".

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace dmm {

using Millis = std::chrono::milliseconds;

std::optional<Millis> parseDuration(std::string_view text);
std::string formatDuration(Millis d);  // shortest exact form: "1500ms", "5s", "2m", "1h"

}  // namespace dmm
