// The fast exact helpers of headq/quant.h (used by csrc/cuda/quant_fast.cuh) against the
// reference functions, bit for bit: asym_code_rcp == asym_code, sym_code_rcp == sym_code for
// every float16 scale and many millions of random and adversarial inputs, and the value-only
// min/max reduction + extremum_is_exact fallback == the sequential nan_min / nan_max loop.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "headq/fp16.h"
#include "headq/quant.h"

namespace headq {
namespace {

const int kAllBits[] = {2, 3, 4, 8};

float f_bits(uint32_t u) { return bits_as_float(u); }

// Edge values: zeros, NaNs (both signs, payloads), infinities, float32 subnormals, float16
// boundaries, huge, tiny and ordinary values.
std::vector<float> edge_values() {
  std::vector<float> v = {0.0f, -0.0f, f_bits(0x7fc00000u), f_bits(0xffc00000u),
                          f_bits(0x7f800001u), f_bits(0xff812345u),
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(), f_bits(1u), f_bits(0x80000001u),
                          f_bits(0x007fffffu), f_bits(0x00800000u), f_bits(0x80800000u),
                          std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                          65504.0f, -65504.0f, 65520.0f, 5.9604645e-8f, 6.1035156e-5f, 1.0f,
                          -1.0f, 0.5f, 1.5f, 2.5f, 3.0f, 0.1f, -0.1f, 1e-30f, 1e30f, 0x1p126f,
                          0x1p127f, 0x1p-126f, 0x1p-127f, 7.5f, 255.5f, 127.5f, -127.5f};
  return v;
}

void expect_asym(float x, float s, float z, int bits) {
  const uint32_t want = asym_code(x, s, z, bits);
  const uint32_t got = asym_code_rcp(x, s, z, quant_rcp(s), bits);
  ASSERT_EQ(got, want) << "x=" << x << " (0x" << std::hex << float_as_bits(x) << ") s=" << s
                       << " (0x" << float_as_bits(s) << ") z=" << z << " (0x" << float_as_bits(z)
                       << std::dec << ") bits=" << bits;
}

void expect_sym(float y, float s, int bits) {
  const uint32_t want = sym_code(y, s, bits);
  const uint32_t got = sym_code_rcp(y, s, quant_rcp(s), bits);
  ASSERT_EQ(got, want) << "y=" << y << " (0x" << std::hex << float_as_bits(y) << ") s=" << s
                       << " (0x" << float_as_bits(s) << std::dec << ") bits=" << bits;
}

TEST(QuantFast, RcpSentinel) {
  EXPECT_TRUE(quant_rcp(0.0f) != quant_rcp(0.0f));
  EXPECT_TRUE(quant_rcp(-0.0f) != quant_rcp(-0.0f));
  EXPECT_TRUE(quant_rcp(f_bits(0x7fc00000u)) != quant_rcp(f_bits(0x7fc00000u)));
  EXPECT_TRUE(quant_rcp(std::numeric_limits<float>::infinity()) !=
              quant_rcp(std::numeric_limits<float>::infinity()));
  EXPECT_TRUE(quant_rcp(f_bits(0x00400000u)) != quant_rcp(f_bits(0x00400000u)));
  EXPECT_TRUE(quant_rcp(0x1p127f) != quant_rcp(0x1p127f));
  EXPECT_EQ(quant_rcp(0.25f), 4.0f);
  EXPECT_EQ(quant_rcp(-2.0f), -0.5f);
  // Every finite nonzero float16 scale gets a finite reciprocal.
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float s = half_bits_to_float(static_cast<uint16_t>(h));
    if (s != 0.0f && s == s && std::fabs(s) != std::numeric_limits<float>::infinity()) {
      const float r = quant_rcp(s);
      ASSERT_TRUE(r == r && std::fabs(r) < std::numeric_limits<float>::infinity()) << h;
    }
  }
}

TEST(QuantFast, MagicRounding) {
  // v + 1.5*2^23 == 1.5*2^23 + rint(v), ties to even, over a dense grid of [-256, 256].
  for (int i = -256 * 64; i <= 256 * 64; ++i) {
    const float v = static_cast<float>(i) / 64.0f;
    const float m = add_rn(v, kRintMagic);
    ASSERT_EQ(static_cast<int32_t>(float_as_bits(m) - kRintMagicBits),
              static_cast<int32_t>(rintf(v)))
        << v;
  }
}

// Every float16 scale bit pattern, with x and z from a sample that covers codes across the
// whole range, the clamps and the edge values.
TEST(QuantFast, AsymAllHalfScales) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  const std::vector<float> edges = edge_values();
  for (uint32_t hs = 0; hs < 0x10000u; ++hs) {
    const float s = half_bits_to_float(static_cast<uint16_t>(hs));
    for (int bits : kAllBits) {
      const float qmax = static_cast<float>(asym_qmax(bits));
      for (int k = 0; k < 12; ++k) {
        // z a float16 value; x = z + q*s for q around the code range and near half-integers.
        const float z = round_to_half((u01(rng) - 0.5f) * 8.0f);
        float q = (u01(rng) * (qmax + 2.0f)) - 1.0f;
        if (k % 3 == 0) q = std::floor(q) + 0.5f;  // exact half-integer targets
        const float x = add_rn(z, mul_rn(q, s));
        expect_asym(x, s, z, bits);
        expect_asym(std::nextafter(x, 1e38f), s, z, bits);
        expect_asym(std::nextafter(x, -1e38f), s, z, bits);
      }
      if (hs % 61 == 0) {
        for (float x : edges) {
          for (float z : {0.0f, -0.0f, 1.0f, -3.5f, edges[hs % edges.size()]}) {
            expect_asym(x, s, z, bits);
          }
        }
      }
    }
  }
}

