#include "preload/shim_config.h"

#include <arpa/inet.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace dmm::preload {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

bool parseInt(std::string_view s, long lo, long hi, long& out) {
  if (s.empty() || s.size() > 18) return false;
  long v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  if (v < lo || v > hi) return false;
  out = v;
  return true;
}

bool parseBool(std::string_view s, bool& out) {
  if (s == "1" || s == "true" || s == "yes" || s == "on") {
    out = true;
    return true;
  }
  if (s == "0" || s == "false" || s == "no" || s == "off" || s.empty()) {
    out = false;
    return true;
  }
  return false;
}

bool parseCidr(std::string_view text, CidrPrefix& out) {
  std::string_view addr = text;
  std::string_view len;
  if (auto slash = text.find('/'); slash != std::string_view::npos) {
    addr = text.substr(0, slash);
    len = text.substr(slash + 1);
    if (len.empty()) return false;
  }
  char buf[INET6_ADDRSTRLEN + 1];
  if (addr.empty() || addr.size() >= sizeof(buf)) return false;
  std::memcpy(buf, addr.data(), addr.size());
  buf[addr.size()] = '\0';
  CidrPrefix p;
  if (::inet_pton(AF_INET, buf, p.address) == 1) {
    p.family = AF_INET;
  } else if (::inet_pton(AF_INET6, buf, p.address) == 1) {
    p.family = AF_INET6;
  } else {
    return false;
  }
  long max = p.family == AF_INET ? 32 : 128;
  long prefix = max;
  if (!len.empty() && !parseInt(len, 0, max, prefix)) return false;
  p.prefix = static_cast<unsigned>(prefix);
  out = p;
  return true;
}

bool prefixMatches(const CidrPrefix& p, const Address& a) {
  if (p.family != a.family) return false;
  unsigned full = p.prefix / 8;
  if (std::memcmp(p.address, a.bytes, full) != 0) return false;
  unsigned rest = p.prefix % 8;
  if (rest == 0) return true;
  auto mask = static_cast<std::uint8_t>(0xff << (8 - rest));
  return (p.address[full] & mask) == (a.bytes[full] & mask);
}

// fe80::/10: meaningful only with the application's interface (its scope id), which the
// preamble does not carry, so the sidecar could not dial it.
bool isLinkLocal6(const Address& a) {
  return a.family == AF_INET6 && a.bytes[0] == 0xfe && (a.bytes[1] & 0xc0) == 0x80;
}

bool isLoopbackOrUnspecified(const Address& a) {
  static constexpr std::uint8_t kZero[16] = {};
  if (a.family == AF_INET) return a.bytes[0] == 127 || std::memcmp(a.bytes, kZero, 4) == 0;
  if (std::memcmp(a.bytes, kZero, 15) != 0) return false;
  return a.bytes[15] == 0 || a.bytes[15] == 1;  // :: and ::1
}

}  // namespace

bool CidrList::contains(const Address& a) const {
  for (std::size_t i = 0; i < size; ++i) {
    if (prefixMatches(items[i], a)) return true;
  }
  return false;
}

bool ShimConfig::captures(const Address& a) const {
  if (a.family != AF_INET && a.family != AF_INET6) return false;
  if (isLoopbackOrUnspecified(a) || isLinkLocal6(a)) return false;
  if (include.size > 0 && !include.contains(a)) return false;
  return !exclude.contains(a);
}

bool knownQosClass(std::string_view name) {
  return name == "default" || name == "latency" || name == "bulk" || name == "background";
}

bool parseCidrList(std::string_view text, CidrList& out, std::string& error) {
  CidrList list;
  while (!text.empty()) {
    auto comma = text.find(',');
    std::string_view item = trim(text.substr(0, comma));
    text = comma == std::string_view::npos ? std::string_view{} : text.substr(comma + 1);
    if (item.empty()) continue;
    if (list.size == kMaxCidrs) {
      error = "more than " + std::to_string(kMaxCidrs) + " prefixes";
      return false;
    }
    if (!parseCidr(item, list.items[list.size])) {
      error = "'" + std::string(item) + "' is not an address or prefix";
      return false;
    }
    ++list.size;
  }
  out = list;
  return true;
}

