// Bit-stream packing: round trip for every bit width and row length, and the byte layout
// (little-endian stream, 3-bit codes straddling bytes).
#include <gtest/gtest.h>

#include <random>
#include <tuple>
#include <vector>

#include "headq/pack.h"

namespace {

class PackRoundTrip : public ::testing::TestWithParam<std::tuple<int, int64_t>> {};

TEST_P(PackRoundTrip, UnpackInvertsPack) {
  const int bits = std::get<0>(GetParam());
  const int64_t n = std::get<1>(GetParam());
  std::mt19937 rng(static_cast<uint32_t>(bits * 1000 + n));
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  std::vector<uint8_t> codes(n), back(n);
  for (auto& c : codes) c = static_cast<uint8_t>(dist(rng));
  // Exactly sized buffer: an out-of-bounds read or write shows up under HEADQ_SANITIZE.
  std::vector<uint8_t> packed(headq::packed_row_bytes(n, bits));
  headq::pack_row(codes.data(), n, bits, packed.data());
  headq::unpack_row(packed.data(), n, bits, back.data());
  EXPECT_EQ(codes, back);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(headq::get_code(packed.data(), i, bits), codes[i]);
}

TEST_P(PackRoundTrip, MaxCodesFillEveryBit) {
  const int bits = std::get<0>(GetParam());
  const int64_t n = std::get<1>(GetParam());
  std::vector<uint8_t> codes(n, static_cast<uint8_t>((1 << bits) - 1));
  std::vector<uint8_t> packed(headq::packed_row_bytes(n, bits));
  headq::pack_row(codes.data(), n, bits, packed.data());
  for (uint8_t byte : packed) EXPECT_EQ(byte, 0xff);
}

INSTANTIATE_TEST_SUITE_P(
    BitsAndLengths, PackRoundTrip,
    ::testing::Combine(::testing::Values(2, 3, 4, 8),
                       ::testing::Values<int64_t>(8, 16, 24, 64, 128, 256)),
    [](const ::testing::TestParamInfo<std::tuple<int, int64_t>>& info) {
      return "b" + std::to_string(std::get<0>(info.param)) + "_n" +
             std::to_string(std::get<1>(info.param));
    });

TEST(PackLayout, TwoBitCodesLowBitsFirst) {
  const uint8_t codes[8] = {1, 2, 3, 0, 3, 3, 0, 1};
  uint8_t packed[2];
  headq::pack_row(codes, 8, 2, packed);
  EXPECT_EQ(packed[0], 1 | (2 << 2) | (3 << 4) | (0 << 6));
  EXPECT_EQ(packed[1], 3 | (3 << 2) | (0 << 4) | (1 << 6));
}

TEST(PackLayout, ThreeBitCodesStraddleBytes) {
  // Code 2 occupies stream bits 6..8: its two low bits end byte 0, its high bit starts byte 1.
  uint8_t codes[8] = {0, 0, 7, 0, 0, 0, 0, 0};
  uint8_t packed[3];
  headq::pack_row(codes, 8, 3, packed);
  EXPECT_EQ(packed[0], 0xc0);
  EXPECT_EQ(packed[1], 0x01);
  EXPECT_EQ(packed[2], 0x00);
  // Code 5 occupies bits 15..17: bit 7 of byte 1 and bits 0..1 of byte 2.
  uint8_t codes2[8] = {0, 0, 0, 0, 0, 5, 0, 0};
  headq::pack_row(codes2, 8, 3, packed);
  EXPECT_EQ(packed[0], 0x00);
  EXPECT_EQ(packed[1], 0x80);
  EXPECT_EQ(packed[2], 0x02);
  EXPECT_EQ(headq::get_code(packed, 5, 3), 5u);
}

TEST(PackLayout, FourAndEightBit) {
  const uint8_t codes[2] = {0xa, 0x5};
  uint8_t packed[1];
  headq::pack_row(codes, 2, 4, packed);
  EXPECT_EQ(packed[0], 0x5a);
  const uint8_t codes8[1] = {0xc3};
  headq::pack_row(codes8, 1, 8, packed);
  EXPECT_EQ(packed[0], 0xc3);
}

}  // namespace
