#include "common/toml_table.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include "common/duration.h"

namespace dmm {

namespace {

// toml11 v3 puts the exact column only into its formatted message: the caret line under the
// offending source line (" 2 | b = = 2" / "   |     ^--- here"). Recover it from there, and keep
// the first line of the message ("[error] bad format: ...") as the text.
SourcePosition syntaxErrorPosition(const toml::exception& e, const std::string& file,
                                   std::string& message) {
  SourcePosition pos{file, e.location().line(), e.location().column()};
  std::istringstream in(e.what());
  std::string line;
  std::string first;
  std::string prev;
  bool have_first = false;
  while (std::getline(in, line)) {
    if (!have_first) {
      first = line;
      have_first = true;
    }
    auto bar = line.find(" | ");
    auto caret = line.find('^');
    if (bar != std::string::npos && caret != std::string::npos && caret > bar) {
      // The source line above shares the same " | " column.
      auto prev_bar = prev.find(" | ");
      if (prev_bar != std::string::npos) {
        pos.column = static_cast<std::uint32_t>(caret - (bar + 3) + 1);
        auto num = prev.substr(0, prev_bar);
        try {
          pos.line = static_cast<std::uint32_t>(std::stoul(num));
        } catch (...) {
        }
      }
      break;
    }
    prev = line;
  }
  const std::string prefix = "[error] ";
  if (first.rfind(prefix, 0) == 0) first = first.substr(prefix.size());
  if (first.rfind("toml::", 0) == 0) {
    // "toml::parse_basic_string: the next token..." -> "the next token..."
    auto colon = first.find(": ");
    if (colon != std::string::npos) first = first.substr(colon + 2);
  }
  message = "TOML syntax error: " + first;
  if (pos.line == 0) pos.line = 1;
  if (pos.column == 0) pos.column = 1;
  return pos;
}

std::string typeName(const toml::value& v) {
  switch (v.type()) {
    case toml::value_t::boolean:
      return "a boolean";
    case toml::value_t::integer:
      return "an integer";
    case toml::value_t::floating:
      return "a float";
    case toml::value_t::string:
      return "a string";
    case toml::value_t::array:
      return "an array";
    case toml::value_t::table:
      return "a table";
    default:
      return "a date/time";
  }
}

// The offset of the first byte that is not part of well-formed UTF-8 (RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF), or npos.
std::size_t firstInvalidUtf8(const std::string& text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    std::size_t len = 0;
    unsigned lo = 0x80;
    unsigned hi = 0xbf;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    }
    i += len;
  }
  return std::string::npos;
}

bool isKeyChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_' || c == '-' || c == '"' ||
         c == '\'';
}

// toml11 3.7 dereferences the last element of an empty array when a later key runs through a
// key holding one (`a = []` then `a.b = 1` or `[a.b]`): invalid TOML, but a crash instead of an
// error. Finds such a later key, conservatively (by the empty array's last key component), and
// returns its offset, or npos. `name` gets the component.
std::size_t keyThroughEmptyArray(const std::string& text, std::string& name) {
  const std::size_t n = text.size();
  std::vector<std::string> empties;
  for (std::size_t eq = text.find('='); eq != std::string::npos; eq = text.find('=', eq + 1)) {
    std::size_t i = eq + 1;
    while (i < n && (text[i] == ' ' || text[i] == '\t'))
      ++i;
    if (i >= n || text[i] != '[') continue;
    ++i;
    for (;;) {  // whitespace, newlines and comments inside the brackets
      while (i < n && std::isspace(static_cast<unsigned char>(text[i])) != 0)
        ++i;
      if (i < n && text[i] == '#') {
        while (i < n && text[i] != '\n')
          ++i;
        continue;
      }
      break;
    }
    if (i >= n || text[i] != ']') continue;
    // The key before '=': its last component.
    std::size_t end = eq;
    while (end > 0 && (text[end - 1] == ' ' || text[end - 1] == '\t'))
      --end;
    std::size_t begin = end;
    while (begin > 0 && isKeyChar(text[begin - 1]))
      --begin;
    std::string key = text.substr(begin, end - begin);
    std::erase(key, '"');
    std::erase(key, '\'');
    if (!key.empty()) empties.push_back(key);
  }
  for (const auto& key : empties) {
    for (std::size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + 1)) {
      // A key component: a boundary before, then (quote) spaces '.' spaces and another key,
      // and then '=' or ']' before the line ends.
      if (at > 0 && isKeyChar(text[at - 1]) && text[at - 1] != '"' && text[at - 1] != '\'')
        continue;
      std::size_t i = at + key.size();
      if (i < n && (text[i] == '"' || text[i] == '\'')) ++i;
      while (i < n && (text[i] == ' ' || text[i] == '\t'))
        ++i;
      if (i >= n || text[i] != '.') continue;
      ++i;
      while (i < n && (text[i] == ' ' || text[i] == '\t'))
        ++i;
      if (i >= n || !isKeyChar(text[i])) continue;
      const auto line_end = text.find('\n', i);
      const auto stop = text.find_first_of("=]", i);
      if (stop == std::string::npos || (line_end != std::string::npos && stop > line_end)) continue;
      name = key;
      return at;
    }
  }
  return std::string::npos;
}

