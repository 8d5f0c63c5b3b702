// float32 <-> IEEE binary16 bit patterns, round to nearest even, identical to
// torch's tensor.to(torch.float16) for finite values, subnormals, overflow and infinities.
// NaN becomes the quiet NaN 0x7E00 with the input's sign (c10's scalar conversion).
#pragma once

#include "headq/common.h"

namespace headq {

// float32 -> float16 bits (round to nearest, ties to even).
HEADQ_HD HEADQ_INLINE uint16_t float_to_half_bits(float x) {
  const uint32_t f = float_as_bits(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a >= 0x38800000u) {
    // Normal half: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
    // A carry out of the mantissa correctly bumps the exponent.
    const uint32_t odd = (a >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((a + 0xfffu + odd - 0x38000000u) >> 13));
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to zero
  // Subnormal half: value in units of 2^-24 is m * 2^(e - 126), with e <= 112.
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t r = m >> shift;
  if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal
  return static_cast<uint16_t>(sign | r);
}

// float16 bits -> float32 (exact).
HEADQ_HD HEADQ_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float32.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return (sign != 0u) ? -v : v;
  }
  if (exp == 31) return bits_as_float(sign | 0x7f800000u | (mant << 13));
  return bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round a float32 through float16 and back (what storing a scale/zero does).
HEADQ_HD HEADQ_INLINE float round_to_half(float x) {
  return half_bits_to_float(float_to_half_bits(x));
}

}  // namespace headq
