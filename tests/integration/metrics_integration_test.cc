// The metrics page as Prometheus itself sees it, after real traffic (a relayed connection, a
// fallback, policy decisions by a named rule) so that every labelled series exists: promtool's
// lint, a real Prometheus server scraping a sidecar and answering queries, and the Grafana
// dashboard (docs/grafana/dmm-sidecar.json) checked against the metrics that really exist.
//
// promtool and prometheus come from Debian's `prometheus` package (tests/bootstrap.sh installs
// it). A missing tool fails the tests: a skip would let the checks quietly stop running.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "testbed/metrics_reference.h"
#include "testbed/servers.h"
#include "testbed/testbed.h"

namespace dmm::testbed {
namespace {

constexpr const char* kKey = "metrics-integration-key-0123456789";
constexpr std::uint16_t kPort = 9000;
constexpr const char* kRule = "metrics-test";
// A second address on host B, where no sidecar listens.
constexpr const char* kIp4B2 = "10.201.0.12";

std::string dashboardPath() {
  return std::string(DMM_SOURCE_DIR) + "/docs/grafana/dmm-sidecar.json";
}
std::string referencePath() {
  return std::string(DMM_SOURCE_DIR) + "/docs/metrics.md";
}

// The PromQL examples at the end of docs/metrics.md: one query per paragraph of the code block
// after "## Example queries", `#` lines being comments.
std::vector<std::string> referenceExampleQueries(const std::string& markdown) {
  std::vector<std::string> queries;
  auto section = markdown.find("## Example queries");
  if (section == std::string::npos) return queries;
  auto begin = markdown.find("```\n", section);
  auto end = markdown.find("\n```", begin + 4);
  if (begin == std::string::npos || end == std::string::npos) return queries;
  std::istringstream in(markdown.substr(begin + 4, end - begin - 4));
  std::string query;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') {
      if (!query.empty()) queries.push_back(query);
      query.clear();
    } else {
      query += line + "\n";
    }
  }
  if (!query.empty()) queries.push_back(query);
  return queries;
}

std::string percentEncode(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.' ||
        c == '~') {
      out += c;
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X",
                    static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    }
  }
  return out;
}

// The PromQL of every panel target in the dashboard ("expr" strings, JSON escapes undone).
std::vector<std::string> dashboardExpressions(const std::string& json) {
  std::vector<std::string> exprs;
  static const std::regex expr_re(R"re("expr"\s*:\s*"((?:[^"\\]|\\.)*)")re");
  for (std::sregex_iterator it(json.begin(), json.end(), expr_re), end; it != end; ++it) {
    std::string raw = (*it)[1].str();
    std::string expr;
    for (std::size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] != '\\' || i + 1 == raw.size()) {
        expr += raw[i];
        continue;
      }
      char e = raw[++i];
      expr += e == 'n' ? '\n' : e == 't' ? '\t' : e;  // \" \\ \/ stand for themselves
    }
    exprs.push_back(expr);
  }
  return exprs;
}

// One element of an instant query's result vector.
struct Sample {
  std::string labels;  // the "metric" object, as JSON text
  std::string value;   // as Prometheus formats it: "1", "0.5", "NaN"
};
struct QueryResult {
  bool ok = false;     // HTTP 200 and "status":"success"
  std::string answer;  // the whole response, for failure messages
  std::vector<Sample> samples;
};

// A Prometheus server in `ns`, on a free loopback port, scraping `target` (job "dmm-sidecar")
// every second, with a fresh data directory: samples of an earlier run would fake a success.
class PrometheusServer {
 public:
  PrometheusServer(const Netns& ns, const std::string& binary, const std::string& target)
      : ns_(ns) {
    port_ = freePort();
    std::string config = dir_.write("prometheus.yml", R"(global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: dmm-sidecar
    static_configs:
      - targets: [")" + target + R"("]
)");
    std::string data = dir_.path() + "/data";
    process_ = std::make_unique<Process>(
        &ns,
        std::vector<std::string>{binary, "--config.file=" + config, "--storage.tsdb.path=" + data,
                                 "--web.listen-address=127.0.0.1:" + std::to_string(port_)},
        dir_.path() + "/prometheus.log");
  }
  ~PrometheusServer() { process_.reset(); }  // killed (by PID) before its directory goes

  QueryResult query(const std::string& promql) const {
    QueryResult r;
    auto response =
        httpGet(ns_, at("127.0.0.1", port_), "/api/v1/query?query=" + percentEncode(promql), 5s);
    r.answer = "HTTP " + std::to_string(response.status) + ": " + response.body;
    r.ok =
        response.status == 200 && response.body.find(R"("status":"success")") != std::string::npos;
    static const std::regex sample_re(
        R"re(\{"metric":(\{[^}]*\}),"value":\[[-+0-9.eE]+,"([^"]*)"\]\})re");
    for (std::sregex_iterator it(response.body.begin(), response.body.end(), sample_re), end;
         it != end; ++it) {
      r.samples.push_back({(*it)[1].str(), (*it)[2].str()});
    }
    return r;
  }
  std::string log() const { return process_->log(); }
  bool running() { return process_->running(); }

 private:
  // A port nothing in the namespace listens on (the namespace is this test's own).
  std::uint16_t freePort() const {
    UniqueFd fd = ns_.socket(AF_INET, SOCK_STREAM);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sin;
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&sin), len) != 0 ||
        ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&sin), &len) != 0) {
      ADD_FAILURE() << "no free port: " << std::strerror(errno);
      return 0;
    }
    return ntohs(sin.sin_port);
  }

  const Netns& ns_;
  TempDir dir_;
  std::uint16_t port_ = 0;
  std::unique_ptr<Process> process_;
};

