// Shared macros and exactly-rounded float helpers of the torch-free headq kernels.
//
// Everything in csrc/include/headq is free of torch and usable from host code (g++) and from
// device code (nvcc). Bit-exactness of codes, scales and zeros (docs/LAYOUT.md) needs every
// multiply and add rounded separately: device code uses the explicit __f*_rn intrinsics, host
// code must be compiled with -ffp-contract=off (setup.py and CMakeLists.txt do so).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HEADQ_HD __host__ __device__
#define HEADQ_INLINE __forceinline__
#else
#define HEADQ_HD
#define HEADQ_INLINE inline
#endif

namespace headq {

HEADQ_HD HEADQ_INLINE uint32_t float_as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

HEADQ_HD HEADQ_INLINE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The window end a query row sees. With query_tokens L > 1 (a call of L tokens through the
// decode ops, docs/LAYOUT.md) query head j of a batch row is token j % L of the window's last L
// tokens, causal among them: it sees window tokens t < window_end_of_row(n_window, L, j). With
// L == 1 every row sees the whole window. (Python: reference._window_ends.)
template <class I>
HEADQ_HD HEADQ_INLINE I window_end_of_row(I n_window, I query_tokens, I query_head) {
  return n_window - (query_tokens - 1 - query_head % query_tokens);
}

// a * b, rounded once (never fused with a following add).
HEADQ_HD HEADQ_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a + b, rounded once.
HEADQ_HD HEADQ_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a - b, rounded once.
HEADQ_HD HEADQ_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// a / b, IEEE division (correctly rounded on the device too, independent of fast-math flags).
HEADQ_HD HEADQ_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Round to the nearest integer, ties to even (torch.round, rintf in the default rounding mode).
HEADQ_HD HEADQ_INLINE float round_half_even(float x) { return rintf(x); }

// max/min that propagate NaN (like torch.amax / torch.amin): once a NaN is seen it stays.
HEADQ_HD HEADQ_INLINE float nan_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }
HEADQ_HD HEADQ_INLINE float nan_min(float acc, float x) { return (x < acc || x != x) ? x : acc; }

}  // namespace headq
