#include "common/log.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <cstdlib>
#include <memory>

namespace dmm::log {

namespace {

// "%*" in the pattern: the sd-daemon priority prefix for the message's level.
class PriorityFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    static constexpr std::string_view kPrefix[] = {"<7>", "<7>", "<6>", "<4>", "<3>", "<2>", "<6>"};
    auto index = static_cast<std::size_t>(msg.level);
    auto prefix = index < std::size(kPrefix) ? kPrefix[index] : kPrefix[2];
    dest.append(prefix.data(), prefix.data() + prefix.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<PriorityFlag>();
  }
};

}  // namespace

void init(Format format, spdlog::level::level_enum level) {
  if (format == Format::kAuto) {
    format = std::getenv("JOURNAL_STREAM") != nullptr ? Format::kJournal : Format::kPlain;
  }
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("dmm", sink);
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  if (format == Format::kJournal) {
    formatter->add_flag<PriorityFlag>('*').set_pattern("%*%v");
  } else {
    formatter->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
  }
  logger->set_formatter(std::move(formatter));
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
}

void setLevel(spdlog::level::level_enum level) {
  spdlog::set_level(level);
}

spdlog::level::level_enum level() {
  return spdlog::get_level();
}

std::string_view levelName(spdlog::level::level_enum level) {
  using spdlog::level::level_enum;
  switch (level) {
    case level_enum::trace:
      return "trace";
    case level_enum::debug:
      return "debug";
    case level_enum::info:
      return "info";
    case level_enum::warn:
      return "warning";
    case level_enum::err:
      return "error";
    case level_enum::critical:
      return "critical";
    default:
      return "off";
  }
}

bool RateLimiter::admit(std::uint64_t& suppressed, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  if (in_window_ == 0 || now - window_start_ >= window_) {
    window_start_ = now;
    in_window_ = 0;
  }
  if (in_window_ >= burst_) {
    ++suppressed_;
    return false;
  }
  ++in_window_;
  suppressed = suppressed_;
  suppressed_ = 0;
  return true;
}

std::optional<spdlog::level::level_enum> parseLevel(std::string_view text) {
  using spdlog::level::level_enum;
  if (text == "trace") return level_enum::trace;
  if (text == "debug") return level_enum::debug;
  if (text == "info") return level_enum::info;
  if (text == "warning" || text == "warn") return level_enum::warn;
  if (text == "error") return level_enum::err;
  if (text == "critical") return level_enum::critical;
  if (text == "off") return level_enum::off;
  return std::nullopt;
}

std::optional<Format> parseFormat(std::string_view text) {
  if (text == "auto") return Format::kAuto;
  if (text == "plain") return Format::kPlain;
  if (text == "journal") return Format::kJournal;
  return std::nullopt;
}

}  // namespace dmm::log
