// Config loading and validation: defaults, every section, and errors as file:line:col lines,
// all of them in one pass.

#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "proxy/config.h"
#include "stacks/kernel/kernel_stack.h"
#include "stacks/stack.h"

namespace dmm::proxy {
namespace {

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override { stacks::registerBuiltinStacks(registry_); }

  std::optional<Config> load(const std::string& text) {
    diags_ = Diagnostics();
    return loadConfigString(text, "sidecar.toml", registry_, diags_);
  }
  std::string errors() const { return diags_.formatAll(); }

  stacks::StackRegistry registry_;
  Diagnostics diags_;
};

constexpr const char* kKey = "[security]\npsk = \"0123456789abcdef0123\"\n";

TEST_F(ConfigTest, MinimalConfigGetsDefaults) {
  auto c = load(kKey);
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->tunnel_port, 17002);
  ASSERT_EQ(c->capture_listen.size(), 2u);
  EXPECT_EQ(c->capture_listen[0].toString(), "127.0.0.1:17001");
  EXPECT_EQ(c->capture_listen[1].toString(), "[::1]:17001");
  ASSERT_EQ(c->tunnel_listen.size(), 2u);
  EXPECT_EQ(c->tunnel_listen[0].toString(), "0.0.0.0:17002");
  EXPECT_EQ(c->metrics_listen.toString(), "127.0.0.1:17090");
  ASSERT_EQ(c->stacks.size(), 1u);
  EXPECT_EQ(c->stacks[0].name, "kernel");
  EXPECT_EQ(c->fallback, FallbackMode::kDirect);
  EXPECT_EQ(c->handshake_timeout, Millis(5000));
  EXPECT_EQ(c->psk.size(), 20u);
}

TEST_F(ConfigTest, FullConfigIsRead) {
  auto c = load(R"(
[sidecar]
workers = 3
mark = 0x1234
[log]
level = "debug"
format = "journal"
[capture]
listen = ["127.0.0.1:15001"]
exclude = ["10.9.0.0/16"]
exclude_ports = ["22", "8000-8080"]
ipv6 = false
chain = "MYCHAIN"
[tunnel]
listen = "0.0.0.0:15002"
port = 15002
max_header_bytes = 1024
[fallback]
mode = "refuse"
no_sidecar_ttl = "2m"
[inbound]
allow_local = false
[[inbound.allow]]
cidr = "10.1.0.0/16"
ports = ["80", "443"]
[timeouts]
connect = "1s"
handshake = "250ms"
idle = "10m"
half_closed = "30s"
[relay]
buffer_size = 131072
low_watermark = 32768
splice = false
[security]
psk = "0123456789abcdef0123"
key_id = "k2"
max_clock_skew = "10s"
[metrics]
listen = "[::1]:9100"
[[stack]]
name = "fast"
kind = "kernel"
nodelay = true
send_buffer = 4194304
[[stack]]
name = "bulk"
kind = "kernel"
nodelay = false
)");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->workers, 3u);
  EXPECT_EQ(c->mark, 0x1234u);
  EXPECT_EQ(c->log_level, spdlog::level::debug);
  EXPECT_EQ(c->capture_listen.size(), 1u);
  EXPECT_EQ(c->capture_exclude_ports.size(), 2u);
  EXPECT_EQ(c->capture_exclude_ports[1].last, 8080);
  EXPECT_EQ(c->capture_chain, "MYCHAIN");
  EXPECT_EQ(c->tunnel_listen.size(), 1u);
  EXPECT_EQ(c->fallback, FallbackMode::kRefuse);
  EXPECT_EQ(c->no_sidecar_ttl, Millis(120000));
  ASSERT_EQ(c->inbound_allow.size(), 1u);
  EXPECT_TRUE(c->inbound_allow[0].matches(*SocketAddress::parse("10.1.2.3:443")));
  EXPECT_FALSE(c->inbound_allow[0].matches(*SocketAddress::parse("10.1.2.3:444")));
  EXPECT_FALSE(c->inbound_allow[0].matches(*SocketAddress::parse("10.2.2.3:443")));
  EXPECT_EQ(c->handshake_timeout, Millis(250));
  EXPECT_FALSE(c->splice);
  EXPECT_EQ(c->key_id, "k2");
  EXPECT_EQ(c->metrics_listen.toString(), "[::1]:9100");
  ASSERT_EQ(c->stacks.size(), 2u);
  EXPECT_EQ(c->stacks[1].name, "bulk");
  auto* fast = dynamic_cast<const stacks::kernel::KernelOptions*>(c->stacks[0].options.get());
  ASSERT_NE(fast, nullptr);
  EXPECT_EQ(fast->send_buffer, 4194304);
}

