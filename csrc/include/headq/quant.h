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

// ---------------------------------------------------------------------------------------------
// Fast, provably exact helpers of the CUDA fast kernels (csrc/cuda/quant_fast.cuh). None of the
// functions above changes; each helper below either returns exactly what the reference function
// returns or says that it cannot (and the caller then runs the reference function).
// tests/cpp/test_quant_fast.cc checks them bit for bit against the reference functions.

// NaN-propagating min/max of two floats: a NaN (any payload) if a or b is NaN, else the smaller
// (larger) value; which zero min(-0, +0) returns is unspecified. Device: min.NaN / max.NaN
// (sm_80+), one instruction; host: the same rule with comparisons.
HEADQ_HD HEADQ_INLINE float min_nanprop(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? add_rn(a, b) : (b < a ? b : a);
#endif
}
HEADQ_HD HEADQ_INLINE float max_nanprop(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? add_rn(a, b) : (b > a ? b : a);
#endif
}

// Whether the value-only extremum v of a set (a fold of min_nanprop / max_nanprop in ANY order
// or tree shape) is bit for bit the result of the sequential nan_min / nan_max fold over the set.
// Argument: min_nanprop is an exact selection, so without NaN in the set every fold returns an
// element whose VALUE is the set's minimum; any NaN in the set makes every fold NaN. The
// sequential nan_min fold returns (the last NaN if any NaN, else) the earliest element of
// minimal value. Without NaN, elements of equal value have identical bit patterns unless that
// value is zero (-0.0 vs +0.0). Hence v == v && v != 0 implies: no NaN in the set, and v is the
// unique bit pattern of the minimum, i.e. the sequential result. Otherwise (NaN or a zero
// extremum) the caller recomputes the sequential fold. Same for max.
HEADQ_HD HEADQ_INLINE bool extremum_is_exact(float v) { return v == v && v != 0.0f; }

// lo <= clamp <= hi; a NaN v stays NaN (and thus fails the *_try checks below).
HEADQ_HD HEADQ_INLINE float clamp_nanprop(float v, float lo, float hi) {
  return min_nanprop(max_nanprop(v, lo), hi);
}

// Reciprocal scale for asym_code_try / sym_code_try: 1/s (correctly rounded) when s is a
// normal float32 with 2^-126 <= |s| <= 2^126 (then 1/s is normal and finite, relative error
// <= 2^-24), otherwise NaN. A NaN rs makes every *_try of the set fail, so s == 0, +-inf, NaN,
// float32-subnormal s and huge s (subnormal 1/s) always take the reference path. Every float16
// scale except 0, inf and NaN is in range (float16 values are 2^-24 .. 65504 in magnitude).
HEADQ_HD HEADQ_INLINE float quant_rcp(float s) {
  const float a = fabsf(s);
  return (a >= 0x1p-126f && a <= 0x1p126f) ? div_rn(1.0f, s) : bits_as_float(0x7fc00000u);
}

// 1.5 * 2^23: for |v| <= 2^22, v + kRintMagic (one float32 add, round to nearest even) is
// 1.5*2^23 + rint(v) exactly (ulp 1 in [2^23, 2^24); 1.5*2^23 is even, so ties go to the even
// integer like rintf), and its bit pattern is 0x4B400000 + rint(v) (two's complement).
constexpr float kRintMagic = 12582912.0f;
constexpr uint32_t kRintMagicBits = 0x4B400000u;
// The *_try functions accept a quotient only when it is at least 2^-13 away from every
// half-integer (distance to the nearest integer at most 0.5 - 2^-13).
constexpr float kNearHalfLimit = 0.5f - 0x1p-13f;

