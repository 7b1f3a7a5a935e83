#pragma once
// The stack instances' own metrics, collected at scrape time: dmm_sidecar_stack_up for every
// instance, and what each instance reports (Stack::samples(), e.g. a dpdk port's counters),
// with its `stack` label.

#include <prometheus/metric_family.h>

#include <memory>
#include <vector>

#include "stacks/stack.h"

namespace dmm::proxy {

std::vector<prometheus::MetricFamily> collectStackMetrics(
    const std::vector<std::unique_ptr<stacks::Stack>>& stacks);

}  // namespace dmm::proxy