TEST_F(ConfigTest, EveryErrorInOnePassWithPositions) {
  auto c = load(R"([sidecar]
workers = "two"
colour = "blue"
[timeouts]
connect = "5 parsecs"
[capture]
exclude = ["10.0.0.0/33"]
[[stack]]
name = "k"
kind = "warp"
[security]
psk = "short"
)");
  EXPECT_FALSE(c);
  std::string e = errors();
  EXPECT_NE(e.find("sidecar.toml:2:11: error: 'workers' in [sidecar]: expected an integer"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:3:1: error: unknown key 'colour' in [sidecar]"), std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:5:11: error: 'connect' in [timeouts]"), std::string::npos) << e;
  EXPECT_NE(
      e.find("sidecar.toml:7:12: error: 'exclude' in [capture]: \"10.0.0.0/33\" is not a CIDR"),
      std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:10:8: error: 'kind' in [[stack]] #1: unknown stack kind \"warp\""),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:12:7: error: 'psk' in [security]: must be at least 16 bytes"),
            std::string::npos)
      << e;
  EXPECT_EQ(diags_.errorCount(), 6u) << e;
  // Sorted by position.
  EXPECT_LT(e.find(":2:11:"), e.find(":3:1:"));
  EXPECT_LT(e.find(":3:1:"), e.find(":12:7:"));
}

TEST_F(ConfigTest, SyntaxErrorHasItsColumn) {
  EXPECT_FALSE(load("[sidecar]\nworkers = = 2\n"));
  std::string e = errors();
  EXPECT_EQ(e.rfind("sidecar.toml:2:11: error: TOML syntax error:", 0), 0u) << e;
}

