// The preload shim's configuration: the filter, the file format, the environment's precedence,
// and bad input ignored (kept as it was) with a warning rather than anything fatal.

#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "preload/fd_table.h"
#include "preload/shim_config.h"

namespace dmm::preload {
namespace {

Address addr(const char* text) {
  Address a;
  if (::inet_pton(AF_INET, text, a.bytes) == 1) {
    a.family = AF_INET;
  } else {
    EXPECT_EQ(::inet_pton(AF_INET6, text, a.bytes), 1) << text;
    a.family = AF_INET6;
  }
  return a;
}

std::map<std::string, std::string> g_env;
const char* fakeGetenv(const char* name) {
  auto it = g_env.find(name);
  return it == g_env.end() ? nullptr : it->second.c_str();
}

TEST(PreloadConfig, DefaultsCaptureEverythingButLoopbackAndUnspecified) {
  ShimConfig c;
  EXPECT_STREQ(c.socket_path, "/run/dmm-sidecar/preload.sock");
  EXPECT_EQ(c.fallback, Fallback::kDirect);
  EXPECT_FALSE(c.debug);
  EXPECT_TRUE(c.captures(addr("10.1.2.3")));
  EXPECT_TRUE(c.captures(addr("203.0.113.9")));
  EXPECT_TRUE(c.captures(addr("fd00::1")));
  EXPECT_FALSE(c.captures(addr("127.0.0.1")));
  EXPECT_FALSE(c.captures(addr("127.255.0.9")));
  EXPECT_FALSE(c.captures(addr("0.0.0.0")));
  EXPECT_FALSE(c.captures(addr("::1")));
  EXPECT_FALSE(c.captures(addr("::")));
  EXPECT_FALSE(c.captures(addr("fe80::1")));
  EXPECT_FALSE(c.captures(addr("febf::1")));
  EXPECT_TRUE(c.captures(addr("fec0::1")));
}

TEST(PreloadConfig, IncludeAndExcludeLists) {
  ShimConfig c;
  std::vector<std::string> w;
  applySetting(c, "include", "10.0.0.0/8, fd00::/8", "t", w);
  applySetting(c, "exclude", "10.9.0.0/16,10.1.2.3", "t", w);
  EXPECT_TRUE(w.empty());
  EXPECT_TRUE(c.captures(addr("10.200.1.1")));
  EXPECT_FALSE(c.captures(addr("10.9.5.5")));
  EXPECT_FALSE(c.captures(addr("10.1.2.3")));
  EXPECT_TRUE(c.captures(addr("10.1.2.4")));
  EXPECT_TRUE(c.captures(addr("fd12::5")));
  EXPECT_FALSE(c.captures(addr("fe80::1")));
  EXPECT_FALSE(c.captures(addr("192.168.1.1")));
  // Prefixes that end inside a byte.
  applySetting(c, "include", "172.16.0.0/12", "t", w);
  EXPECT_TRUE(c.captures(addr("172.31.255.1")));
  EXPECT_FALSE(c.captures(addr("172.32.0.1")));
  // Loopback stays out even when listed.
  applySetting(c, "include", "127.0.0.0/8,::1/128", "t", w);
  EXPECT_FALSE(c.captures(addr("127.0.0.1")));
  EXPECT_FALSE(c.captures(addr("::1")));
}

TEST(PreloadConfig, BadValuesAreIgnoredWithAWarning) {
  ShimConfig c;
  std::vector<std::string> w;
  applySetting(c, "include", "10.0.0.0/8", "t", w);
  for (const char* bad : {"10.0.0.0/33", "banana", "10.0.0.0/", "::/129", "1.2.3.4/-1"}) {
    applySetting(c, "include", bad, "ENV", w);
  }
  EXPECT_EQ(w.size(), 5u);
  EXPECT_EQ(c.include.size, 1u);  // the good list stayed
  applySetting(c, "socket", "relative/path", "f:1", w);
  applySetting(c, "socket", "/" + std::string(200, 'x'), "f:2", w);
  EXPECT_STREQ(c.socket_path, "/run/dmm-sidecar/preload.sock");
  applySetting(c, "qos", "warp", "f:3", w);
  applySetting(c, "fallback", "maybe", "f:4", w);
  applySetting(c, "timeout_ms", "0", "f:5", w);
  applySetting(c, "timeout_ms", "soon", "f:6", w);
  applySetting(c, "debug", "perhaps", "f:7", w);
  applySetting(c, "colour", "blue", "f:8", w);
  EXPECT_EQ(w.size(), 13u);
  EXPECT_STREQ(c.qos, "");
  EXPECT_EQ(c.fallback, Fallback::kDirect);
  EXPECT_EQ(c.timeout_ms, kDefaultTimeoutMs);
  EXPECT_FALSE(c.debug);
  EXPECT_NE(w.back().find("f:8: unknown key 'colour'"), std::string::npos) << w.back();
  std::string list;
  for (const auto& s : w)
    list += s + "\n";
  EXPECT_NE(list.find("f:3: qos: 'warp' is not one of"), std::string::npos) << list;
}

TEST(PreloadConfig, TooManyPrefixesIsAnError) {
  std::string many;
  for (int i = 0; i < 33; ++i)
    many += "10.0." + std::to_string(i) + ".0/24,";
  CidrList out;
  std::string error;
  EXPECT_FALSE(parseCidrList(many, out, error));
  EXPECT_NE(error.find("more than 32"), std::string::npos);
}

TEST(PreloadConfig, FileLinesCommentsQuotesAndLineNumbers) {
  ShimConfig c;
  std::vector<std::string> w;
  applyFileText(c,
                "# the shim\n"
                "socket = \"/run/x/p.sock\"\n"
                "\n"
                "qos = bulk   # trailing comment\n"
                "fallback=refuse\r\n"
                "just words\n"
                "timeout_ms = 250\n"
                "debug = yes\n",
                "/etc/p.conf", w);
  EXPECT_STREQ(c.socket_path, "/run/x/p.sock");
  EXPECT_STREQ(c.qos, "bulk");
  EXPECT_EQ(c.fallback, Fallback::kRefuse);
  EXPECT_EQ(c.timeout_ms, 250);
  EXPECT_TRUE(c.debug);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0], "/etc/p.conf:6: not key = value (ignored)");
}