TEST(QuantFast, SymAllHalfScales) {
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  const std::vector<float> edges = edge_values();
  for (uint32_t hs = 0; hs < 0x10000u; ++hs) {
    const float s = half_bits_to_float(static_cast<uint16_t>(hs));
    for (int bits : {4, 8}) {
      const float qz = static_cast<float>(sym_qz(bits));
      for (int k = 0; k < 16; ++k) {
        float q = (u01(rng) * 2.0f - 1.0f) * (qz + 2.0f);
        if (k % 3 == 0) q = std::floor(q) + 0.5f;
        const float y = mul_rn(q, s);
        expect_sym(y, s, bits);
        expect_sym(std::nextafter(y, 1e38f), s, bits);
        expect_sym(std::nextafter(y, -1e38f), s, bits);
      }
      if (hs % 61 == 0) {
        for (float y : edges) expect_sym(y, s, bits);
      }
    }
  }
}

// Random float32 bit patterns for x, s, z (every class: NaN, inf, subnormal, huge).
TEST(QuantFast, AsymRandomBitPatterns) {
  std::mt19937 rng(7);
  for (int i = 0; i < 4000000; ++i) {
    const float x = f_bits(rng()), s = f_bits(rng()), z = f_bits(rng());
    expect_asym(x, s, z, kAllBits[i & 3]);
  }
}

// Realistic sets: scale and zero from asym_params of the set's min/max, x from the set, plus
// x constructed within a few ulps of the half-integer boundaries of the quotient.
TEST(QuantFast, AsymRealisticAndNearHalf) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  std::uniform_int_distribution<int> e_dist(-30, 15);
  for (int i = 0; i < 3000000; ++i) {
    const int bits = kAllBits[i & 3];
    const float qmax = static_cast<float>(asym_qmax(bits));
    const float mag = std::ldexp(1.0f, e_dist(rng));
    const float mn = (u01(rng) - 0.7f) * mag;
    const float mx = add_rn(mn, u01(rng) * mag);
    const AsymParams p = asym_params(mn, mx, bits);
    float x;
    if (i % 2 == 0) {
      x = mn + (mx - mn) * u01(rng);
    } else {
      // Quotient as close to a half-integer as float32 allows: x = z + (k + 0.5) * s, then
      // walk a few ulps either way.
      const float kf = std::floor(u01(rng) * (qmax + 1.0f)) - 0.5f + (i % 7 == 1 ? 1.0f : 0.0f);
      x = add_rn(p.zero, mul_rn(kf, p.scale));
      const int walk = static_cast<int>(rng() % 9) - 4;
      for (int w = 0; w < (walk < 0 ? -walk : walk); ++w)
        x = std::nextafter(x, walk < 0 ? -1e38f : 1e38f);
    }
    expect_asym(x, p.scale, p.zero, bits);
  }
}

TEST(QuantFast, SymRandom) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  for (int i = 0; i < 2000000; ++i) {
    const int bits = (i & 1) ? 4 : 8;
    if (i % 4 == 0) {
      expect_sym(f_bits(rng()), f_bits(rng()), bits);
      continue;
    }
    // A token's y vector: scale from amax, y near half-integer multiples of the scale.
    const float mag = std::ldexp(1.0f, static_cast<int>(rng() % 40) - 25);
    const float amax = u01(rng) * mag;
    const float s = half_bits_to_float(sym_scale_bits(amax, bits));
    const float qz = static_cast<float>(sym_qz(bits));
    float y;
    if (i % 4 == 1) {
      y = (u01(rng) * 2.0f - 1.0f) * amax;
    } else {
      const float kf = std::floor((u01(rng) * 2.0f - 1.0f) * (qz + 1.0f)) + 0.5f;
      y = mul_rn(kf, s);
      const int walk = static_cast<int>(rng() % 9) - 4;
      for (int w = 0; w < (walk < 0 ? -walk : walk); ++w)
        y = std::nextafter(y, walk < 0 ? -1e38f : 1e38f);
    }
    expect_sym(y, s, bits);
  }
}