TEST_F(ConfigTest, UnknownTopLevelTableAndStackKeys) {
  EXPECT_FALSE(
      load(std::string(kKey) +
           "[tunel]\nport = 1\n[[stack]]\nname = \"a\"\nkind = \"kernel\"\nnodelai = true\n"));
  std::string e = errors();
  EXPECT_NE(e.find("sidecar.toml:3:1: error: unknown key 'tunel' in the top level"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:8:1: error: unknown key 'nodelai' in [[stack]] #1"),
            std::string::npos)
      << e;
}

TEST_F(ConfigTest, StackNamesAreUniqueAndLabelNamesAreReserved) {
  EXPECT_FALSE(load(std::string(kKey) + "[[stack]]\nname = \"a\"\nkind = \"kernel\"\n"
                                        "[[stack]]\nname = \"a\"\nkind = \"kernel\"\n"
                                        "[[stack]]\nname = \"direct\"\nkind = \"kernel\"\n"
                                        "[[stack]]\nname = \"none\"\nkind = \"kernel\"\n"));
  std::string e = errors();
  EXPECT_NE(e.find("a stack named \"a\" is already defined"), std::string::npos) << e;
  EXPECT_NE(e.find("\"direct\" is reserved"), std::string::npos) << e;
  EXPECT_NE(e.find("\"none\" is reserved"), std::string::npos) << e;
}

TEST_F(ConfigTest, KeyIsRequired) {
  EXPECT_FALSE(load("[sidecar]\nworkers = 1\n"));
  EXPECT_NE(errors().find("sidecar.toml:1:1: error: [security] psk_file (or psk) is required"),
            std::string::npos)
      << errors();
  EXPECT_TRUE(load("[capture]\nenabled = false\n[tunnel]\nenabled = false\n"));
}

TEST_F(ConfigTest, KeyFileIsReadAndTrimmed) {
  std::string path = ::testing::TempDir() + "/dmm_psk_test";
  {
    std::ofstream out(path);
    out << "a-secret-of-enough-length\n";
  }
  auto c = load("[security]\npsk_file = \"" + path + "\"\n");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(std::string(c->psk.begin(), c->psk.end()), "a-secret-of-enough-length");
  EXPECT_FALSE(load("[security]\npsk_file = \"/nonexistent/key\"\n"));
  EXPECT_NE(errors().find("sidecar.toml:2:12: error: 'psk_file' in [security]: cannot read"),
            std::string::npos)
      << errors();
}

TEST_F(ConfigTest, ListenListsMustNotBeEmpty) {
  EXPECT_FALSE(load(std::string(kKey) + "[capture]\nlisten = []\n[tunnel]\nlisten = []\n"));
  std::string e = errors();
  EXPECT_NE(e.find("sidecar.toml:4:10: error: 'listen' in [capture]: needs at least one address"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:6:10: error: 'listen' in [tunnel]: needs at least one address"),
            std::string::npos)
      << e;
  auto c = load(std::string(kKey) + "[tunnel]\nlisten = \"[::]:15002\"\n");
  ASSERT_TRUE(c) << errors();
  ASSERT_EQ(c->tunnel_listen.size(), 1u);
  EXPECT_EQ(c->tunnel_listen[0].toString(), "[::]:15002");
}

TEST_F(ConfigTest, WatermarksMustBeOrdered) {
  EXPECT_FALSE(load(std::string(kKey) + "[relay]\nbuffer_size = 8192\nlow_watermark = 8192\n"));
  EXPECT_NE(errors().find("must be below buffer_size"), std::string::npos) << errors();
  EXPECT_FALSE(load(std::string(kKey) + "[relay]\npipe_size = 8192\nlow_watermark = 8192\n"));
  EXPECT_NE(errors().find("sidecar.toml:5:17: error: 'low_watermark' in [relay]: must be below "
                          "pipe_size (8192)"),
            std::string::npos)
      << errors();
  auto c = load(std::string(kKey) + "[relay]\npipe_size = 262144\n");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->pipe_size, 262144u);
  EXPECT_EQ(load(kKey)->pipe_size, 1u << 20);
}

TEST_F(ConfigTest, BufferMemoryIsBoundedByDefaultAndSplitAmongWorkers) {
  auto c = load(kKey);
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->buffer_memory, 512ull << 20);
  c = load(std::string(kKey) + "[sidecar]\nworkers = 4\n\n[relay]\nbuffer_memory = 8388608\n");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->workerBufferMemory(), 2u << 20);
  // A worker never gets less than one connection's two buffers.
  c = load(std::string(kKey) + "[sidecar]\nworkers = 4\n\n[relay]\nbuffer_memory = 131072\n");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->workerBufferMemory(), 131072u);
  c = load(std::string(kKey) + "[relay]\nbuffer_memory = 0\n");
  ASSERT_TRUE(c) << errors();
  EXPECT_EQ(c->workerBufferMemory(), 0u);  // no limit
  EXPECT_FALSE(load(std::string(kKey) + "[relay]\nbuffer_memory = 100000\n"));
  EXPECT_NE(errors().find("sidecar.toml:4:17: error: 'buffer_memory' in [relay]: must be 0 (no "
                          "limit) or at least two buffers (131072 bytes)"),
            std::string::npos)
      << errors();
  EXPECT_FALSE(load(std::string(kKey) + "[relay]\nbuffer_memory = -1\n"));
}

TEST_F(ConfigTest, CaptureNeedsAMark) {
  EXPECT_FALSE(load(std::string(kKey) + "[sidecar]\nmark = 0\n"));
  EXPECT_NE(errors().find("mark must not be 0"), std::string::npos) << errors();
}

