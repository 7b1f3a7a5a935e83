#pragma once
// The standard process metrics of Prometheus client libraries (process_cpu_seconds_total,
// process_resident_memory_bytes, ...), read from /proc/self at scrape time. prometheus-cpp
// has no process collector; these names are what dashboards and alerts expect.

#include <prometheus/metric_family.h>

#include <vector>

namespace dmm::proxy {

std::vector<prometheus::MetricFamily> collectProcessMetrics();

}  // namespace dmm::proxy
