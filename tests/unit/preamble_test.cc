// The preload preamble codec: round trips, every prefix incomplete, every malformation
// refused, and random and mutated input never read out of bounds (run under ASan by the
// hardening build) and never accepted with a size it does not have.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <cstring>
#include <random>

#include "preload/preamble.h"

namespace dmm::preload {
namespace {

using Status = DecodeResult::Status;

Preamble v4(const char* ip, std::uint16_t port, std::string qos = {}) {
  Preamble p;
  p.destination.family = AF_INET;
  ::inet_pton(AF_INET, ip, p.destination.address);
  p.destination.port = port;
  p.qos = std::move(qos);
  return p;
}

Preamble v6(const char* ip, std::uint16_t port) {
  Preamble p;
  p.destination.family = AF_INET6;
  ::inet_pton(AF_INET6, ip, p.destination.address);
  p.destination.port = port;
  return p;
}

std::vector<std::uint8_t> encoded(const Preamble& p) {
  std::vector<std::uint8_t> out;
  EXPECT_TRUE(encodePreamble(p, out));
  return out;
}

TEST(Preamble, RoundTripsBothFamiliesWithAndWithoutQos) {
  for (const auto& p :
       {v4("10.1.2.3", 443, "latency"), v4("192.168.0.1", 1), v6("fd00::7", 8080)}) {
    auto bytes = encoded(p);
    bytes.push_back('x');  // the application's first byte follows
    auto r = decodePreamble(bytes);
    ASSERT_EQ(r.status, Status::kOk) << r.error;
    EXPECT_EQ(r.consumed, bytes.size() - 1);
    EXPECT_EQ(r.preamble.destination.family, p.destination.family);
    EXPECT_EQ(r.preamble.destination.port, p.destination.port);
    EXPECT_EQ(std::memcmp(r.preamble.destination.address, p.destination.address, 16), 0);
    EXPECT_EQ(r.preamble.qos, p.qos);
  }
}

TEST(Preamble, TheWireBytesAreAsDocumented) {
  auto bytes = encoded(v4("10.0.0.2", 80, "bulk"));
  std::vector<std::uint8_t> want = {'D',  'M', 'M', 'p', 1,   0,  0, 15,     // header, N = 15
                                    0x01, 7,   4,   0,   80,  10, 0, 0,  2,  // destination
                                    0x02, 4,   'b', 'u', 'l', 'k'};          // qos
  EXPECT_EQ(bytes, want);
}

TEST(Preamble, EveryProperPrefixIsIncomplete) {
  auto bytes = encoded(v6("2001:db8::1", 443));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    auto r = decodePreamble(std::span(bytes.data(), n));
    EXPECT_EQ(r.status, Status::kIncomplete) << n << ": " << r.error;
  }
}

TEST(Preamble, RefusesMalformations) {
  auto base = encoded(v4("10.0.0.2", 80));
  auto refused = [](std::vector<std::uint8_t> b, const char* why) {
    auto r = decodePreamble(b);
    EXPECT_EQ(r.status, Status::kInvalid) << why;
    EXPECT_FALSE(r.error.empty());
  };
  {
    std::vector<std::uint8_t> b = {'G', 'E'};  // a stranger: refused on the first bytes
    refused(b, "magic");
  }
  auto b = base;
  b[4] = 2;
  refused(b, "version");
  b = base;
  b[5] = 1;
  refused(b, "reserved");
  b = base;
  b[6] = 0x04;  // N = 1024 + ...: longer than allowed
  refused(b, "too long");
  b = base;
  b[10] = 5;  // family
  refused(b, "family");
  b = base;
  b[11] = 0;
  b[12] = 0;  // port 0
  refused(b, "port");
  b = base;
  b.insert(b.end(), base.begin() + 8, base.end());  // destination twice
  b[7] = static_cast<std::uint8_t>(b.size() - 8);
  refused(b, "twice");
  b = {'D', 'M', 'M', 'p', 1, 0, 0, 3, 0x02, 1, 'x'};  // no destination
  refused(b, "no destination");
  b = base;
  b.insert(b.end(), {0x02, 3, 'B', 'A', 'D'});  // qos charset
  b[7] = static_cast<std::uint8_t>(b.size() - 8);
  refused(b, "qos");
  b = base;
  b.insert(b.end(), {0x90, 0});  // unknown critical field
  b[7] = static_cast<std::uint8_t>(b.size() - 8);
  refused(b, "critical");
  b = base;
  b.insert(b.end(), {0x05, 9, 1});  // a field running past N
  b[7] = static_cast<std::uint8_t>(b.size() - 8);
  refused(b, "overrun");
}

TEST(Preamble, SkipsUnknownOrdinaryFields) {
  auto b = encoded(v4("10.0.0.2", 80));
  b.insert(b.end(), {0x33, 2, 'h', 'i'});
  b[7] = static_cast<std::uint8_t>(b.size() - 8);
  auto r = decodePreamble(b);
  ASSERT_EQ(r.status, Status::kOk) << r.error;
  EXPECT_EQ(r.consumed, b.size());
}

TEST(Preamble, EncodeRefusesWhatCannotBeSent) {
  std::vector<std::uint8_t> out;
  Preamble p;  // no family
  EXPECT_FALSE(encodePreamble(p, out));
  EXPECT_FALSE(encodePreamble(v4("10.0.0.1", 1, std::string(33, 'a')), out));
  EXPECT_FALSE(encodePreamble(v4("10.0.0.1", 1, "Latency"), out));
  EXPECT_TRUE(out.empty());
  std::uint8_t small[10];
  EXPECT_EQ(encodePreamble(v4("10.0.0.1", 1), std::span<std::uint8_t>(small)), 0u);
}

TEST(Preamble, RandomAndMutatedInputIsNeverMisread) {
  std::mt19937 rng(20261124);
  auto seed = encoded(v6("fd00::1", 9000));
  seed.insert(seed.end(), {0x02, 7, 'l', 'a', 't', 'e', 'n', 'c', 'y'});
  seed[7] = static_cast<std::uint8_t>(seed.size() - 8);
  int ok = 0;
  for (int i = 0; i < 200000; ++i) {
    std::vector<std::uint8_t> b;
    if (i % 2 == 0) {
      b = seed;
      int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f)
        b[rng() % b.size()] = static_cast<std::uint8_t>(rng());
      b.resize(rng() % (b.size() + 8), 0xAA);
    } else {
      b.resize(rng() % 64);
      for (auto& x : b)
        x = static_cast<std::uint8_t>(rng());
      if (b.size() >= 4) std::memcpy(b.data(), "DMMp", 4);
    }
    auto r = decodePreamble(b);
    if (r.status == Status::kOk) {
      ++ok;
      ASSERT_LE(r.consumed, b.size());
      ASSERT_TRUE(r.preamble.destination.family == AF_INET ||
                  r.preamble.destination.family == AF_INET6);
      // What decodes re-encodes to the same destination.
      auto again = decodePreamble(encoded(r.preamble));
      ASSERT_EQ(again.status, Status::kOk);
      ASSERT_EQ(again.preamble.destination.port, r.preamble.destination.port);
    }
  }
  EXPECT_GT(ok, 0);  // the mutations do leave some valid preambles
}

}  // namespace
}  // namespace dmm::preload