constexpr int kMaxNesting = 64;

// The offset of the first '[' or '{' nested deeper than kMaxNesting (outside strings and
// comments), or npos. toml11 3.7 parses arrays and inline tables recursively without a limit:
// a line of a few thousand '[' overflows the stack.
std::size_t tooDeep(const std::string& text) {
  const std::size_t n = text.size();
  int depth = 0;
  std::size_t i = 0;
  auto starts = [&](std::size_t at, const char* what) { return text.compare(at, 3, what) == 0; };
  while (i < n) {
    const char c = text[i];
    if (c == '#') {
      while (i < n && text[i] != '\n')
        ++i;
    } else if (c == '"' || c == '\'') {
      const bool multi = starts(i, c == '"' ? "\"\"\"" : "\'\'\'");
      i += multi ? 3 : 1;
      while (i < n) {
        if (c == '"' && text[i] == '\\') {
          i += 2;
          continue;
        }
        if (multi ? starts(i, c == '"' ? "\"\"\"" : "\'\'\'") : text[i] == c) {
          i += multi ? 3 : 1;
          break;
        }
        if (!multi && text[i] == '\n') break;  // an unterminated string: toml11 reports it
        ++i;
      }
      continue;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxNesting) return i;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
    ++i;
  }
  return std::string::npos;
}

SourcePosition positionAt(const std::string& text, const std::string& file, std::size_t at) {
  const auto line = static_cast<std::uint32_t>(
      1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(at), '\n'));
  const auto nl = at == 0 ? std::string::npos : text.rfind('\n', at - 1);
  const std::size_t line_start = nl == std::string::npos ? 0 : nl + 1;
  return {file, line, static_cast<std::uint32_t>(at - line_start + 1)};
}

}  // namespace

std::optional<toml::value> loadTomlString(const std::string& text, const std::string& file_name,
                                          Diagnostics& diags) {
  // A TOML document is UTF-8. Checked here, before toml11 sees it: toml11 3.7 (Debian 12) reads
  // out of bounds while reporting invalid UTF-8 inside a literal string (found by
  // tests/fuzz/policy_fuzz.cc and config_fuzz.cc).
  if (auto bad = firstInvalidUtf8(text); bad != std::string::npos) {
    diags.error(positionAt(text, file_name, bad),
                "the file is not valid UTF-8 (TOML must be): byte " + std::to_string(bad));
    return std::nullopt;
  }
  if (auto at = tooDeep(text); at != std::string::npos) {
    diags.error(positionAt(text, file_name, at), "arrays and inline tables nested more than " +
                                                     std::to_string(kMaxNesting) + " deep");
    return std::nullopt;
  }
  std::string array_key;
  if (auto at = keyThroughEmptyArray(text, array_key); at != std::string::npos) {
    diags.error(positionAt(text, file_name, at),
                "this key extends `" + array_key +
                    "`, which is an empty array: an array cannot hold keys (toml11 3.7 would crash "
                    "on this, so it is refused before parsing)");
    return std::nullopt;
  }
  try {
    std::istringstream in(text);
    return toml::parse(in, file_name);
  } catch (const toml::exception& e) {
    std::string message;
    auto pos = syntaxErrorPosition(e, file_name, message);
    diags.error(pos, message);
  } catch (const std::exception& e) {
    diags.error({file_name, 1, 1}, e.what());
  }
  return std::nullopt;
}

