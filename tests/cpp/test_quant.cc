// Asymmetric (keys/values) and symmetric (side code) quantisers, and the CPU quantise kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "headq/quant.h"
#include "headq/quant_cpu.h"

namespace {

// Error bound of the asymmetric quantiser for x in [mn, mx]: half a step, plus what rounding the
// zero and the scale to float16 moves the grid (|mn - z| at the bottom, qmax * |s - s_exact| at
// the top), plus float32 rounding of the arithmetic.
float asym_bound(float mn, float mx, const headq::AsymParams& p, int bits) {
  const float qmax = static_cast<float>(headq::asym_qmax(bits));
  const float s_exact = (mx - mn) / qmax;
  const float mag = std::max(std::fabs(mn), std::fabs(mx));
  return p.scale / 2 + std::fabs(mn - p.zero) + qmax * std::fabs(s_exact - p.scale) +
         4 * std::numeric_limits<float>::epsilon() * mag;
}

class AsymQuant : public ::testing::TestWithParam<std::tuple<int, float, float>> {};

TEST_P(AsymQuant, ErrorWithinHalfStep) {
  const int bits = std::get<0>(GetParam());
  const float center = std::get<1>(GetParam());
  const float spread = std::get<2>(GetParam());
  std::mt19937 rng(static_cast<uint32_t>(bits * 7919 + spread * 13));
  std::normal_distribution<float> dist(center, spread);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> x(64);
    for (auto& v : x) v = dist(rng);
    const float mn = *std::min_element(x.begin(), x.end());
    const float mx = *std::max_element(x.begin(), x.end());
    const headq::AsymParams p = headq::asym_params(mn, mx, bits);
    EXPECT_EQ(p.scale, headq::half_bits_to_float(p.scale_bits));
    EXPECT_EQ(p.zero, headq::round_to_half(mn));
    const float bound = asym_bound(mn, mx, p, bits);
    for (float v : x) {
      const uint32_t c = headq::asym_code(v, p.scale, p.zero, bits);
      ASSERT_LE(c, static_cast<uint32_t>(headq::asym_qmax(bits)));
      const float xhat = headq::asym_dequant(c, p.scale, p.zero);
      ASSERT_LE(std::fabs(v - xhat), bound) << "x=" << v << " code=" << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, AsymQuant,
                         ::testing::Combine(::testing::Values(2, 3, 4, 8),
                                            ::testing::Values(0.0f, 5.0f),
                                            ::testing::Values(0.01f, 1.0f, 100.0f)));

TEST(AsymQuant, ConstantSetHasZeroScaleAndExactZero) {
  for (int bits : {2, 3, 4, 8}) {
    const headq::AsymParams p = headq::asym_params(1.25f, 1.25f, bits);
    EXPECT_EQ(p.scale, 0.0f);
    EXPECT_EQ(p.zero, 1.25f);
    EXPECT_EQ(headq::asym_code(1.25f, p.scale, p.zero, bits), 0u);
    EXPECT_EQ(headq::asym_dequant(0, p.scale, p.zero), 1.25f);
  }
}

TEST(AsymQuant, RoundsHalfToEvenAndClamps) {
  // s = 1, z = 0: 2.5 -> 2, 3.5 -> 4, -0.7 -> 0, 100 -> 15, NaN -> 0.
  EXPECT_EQ(headq::asym_code(2.5f, 1.0f, 0.0f, 4), 2u);
  EXPECT_EQ(headq::asym_code(3.5f, 1.0f, 0.0f, 4), 4u);
  EXPECT_EQ(headq::asym_code(-0.7f, 1.0f, 0.0f, 4), 0u);
  EXPECT_EQ(headq::asym_code(100.0f, 1.0f, 0.0f, 4), 15u);
  EXPECT_EQ(headq::asym_code(std::nanf(""), 1.0f, 0.0f, 4), 0u);
  EXPECT_EQ(headq::asym_code(std::numeric_limits<float>::infinity(), 1.0f, 0.0f, 3), 7u);
}

TEST(AsymQuant, NanInSetPoisonsParams) {
  float mn = 0.0f, mx = 0.0f;
  for (float v : {1.0f, std::nanf(""), -2.0f}) {
    mn = headq::nan_min(mn, v);
    mx = headq::nan_max(mx, v);
  }
  const headq::AsymParams p = headq::asym_params(mn, mx, 4);
  EXPECT_TRUE(std::isnan(p.scale) || std::isnan(p.zero));
}

class SymQuant : public ::testing::TestWithParam<int> {};

TEST_P(SymQuant, ErrorWithinHalfStepAndCodesInRange) {
  const int bits = GetParam();
  const int qz = headq::sym_qz(bits), off = headq::sym_offset(bits);
  std::mt19937 rng(static_cast<uint32_t>(bits));
  std::normal_distribution<float> dist(0.0f, 0.3f);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> y(32);
    float amax = 0.0f;
    for (auto& v : y) {
      v = dist(rng);
      amax = headq::nan_max(amax, std::fabs(v));
    }
    const float s = headq::half_bits_to_float(headq::sym_scale_bits(amax, bits));
    const float s_exact = amax / static_cast<float>(qz);
    const float bound = s / 2 + qz * std::fabs(s - s_exact) + 1e-7f;
    for (float v : y) {
      const uint32_t c = headq::sym_code(v, s, bits);
      ASSERT_GE(static_cast<int>(c), off - qz);
      ASSERT_LE(static_cast<int>(c), off + qz);
      ASSERT_LE(std::fabs(v - headq::sym_dequant(c, s, bits)), bound);
    }
  }
}

TEST_P(SymQuant, ZeroVectorGivesOffsetCodes) {
  const int bits = GetParam();
  const float s = headq::half_bits_to_float(headq::sym_scale_bits(0.0f, bits));
  EXPECT_EQ(s, 0.0f);
  EXPECT_EQ(headq::sym_code(0.0f, s, bits), static_cast<uint32_t>(headq::sym_offset(bits)));
  EXPECT_EQ(headq::sym_dequant(headq::sym_code(0.0f, s, bits), s, bits), 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Bits, SymQuant, ::testing::Values(4, 8));

// The CPU key kernel on a strided (transposed) input: codes/scales reproduce the quantiser.
class QuantizeKeysSlice : public ::testing::TestWithParam<std::tuple<int, int64_t>> {};

TEST_P(QuantizeKeysSlice, MatchesScalarQuantiser) {
  const int bits = std::get<0>(GetParam());
  const int64_t G = std::get<1>(GetParam());
  const int64_t T = 2 * G, D = 16;
  std::mt19937 rng(static_cast<uint32_t>(bits + G));
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> k(D * T);  // stored [D, T]: element (t, c) at c*T + t
  for (auto& v : k) v = dist(rng);
  for (int64_t t = 0; t < G; ++t) k[3 * T + t] = -0.5f;  // constant channel in group 0
  std::vector<uint8_t> codes(T * D * bits / 8);
  std::vector<uint16_t> scale((T / G) * D), zero((T / G) * D);
  headq::cpu::quantize_keys_slice<float>(k.data(), 1, T, T, D, G, bits, codes.data(),
                                         scale.data(), zero.data());
  std::vector<float> khat(T * D);
  headq::cpu::dequant_key_rows(codes.data(), scale.data(), zero.data(), D, G, bits, 0, T,
                               khat.data());
  for (int64_t g = 0; g < T / G; ++g) {
    for (int64_t c = 0; c < D; ++c) {
      float mn = k[c * T + g * G], mx = mn;
      for (int64_t t = g * G; t < (g + 1) * G; ++t) {
        mn = std::min(mn, k[c * T + t]);
        mx = std::max(mx, k[c * T + t]);
      }
      const headq::AsymParams p = headq::asym_params(mn, mx, bits);
      ASSERT_EQ(scale[g * D + c], p.scale_bits);
      ASSERT_EQ(zero[g * D + c], p.zero_bits);
      const float bound = asym_bound(mn, mx, p, bits);
      for (int64_t t = g * G; t < (g + 1) * G; ++t) {
        const float x = k[c * T + t];
        ASSERT_EQ(headq::get_code(codes.data() + t * D * bits / 8, c, bits),
                  headq::asym_code(x, p.scale, p.zero, bits));
        ASSERT_LE(std::fabs(x - khat[t * D + c]), bound);
      }
    }
  }
  EXPECT_EQ(khat[0 * D + 3], -0.5f);  // constant channel reconstructs exactly
}

INSTANTIATE_TEST_SUITE_P(Grid, QuantizeKeysSlice,
                         ::testing::Combine(::testing::Values(2, 3, 4, 8),
                                            ::testing::Values<int64_t>(32, 64)));

}  // namespace
