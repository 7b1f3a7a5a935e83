#pragma once
// Logging: spdlog to stderr. Under systemd (JOURNAL_STREAM set) or when asked, each line starts
// with the sd-daemon priority prefix ("<3>", "<4>", ...) that journald turns into the entry's
// priority, and carries no timestamp of its own (journald adds one).

#include <spdlog/spdlog.h>

#include <optional>
#include <string>
#include <string_view>

namespace dmm::log {

enum class Format { kAuto, kPlain, kJournal };

// Installs the process-wide logger. Call once, early, from the main thread.
void init(Format format, spdlog::level::level_enum level);
// Parses "trace", "debug", "info", "warning"/"warn", "error", "critical", "off".
std::optional<spdlog::level::level_enum> parseLevel(std::string_view text);
std::optional<Format> parseFormat(std::string_view text);  // "auto", "plain", "journal"
void setLevel(spdlog::level::level_enum level);

}  // namespace dmm::log
