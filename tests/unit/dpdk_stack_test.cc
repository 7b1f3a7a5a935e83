// The dpdk stack kind's pieces that need no port: the checksum lwIP uses, the byte rings, the
// endpoint params, the [[stack]] options.

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "common/diagnostics.h"
#include "common/toml_table.h"
#include "stacks/dpdk/channel.h"
#include "stacks/dpdk/dpdk_stack.h"

extern "C" uint16_t dmm_lwip_chksum(const void* data, int len);

namespace dmm::stacks::dpdk {
namespace {

// RFC 1071 as lwIP's portable routine does it: 16-bit words in memory order, an odd last byte
// padded with zero, folded, not inverted.
std::uint16_t referenceSum(const unsigned char* p, std::size_t n) {
  std::uint32_t sum = 0;
  for (std::size_t i = 0; i + 1 < n; i += 2) {
    std::uint16_t w;
    std::memcpy(&w, p + i, 2);
    sum += w;
  }
  if (n % 2 == 1) {
    std::uint16_t w = 0;
    std::memcpy(&w, p + n - 1, 1);
    sum += w;
  }
  while (sum >> 16)
    sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<std::uint16_t>(sum);
}

TEST(DpdkChecksum, EqualsRfc1071ForEveryLengthAndAlignment) {
  std::mt19937 rng(7);
  std::vector<unsigned char> buf(4096 + 16);
  for (auto& b : buf)
    b = static_cast<unsigned char>(rng());
  for (std::size_t offset = 0; offset < 8; ++offset) {
    for (std::size_t len = 0; len <= 1600; ++len) {
      ASSERT_EQ(dmm_lwip_chksum(buf.data() + offset, static_cast<int>(len)),
                referenceSum(buf.data() + offset, len))
          << "offset " << offset << " length " << len;
    }
  }
  // All ones: the carries fold many times.
  std::vector<unsigned char> ones(9000, 0xff);
  EXPECT_EQ(dmm_lwip_chksum(ones.data(), 9000), referenceSum(ones.data(), 9000));
  EXPECT_EQ(dmm_lwip_chksum(ones.data(), 8999), referenceSum(ones.data(), 8999));
}

TEST(DpdkByteRing, KeepsOrderAcrossTheWrapAndNeverOverfills) {
  ByteRing ring;
  ASSERT_TRUE(ring.allocate(4096));
  std::mt19937 rng(3);
  std::uint64_t produced = 0;
  std::uint64_t consumed = 0;
  for (int step = 0; step < 20000; ++step) {
    std::vector<std::byte> in(rng() % 1500);
    for (std::size_t i = 0; i < in.size(); ++i)
      in[i] = static_cast<std::byte>((produced + i) & 0xff);
    std::size_t put = ring.put(in);
    EXPECT_LE(ring.used(), ring.size());
    EXPECT_EQ(put, std::min(in.size(), 4096 - static_cast<std::size_t>(produced - consumed)));
    produced += put;
    std::vector<std::byte> out(rng() % 1500);
    std::size_t got = ring.get(out);
    for (std::size_t i = 0; i < got; ++i)
      ASSERT_EQ(out[i], static_cast<std::byte>((consumed + i) & 0xff)) << "at " << consumed + i;
    consumed += got;
  }
  EXPECT_EQ(ring.head(), produced);
  EXPECT_EQ(ring.tail(), consumed);
}

TEST(DpdkOptions, ParseAndReportMistakesWithTheirPosition) {
  auto parse = [](const std::string& text, Diagnostics& diags) {
    auto doc = loadTomlString(text, "s.toml", diags);
    TomlTable t(*doc, "[[stack]]", diags);
    return DpdkStackFactory().parseOptions(t);
  };
  Diagnostics ok;
  auto o = parse(
      "port = \"net_af_packet0,iface=eth1\"\naddress = \"10.0.0.1/16\"\n"
      "eal_args = [\"-m\", \"256\"]\nbusy_poll = true\ncpu = 1\n",
      ok);
  ASSERT_TRUE(o) << ok.formatAll();
  const auto& d = dynamic_cast<const DpdkOptions&>(*o);
  EXPECT_EQ(d.port, "net_af_packet0,iface=eth1");
  EXPECT_EQ(d.address.toString(), "10.0.0.1");
  EXPECT_EQ(d.prefix_length, 16);
  EXPECT_EQ(d.eal_args, (std::vector<std::string>{"-m", "256"}));
  EXPECT_TRUE(d.busy_poll);
  EXPECT_EQ(d.cpu, 1);
  Diagnostics bad;
  EXPECT_FALSE(parse("port = \"net_af_packet0,iface=eth1\"\naddress = \"fd00::1/64\"\n", bad));
  EXPECT_NE(bad.formatAll().find("s.toml:2:11: error: 'address'"), std::string::npos)
      << bad.formatAll();
  Diagnostics missing;
  EXPECT_FALSE(parse("address = \"10.0.0.1/24\"\n", missing));
  EXPECT_NE(missing.formatAll().find("port"), std::string::npos) << missing.formatAll();
}

}  // namespace
}  // namespace dmm::stacks::dpdk
