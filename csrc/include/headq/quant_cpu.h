// Torch-free CPU kernels of the quantisation ops, one (batch, KV head) slice per call.
//
// Input tensors are raw pointers with int64 strides (any layout); outputs are contiguous.
// Float16 outputs are written as their bit patterns (uint16_t). T is the input element type:
// float, or any type with an exact conversion to float (c10::Half, c10::BFloat16).
// The ATen wrappers (csrc/cpu) call these from at::parallel_for over B*H slices.
#pragma once

#include <algorithm>
#include <vector>

#include "headq/common.h"
#include "headq/fp16.h"
#include "headq/pack.h"
#include "headq/quant.h"

namespace headq {
namespace cpu {

// Keys of one (b, h): per channel, groups of G tokens.
template <typename T>
void quantize_keys_slice(const T* k,  // [n_tok, D], element (t, c) at k[t*stride_t + c*stride_d]
                         int64_t stride_t, int64_t stride_d, int64_t n_tok, int64_t D,
                         int64_t G, int bits,
                         uint8_t* codes,   // [n_tok, D*bits/8]
                         uint16_t* scale,  // [n_tok/G, D] float16 bits
                         uint16_t* zero) {  // [n_tok/G, D] float16 bits
  const int64_t row_bytes = packed_row_bytes(D, bits);
  std::vector<float> mn(D), mx(D), s(D), z(D);
  for (int64_t g = 0; g < n_tok / G; ++g) {
    const int64_t t0 = g * G;
    for (int64_t c = 0; c < D; ++c) {
      const float x = static_cast<float>(k[t0 * stride_t + c * stride_d]);
      mn[c] = x;
      mx[c] = x;
    }
    for (int64_t t = t0 + 1; t < t0 + G; ++t) {
      for (int64_t c = 0; c < D; ++c) {
        const float x = static_cast<float>(k[t * stride_t + c * stride_d]);
        mn[c] = nan_min(mn[c], x);
        mx[c] = nan_max(mx[c], x);
      }
    }
    for (int64_t c = 0; c < D; ++c) {
      const AsymParams p = asym_params(mn[c], mx[c], bits);
      scale[g * D + c] = p.scale_bits;
      zero[g * D + c] = p.zero_bits;
      s[c] = p.scale;
      z[c] = p.zero;
    }
    for (int64_t t = t0; t < t0 + G; ++t) {
      uint8_t* row = codes + t * row_bytes;
      for (int64_t j = 0; j < row_bytes; ++j) row[j] = 0;
      for (int64_t c = 0; c < D; ++c) {
        const float x = static_cast<float>(k[t * stride_t + c * stride_d]);
        put_code(row, c, bits, asym_code(x, s[c], z[c], bits));
      }
    }
  }
}

// Dequantised keys of one (b, h) slice as float32 rows [t_begin, t_end) (shared by
// dequantize_keys, side_code and the attention kernels).
inline void dequant_key_rows(const uint8_t* codes,    // [n_tok, D*bits/8]
                             const uint16_t* scale,   // [n_tok/G, D]
                             const uint16_t* zero,    // [n_tok/G, D]
                             int64_t D, int64_t G, int bits, int64_t t_begin, int64_t t_end,
                             float* out) {  // [t_end - t_begin, D]
  const int64_t row_bytes = packed_row_bytes(D, bits);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* row = codes + t * row_bytes;
    const uint16_t* sg = scale + (t / G) * D;
    const uint16_t* zg = zero + (t / G) * D;
    float* o = out + (t - t_begin) * D;
    for (int64_t c = 0; c < D; ++c) {
      o[c] = asym_dequant(get_code(row, c, bits), half_bits_to_float(sg[c]),
                          half_bits_to_float(zg[c]));
    }
  }
}

template <typename T>
void dequantize_keys_slice(const uint8_t* codes,   // [n_tok, D*bits/8]
                           const uint16_t* scale,  // [n_tok/G, D]
                           const uint16_t* zero,   // [n_tok/G, D]
                           int64_t n_tok, int64_t D, int64_t G, int bits,
                           T* out) {  // [n_tok, D]
  std::vector<float> row(D);
  for (int64_t t = 0; t < n_tok; ++t) {
    dequant_key_rows(codes, scale, zero, D, G, bits, t, t + 1, row.data());
    for (int64_t c = 0; c < D; ++c) out[t * D + c] = static_cast<T>(row[c]);
  }
}

// Values of one (b, h): per token, groups of Gv channels.
template <typename T>
void quantize_values_slice(const T* v,  // [n_tok, D], element (t, c) at v[t*stride_t + c*stride_d]
                           int64_t stride_t, int64_t stride_d, int64_t n_tok, int64_t D,
                           int64_t Gv, int bits,
                           uint8_t* codes,   // [n_tok, D*bits/8]
                           uint16_t* scale,  // [n_tok, D/Gv] float16 bits
                           uint16_t* zero) {  // [n_tok, D/Gv] float16 bits
  const int64_t row_bytes = packed_row_bytes(D, bits);
  const int64_t n_groups = D / Gv;
  std::vector<float> x(D);
  for (int64_t t = 0; t < n_tok; ++t) {
    for (int64_t c = 0; c < D; ++c) x[c] = static_cast<float>(v[t * stride_t + c * stride_d]);
    uint8_t* row = codes + t * row_bytes;
    for (int64_t j = 0; j < row_bytes; ++j) row[j] = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t c0 = g * Gv;
      float mn = x[c0], mx = x[c0];
      for (int64_t c = c0 + 1; c < c0 + Gv; ++c) {
        mn = nan_min(mn, x[c]);
        mx = nan_max(mx, x[c]);
      }
      const AsymParams p = asym_params(mn, mx, bits);
      scale[t * n_groups + g] = p.scale_bits;
      zero[t * n_groups + g] = p.zero_bits;
      for (int64_t c = c0; c < c0 + Gv; ++c)
        put_code(row, c, bits, asym_code(x[c], p.scale, p.zero, bits));
    }
  }
}