std::optional<toml::value> loadTomlFile(const std::string& path, Diagnostics& diags) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    diags.error({path, 0, 0}, "cannot open file");
    return std::nullopt;
  }
  std::ostringstream text;
  text << in.rdbuf();
  return loadTomlString(text.str(), path, diags);
}

// toml11 v3 finds a value's line by counting the newlines from the start of the file, twice per
// location(), which makes positions quadratic in the file's size: a generated policy file of
// 10,000 [[rule]] tables spent seconds there. Instead, one index of line starts per source (kept
// for the thread's last source) makes each position a binary search; same numbers as toml11's
// (line: 1 + newlines before the value; column: 1 + bytes since the line's start).
bool isConfigName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

SourcePosition positionOf(const toml::value& v) {
  const auto* region = dynamic_cast<const toml::detail::region*>(toml::detail::get_region(v));
  if (region == nullptr || !region->is_ok()) {
    auto loc = v.location();
    return {loc.file_name(), loc.line(), loc.column()};
  }
  struct LineIndex {
    std::weak_ptr<const std::vector<char>> source;  // expired: rebuild, whatever the address
    std::vector<std::size_t> starts;
  };
  thread_local LineIndex index;
  const auto& source = region->source();
  if (index.source.lock() != source) {
    index.source = source;
    index.starts.assign(1, 0);
    for (std::size_t i = 0; i < source->size(); ++i) {
      if ((*source)[i] == '\n') index.starts.push_back(i + 1);
    }
  }
  auto offset = static_cast<std::size_t>(region->first() - source->cbegin());
  auto line = std::upper_bound(index.starts.begin(), index.starts.end(), offset) - 1;
  return {region->name(), static_cast<std::uint32_t>(line - index.starts.begin() + 1),
          static_cast<std::uint32_t>(offset - *line + 1)};
}

TomlTable::TomlTable(const toml::value& table, std::string name, Diagnostics& diags)
    : table_(table), name_(std::move(name)), diags_(diags) {}

SourcePosition TomlTable::position() const {
  auto pos = positionOf(table_);
  if (pos.line == 0) pos.line = 1;
  if (pos.column == 0) pos.column = 1;
  return pos;
}

SourcePosition TomlTable::keyPosition(std::string_view key) const {
  if (!table_.is_table()) return position();
  const auto& t = table_.as_table();
  auto it = t.find(std::string(key));
  if (it == t.end()) return position();
  auto loc = it->second.location();
  SourcePosition pos{loc.file_name(), loc.line(), loc.column()};
  // Point at the key itself rather than its value when the key is on the same line.
  const std::string& line = loc.line_str();
  if (pos.column > 1 && pos.column - 1 <= line.size()) {
    auto found = line.rfind(key, pos.column - 1);
    if (found != std::string::npos) pos.column = static_cast<std::uint32_t>(found + 1);
  }
  return pos;
}

const toml::value* TomlTable::find(std::string_view key) {
  known_.emplace(key);
  if (!table_.is_table()) return nullptr;
  const auto& t = table_.as_table();
  auto it = t.find(std::string(key));
  return it == t.end() ? nullptr : &it->second;
}

const toml::value* TomlTable::getRaw(std::string_view key) {
  return find(key);
}

void TomlTable::typeError(std::string_view key, std::string_view expected) {
  const toml::value* v = find(key);
  diags_.error(v != nullptr ? positionOf(*v) : position(),
               "'" + std::string(key) + "' in " + name_ + ": expected " + std::string(expected) +
                   (v != nullptr ? ", got " + typeName(*v) : std::string()));
}

std::optional<std::string> TomlTable::getString(std::string_view key) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) {
    typeError(key, "a string");
    return std::nullopt;
  }
  return v->as_string().str;
}

