#include "common/diagnostics.h"

#include <algorithm>
#include <tuple>

namespace dmm {

std::string Diagnostic::format() const {
  std::string out = where.file;
  if (where.line > 0) {
    out += ":" + std::to_string(where.line) + ":" + std::to_string(where.column);
  }
  out += severity == Severity::kError ? ": error: " : ": warning: ";
  out += message;
  return out;
}

void Diagnostics::error(SourcePosition where, std::string message) {
  items_.push_back({Diagnostic::Severity::kError, std::move(where), std::move(message)});
  ++errors_;
}

void Diagnostics::warning(SourcePosition where, std::string message) {
  items_.push_back({Diagnostic::Severity::kWarning, std::move(where), std::move(message)});
}

std::vector<Diagnostic> Diagnostics::sorted() const {
  auto out = items_;
  std::stable_sort(out.begin(), out.end(), [](const Diagnostic& a, const Diagnostic& b) {
    return std::tie(a.where.file, a.where.line, a.where.column) <
           std::tie(b.where.file, b.where.line, b.where.column);
  });
  return out;
}

std::string Diagnostics::formatAll() const {
  std::string out;
  for (const auto& d : sorted())
    out += d.format() + "\n";
  return out;
}

}  // namespace dmm