// Dequantised values of one (b, h) slice as float32 rows [t_begin, t_end).
inline void dequant_value_rows(const uint8_t* codes,   // [n_tok, D*bits/8]
                               const uint16_t* scale,  // [n_tok, D/Gv]
                               const uint16_t* zero,   // [n_tok, D/Gv]
                               int64_t D, int64_t Gv, int bits, int64_t t_begin, int64_t t_end,
                               float* out) {  // [t_end - t_begin, D]
  const int64_t row_bytes = packed_row_bytes(D, bits);
  const int64_t n_groups = D / Gv;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* row = codes + t * row_bytes;
    float* o = out + (t - t_begin) * D;
    for (int64_t g = 0; g < n_groups; ++g) {
      const float s = half_bits_to_float(scale[t * n_groups + g]);
      const float z = half_bits_to_float(zero[t * n_groups + g]);
      for (int64_t c = g * Gv; c < (g + 1) * Gv; ++c)
        o[c] = asym_dequant(get_code(row, c, bits), s, z);
    }
  }
}

template <typename T>
void dequantize_values_slice(const uint8_t* codes,   // [n_tok, D*bits/8]
                             const uint16_t* scale,  // [n_tok, D/Gv]
                             const uint16_t* zero,   // [n_tok, D/Gv]
                             int64_t n_tok, int64_t D, int64_t Gv, int bits,
                             T* out) {  // [n_tok, D]
  std::vector<float> row(D);
  for (int64_t t = 0; t < n_tok; ++t) {
    dequant_value_rows(codes, scale, zero, D, Gv, bits, t, t + 1, row.data());
    for (int64_t c = 0; c < D; ++c) out[t * D + c] = static_cast<T>(row[c]);
  }
}

