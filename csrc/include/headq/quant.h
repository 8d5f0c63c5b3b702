// Quantiser arithmetic of docs/LAYOUT.md: the asymmetric quantiser of keys and values and the
// symmetric (offset-binary) quantiser of the side code. Every operation is a separately rounded
// float32 operation in the documented order, so codes are bit-exact on host and device.
#pragma once

#include "headq/common.h"
#include "headq/fp16.h"

namespace headq {

// Largest asymmetric code, 2^bits - 1.
HEADQ_HD HEADQ_INLINE int asym_qmax(int bits) { return (1 << bits) - 1; }

// Stored (float16) parameters of one quantisation set and their float32 values.
struct AsymParams {
  float scale;          // float32(f16((mx - mn) / qmax))
  float zero;           // float32(f16(mn))
  uint16_t scale_bits;  // float16 bit pattern of scale
  uint16_t zero_bits;   // float16 bit pattern of zero
};

// Parameters from the exact float32 min and max of the set.
HEADQ_HD HEADQ_INLINE AsymParams asym_params(float mn, float mx, int bits) {
  const float qmax = static_cast<float>(asym_qmax(bits));
  AsymParams p;
  p.scale_bits = float_to_half_bits(div_rn(sub_rn(mx, mn), qmax));
  p.zero_bits = float_to_half_bits(mn);
  p.scale = half_bits_to_float(p.scale_bits);
  p.zero = half_bits_to_float(p.zero_bits);
  return p;
}

// code(x) = 0 if s == 0 else clamp(rint((x - z) / s), 0, qmax); a NaN quotient gives 0.
HEADQ_HD HEADQ_INLINE uint32_t asym_code(float x, float s, float z, int bits) {
  if (s == 0.0f) return 0u;
  const float q = round_half_even(div_rn(sub_rn(x, z), s));
  const float qmax = static_cast<float>(asym_qmax(bits));
  if (!(q > 0.0f)) return 0u;  // negative, zero or NaN
  if (q >= qmax) return static_cast<uint32_t>(asym_qmax(bits));
  return static_cast<uint32_t>(q);
}

// dequant(c) = c * s + z: multiply, round, add, round (no FMA).
HEADQ_HD HEADQ_INLINE float asym_dequant(uint32_t code, float s, float z) {
  return add_rn(mul_rn(static_cast<float>(code), s), z);
}

// Symmetric side-code quantiser with qz = 2^(bits-1) - 1 and offset 2^(bits-1).
HEADQ_HD HEADQ_INLINE int sym_qz(int bits) { return (1 << (bits - 1)) - 1; }
HEADQ_HD HEADQ_INLINE int sym_offset(int bits) { return 1 << (bits - 1); }

// float16 bits of the per-token side scale f16(amax / qz); amax = max_j |y_j| (NaN-propagating).
HEADQ_HD HEADQ_INLINE uint16_t sym_scale_bits(float amax, int bits) {
  return float_to_half_bits(div_rn(amax, static_cast<float>(sym_qz(bits))));
}

// Stored code q + 2^(bits-1), q = 0 if s == 0 else clamp(rint(y / s), -qz, qz) (NaN -> 0).
HEADQ_HD HEADQ_INLINE uint32_t sym_code(float y, float s, int bits) {
  const int off = sym_offset(bits);
  if (s == 0.0f) return static_cast<uint32_t>(off);
  const float q = round_half_even(div_rn(y, s));
  const float qz = static_cast<float>(sym_qz(bits));
  int qi;
  if (q != q) {
    qi = 0;
  } else if (q >= qz) {
    qi = sym_qz(bits);
  } else if (q <= -qz) {
    qi = -sym_qz(bits);
  } else {
    qi = static_cast<int>(q);
  }
  return static_cast<uint32_t>(qi + off);
}

// (code - 2^(bits-1)) * s.
HEADQ_HD HEADQ_INLINE float sym_dequant(uint32_t code, float s, int bits) {
  return mul_rn(static_cast<float>(static_cast<int>(code) - sym_offset(bits)), s);
}

}  // namespace headq