void applySetting(ShimConfig& config, std::string_view key, std::string_view value,
                  const std::string& where, std::vector<std::string>& warnings) {
  auto warn = [&](const std::string& why) {
    warnings.push_back(where + ": " + std::string(key) + ": " + why + " (ignored)");
  };
  if (key == "socket") {
    if (value.empty() || value.front() != '/') return warn("not an absolute path");
    if (value.size() >= sizeof(config.socket_path)) return warn("path too long for a Unix socket");
    std::memcpy(config.socket_path, value.data(), value.size());
    config.socket_path[value.size()] = '\0';
  } else if (key == "qos") {
    if (!value.empty() && !knownQosClass(value)) {
      return warn("'" + std::string(value) + "' is not one of default, latency, bulk, background");
    }
    std::memcpy(config.qos, value.data(), value.size());
    config.qos[value.size()] = '\0';
  } else if (key == "include" || key == "exclude") {
    std::string error;
    if (!parseCidrList(value, key == "include" ? config.include : config.exclude, error)) {
      return warn(error);
    }
  } else if (key == "fallback") {
    if (value == "direct") {
      config.fallback = Fallback::kDirect;
    } else if (value == "refuse") {
      config.fallback = Fallback::kRefuse;
    } else {
      return warn("'" + std::string(value) + "' is neither direct nor refuse");
    }
  } else if (key == "debug") {
    if (!parseBool(value, config.debug)) return warn("not a boolean");
  } else if (key == "shm") {
    if (!parseBool(value, config.shm)) return warn("not a boolean");
  } else if (key == "timeout_ms") {
    long ms = 0;
    if (!parseInt(value, 1, 60000, ms)) return warn("not a number of milliseconds in 1-60000");
    config.timeout_ms = static_cast<int>(ms);
  } else {
    warnings.push_back(where + ": unknown key '" + std::string(key) + "' (ignored)");
  }
}

void applyFileText(ShimConfig& config, std::string_view text, const std::string& path,
                   std::vector<std::string>& warnings) {
  int line_no = 0;
  while (!text.empty()) {
    ++line_no;
    auto nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    std::string where = path + ":" + std::to_string(line_no);
    if (auto hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    line = trim(line);
    if (line.empty()) continue;
    auto eq = line.find('=');
    if (eq == std::string_view::npos) {
      warnings.push_back(where + ": not key = value (ignored)");
      continue;
    }
    std::string_view key = trim(line.substr(0, eq));
    std::string_view value = trim(line.substr(eq + 1));
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      value = value.substr(1, value.size() - 2);
    }
    applySetting(config, key, value, where, warnings);
  }
}

ShimConfig loadConfig(const char* (*getenv_fn)(const char*), std::vector<std::string>& warnings) {
  ShimConfig config;
  const char* named = getenv_fn("DMM_PRELOAD_CONFIG");
  const char* path = named != nullptr && *named != '\0' ? named : kDefaultConfigPath;
  if (std::FILE* f = std::fopen(path, "re")) {
    std::string text;
    char buf[4096];
    std::size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0 && text.size() < (1u << 20)) {
      text.append(buf, n);
    }
    std::fclose(f);
    applyFileText(config, text, path, warnings);
  } else if (path == named) {
    warnings.push_back(std::string(path) + ": " + std::strerror(errno) + " (ignored)");
  }
  static constexpr struct {
    const char* env;
    const char* key;
  } kEnv[] = {{"DMM_PRELOAD_SOCKET", "socket"},     {"DMM_PRELOAD_QOS", "qos"},
              {"DMM_PRELOAD_INCLUDE", "include"},   {"DMM_PRELOAD_EXCLUDE", "exclude"},
              {"DMM_PRELOAD_FALLBACK", "fallback"}, {"DMM_PRELOAD_DEBUG", "debug"},
              {"DMM_PRELOAD_SHM", "shm"},           {"DMM_PRELOAD_TIMEOUT_MS", "timeout_ms"}};
  for (const auto& e : kEnv) {
    if (const char* v = getenv_fn(e.env)) applySetting(config, e.key, trim(v), e.env, warnings);
  }
  return config;
}

}  // namespace dmm::preload