TEST(PreloadConfig, TheEnvironmentOverridesTheFile) {
  std::string path = ::testing::TempDir() + "/preload-config-test.conf";
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("socket = /from/file.sock\nqos = bulk\nfallback = refuse\n", f);
    std::fclose(f);
  }
  g_env = {{"DMM_PRELOAD_CONFIG", path},
           {"DMM_PRELOAD_QOS", "latency"},
           {"DMM_PRELOAD_FALLBACK", "bogus"}};
  std::vector<std::string> w;
  ShimConfig c = loadConfig(fakeGetenv, w);
  EXPECT_STREQ(c.socket_path, "/from/file.sock");  // only in the file
  EXPECT_STREQ(c.qos, "latency");                  // the environment wins
  EXPECT_EQ(c.fallback, Fallback::kRefuse);        // a bad override is ignored
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("DMM_PRELOAD_FALLBACK"), std::string::npos);
  // A named file that is missing is reported; the default one missing is not.
  g_env = {{"DMM_PRELOAD_CONFIG", path + ".missing"}};
  w.clear();
  loadConfig(fakeGetenv, w);
  EXPECT_EQ(w.size(), 1u);
  std::remove(path.c_str());
}

TEST(PreloadFdTable, CopyClearAndRange) {
  FdTable t;
  t.init();
  EXPECT_GE(t.capacity(), FdTable::kChunkEntries);
  EXPECT_EQ(t.find(5), nullptr);  // nothing mapped yet
  FdEntry* e = t.get(5);
  ASSERT_NE(e, nullptr);
  FdData d;
  d.state = FdState::kCaptured;
  d.peer.ss_family = AF_INET;
  std::snprintf(d.qos, sizeof(d.qos), "bulk");
  d.epoll_count = 1;
  e->write(d);
  t.copy(5, 1500);  // another chunk
  ASSERT_NE(t.find(1500), nullptr);
  FdData c = t.find(1500)->read();
  EXPECT_EQ(c.state, FdState::kCaptured);
  EXPECT_STREQ(c.qos, "bulk");
  EXPECT_EQ(c.epoll_count, 0u);  // registrations belong to the number
  t.copy(6, 1500);               // from an fd we know nothing of: forgotten
  EXPECT_EQ(t.find(1500)->state(), FdState::kFree);
  t.copy(5, 7);
  t.clearRange(6, 1000);
  EXPECT_EQ(t.find(5)->state(), FdState::kCaptured);
  EXPECT_EQ(t.find(7)->state(), FdState::kFree);
  t.clear(5);
  EXPECT_EQ(t.find(5)->state(), FdState::kFree);
  EXPECT_EQ(t.get(-1), nullptr);
  EXPECT_EQ(t.get(static_cast<int>(t.capacity())), nullptr);
}

TEST(PreloadFdTable, StoredOptionsReplaceAndAreBounded) {
  FdData d;
  int one = 1;
  int two = 2;
  EXPECT_TRUE(d.storeOption(6, 1, &one, sizeof(one)));
  EXPECT_TRUE(d.storeOption(6, 1, &two, sizeof(two)));
  ASSERT_NE(d.findOption(6, 1), nullptr);
  int v = 0;
  std::memcpy(&v, d.findOption(6, 1)->value, sizeof(v));
  EXPECT_EQ(v, 2);
  EXPECT_EQ(d.option_count, 1u);
  for (int i = 2; i < 2 + static_cast<int>(kMaxStoredOptions) - 1; ++i) {
    EXPECT_TRUE(d.storeOption(6, i, &one, sizeof(one)));
  }
  EXPECT_FALSE(d.storeOption(6, 100, &one, sizeof(one)));
  EXPECT_EQ(d.findOption(6, 100), nullptr);
}

}  // namespace
}  // namespace dmm::preload
