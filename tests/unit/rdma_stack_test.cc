// The rdma stack kind's pieces that need no device: the immediate and private-data codecs, the
// [[stack]] options, and an instance that cannot start (this host has no RDMA) staying down
// with its reason instead of taking the sidecar with it. The data path runs for real in the
// Soft-RoCE guest (tests/rdma/).

#include <gtest/gtest.h>

#include "common/diagnostics.h"
#include "common/toml_table.h"
#include "stacks/rdma/rdma_stack.h"
#include "stacks/rdma/wire.h"

namespace dmm::stacks::rdma {
namespace {

TEST(RdmaWire, ImmediatesRoundTripAndReservedOnesAreRefused) {
  auto d = decodeImm(encodeData(65536));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->type, MessageType::kData);
  EXPECT_EQ(d->bytes, 65536u);
  d = decodeImm(encodeData(kMaxDataBytes));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->bytes, kMaxDataBytes);

  auto c = decodeImm(encodeCredit(255, kMaxCreditBytes));
  ASSERT_TRUE(c);
  EXPECT_EQ(c->type, MessageType::kCredit);
  EXPECT_EQ(c->messages, 255u);
  EXPECT_EQ(c->bytes, kMaxCreditBytes);
  c = decodeImm(encodeCredit(32, 0));
  ASSERT_TRUE(c);
  EXPECT_EQ(c->messages, 32u);
  EXPECT_EQ(c->bytes, 0u);

  auto f = decodeImm(encodeFin());
  ASSERT_TRUE(f);
  EXPECT_EQ(f->type, MessageType::kFin);

  EXPECT_FALSE(decodeImm(0));             // DATA of nothing
  EXPECT_FALSE(decodeImm(3u << 30));      // the reserved type
  EXPECT_FALSE(decodeImm(2u << 30 | 1));  // FIN with a payload
  EXPECT_FALSE(decodeImm(0xffffffffu));
}

TEST(RdmaWire, HelloRoundTripsAndRejectsWhatIsNotOne) {
  Hello h;
  h.receives = 128;
  for (std::size_t i = 0; i < h.token.size(); ++i)
    h.token[i] = static_cast<std::uint8_t>(i * 7 + 1);
  h.ring_address = 0x00007f1234567000ull;
  h.rkey = 0xdeadbeef;
  h.ring_size = 512 * 1024;
  auto bytes = encodeHello(h);
  EXPECT_EQ(std::string(bytes.begin(), bytes.begin() + 4), "DMMr");
  // rdma_cm pads private data: trailing bytes are fine.
  std::vector<std::uint8_t> padded(bytes.begin(), bytes.end());
  padded.resize(56, 0);
  auto back = decodeHello(padded);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->receives, 128);
  EXPECT_EQ(back->token, h.token);
  EXPECT_EQ(back->ring_address, h.ring_address);
  EXPECT_EQ(back->rkey, h.rkey);
  EXPECT_EQ(back->ring_size, h.ring_size);

  auto mutate = [&](std::size_t at, std::uint8_t v) {
    auto b = bytes;
    b[at] = v;
    return decodeHello(b);
  };
  EXPECT_FALSE(decodeHello(std::span(bytes).first(kHelloSize - 1)));
  EXPECT_FALSE(mutate(0, 'X'));  // magic
  EXPECT_FALSE(mutate(4, 2));    // version
  EXPECT_FALSE(mutate(5, 1));    // the reserved byte (found by tests/fuzz/rdma_wire_fuzz.cc)
  Hello no_receives = h;
  no_receives.receives = 0;
  EXPECT_FALSE(decodeHello(encodeHello(no_receives)));
  for (std::uint32_t size : {0u, 1000u, 2048u, 3u << 20}) {
    Hello bad = h;
    bad.ring_size = size;
    EXPECT_FALSE(decodeHello(encodeHello(bad))) << size;
  }
}

std::unique_ptr<StackOptions> parse(const std::string& text, Diagnostics& diags) {
  auto doc = loadTomlString(text, "s.toml", diags);
  TomlTable t(*doc, "[[stack]]", diags);
  return RdmaStackFactory().parseOptions(t);
}

TEST(RdmaOptions, ParseAndReportMistakesWithTheirPosition) {
  Diagnostics ok;
  auto o = parse(
      "address = \"192.168.77.1\"\nport = 7500\nring_size = 1048576\nreceive_depth = 256\n"
      "inline_size = 64\nlinger = \"5s\"\nresolve_timeout = \"500ms\"\n",
      ok);
  ASSERT_TRUE(o) << ok.formatAll();
  const auto& r = dynamic_cast<const RdmaOptions&>(*o);
  EXPECT_EQ(r.address.toString(), "192.168.77.1");
  EXPECT_EQ(r.port, 7500);
  EXPECT_EQ(r.ring_size, 1u << 20);
  EXPECT_EQ(r.receive_depth, 256);
  EXPECT_EQ(r.inline_size, 64u);
  EXPECT_EQ(r.linger_ms, 5000u);
  EXPECT_EQ(r.resolve_timeout_ms, 500u);

  Diagnostics v6;
  EXPECT_TRUE(parse("address = \"fd00:77::1\"\n", v6)) << v6.formatAll();

  Diagnostics bad;
  EXPECT_FALSE(parse("address = \"192.168.77.1\"\nring_size = 100000\n", bad));
  EXPECT_NE(bad.formatAll().find("s.toml:2:13: error: 'ring_size'"), std::string::npos)
      << bad.formatAll();
  Diagnostics bad_address;
  EXPECT_FALSE(parse("address = \"0.0.0.0\"\n", bad_address));
  EXPECT_NE(bad_address.formatAll().find("s.toml:1:11: error: 'address'"), std::string::npos)
      << bad_address.formatAll();
  Diagnostics missing;
  EXPECT_FALSE(parse("port = 7401\n", missing));
  EXPECT_NE(missing.formatAll().find("address"), std::string::npos) << missing.formatAll();
}

TEST(RdmaStack, AnInstanceThatCannotStartIsDownWithItsReason) {
  // 127.0.0.1 is on no RDMA device (and this host may have no RDMA at all).
  Diagnostics diags;
  auto o = parse("address = \"127.0.0.1\"\nport = 7999\n", diags);
  ASSERT_TRUE(o);
  auto stack = RdmaStackFactory().create("rd0", *o);
  ASSERT_TRUE(stack);
  EXPECT_FALSE((*stack)->healthy());
  EXPECT_FALSE((*stack)->status().empty());
  EXPECT_EQ((*stack)->status().front(), '(');
  std::vector<StackSample> samples;
  (*stack)->samples(samples);
  EXPECT_TRUE(samples.empty());
  EventLoop loop;
  SessionToken token{};
  struct NoAcceptor : DataAcceptor {
    void onDataConnection(std::unique_ptr<StackConnection>) override {}
  } acceptor;
  auto params = (*stack)->advertise();
  auto expected = (*stack)->expectData(loop, token, params, acceptor);
  ASSERT_FALSE(expected);
  EXPECT_STREQ(expected.error().reason, "rdma_down");
}

}  // namespace
}  // namespace dmm::stacks::rdma
