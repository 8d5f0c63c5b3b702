// float <-> float16 bit conversion: edge values, exhaustive round trip, and a sweep against the
// compiler's _Float16 (round to nearest even) where the compiler has it.
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <cstdint>
#include <limits>
#include <random>

#include "headq/fp16.h"

namespace {

struct Fp16Case {
  const char* name;
  float x;
  uint16_t bits;
};

void PrintTo(const Fp16Case& c, std::ostream* os) { *os << c.name; }

class Fp16Edge : public ::testing::TestWithParam<Fp16Case> {};

TEST_P(Fp16Edge, RoundsToNearestEven) {
  const Fp16Case& c = GetParam();
  EXPECT_EQ(headq::float_to_half_bits(c.x), c.bits) << c.name;
}

const float kMinNormal = std::ldexp(1.0f, -14);
const float kMinSub = std::ldexp(1.0f, -24);

INSTANTIATE_TEST_SUITE_P(
    Values, Fp16Edge,
    ::testing::Values(
        Fp16Case{"zero", 0.0f, 0x0000}, Fp16Case{"neg_zero", -0.0f, 0x8000},
        Fp16Case{"one", 1.0f, 0x3c00}, Fp16Case{"minus_two", -2.0f, 0xc000},
        Fp16Case{"max", 65504.0f, 0x7bff},
        Fp16Case{"below_overflow_tie", 65519.996f, 0x7bff},
        Fp16Case{"overflow_tie", 65520.0f, 0x7c00}, Fp16Case{"huge", 1e10f, 0x7c00},
        Fp16Case{"neg_huge", -1e10f, 0xfc00},
        Fp16Case{"inf", std::numeric_limits<float>::infinity(), 0x7c00},
        Fp16Case{"neg_inf", -std::numeric_limits<float>::infinity(), 0xfc00},
        Fp16Case{"nan", std::numeric_limits<float>::quiet_NaN(), 0x7e00},
        Fp16Case{"tie_to_even_down", 1.0f + std::ldexp(1.0f, -11), 0x3c00},
        Fp16Case{"tie_to_even_up", 1.0f + 3 * std::ldexp(1.0f, -11), 0x3c02},
        Fp16Case{"above_tie", 1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3c01},
        Fp16Case{"mantissa_carry", 2.0f - std::ldexp(1.0f, -12), 0x4000},
        Fp16Case{"min_normal", kMinNormal, 0x0400},
        Fp16Case{"below_min_normal_rounds_up", kMinNormal - std::ldexp(1.0f, -26), 0x0400},
        Fp16Case{"max_subnormal", kMinNormal - kMinSub, 0x03ff},
        Fp16Case{"min_subnormal", kMinSub, 0x0001},
        Fp16Case{"half_min_subnormal_tie_to_zero", std::ldexp(1.0f, -25), 0x0000},
        Fp16Case{"above_half_min_subnormal", std::ldexp(1.0f, -25) * 1.0000001f, 0x0001},
        Fp16Case{"subnormal_tie_to_even_up", 3 * std::ldexp(1.0f, -25), 0x0002},
        Fp16Case{"subnormal_tie_to_even_down", 5 * std::ldexp(1.0f, -25), 0x0002},
        Fp16Case{"neg_subnormal", -3 * kMinSub, 0x8003},
        Fp16Case{"float_denormal", std::numeric_limits<float>::denorm_min(), 0x0000}),
    [](const ::testing::TestParamInfo<Fp16Case>& info) { return std::string(info.param.name); });

TEST(Fp16, ExhaustiveHalfRoundTrip) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = headq::half_bits_to_float(static_cast<uint16_t>(h));
    const bool is_nan = ((h & 0x7c00u) == 0x7c00u) && (h & 0x3ffu);
    if (is_nan) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      continue;
    }
    ASSERT_EQ(headq::float_to_half_bits(f), h) << std::hex << h;
  }
}

TEST(Fp16, HalfToFloatValues) {
  EXPECT_EQ(headq::half_bits_to_float(0x3c00), 1.0f);
  EXPECT_EQ(headq::half_bits_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(headq::half_bits_to_float(0x0001), kMinSub);
  EXPECT_EQ(headq::half_bits_to_float(0x03ff), kMinNormal - kMinSub);
  EXPECT_TRUE(std::isinf(headq::half_bits_to_float(0xfc00)));
  EXPECT_TRUE(std::signbit(headq::half_bits_to_float(0x8000)));
}

#if defined(__FLT16_MAX__)
// Random float bit patterns concentrated on the half range, against _Float16 (libgcc's
// round-to-nearest-even conversion).
TEST(Fp16, MatchesCompilerFloat16) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_int_distribution<uint32_t> exp_dist(90, 145);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = any(rng);
    if (i % 2 == 0) u = (u & 0x807fffffu) | (exp_dist(rng) << 23);
    float x;
    std::memcpy(&x, &u, sizeof(x));
    if (std::isnan(x)) continue;
    const _Float16 h = static_cast<_Float16>(x);
    uint16_t want;
    std::memcpy(&want, &h, sizeof(want));
    ASSERT_EQ(headq::float_to_half_bits(x), want) << std::hexfloat << x;
  }
}
#endif

}  // namespace