// Two sidecars (A captures, B receives) after real traffic, so that the rule-labelled series
// exist and the other series have moved from 0.
class MetricsAfterTraffic : public HostPairTest {
 protected:
  void SetUp() override {
    const std::string policy = "[[rule]]\nname = \"" + std::string(kRule) +
                               "\"\nmatch.ports = [\"" + std::to_string(kPort) +
                               "\"]\nstacks = [\"kernel\"]\n";
    const std::string config = "[security]\npsk = \"" + std::string(kKey) +
                               "\"\n[timeouts]\nconnect = \"2s\"\nhandshake = \"2s\"\n";
    // B's tunnel port is on its first address only: at its second one, A finds no sidecar and
    // falls back to a direct connection.
    hosts_.b().mustExec({"ip", "addr", "add", std::string(kIp4B2) + "/24", "dev", hosts_.devB()});
    b_ = std::make_unique<SidecarProcess>(
        hosts_.b(),
        sidecarConfig(config + "[tunnel]\nlisten = [\"" + std::string(TwoHosts::kIp4B) +
                      ":17002\"]\n"),
        "b", std::map<std::string, std::string>{{"10-metrics.toml", policy}});
    // A also runs a dpdk instance (on a veth pair of its own, carrying nothing: the rule picks
    // the kernel), so that the dpdk families are on its page too.
    hosts_.a().mustExec({"ip", "link", "add", "dpm0", "type", "veth", "peer", "name", "dpm1"});
    hosts_.a().mustExec({"ip", "link", "set", "dpm0", "up"});
    hosts_.a().mustExec({"ip", "link", "set", "dpm1", "up"});
    const std::string stacks =
        "[[stack]]\nname = \"kernel\"\nkind = \"kernel\"\n\n[[stack]]\nname = \"dp0\"\n"
        "kind = \"dpdk\"\nport = \"net_af_packet0,iface=dpm0\"\naddress = \"10.203.0.1/24\"\n";
    a_ = std::make_unique<SidecarProcess>(
        hosts_.a(), sidecarConfig(config + stacks), "a",
        std::map<std::string, std::string>{{"10-metrics.toml", policy}});
    a_->installCapture();

    ThreadServer server4(hosts_.b(), at(TwoHosts::kIp4B, kPort), echoHandler);
    ThreadServer server2(hosts_.b(), at(kIp4B2, kPort), echoHandler);
    ASSERT_EQ(echoOnce(hosts_.a(), at(TwoHosts::kIp4B, kPort), "relayed"), "relayed");
    ASSERT_EQ(echoOnce(hosts_.a(), at(kIp4B2, kPort), "direct"), "direct");
    ASSERT_TRUE(waitFor(*a_, "dmm_sidecar_connections_total",
                        {{"role", "outbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
    ASSERT_TRUE(waitFor(*a_, "dmm_sidecar_connections_total",
                        {{"role", "outbound"}, {"stack", "direct"}, {"outcome", "closed"}}, 1));
    ASSERT_TRUE(waitFor(*b_, "dmm_sidecar_connections_total",
                        {{"role", "inbound"}, {"stack", "kernel"}, {"outcome", "closed"}}, 1));
    ASSERT_EQ(a_->metric("dmm_sidecar_fallbacks_total",
                         {{"reason", "peer_refused"}, {"action", "direct"}})
                  .value_or(-1),
              1);
    ASSERT_EQ(
        a_->metric("dmm_sidecar_policy_decisions_total", {{"role", "outbound"}, {"rule", kRule}})
            .value_or(-1),
        2);
    ASSERT_EQ(
        b_->metric("dmm_sidecar_policy_decisions_total", {{"role", "inbound"}, {"rule", kRule}})
            .value_or(-1),
        1);
  }

  static bool waitFor(SidecarProcess& s, const std::string& name,
                      const std::map<std::string, std::string>& labels, double want) {
    return eventually([&] { return s.metric(name, labels).value_or(-1) >= want; }, 5s);
  }
};

TEST(Promtool, FailsAPageThatBreaksTheNamingRules) {
  // The control for the test below: promtool really reads the page from stdin and lints it.
  std::string promtool;
  ASSERT_TRUE(prometheusTool("promtool", &promtool));
  auto r = runCommand({promtool, "check", "metrics"},
                      "# HELP x_latency_ms A counter in milliseconds.\n"
                      "# TYPE x_latency_ms counter\nx_latency_ms 1\n");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("_total"), std::string::npos) << r.output;
}

TEST_F(MetricsAfterTraffic, PromtoolFindsNothingToLintOnEitherSidesPage) {
  std::string promtool;
  ASSERT_TRUE(prometheusTool("promtool", &promtool));
  for (const auto* side : {a_.get(), b_.get()}) {
    const char* name = side == a_.get() ? "A (outbound)" : "B (inbound)";
    std::string page = side->scrape();
    ASSERT_FALSE(page.empty()) << name;
    // The families whose series appear only with traffic are on the page being linted.
    ASSERT_NE(page.find("dmm_sidecar_policy_decisions_total{"), std::string::npos) << page;
    ASSERT_NE(page.find("dmm_sidecar_stack_attempts_total{"), std::string::npos) << page;
    auto r = runCommand({promtool, "check", "metrics"}, page);
    EXPECT_EQ(r.status, 0) << "`promtool check metrics` on sidecar " << name << "'s page exited "
                           << r.status << ":\n"
                           << r.output << "\n---- the page ----\n"
                           << page;
  }
}

TEST_F(MetricsAfterTraffic, TheDashboardNamesOnlyMetricsThatExistAndPlotsEveryOne) {
  auto json_check = run({"python3", "-m", "json.tool", dashboardPath()});
  ASSERT_EQ(json_check.status, 0) << dashboardPath() << " is not valid JSON:\n"
                                  << json_check.output;
  std::string dashboard = readFile(dashboardPath());
  ASSERT_NE(dashboard.find("${DS_PROMETHEUS}"), std::string::npos)
      << "the dashboard's data source is not the ${DS_PROMETHEUS} input";

  std::set<std::string> on_pages = namesOnPage(a_->scrape());
  on_pages.merge(namesOnPage(b_->scrape()));
  std::set<std::string> on_dashboard;
  static const std::regex name_re("(?:dmm_sidecar|process)_[a-z_]+");
  for (std::sregex_iterator it(dashboard.begin(), dashboard.end(), name_re), end; it != end; ++it)
    on_dashboard.insert(it->str());
  ASSERT_FALSE(on_dashboard.empty());
  for (const auto& name : on_dashboard) {
    if (needsRdma(name)) continue;  // tests/rdma/ checks them on Soft-RoCE
    EXPECT_TRUE(on_pages.count(name) == 1)
        << "the dashboard uses " << name << ", which no sidecar serves";
  }
  // The other way round: a metric added to the code gets a panel (or this test says so).
  std::istringstream page(a_->scrape());
  for (std::string line; std::getline(page, line);) {
    if (line.rfind("# TYPE ", 0) != 0) continue;
    std::string family = line.substr(7, line.find(' ', 7) - 7);
    EXPECT_NE(dashboard.find(family), std::string::npos)
        << family << " is on the metrics page but not on the dashboard";
  }
}

TEST_F(MetricsAfterTraffic, TheReferenceListsEveryMetricWithItsTypeAndLabels) {
  auto documented = familiesInReference(readFile(referencePath()));
  ASSERT_FALSE(documented.empty()) << "no metrics table in " << referencePath();
  auto served = familiesOnPage(a_->scrape());
  for (const auto& [name, family] : familiesOnPage(b_->scrape()))
    served[name].labels.insert(family.labels.begin(), family.labels.end());
  for (const auto& [name, family] : served) {
    SCOPED_TRACE(name);
    auto doc = documented.find(name);
    if (doc == documented.end()) {
      ADD_FAILURE() << name << " is served but not in " << referencePath();
      continue;
    }
    EXPECT_EQ(doc->second.type, family.type);
    EXPECT_EQ(doc->second.labels, family.labels);
  }
  for (const auto& [name, family] : documented) {
    if (needsRdma(name)) continue;  // tests/rdma/ checks them on Soft-RoCE
    EXPECT_EQ(served.count(name), 1u)
        << referencePath() << " lists " << name << ", which no sidecar serves";
  }
}

TEST_F(MetricsAfterTraffic, APrometheusServerScrapesTheSidecarAndAnswersQueries) {
  std::string binary;
  ASSERT_TRUE(prometheusTool("prometheus", &binary));
  const auto start = std::chrono::steady_clock::now();
  const std::string target = a_->metricsAddress();
  PrometheusServer prometheus(hosts_.a(), binary, target);
  // The first scrape lands about 6 s after the start, even with a 1 s interval.
  QueryResult up;
  bool scraped = eventually(
      [&] {
        up = prometheus.query(R"(up{job="dmm-sidecar"})");
        return (up.ok && !up.samples.empty()) || !prometheus.running();
      },
      30s);
  ASSERT_TRUE(scraped && prometheus.running())
      << "no answer about the scrape within 30 s; last answer: " << up.answer
      << "\n---- prometheus log ----\n"
      << prometheus.log();
  ASSERT_EQ(up.samples.size(), 1u) << up.answer;
  EXPECT_EQ(up.samples[0].value, "1") << "the scrape failed: " << up.answer;
  EXPECT_NE(up.samples[0].labels.find(target), std::string::npos) << up.answer;
  std::cerr << "first scrape seen after "
            << std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - start)
                   .count()
            << " ms\n";

  // The sidecar's own metrics, as the sidecar serves them.
  auto relayed = prometheus.query(
      R"(dmm_sidecar_connections_total{job="dmm-sidecar",role="outbound",stack="kernel",outcome="closed"})");
  ASSERT_TRUE(relayed.ok) << relayed.answer;
  ASSERT_EQ(relayed.samples.size(), 1u) << relayed.answer;
  EXPECT_EQ(relayed.samples[0].value, "1") << relayed.answer;
  auto decisions = prometheus.query(R"(dmm_sidecar_policy_decisions_total{role="outbound"})");
  ASSERT_EQ(decisions.samples.size(), 1u) << decisions.answer;
  EXPECT_NE(decisions.samples[0].labels.find(std::string(R"("rule":")") + kRule + "\""),
            std::string::npos)
      << decisions.answer;
  EXPECT_EQ(decisions.samples[0].value, "2") << decisions.answer;

  // Every dashboard query, with Grafana's variables filled in, is valid PromQL and finds
  // series. rate() needs two samples in its window: wait for the second scrape.
  ASSERT_TRUE(eventually(
      [&] {
        auto n = prometheus.query(R"(count_over_time(up{job="dmm-sidecar"}[1m]))");
        return n.samples.size() == 1 && std::atof(n.samples[0].value.c_str()) >= 2;
      },
      10s));
  auto exprs = dashboardExpressions(readFile(dashboardPath()));
  ASSERT_GE(exprs.size(), 10u) << "the dashboard at " << dashboardPath() << " has few queries";
  // The reference's example queries too.
  auto examples = referenceExampleQueries(readFile(referencePath()));
  ASSERT_GE(examples.size(), 3u) << "no example queries found in " << referencePath();
  exprs.insert(exprs.end(), examples.begin(), examples.end());
  for (std::string expr : exprs) {
    for (auto [var, value] :
         {std::pair{"$__rate_interval", "1m"}, std::pair{"$instance", target.c_str()}}) {
      for (auto pos = expr.find(var); pos != std::string::npos; pos = expr.find(var))
        expr.replace(pos, std::string(var).size(), value);
    }
    EXPECT_EQ(expr.find('$'), std::string::npos) << "a variable the test does not know: " << expr;
    if (needsRdma(expr)) continue;  // no RDMA device here: tests/rdma/ checks the names
    auto r = prometheus.query(expr);
    EXPECT_TRUE(r.ok) << expr << "\n" << r.answer;
    EXPECT_FALSE(r.samples.empty()) << "no series for " << expr << "\n" << r.answer;
  }
}

}  // namespace
}  // namespace dmm::testbed
