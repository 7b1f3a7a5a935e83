#pragma once
// TomlTable: reads one TOML table for a loader, turning every problem into a positioned
// diagnostic instead of an exception, and rejecting keys that no loader asked for.
//
// Usage: construct over a table, call the getters for every key the schema knows, then
// rejectUnknown(). Getters return nullopt when the key is absent or invalid; an invalid value
// has already been reported, so loaders simply carry on and report everything in one pass.

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <toml.hpp>
#include <vector>

#include "common/diagnostics.h"
#include "common/socket_address.h"

namespace dmm {

// Parses a TOML file. On a read or syntax error, records a diagnostic and returns nullopt.
std::optional<toml::value> loadTomlFile(const std::string& path, Diagnostics& diags);
// Same, from text (file_name is used in diagnostics).
std::optional<toml::value> loadTomlString(const std::string& text, const std::string& file_name,
                                          Diagnostics& diags);

// A name an operator gives in a config file (stack instances, rules, chains): 1-64 characters
// of [A-Za-z0-9_.-], safe in log lines and metric labels.
bool isConfigName(std::string_view name);

// Position of a value in its file.
SourcePosition positionOf(const toml::value& v);

class TomlTable {
 public:
  // `name` is how the table is called in messages, e.g. "[capture]" or "[[stack]] #2".
  TomlTable(const toml::value& table, std::string name, Diagnostics& diags);

  std::optional<std::string> getString(std::string_view key);
  std::optional<std::int64_t> getInt(std::string_view key, std::int64_t min, std::int64_t max);
  std::optional<bool> getBool(std::string_view key);
  // A float or an integer in [min, max].
  std::optional<double> getNumber(std::string_view key, double min, double max);
  std::optional<std::chrono::milliseconds> getDuration(std::string_view key);
  std::optional<SocketAddress> getSocketAddress(std::string_view key, bool allow_zero_port = false);
  // A string or an array of strings, each checked by `parse`, which reports nothing itself:
  // returning nullopt makes the element an error described by `what` ("a CIDR such as ...").
  template <class T>
  std::optional<std::vector<T>> getList(
      std::string_view key, std::string_view what,
      const std::function<std::optional<T>(std::string_view)>& parse);
  // A sub-table (nullptr when absent or not a table).
  const toml::value* getTable(std::string_view key);
  // An array of tables (empty when absent).
  std::vector<const toml::value*> getArrayOfTables(std::string_view key);
  // Marks a key as known without reading it (for keys another component validates).
  const toml::value* getRaw(std::string_view key);

  // Reports `key` as missing (at the table's position).
  void requireKey(std::string_view key);
  // Reports an error at the position of key's value (or the table if absent).
  void error(std::string_view key, std::string message);
  void warning(std::string_view key, std::string message);
  // Reports every key of the table that no getter asked for.
  void rejectUnknown();

  SourcePosition position() const;
  SourcePosition keyPosition(std::string_view key) const;
  const std::string& name() const { return name_; }
  Diagnostics& diagnostics() { return diags_; }

 private:
  const toml::value* find(std::string_view key);
  void typeError(std::string_view key, std::string_view expected);

  const toml::value& table_;
  std::string name_;
  Diagnostics& diags_;
  std::set<std::string, std::less<>> known_;
};

template <class T>
std::optional<std::vector<T>> TomlTable::getList(
    std::string_view key, std::string_view what,
    const std::function<std::optional<T>(std::string_view)>& parse) {
  const toml::value* v = find(key);
  if (v == nullptr) return std::nullopt;
  std::vector<const toml::value*> elements;
  if (v->is_string()) {
    elements.push_back(v);
  } else if (v->is_array()) {
    for (const auto& e : v->as_array())
      elements.push_back(&e);
  } else {
    typeError(key, "a string or an array of strings");
    return std::nullopt;
  }
  std::vector<T> out;
  bool ok = true;
  for (const toml::value* e : elements) {
    if (!e->is_string()) {
      diags_.error(positionOf(*e), "'" + std::string(key) + "' in " + name_ +
                                       ": expected a string (" + std::string(what) + ")");
      ok = false;
      continue;
    }
    auto parsed = parse(e->as_string().str);
    if (!parsed) {
      diags_.error(positionOf(*e), "'" + std::string(key) + "' in " + name_ + ": \"" +
                                       e->as_string().str + "\" is not " + std::string(what));
      ok = false;
      continue;
    }
    out.push_back(std::move(*parsed));
  }
  if (!ok) return std::nullopt;
  return out;
}

}  // namespace dmm