TEST_F(ConfigTest, ForwardListenersAreReadAndChecked) {
  auto c = load(std::string(kKey) + R"(
[[forward]]
listen = "127.0.0.1:15201"
destination = "10.0.0.2:5201"
[[forward]]
listen = "[::1]:15202"
destination = "[fd00::2]:80"
)");
  ASSERT_TRUE(c) << errors();
  ASSERT_EQ(c->forwards.size(), 2u);
  EXPECT_EQ(c->forwards[0].listen.toString(), "127.0.0.1:15201");
  EXPECT_EQ(c->forwards[0].destination.toString(), "10.0.0.2:5201");
  EXPECT_EQ(c->forwards[1].destination.toString(), "[fd00::2]:80");

  EXPECT_FALSE(load(std::string(kKey) + R"([[forward]]
listen = "127.0.0.1:15201"
[[forward]]
listen = "127.0.0.1:0"
destination = "nowhere"
via = "x"
)"));
  std::string e = errors();
  EXPECT_NE(e.find("sidecar.toml:3:1: error: [[forward]] #1: missing required key 'destination'"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:6:10: error: 'listen' in [[forward]] #2: \"127.0.0.1:0\" is "
                   "not an address"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:7:15: error: 'destination' in [[forward]] #2: \"nowhere\""),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:8:1: error: unknown key 'via' in [[forward]] #2"),
            std::string::npos)
      << e;
}

TEST_F(ConfigTest, FaultsAreOffByDefaultAndReadFromFaultTables) {
  auto none = load(kKey);
  ASSERT_TRUE(none) << errors();
  EXPECT_TRUE(none->faults.empty());
  auto c = load(std::string(kKey) + R"(
[[fault]]
stack = "kernel"
fail_connect = 0.25
connect_failure = "timeout"
reset = 1
reset_after = 4096
stall = 0.5
stall_direction = "both"
stall_after = 10
)");
  ASSERT_TRUE(c) << errors();
  ASSERT_EQ(c->faults.size(), 1u);
  const auto& plan = c->faults[0].plan;
  EXPECT_EQ(c->faults[0].stack, "kernel");
  EXPECT_DOUBLE_EQ(plan[Fault::kFailConnect], 0.25);
  EXPECT_EQ(plan.connect_failure, ConnectFailure::kTimeout);
  EXPECT_DOUBLE_EQ(plan[Fault::kReset], 1);
  EXPECT_EQ(plan.reset_after, 4096u);
  EXPECT_DOUBLE_EQ(plan[Fault::kStall], 0.5);
  EXPECT_EQ(plan.stall_direction, StallDirection::kBoth);
  EXPECT_EQ(plan[Fault::kDropHandshake], 0);
  EXPECT_EQ(plan.describe(),
            "fail_connect=0.25(timeout) reset=1(after 4096 B) stall=0.5(both after 10 B)");
}

TEST_F(ConfigTest, FaultTablesAreCheckedWithPositions) {
  EXPECT_FALSE(load(std::string(kKey) + R"(
[[fault]]
stack = "dp0"
fail_connect = 1.5
connect_failure = "slow"
stall_direction = "up"
reset_after = -1
fail = 1
[[fault]]
reset = 1
)"));
  std::string e = errors();
  EXPECT_NE(
      e.find("sidecar.toml:5:9: error: 'stack' in [[fault]] #1: no [[stack]] is named \"dp0\""),
      std::string::npos)
      << e;
  EXPECT_NE(
      e.find(
          "sidecar.toml:6:16: error: 'fail_connect' in [[fault]] #1: 1.5 is out of range [0, 1]"),
      std::string::npos)
      << e;
  EXPECT_NE(
      e.find("sidecar.toml:7:19: error: 'connect_failure' in [[fault]] #1: \"slow\" is not one of "
             "refused, unreachable, timeout"),
      std::string::npos)
      << e;
  EXPECT_NE(e.find("\"up\" is not one of receive, send, both"), std::string::npos) << e;
  EXPECT_NE(e.find("'reset_after' in [[fault]] #1: -1 is out of range"), std::string::npos) << e;
  EXPECT_NE(e.find("sidecar.toml:10:1: error: unknown key 'fail' in [[fault]] #1"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("sidecar.toml:11:1: error: [[fault]] #2: missing required key 'stack'"),
            std::string::npos)
      << e;
}

TEST_F(ConfigTest, MissingFileIsAnError) {
  Diagnostics diags;
  EXPECT_FALSE(loadConfig("/nonexistent/sidecar.toml", registry_, diags));
  EXPECT_EQ(diags.formatAll(), "/nonexistent/sidecar.toml: error: cannot open file\n");
}

}  // namespace
}  // namespace dmm::proxy
