// Addresses, CIDRs, port ranges, durations, TOML positions, the intrusive list, the log rate
// limiter and runCommand().

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "common/command.h"
#include "common/duration.h"
#include "common/intrusive_list.h"
#include "common/log.h"
#include "common/socket_address.h"
#include "common/toml_table.h"

namespace dmm {
namespace {

TEST(SocketAddress, ParsesAndFormatsBothFamilies) {
  auto v4 = SocketAddress::parse("10.1.2.3:80");
  ASSERT_TRUE(v4);
  EXPECT_TRUE(v4->ip().isV4());
  EXPECT_EQ(v4->port(), 80);
  EXPECT_EQ(v4->toString(), "10.1.2.3:80");
  auto v6 = SocketAddress::parse("[fd00::1]:443");
  ASSERT_TRUE(v6);
  EXPECT_TRUE(v6->ip().isV6());
  EXPECT_EQ(v6->toString(), "[fd00::1]:443");
  sockaddr_storage ss{};
  socklen_t len = v6->toSockaddr(ss);
  EXPECT_EQ(SocketAddress::fromSockaddr(reinterpret_cast<sockaddr*>(&ss), len), v6);
}

TEST(SocketAddress, RejectsBadText) {
  for (const char* bad : {"", "10.1.2.3", "10.1.2.3:", "10.1.2.3:65536", "10.1.2.3:0", "fd00::1:80",
                          "[fd00::1]80", "[10.0.0.1]:80", "host:80", "1.2.3:4"}) {
    EXPECT_FALSE(SocketAddress::parse(bad)) << bad;
  }
  EXPECT_TRUE(SocketAddress::parse("0.0.0.0:0", true));
}

TEST(Cidr, ContainsByPrefix) {
  auto c = Cidr::parse("10.1.2.3/8");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->toString(), "10.0.0.0/8");
  EXPECT_TRUE(c->contains(*IpAddress::parse("10.255.0.1")));
  EXPECT_FALSE(c->contains(*IpAddress::parse("11.0.0.1")));
  EXPECT_FALSE(c->contains(*IpAddress::parse("::ffff:10.0.0.1")));
  auto odd = Cidr::parse("192.168.1.128/25");
  ASSERT_TRUE(odd);
  EXPECT_TRUE(odd->contains(*IpAddress::parse("192.168.1.200")));
  EXPECT_FALSE(odd->contains(*IpAddress::parse("192.168.1.127")));
  auto v6 = Cidr::parse("fd00::/8");
  ASSERT_TRUE(v6);
  EXPECT_TRUE(v6->contains(*IpAddress::parse("fd12::1")));
  EXPECT_FALSE(v6->contains(*IpAddress::parse("fe80::1")));
  auto host = Cidr::parse("fd00::1");
  ASSERT_TRUE(host);
  EXPECT_EQ(host->prefixLength(), 128);
  auto all = Cidr::parse("0.0.0.0/0");
  ASSERT_TRUE(all);
  EXPECT_TRUE(all->contains(*IpAddress::parse("1.2.3.4")));
  EXPECT_FALSE(Cidr::parse("10.0.0.0/33"));
  EXPECT_FALSE(Cidr::parse("10.0.0.0/"));
}

TEST(PortRange, Parses) {
  auto r = PortRange::parse("8000-8080");
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->contains(8000));
  EXPECT_TRUE(r->contains(8080));
  EXPECT_FALSE(r->contains(8081));
  EXPECT_EQ(PortRange::parse("22")->toString(), "22");
  EXPECT_FALSE(PortRange::parse("0"));
  EXPECT_FALSE(PortRange::parse("90-80"));
  EXPECT_FALSE(PortRange::parse("1-70000"));
}

TEST(Duration, ParsesUnitsAndCompounds) {
  EXPECT_EQ(parseDuration("250ms"), Millis(250));
  EXPECT_EQ(parseDuration("5s"), Millis(5000));
  EXPECT_EQ(parseDuration("1m30s"), Millis(90000));
  EXPECT_EQ(parseDuration("2h"), Millis(7'200'000));
  EXPECT_FALSE(parseDuration("5"));
  EXPECT_FALSE(parseDuration("s"));
  EXPECT_FALSE(parseDuration("5 s"));
  EXPECT_FALSE(parseDuration("5d"));
  EXPECT_EQ(formatDuration(Millis(90000)), "90s");
  EXPECT_EQ(formatDuration(Millis(120000)), "2m");
}