namespace dmm::preload {
namespace {

TEST(PreambleShm, TheShmFieldRoundTripsAndIsEmptyOnTheWire) {
  Preamble p;
  p.destination.family = AF_INET;
  p.destination.port = 80;
  p.destination.address[0] = 10;
  p.qos = "bulk";
  p.shm = true;
  std::vector<std::uint8_t> bytes;
  ASSERT_TRUE(encodePreamble(p, bytes));
  // After the qos field: type 0x03, length 0.
  ASSERT_GE(bytes.size(), 2u);
  EXPECT_EQ(bytes[bytes.size() - 2], 0x03);
  EXPECT_EQ(bytes[bytes.size() - 1], 0);
  auto r = decodePreamble(bytes);
  ASSERT_EQ(r.status, DecodeResult::Status::kOk) << r.error;
  EXPECT_TRUE(r.preamble.shm);
  EXPECT_EQ(r.preamble.qos, "bulk");
  p.shm = false;
  bytes.clear();
  ASSERT_TRUE(encodePreamble(p, bytes));
  EXPECT_FALSE(decodePreamble(bytes).preamble.shm);
}

TEST(PreambleShm, AShmFieldWithAValueOrTwiceIsInvalid) {
  Preamble p;
  p.destination.family = AF_INET;
  p.destination.port = 80;
  p.shm = true;
  std::vector<std::uint8_t> bytes;
  ASSERT_TRUE(encodePreamble(p, bytes));
  auto twice = bytes;
  twice.push_back(0x03);
  twice.push_back(0);
  twice[7] = static_cast<std::uint8_t>(twice[7] + 2);
  EXPECT_EQ(decodePreamble(twice).status, DecodeResult::Status::kInvalid);
  // The same with a one-byte value: 0x03, 1, 'x'.
  std::vector<std::uint8_t> valued(bytes.begin(), bytes.end() - 2);
  valued.insert(valued.end(), {0x03, 1, 'x'});
  valued[7] = static_cast<std::uint8_t>(valued[7] + 1);
  auto r = decodePreamble(valued);
  EXPECT_EQ(r.status, DecodeResult::Status::kInvalid);
  EXPECT_EQ(r.error, "shm has a value");
}

}  // namespace
}  // namespace dmm::preload
