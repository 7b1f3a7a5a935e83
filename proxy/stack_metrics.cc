#include "proxy/stack_metrics.h"

#include <string>

namespace dmm::proxy {

std::vector<prometheus::MetricFamily> collectStackMetrics(
    const std::vector<std::unique_ptr<stacks::Stack>>& stacks) {
  std::vector<prometheus::MetricFamily> families;
  auto familyFor = [&](const char* name, const char* help,
                       prometheus::MetricType type) -> prometheus::MetricFamily& {
    for (auto& f : families) {
      if (f.name == name) return f;
    }
    families.push_back({name, help, type, {}});
    return families.back();
  };
  for (const auto& s : stacks) {
    prometheus::ClientMetric up;
    up.label = {{"kind", std::string(s->kind())}, {"stack", s->name()}};
    up.gauge.value = s->healthy() ? 1 : 0;
    familyFor("dmm_sidecar_stack_up",
              "1 while the stack instance can carry connections, 0 when it is down (its device "
              "or port failed to start)",
              prometheus::MetricType::Gauge)
        .metric.push_back(up);
    std::vector<stacks::StackSample> samples;
    s->samples(samples);
    for (const auto& sample : samples) {
      auto type = sample.counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
      prometheus::ClientMetric m;
      if (sample.label != nullptr) m.label.push_back({sample.label, sample.label_value});
      m.label.push_back({"stack", s->name()});
      if (sample.counter) {
        m.counter.value = sample.value;
      } else {
        m.gauge.value = sample.value;
      }
      familyFor(sample.name, sample.help, type).metric.push_back(m);
    }
  }
  return families;
}

}  // namespace dmm::proxy