// The fast paths are actually taken for ordinary data (else the kernels gain nothing).
TEST(QuantFast, FastPathIsCommon) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  int fast = 0, n = 0;
  for (int i = 0; i < 100000; ++i) {
    const int bits = kAllBits[i & 3];
    const AsymParams p = asym_params(-1.0f - u01(rng), 1.0f + u01(rng), bits);
    uint32_t c;
    fast += asym_code_try(u01(rng) * 2.0f - 1.0f, p.zero, quant_rcp(p.scale),
                          static_cast<float>(asym_qmax(bits)), c);
    ++n;
  }
  EXPECT_GT(fast, n * 99 / 100);
}

// ----- min/max: value-only NaN-propagating reduction in an arbitrary tree + exact fallback ----

struct MinMax {
  float mn, mx;
};

MinMax sequential(const std::vector<float>& v) {
  MinMax r{v[0], v[0]};
  for (size_t i = 1; i < v.size(); ++i) {
    r.mn = nan_min(r.mn, v[i]);
    r.mx = nan_max(r.mx, v[i]);
  }
  return r;
}

// Value-only fold over a random binary tree (random split points, random operand order).
MinMax tree(const std::vector<float>& v, size_t lo, size_t hi, std::mt19937& rng) {
  if (hi - lo == 1) return {v[lo], v[lo]};
  const size_t mid = lo + 1 + rng() % (hi - lo - 1);
  const MinMax a = tree(v, lo, mid, rng), b = tree(v, mid, hi, rng);
  if (rng() & 1) return {min_nanprop(a.mn, b.mn), max_nanprop(a.mx, b.mx)};
  return {min_nanprop(b.mn, a.mn), max_nanprop(b.mx, a.mx)};
}

TEST(QuantFast, MinMaxFastOrExact) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  const std::vector<float> specials = {0.0f, -0.0f, f_bits(0x7fc00000u), f_bits(0xffc00001u),
                                       f_bits(0x7f800003u),
                                       std::numeric_limits<float>::infinity(),
                                       -std::numeric_limits<float>::infinity(), f_bits(1u),
                                       f_bits(0x80000001u), 1.0f, -1.0f};
  int fast_taken = 0;
  for (int it = 0; it < 200000; ++it) {
    const size_t n = 1 + rng() % 70;
    std::vector<float> v(n);
    const int mode = it % 4;
    for (size_t i = 0; i < n; ++i) {
      if (mode == 0 || rng() % 8 != 0) {
        v[i] = mode == 3 ? static_cast<float>(static_cast<int>(rng() % 5) - 2)
                         : (u01(rng) - 0.5f) * 10.0f;
      } else {
        v[i] = specials[rng() % specials.size()];
      }
    }
    const MinMax want = sequential(v);
    const MinMax fast = tree(v, 0, n, rng);
    // What the kernels do: keep the fast value when extremum_is_exact, else recompute.
    const float mn = extremum_is_exact(fast.mn) ? fast.mn : want.mn;
    const float mx = extremum_is_exact(fast.mx) ? fast.mx : want.mx;
    ASSERT_EQ(float_as_bits(mn), float_as_bits(want.mn)) << it;
    ASSERT_EQ(float_as_bits(mx), float_as_bits(want.mx)) << it;
    // A NaN anywhere must force the exact path.
    bool has_nan = false;
    for (float x : v) has_nan |= (x != x);
    if (has_nan) {
      ASSERT_FALSE(extremum_is_exact(fast.mn));
      ASSERT_FALSE(extremum_is_exact(fast.mx));
    }
    fast_taken += extremum_is_exact(fast.mn) && extremum_is_exact(fast.mx);
  }
  EXPECT_GT(fast_taken, 20000);
}

TEST(QuantFast, ClampNanprop) {
  EXPECT_EQ(clamp_nanprop(-5.0f, 0.0f, 3.0f), 0.0f);
  EXPECT_EQ(clamp_nanprop(5.0f, 0.0f, 3.0f), 3.0f);
  EXPECT_EQ(clamp_nanprop(1.25f, 0.0f, 3.0f), 1.25f);
  const float nan = f_bits(0x7fc00000u);
  EXPECT_TRUE(clamp_nanprop(nan, 0.0f, 3.0f) != clamp_nanprop(nan, 0.0f, 3.0f));
  uint32_t c;
  EXPECT_FALSE(asym_code_try(nan, 0.0f, 1.0f, 3.0f, c));
  EXPECT_FALSE(sym_code_try(nan, 1.0f, 8, c));
  EXPECT_FALSE(asym_code_try(1.0f, 0.0f, quant_rcp(0.0f), 3.0f, c));
}

}  // namespace
}  // namespace headq