std::optional<std::int64_t> TomlTable::getInt(std::string_view key, std::int64_t min,
                                              std::int64_t max) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_integer()) {
    typeError(key, "an integer");
    return std::nullopt;
  }
  auto n = v->as_integer();
  if (n < min || n > max) {
    diags_.error(positionOf(*v), "'" + std::string(key) + "' in " + name_ + ": " +
                                     std::to_string(n) + " is out of range [" +
                                     std::to_string(min) + ", " + std::to_string(max) + "]");
    return std::nullopt;
  }
  return n;
}

std::optional<double> TomlTable::getNumber(std::string_view key, double min, double max) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  double n = 0;
  if (v->is_floating()) {
    n = v->as_floating();
  } else if (v->is_integer()) {
    n = static_cast<double>(v->as_integer());
  } else {
    typeError(key, "a number");
    return std::nullopt;
  }
  if (!(n >= min && n <= max)) {  // NaN too
    auto g = [](double x) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%g", x);
      return std::string(buf);
    };
    diags_.error(positionOf(*v), "'" + std::string(key) + "' in " + name_ + ": " + g(n) +
                                     " is out of range [" + g(min) + ", " + g(max) + "]");
    return std::nullopt;
  }
  return n;
}

std::optional<bool> TomlTable::getBool(std::string_view key) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) {
    typeError(key, "a boolean");
    return std::nullopt;
  }
  return v->as_boolean();
}

std::optional<std::chrono::milliseconds> TomlTable::getDuration(std::string_view key) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) {
    typeError(key, "a duration string such as \"5s\" or \"250ms\"");
    return std::nullopt;
  }
  auto d = parseDuration(v->as_string().str);
  if (!d) {
    diags_.error(positionOf(*v), "'" + std::string(key) + "' in " + name_ + ": \"" +
                                     v->as_string().str +
                                     "\" is not a duration (use ms, s, m or h, e.g. \"5s\")");
  }
  return d;
}

std::optional<SocketAddress> TomlTable::getSocketAddress(std::string_view key,
                                                         bool allow_zero_port) {
  auto text = getString(key);
  if (!text) return std::nullopt;
  auto addr = SocketAddress::parse(*text, allow_zero_port);
  if (!addr)
    error(key, "\"" + *text + "\" is not an address such as \"10.0.0.1:80\" or \"[::1]:80\"");
  return addr;
}

const toml::value* TomlTable::getTable(std::string_view key) {
  const toml::value* v = find(key);
  if (v == nullptr) return nullptr;
  if (!v->is_table()) {
    typeError(key, "a table");
    return nullptr;
  }
  return v;
}

std::vector<const toml::value*> TomlTable::getArrayOfTables(std::string_view key) {
  std::vector<const toml::value*> out;
  const toml::value* v = find(key);
  if (v == nullptr) return out;
  if (!v->is_array()) {
    typeError(key, "an array of tables ([[" + std::string(key) + "]])");
    return out;
  }
  for (const auto& e : v->as_array()) {
    if (!e.is_table()) {
      diags_.error(positionOf(e), "'" + std::string(key) + "' in " + name_ +
                                      ": expected a table, got " + typeName(e));
      continue;
    }
    out.push_back(&e);
  }
  return out;
}

void TomlTable::requireKey(std::string_view key) {
  diags_.error(position(), name_ + ": missing required key '" + std::string(key) + "'");
}

void TomlTable::error(std::string_view key, std::string message) {
  const toml::value* v = find(key);
  diags_.error(v != nullptr ? positionOf(*v) : position(),
               "'" + std::string(key) + "' in " + name_ + ": " + message);
}

void TomlTable::warning(std::string_view key, std::string message) {
  const toml::value* v = find(key);
  diags_.warning(v != nullptr ? positionOf(*v) : position(),
                 "'" + std::string(key) + "' in " + name_ + ": " + message);
}

void TomlTable::rejectUnknown() {
  if (!table_.is_table()) return;
  for (const auto& [key, value] : table_.as_table()) {
    if (known_.count(key) != 0) continue;
    diags_.error(keyPosition(key), "unknown key '" + key + "' in " + name_);
  }
}

}  // namespace dmm