// asym_code(x, s, z, bits) without the division, for rs = quant_rcp(s) and qmaxf = 2^bits - 1.
// Returns true and the exact code in `code`, or false (then `code` is meaningless and the caller
// must use asym_code). Exactness when it returns true:
//  * d = x - z is rounded exactly as in asym_code. Let Q = d / s (real) and qr = fl(Q), the
//    quotient asym_code rounds. y = fl(d * rs) with rs = (1/s)(1 + e1), |e1| <= 2^-24, so
//    y = Q (1 + e1)(1 + e2) (|e2| <= 2^-24), or |y|, |Q| < 2^-125 when the product underflows
//    (then code 0 both ways), or y = +-inf with Q of the same sign and |Q| > 2^127 (clamped to
//    the same end). y, Q, qr always have the same sign (or are zeros).
//  * y <= 0 (incl. -0): Q <= 0, rint(qr) <= 0, reference code 0; fast: clamp 0 -> code 0.
//    y >= qmax: Q >= qmax (1 - 2^-22.9) > qmax - 0.5, rint(qr) >= qmax, reference qmax; fast:
//    clamp qmax -> code qmax.
//  * 0 < y < qmax <= 255: |y - Q| <= 255.01 * 2^-23 < 2^-15, and |qr - Q| <= ulp(Q)/2 <= 2^-17.
//    The check passes only if y is >= 2^-13 from every half-integer h, so Q is > 2^-13 - 2^-15
//    > 2^-17 from h, hence Q and qr (rounding is monotone and h is representable) lie strictly
//    inside the same interval (h_k, h_k+1) as y: rint(y) == rint(qr) == k, and the clamps agree.
//  * y NaN (d NaN, or rs NaN by quant_rcp's choice): the clamp keeps NaN, t is NaN, check fails.
//  * t = yc - rint(yc) is exact (Sterbenz), so the check is exactly "distance to the nearest
//    half-integer >= 2^-13" (a margin ~4x the error bound above).
HEADQ_HD HEADQ_INLINE bool asym_code_try(float x, float z, float rs, float qmaxf,
                                         uint32_t& code) {
  const float y = mul_rn(sub_rn(x, z), rs);
  const float yc = clamp_nanprop(y, 0.0f, qmaxf);
  const float m = add_rn(yc, kRintMagic);
  const float t = sub_rn(yc, sub_rn(m, kRintMagic));
  code = float_as_bits(m) - kRintMagicBits;
  return fabsf(t) <= kNearHalfLimit;
}

// Exactly asym_code(x, s, z, bits) for every input, given rs = quant_rcp(s).
HEADQ_HD HEADQ_INLINE uint32_t asym_code_rcp(float x, float s, float z, float rs, int bits) {
  uint32_t c;
  if (asym_code_try(x, z, rs, static_cast<float>(asym_qmax(bits)), c)) return c;
  return asym_code(x, s, z, bits);
}

// sym_code(y, s, bits) without the division, for rs = quant_rcp(s): the same argument as
// asym_code_try with the clamp to [-qz, qz] (qz <= 127; y <= -qz gives -qz, y >= qz gives qz,
// the interior |w| < 127 has error < 2^-16), a NaN quotient fails the check (the reference
// maps it to q = 0: taken by the reference path). Stored code rint + 2^(bits-1).
HEADQ_HD HEADQ_INLINE bool sym_code_try(float y, float rs, int bits, uint32_t& code) {
  const float qz = static_cast<float>(sym_qz(bits));
  const float w = mul_rn(y, rs);
  const float wc = clamp_nanprop(w, -qz, qz);
  const float m = add_rn(wc, kRintMagic);
  const float t = sub_rn(wc, sub_rn(m, kRintMagic));
  code = float_as_bits(m) - kRintMagicBits + static_cast<uint32_t>(sym_offset(bits));
  return fabsf(t) <= kNearHalfLimit;
}

// Exactly sym_code(y, s, bits) for every input, given rs = quant_rcp(s).
HEADQ_HD HEADQ_INLINE uint32_t sym_code_rcp(float y, float s, float rs, int bits) {
  uint32_t c;
  if (sym_code_try(y, rs, bits, c)) return c;
  return sym_code(y, s, bits);
}

}  // namespace headq
