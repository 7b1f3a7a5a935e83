// Stack plumbing shared by the kinds: the endpoint codec of the offer and REPLY parameters.

#include <gtest/gtest.h>

#include "stacks/endpoint.h"

namespace dmm::stacks {
namespace {

TEST(StackEndpoint, RoundTripsIpv4AndIpv6AndRejectsWhatIsNotOne) {
  Endpoint e{*IpAddress::parse("10.202.0.2"), 7301};
  auto bytes = encodeEndpoint(e);
  EXPECT_EQ(bytes, (std::vector<std::uint8_t>{1, 4, 10, 202, 0, 2, 0x1c, 0x85}));
  auto back = decodeEndpoint(bytes);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->address, e.address);
  EXPECT_EQ(back->port, 7301);

  Endpoint e6{*IpAddress::parse("fd00:77::2"), 7401};
  auto bytes6 = encodeEndpoint(e6);
  ASSERT_EQ(bytes6.size(), 20u);
  EXPECT_EQ(bytes6[1], 6);
  auto back6 = decodeEndpoint(bytes6);
  ASSERT_TRUE(back6);
  EXPECT_EQ(back6->address, e6.address);
  EXPECT_EQ(back6->port, 7401);

  auto v6_short = bytes6;
  v6_short.pop_back();
  for (auto bad : std::vector<std::vector<std::uint8_t>>{{},
                                                         {1, 4, 10, 202, 0, 2, 0x1c},
                                                         {2, 4, 10, 202, 0, 2, 0x1c, 0x85},
                                                         {1, 6, 10, 202, 0, 2, 0x1c, 0x85},
                                                         {1, 4, 10, 202, 0, 2, 0, 0},
                                                         {1, 4, 0, 0, 0, 0, 0x1c, 0x85},
                                                         {1, 4, 10, 202, 0, 2, 0x1c, 0x85, 0},
                                                         v6_short}) {
    EXPECT_FALSE(decodeEndpoint(bad)) << bad.size();
  }
}

}  // namespace
}  // namespace dmm::stacks