// toml11 3.7 read out of bounds reporting invalid UTF-8 inside a literal string; the fuzzers
// found it through a policy file and a config (tests/fuzz/corpus/{policy,config}/toml11-utf8-*).
// Invalid UTF-8 is refused before toml11 sees it, with its position.
TEST(TomlUtf8, InvalidUtf8IsRefusedWithItsPosition) {
  const std::vector<std::string> bad_texts = {
      "a = '''x\xff'''\n",      "a = 1\nb = '12\xe2.'\n",     "# \xc0\xaf overlong\n",
      "s = \"\xed\xa0\x80\"\n", "s = \"\xf4\x90\x80\x80\"\n", "s = \"\xe2\x82\""};
  for (const auto& bad : bad_texts) {
    Diagnostics diags;
    EXPECT_FALSE(loadTomlString(bad, "u.toml", diags)) << bad;
    EXPECT_NE(diags.formatAll().find("not valid UTF-8"), std::string::npos) << diags.formatAll();
  }
  Diagnostics where;
  (void)loadTomlString("a = 1\nb = 'x\xff'\n", "u.toml", where);
  EXPECT_NE(where.formatAll().find("u.toml:2:7:"), std::string::npos) << where.formatAll();
  // Valid multi-byte text is still fine.
  Diagnostics ok;
  auto v = loadTomlString("s = \"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"\n", "u.toml", ok);
  ASSERT_TRUE(v) << ok.formatAll();
  EXPECT_EQ(toml::find<std::string>(*v, "s"), "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
}

// toml11 3.7 crashes (an empty array's last element) when a key runs through a key holding an
// empty array; found by tests/fuzz/policy_fuzz.cc. Refused before parsing, with the position.
TEST(TomlEmptyArray, AKeyThroughAnEmptyArrayIsRefusedNotACrash) {
  for (const std::string bad :
       {"a = []\na.b = 1\n", "a = [ ]\n[a.b]\n", "[t]\na = [\n # none\n]\n[t.a.c]\n",
        "a = []\n[[a.b]]\n", "x = { a = [], a.b = 1 }\n"}) {
    Diagnostics diags;
    EXPECT_FALSE(loadTomlString(bad, "e.toml", diags)) << bad;
    EXPECT_NE(diags.formatAll().find("which is an empty array"), std::string::npos)
        << bad << diags.formatAll();
  }
  Diagnostics where;
  (void)loadTomlString("a = []\nb = 1\na.c = 2\n", "e.toml", where);
  EXPECT_NE(where.formatAll().find("e.toml:3:1:"), std::string::npos) << where.formatAll();
  // Empty arrays and dotted keys elsewhere, and the name inside a string, are fine.
  for (const std::string good : {"exclude = []\n[t]\nx.y = 1\n", "a = []\nb = \"a.b\"\n",
                                 "a = [[], []]\nc.d = 1\n", "ab = []\nb.c = 1\n"}) {
    Diagnostics ok;
    EXPECT_TRUE(loadTomlString(good, "e.toml", ok)) << good << ok.formatAll();
  }
}

// toml11 3.7 recurses without a limit: thousands of '[' overflowed the stack (found by
// tests/fuzz/policy_fuzz.cc). More than 64 levels are refused before parsing.
TEST(TomlNesting, DeepNestingIsRefusedNotAStackOverflow) {
  Diagnostics diags;
  EXPECT_FALSE(loadTomlString("a = " + std::string(100000, '['), "n.toml", diags));
  EXPECT_NE(diags.formatAll().find("n.toml:1:69: error: arrays and inline tables nested more"),
            std::string::npos)
      << diags.formatAll();
  Diagnostics braces;
  std::string inl = "a = ";
  for (int i = 0; i < 70; ++i)
    inl += "{ b = ";
  EXPECT_FALSE(loadTomlString(inl, "n.toml", braces));
  // 64 levels are fine, and brackets inside strings and comments do not count.
  Diagnostics ok;
  std::string deep = "a = " + std::string(63, '[') + std::string(63, ']') + "\n";
  deep += "s = \"" + std::string(100, '[') + "\"\nt = \'\'\'" + std::string(100, '{') +
          "\'\'\'\n# " + std::string(100, '[') + "\n";
  EXPECT_TRUE(loadTomlString(deep, "n.toml", ok)) << ok.formatAll();
}

// positionOf() keeps an index of line starts per source; it must give toml11's own numbers for
// every value, also when documents alternate and when one is freed and another parsed.
TEST(TomlPosition, AgreesWithToml11ForEveryValue) {
  auto text = [](int tables, const char* indent) {
    std::string t = "# header\n\n";
    for (int i = 0; i < tables; ++i) {
      t += std::string(indent) + "[[t]]\n" + indent + "a = " + std::to_string(i) +
           "\nb = [\"x\", \n  \"y\"]\ns = \"\"\"\nline\nline\"\"\"\nc = { d = 1, e = \"f\" }\n\n";
    }
    return t;
  };
  auto check = [](const toml::value& v) {
    auto loc = v.location();
    auto pos = positionOf(v);
    EXPECT_EQ(pos.file, loc.file_name());
    EXPECT_EQ(pos.line, loc.line());
    EXPECT_EQ(pos.column, loc.column());
    return pos.line;
  };
  auto walk = [&](const toml::value& doc, std::size_t i) {
    const auto& t = doc.at("t").as_array().at(i);
    std::uint32_t line = check(t);
    check(t.at("a"));
    check(t.at("b"));
    check(t.at("b").as_array().at(1));
    check(t.at("s"));
    check(t.at("c").at("e"));
    return line;
  };
  Diagnostics diags;
  auto a = loadTomlString(text(300, ""), "a.toml", diags);
  auto b = loadTomlString(text(200, "  "), "b.toml", diags);
  ASSERT_TRUE(a && b) << diags.formatAll();
  for (std::size_t i = 0; i < 200; ++i) {
    walk(*a, i);
    walk(*b, i);
  }
  EXPECT_EQ(walk(*a, 299), 3u + 299u * 9u);  // two header lines, nine per table
  a.reset();
  auto c = loadTomlString(text(50, "\t"), "c.toml", diags);
  ASSERT_TRUE(c);
  for (std::size_t i = 0; i < 50; ++i)
    walk(*c, i);
  EXPECT_EQ(positionOf(c->at("t").as_array().at(1).at("a")).column, 6u);  // "\ta = 1": bytes
}

struct Tag;
struct Item : ListHook<Tag> {
  int v = 0;
};

TEST(IntrusiveList, MovesAndUnlinksOnDestruction) {
  IntrusiveList<Item, Tag> a;
  IntrusiveList<Item, Tag> b;
  Item x;
  x.v = 1;
  Item y;
  y.v = 2;
  a.pushBack(x);
  a.pushBack(y);
  EXPECT_EQ(a.front()->v, 1);
  a.pushBack(x);  // move to back
  EXPECT_EQ(a.front()->v, 2);
  b.pushBack(y);  // move to the other list
  EXPECT_EQ(a.size(), 1u);
  EXPECT_EQ(b.front()->v, 2);
  {
    Item z;
    b.pushBack(z);
    EXPECT_EQ(b.size(), 2u);
  }
  EXPECT_EQ(b.size(), 1u);
}

TEST(IntrusiveList, ForEachRemovableLetsEachItemLeave) {
  IntrusiveList<Item, Tag> list;
  Item items[4];
  for (int i = 0; i < 4; ++i) {
    items[i].v = i;
    list.pushBack(items[i]);
  }
  int seen = 0;
  list.forEachRemovable([&](Item& item) {
    seen += 1 << item.v;
    if (item.v % 2 == 0) IntrusiveList<Item, Tag>::remove(item);
  });
  EXPECT_EQ(seen, 0b1111);
  EXPECT_EQ(list.size(), 2u);
  EXPECT_EQ(list.front()->v, 1);
}

TEST(LogRateLimiter, LetsABurstThroughThenCountsWhatItDrops) {
  using namespace std::chrono_literals;
  log::RateLimiter limiter(3, 5s);
  auto t0 = log::RateLimiter::Clock::time_point{} + 100s;
  std::uint64_t suppressed = 99;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(limiter.admit(suppressed, t0 + std::chrono::milliseconds(i)));
    EXPECT_EQ(suppressed, 0u);
  }
  for (int i = 0; i < 7; ++i)
    EXPECT_FALSE(limiter.admit(suppressed, t0 + 1s));
  // Still the same window.
  EXPECT_FALSE(limiter.admit(suppressed, t0 + 4999ms));
  // A new window: the first message through reports the 8 dropped, the next reports none.
  ASSERT_TRUE(limiter.admit(suppressed, t0 + 5s));
  EXPECT_EQ(suppressed, 8u);
  ASSERT_TRUE(limiter.admit(suppressed, t0 + 5s));
  EXPECT_EQ(suppressed, 0u);
}

TEST(LogRateLimiter, IsSharedSafelyByThreads) {
  log::RateLimiter limiter(10, std::chrono::hours(1));
  std::atomic<int> admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      std::uint64_t suppressed = 0;
      for (int i = 0; i < 1000; ++i)
        if (limiter.admit(suppressed)) ++admitted;
    });
  }
  for (auto& t : threads)
    t.join();
  EXPECT_EQ(admitted.load(), 10);
}

