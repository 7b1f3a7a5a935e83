#pragma once
// Diagnostics: every problem found in a config or policy file, with its position, collected in
// one pass and printed as "file:line:col: error: message" (the form compilers and editors read).

#include <cstdint>
#include <string>
#include <vector>

namespace dmm {

struct SourcePosition {
  std::string file;
  std::uint32_t line = 0;  // 1-based; 0 when unknown (the whole file)
  std::uint32_t column = 0;
};

struct Diagnostic {
  enum class Severity { kError, kWarning };
  Severity severity = Severity::kError;
  SourcePosition where;
  std::string message;

  std::string format() const;  // "file:line:col: error: message"
};

class Diagnostics {
 public:
  void error(SourcePosition where, std::string message);
  void warning(SourcePosition where, std::string message);

  bool hasErrors() const { return errors_ > 0; }
  std::size_t errorCount() const { return errors_; }
  // All diagnostics ordered by file, line and column.
  std::vector<Diagnostic> sorted() const;
  // One formatted line per diagnostic, in sorted order, each ending in '\n'.
  std::string formatAll() const;

 private:
  std::vector<Diagnostic> items_;
  std::size_t errors_ = 0;
};

}  // namespace dmm
