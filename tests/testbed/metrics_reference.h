#pragma once
// The metrics reference (docs/metrics.md) and a Prometheus text page, read the same way by the
// tests that hold one against the other: the host's (tests/integration/metrics_integration_
// test.cc) and the Soft-RoCE guest's for the rdma families (tests/rdma/).

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>

namespace dmm::testbed {

std::string readFile(const std::string& path);

// Finds a tool of Debian's `prometheus` package in PATH, or says how to get it.
::testing::AssertionResult prometheusTool(const std::string& name, std::string* path);

// Every metric name on a Prometheus text page: sample names (with _bucket, _sum, _count) and
// family names (from the # TYPE lines).
std::set<std::string> namesOnPage(const std::string& page);

// Each metric family on a Prometheus text page: its type and the label names of its samples
// (without a histogram's `le`).
struct Family {
  std::string type;
  std::set<std::string> labels;
};
std::map<std::string, Family> familiesOnPage(const std::string& page);

// The "All metrics" table of docs/metrics.md: | `name` | type | labels | unit | meaning |, the
// labels column as backquoted names, with values in parentheses after some of them.
std::map<std::string, Family> familiesInReference(const std::string& markdown);

// Metric names (or PromQL naming them) that only a sidecar with an RDMA device serves.
inline bool needsRdma(const std::string& text) {
  return text.find("dmm_sidecar_rdma_") != std::string::npos;
}

}  // namespace dmm::testbed