// Side code of one (b, h): residual e = k - khat (optionally centred per key group and
// channel), projected on the head's basis in ascending channel order, then quantised
// symmetrically per token.
template <typename T>
void side_code_slice(const T* k,  // [n_tok, D], element (t, c) at k[t*stride_t + c*stride_d]
                     int64_t stride_t, int64_t stride_d,
                     const uint8_t* k_codes,   // [n_tok, D*key_bits/8]
                     const uint16_t* k_scale,  // [n_tok/G, D]
                     const uint16_t* k_zero,   // [n_tok/G, D]
                     const float* basis,       // [D, r] of this KV head, contiguous
                     int64_t n_tok, int64_t D, int64_t r, int64_t G, int key_bits,
                     int side_bits, bool center,
                     uint8_t* z_codes,    // [n_tok, r*side_bits/8]
                     uint16_t* z_scale) {  // [n_tok] float16 bits
  const int64_t z_row_bytes = packed_row_bytes(r, side_bits);
  std::vector<float> e(G * D), mu(D), y(r);
  for (int64_t g = 0; g < n_tok / G; ++g) {
    const int64_t t0 = g * G;
    dequant_key_rows(k_codes, k_scale, k_zero, D, G, key_bits, t0, t0 + G, e.data());
    for (int64_t t = 0; t < G; ++t) {
      for (int64_t c = 0; c < D; ++c) {
        const float x = static_cast<float>(k[(t0 + t) * stride_t + c * stride_d]);
        e[t * D + c] = sub_rn(x, e[t * D + c]);
      }
    }
    if (center) {
      for (int64_t c = 0; c < D; ++c) mu[c] = 0.0f;
      for (int64_t t = 0; t < G; ++t)
        for (int64_t c = 0; c < D; ++c) mu[c] = add_rn(mu[c], e[t * D + c]);
      const float gf = static_cast<float>(G);
      for (int64_t c = 0; c < D; ++c) mu[c] = div_rn(mu[c], gf);
      for (int64_t t = 0; t < G; ++t)
        for (int64_t c = 0; c < D; ++c) e[t * D + c] = sub_rn(e[t * D + c], mu[c]);
    }
    for (int64_t t = 0; t < G; ++t) {
      const float* et = e.data() + t * D;
      for (int64_t j = 0; j < r; ++j) y[j] = 0.0f;
      for (int64_t c = 0; c < D; ++c) {
        const float* u = basis + c * r;
        for (int64_t j = 0; j < r; ++j) y[j] = add_rn(y[j], mul_rn(et[c], u[j]));
      }
      float amax = fabsf(y[0]);
      for (int64_t j = 1; j < r; ++j) amax = nan_max(amax, fabsf(y[j]));
      const uint16_t sb = sym_scale_bits(amax, side_bits);
      const float s = half_bits_to_float(sb);
      z_scale[t0 + t] = sb;
      uint8_t* row = z_codes + (t0 + t) * z_row_bytes;
      for (int64_t j = 0; j < z_row_bytes; ++j) row[j] = 0;
      for (int64_t j = 0; j < r; ++j) put_code(row, j, side_bits, sym_code(y[j], s, side_bits));
    }
  }
}

// Dequantised side code rows [t_begin, t_end) of one (b, h): (code - 2^(bz-1)) * s.
inline void dequant_side_rows(const uint8_t* z_codes,   // [n_tok, r*side_bits/8]
                              const uint16_t* z_scale,  // [n_tok]
                              int64_t r, int side_bits, int64_t t_begin, int64_t t_end,
                              float* out) {  // [t_end - t_begin, r]
  const int64_t row_bytes = packed_row_bytes(r, side_bits);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* row = z_codes + t * row_bytes;
    const float s = half_bits_to_float(z_scale[t]);
    float* o = out + (t - t_begin) * r;
    for (int64_t j = 0; j < r; ++j) o[j] = sym_dequant(get_code(row, j, side_bits), s, side_bits);
  }
}

// reconstruct_keys of one (b, h) slice: per element k̂ + sign · Σ_j ẑ_j U[d, j], the sum over j
// ascending from 0, every product and sum rounded once (docs/LAYOUT.md; the CUDA kernels do the
// same operations). The rank loop is outside the channel loop, over a transposed copy of U, so
// the channel loop has no dependency chain and vectorises (the same operations per element).
template <typename T>
void reconstruct_keys_slice(const uint8_t* codes,     // [n_tok, D*bits/8]
                            const uint16_t* scale,    // [n_tok/G, D]
                            const uint16_t* zero,     // [n_tok/G, D]
                            const uint8_t* z_codes,   // [n_tok, r*side_bits/8]
                            const uint16_t* z_scale,  // [n_tok]
                            const float* basis,       // U of this head [D, r]
                            int64_t n_tok, int64_t D, int64_t G, int bits, int64_t r,
                            int side_bits, float sign,
                            T* out) {  // [n_tok, D]
  std::vector<float> row(D), zhat(r), corr(D), ut(r * D);
  for (int64_t c = 0; c < D; ++c)
    for (int64_t j = 0; j < r; ++j) ut[j * D + c] = basis[c * r + j];
  for (int64_t t = 0; t < n_tok; ++t) {
    dequant_key_rows(codes, scale, zero, D, G, bits, t, t + 1, row.data());
    dequant_side_rows(z_codes, z_scale, r, side_bits, t, t + 1, zhat.data());
    std::fill(corr.begin(), corr.end(), 0.0f);
    for (int64_t j = 0; j < r; ++j) {
      const float zj = zhat[j];
      const float* u = ut.data() + j * D;
      for (int64_t c = 0; c < D; ++c) corr[c] = add_rn(corr[c], mul_rn(zj, u[c]));
    }
    for (int64_t c = 0; c < D; ++c)
      out[t * D + c] = static_cast<T>(add_rn(row[c], mul_rn(sign, corr[c])));
  }
}

}  // namespace cpu
}  // namespace headq
