#pragma once
// Logging: spdlog to stderr. Under systemd (JOURNAL_STREAM set) or when asked, each line starts
// with the sd-daemon priority prefix ("<3>", "<4>", ...) that journald turns into the entry's
// priority, and carries no timestamp of its own (journald adds one).

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdint>
#include <mutex>
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
spdlog::level::level_enum level();
std::string_view levelName(spdlog::level::level_enum level);

// Bounds how often one call site logs: at most `burst` messages per `window`; the rest are
// counted and the next message let through says how many were suppressed. Thread-safe: one
// static limiter per call site serves every worker. For per-connection warnings, which a
// misbehaving peer or a flood of failing connections could otherwise turn into a log storm.
class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit RateLimiter(unsigned burst = 10, Clock::duration window = std::chrono::seconds(5))
      : burst_(burst), window_(window) {}
  // Whether to log now; when it is, `suppressed` gets the count dropped since the last one.
  bool admit(std::uint64_t& suppressed, Clock::time_point now = Clock::now());

 private:
  const unsigned burst_;
  const Clock::duration window_;
  std::mutex mutex_;
  Clock::time_point window_start_{};
  unsigned in_window_ = 0;
  std::uint64_t suppressed_ = 0;
};

// Logs through `limiter`: `spdlog::log(level, ...)`, with " (N similar messages suppressed)"
// appended when some were.
template <class... Args>
void limited(RateLimiter& limiter, spdlog::level::level_enum lvl,
             fmt::format_string<Args...> format, Args&&... args) {
  if (!spdlog::should_log(lvl)) return;
  std::uint64_t suppressed = 0;
  if (!limiter.admit(suppressed)) return;
  auto text = fmt::format(format, std::forward<Args>(args)...);
  if (suppressed > 0) text += fmt::format(" ({} similar messages suppressed)", suppressed);
  spdlog::log(lvl, "{}", text);
}

}  // namespace dmm::log
