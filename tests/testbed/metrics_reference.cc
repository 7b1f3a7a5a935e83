#include "testbed/metrics_reference.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

namespace dmm::testbed {

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

::testing::AssertionResult prometheusTool(const std::string& name, std::string* path) {
  const char* env = std::getenv("PATH");
  std::istringstream dirs(env != nullptr ? env : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) {
      *path = candidate;
      return ::testing::AssertionSuccess();
    }
  }
  return ::testing::AssertionFailure()
         << name << " is not installed (not in PATH): install Debian's `prometheus` package "
         << "(apt-get install prometheus; tests/bootstrap.sh test does it)";
}

std::set<std::string> namesOnPage(const std::string& page) {
  std::set<std::string> names;
  std::istringstream in(page);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream words(line.substr(7));
      std::string name;
      words >> name;
      names.insert(name);
    } else if (!line.empty() && line[0] != '#') {
      names.insert(line.substr(0, line.find_first_of("{ ")));
    }
  }
  return names;
}

std::map<std::string, Family> familiesOnPage(const std::string& page) {
  std::map<std::string, Family> families;
  std::istringstream in(page);
  std::string current;
  static const std::regex label_re(R"re(([a-zA-Z_][a-zA-Z0-9_]*)=")re");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream words(line.substr(7));
      words >> current >> families[current].type;
    } else if (!line.empty() && line[0] != '#' && !current.empty()) {
      auto open = line.find('{');
      if (open == std::string::npos) continue;
      std::string labels = line.substr(open, line.find('}') - open);
      for (std::sregex_iterator it(labels.begin(), labels.end(), label_re), end; it != end; ++it) {
        if ((*it)[1] != "le") families[current].labels.insert((*it)[1]);
      }
    }
  }
  return families;
}

std::map<std::string, Family> familiesInReference(const std::string& markdown) {
  std::map<std::string, Family> families;
  static const std::regex row_re(
      R"re(^\| `((?:dmm_sidecar|process)_[a-z_]+)` \| ([a-z]+) \| ([^|]*) \|)re");
  static const std::regex name_re("`([a-z_]+)`");
  static const std::regex values_re(R"re(\([^)]*\))re");
  std::istringstream in(markdown);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (!std::regex_search(line, m, row_re)) continue;
    Family& f = families[m[1].str()];
    f.type = m[2].str();
    std::string labels = std::regex_replace(m[3].str(), values_re, "");
    for (std::sregex_iterator it(labels.begin(), labels.end(), name_re), end; it != end; ++it)
      f.labels.insert((*it)[1].str());
  }
  return families;
}

}  // namespace dmm::testbed