TEST(RunCommand, PassesInputAndCollectsBothOutputs) {
  auto r = runCommand({"sh", "-c", "cat; echo oops >&2; exit 3"}, "hello\n");
  EXPECT_EQ(r.status, 3);
  EXPECT_EQ(r.output, "hello\noops\n");
}

TEST(RunCommand, MovesLargeInputAndOutputWithoutStalling) {
  // More than a pipe holds both ways: writing all input before reading output would deadlock.
  std::string big(1 << 20, 'x');
  for (std::size_t i = 0; i < big.size(); i += 4096)
    big[i] = static_cast<char>('a' + i % 26);
  auto r = runCommand({"cat"}, big);
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.output, big);
}

TEST(RunCommand, AChildThatIgnoresItsInputIsNotAnError) {
  // It exits without reading: no SIGPIPE for us (this process does not ignore it).
  auto r = runCommand({"true"}, std::string(1 << 20, 'y'));
  EXPECT_EQ(r.status, 0);
}

TEST(RunCommand, ReportsWhatCannotStart) {
  auto r = runCommand({"/nonexistent/dmm-no-such-tool"});
  EXPECT_EQ(r.status, -1);
  EXPECT_NE(r.output.find("No such file"), std::string::npos) << r.output;
  EXPECT_EQ(runCommand({"sh", "-c", "kill -9 $$"}).status, -1);
}

}  // namespace
}  // namespace dmm
