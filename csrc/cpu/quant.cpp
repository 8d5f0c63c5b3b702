// CPU host wrappers of the quantisation ops: validate, allocate, dispatch the dtype, run the
// torch-free slice kernels (csrc/include/headq/quant_cpu.h) in parallel over (batch, head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "dispatch.h"
#include "headq/quant_cpu.h"
#include "validate.h"

namespace headq {
namespace {

uint16_t* half_bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::Half>()); }
const uint16_t* half_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::Half>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_keys_cpu(
    const at::Tensor& k,  // [B, H, T, D] any strides
    int64_t bits, int64_t group_size) {
  validate_quantize_keys(k, bits, group_size);
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), G = group_size;
  at::Tensor codes = at::empty({B, H, T, D * bits / 8}, k.options().dtype(at::kByte));
  at::Tensor scale = at::empty({B, H, T / G, D}, k.options().dtype(at::kHalf));
  at::Tensor zero = at::empty({B, H, T / G, D}, k.options().dtype(at::kHalf));
  uint8_t* codes_p = codes.data_ptr<uint8_t>();  // [B, H, T, D*bits/8]
  uint16_t* scale_p = half_bits(scale);           // [B, H, T/G, D]
  uint16_t* zero_p = half_bits(zero);             // [B, H, T/G, D]
  const int64_t row_bytes = D * bits / 8;
  HEADQ_DISPATCH_FLOAT(k.scalar_type(), "quantize_keys", [&] {
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();  // [B, H, T, D] strided
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        cpu::quantize_keys_slice<scalar_t>(k_p + b * k.stride(0) + h * k.stride(1), k.stride(2),
                                           k.stride(3), T, D, G, static_cast<int>(bits),
                                           codes_p + bh * T * row_bytes,
                                           scale_p + bh * (T / G) * D, zero_p + bh * (T / G) * D);
      }
    });
  });
  return {codes, scale, zero};
}

// The three dequantising ops write into `out` [B, H, T, D] (validated) through a *_fill: each
// (b, h) slab's token rows at out + b * stride(0) + h * stride(1), D contiguous elements each.
// Their functional forms fill a fresh tensor; their *_into forms the caller's `out`, through a
// contiguous temporary where its rows are not contiguous.
template <typename F>
void fill_out(const at::Tensor& out, F&& fill) {
  if (out.stride(3) == 1 && out.stride(2) == out.size(3)) {
    fill(out);
    return;
  }
  const at::Tensor tmp = at::empty(out.sizes(), out.options());
  fill(tmp);
  out.copy_(tmp);
}

template <typename scalar_t>
scalar_t* slab_of(const at::Tensor& out, int64_t bh, int64_t H) {
  return out.data_ptr<scalar_t>() + (bh / H) * out.stride(0) + (bh % H) * out.stride(1);
}

void dequantize_keys_fill(const at::Tensor& codes_in,  // [B, H, T, D*bits/8] uint8
                          const at::Tensor& scale_in,  // [B, H, T/G, D] f16
                          const at::Tensor& zero_in,   // [B, H, T/G, D] f16
                          int64_t bits, int64_t group_size, const at::Tensor& out) {
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t row_bytes = codes.size(3), D = row_bytes * 8 / bits, G = group_size;
  const uint8_t* codes_p = codes.const_data_ptr<uint8_t>();
  const uint16_t* scale_p = half_bits(scale);
  const uint16_t* zero_p = half_bits(zero);
  HEADQ_DISPATCH_FLOAT(out.scalar_type(), "dequantize_keys", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        cpu::dequantize_keys_slice<scalar_t>(codes_p + bh * T * row_bytes,
                                             scale_p + bh * (T / G) * D,
                                             zero_p + bh * (T / G) * D, T, D, G,
                                             static_cast<int>(bits), slab_of<scalar_t>(out, bh, H));
      }
    });
  });
}

at::Tensor dequantize_keys_cpu(const at::Tensor& codes, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               at::ScalarType out_dtype) {
  at::Tensor out = at::empty(validate_dequantize_keys(codes, scale, zero, bits, group_size,
                                                      out_dtype),
                             codes.options().dtype(out_dtype));
  dequantize_keys_fill(codes, scale, zero, bits, group_size, out);
  return out;
}

void dequantize_keys_into_cpu(const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& zero, int64_t bits, int64_t group_size,
                              const at::Tensor& out) {
  validate_dequantize_keys_into(codes, scale, zero, bits, group_size, out);
  fill_out(out, [&](const at::Tensor& o) {
    dequantize_keys_fill(codes, scale, zero, bits, group_size, o);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cpu(
    const at::Tensor& v,  // [B, H, T, D] any strides
    int64_t bits, int64_t group_size) {
  validate_quantize_values(v, bits, group_size);
  const int64_t B = v.size(0), H = v.size(1), T = v.size(2), D = v.size(3), Gv = group_size;
  at::Tensor codes = at::empty({B, H, T, D * bits / 8}, v.options().dtype(at::kByte));
  at::Tensor scale = at::empty({B, H, T, D / Gv}, v.options().dtype(at::kHalf));
  at::Tensor zero = at::empty({B, H, T, D / Gv}, v.options().dtype(at::kHalf));
  uint8_t* codes_p = codes.data_ptr<uint8_t>();  // [B, H, T, D*bits/8]
  uint16_t* scale_p = half_bits(scale);           // [B, H, T, D/Gv]
  uint16_t* zero_p = half_bits(zero);             // [B, H, T, D/Gv]
  const int64_t row_bytes = D * bits / 8;
  HEADQ_DISPATCH_FLOAT(v.scalar_type(), "quantize_values", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();  // [B, H, T, D] strided
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        cpu::quantize_values_slice<scalar_t>(
            v_p + b * v.stride(0) + h * v.stride(1), v.stride(2), v.stride(3), T, D, Gv,
            static_cast<int>(bits), codes_p + bh * T * row_bytes, scale_p + bh * T * (D / Gv),
            zero_p + bh * T * (D / Gv));
      }
    });
  });
  return {codes, scale, zero};
}

void dequantize_values_fill(const at::Tensor& codes_in,  // [B, H, T, D*bits/8] uint8
                            const at::Tensor& scale_in,  // [B, H, T, D/Gv] f16
                            const at::Tensor& zero_in,   // [B, H, T, D/Gv] f16
                            int64_t bits, int64_t group_size, const at::Tensor& out) {
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t row_bytes = codes.size(3), D = row_bytes * 8 / bits, Gv = group_size;
  const uint8_t* codes_p = codes.const_data_ptr<uint8_t>();
  const uint16_t* scale_p = half_bits(scale);
  const uint16_t* zero_p = half_bits(zero);
  HEADQ_DISPATCH_FLOAT(out.scalar_type(), "dequantize_values", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        cpu::dequantize_values_slice<scalar_t>(codes_p + bh * T * row_bytes,
                                               scale_p + bh * T * (D / Gv),
                                               zero_p + bh * T * (D / Gv), T, D, Gv,
                                               static_cast<int>(bits),
                                               slab_of<scalar_t>(out, bh, H));
      }
    });
  });
}

at::Tensor dequantize_values_cpu(const at::Tensor& codes, const at::Tensor& scale,
                                 const at::Tensor& zero, int64_t bits, int64_t group_size,
                                 at::ScalarType out_dtype) {
  at::Tensor out = at::empty(validate_dequantize_values(codes, scale, zero, bits, group_size,
                                                        out_dtype),
                             codes.options().dtype(out_dtype));
  dequantize_values_fill(codes, scale, zero, bits, group_size, out);
  return out;
}

void dequantize_values_into_cpu(const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t bits, int64_t group_size,
                                const at::Tensor& out) {
  validate_dequantize_values_into(codes, scale, zero, bits, group_size, out);
  fill_out(out, [&](const at::Tensor& o) {
    dequantize_values_fill(codes, scale, zero, bits, group_size, o);
  });
}

std::tuple<at::Tensor, at::Tensor> side_code_cpu(
    const at::Tensor& k,           // [B, H, T, D] any strides
    const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8] uint8
    const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
    const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
    const at::Tensor& basis_in,    // [H, D, r] f32
    int64_t key_bits, int64_t group_size, int64_t side_bits, bool center) {
  validate_side_code(k, k_codes_in, k_scale_in, k_zero_in, basis_in, key_bits, group_size,
                     side_bits, center);
  const at::Tensor k_codes = k_codes_in.contiguous();
  const at::Tensor k_scale = k_scale_in.contiguous();
  const at::Tensor k_zero = k_zero_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const int64_t G = group_size, r = basis.size(2);
  const int64_t k_row_bytes = D * key_bits / 8, z_row_bytes = r * side_bits / 8;
  at::Tensor z_codes = at::empty({B, H, T, z_row_bytes}, k.options().dtype(at::kByte));
  at::Tensor z_scale = at::empty({B, H, T}, k.options().dtype(at::kHalf));
  const uint8_t* kc_p = k_codes.const_data_ptr<uint8_t>();
  const uint16_t* ks_p = half_bits(k_scale);
  const uint16_t* kz_p = half_bits(k_zero);
  const float* u_p = basis.const_data_ptr<float>();  // [H, D, r]
  uint8_t* zc_p = z_codes.data_ptr<uint8_t>();       // [B, H, T, r*side_bits/8]
  uint16_t* zs_p = half_bits(z_scale);               // [B, H, T]
  HEADQ_DISPATCH_FLOAT(k.scalar_type(), "side_code", [&] {
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();  // [B, H, T, D] strided
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        cpu::side_code_slice<scalar_t>(
            k_p + b * k.stride(0) + h * k.stride(1), k.stride(2), k.stride(3),
            kc_p + bh * T * k_row_bytes, ks_p + bh * (T / G) * D, kz_p + bh * (T / G) * D,
            u_p + h * D * r, T, D, r, G, static_cast<int>(key_bits), static_cast<int>(side_bits),
            center, zc_p + bh * T * z_row_bytes, zs_p + bh * T);
      }
    });
  });
  return {z_codes, z_scale};
}

at::Tensor dequantize_side_cpu(const at::Tensor& z_codes_in,  // [B, H, T, r*side_bits/8]
                               const at::Tensor& z_scale_in,  // [B, H, T] f16
                               int64_t side_bits) {
  validate_dequantize_side(z_codes_in, z_scale_in, side_bits);
  const at::Tensor z_codes = z_codes_in.contiguous();
  const at::Tensor z_scale = z_scale_in.contiguous();
  const int64_t B = z_codes.size(0), H = z_codes.size(1), T = z_codes.size(2);
  const int64_t row_bytes = z_codes.size(3), r = row_bytes * 8 / side_bits;
  at::Tensor out = at::empty({B, H, T, r}, z_codes.options().dtype(at::kFloat));
  const uint8_t* zc_p = z_codes.const_data_ptr<uint8_t>();
  const uint16_t* zs_p = half_bits(z_scale);
  float* out_p = out.data_ptr<float>();  // [B, H, T, r]
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      cpu::dequant_side_rows(zc_p + bh * T * row_bytes, zs_p + bh * T, r,
                             static_cast<int>(side_bits), 0, T, out_p + bh * T * r);
    }
  });
  return out;
}

void reconstruct_keys_fill(const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8] uint8
                           const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
                           const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
                           const at::Tensor& z_codes_in,  // [B, H, T, r*side_bits/8] uint8
                           const at::Tensor& z_scale_in,  // [B, H, T] f16
                           const at::Tensor& basis_in,    // [H, D, r] f32
                           int64_t key_bits, int64_t group_size, int64_t side_bits, double sign,
                           const at::Tensor& out) {
  const at::Tensor codes = k_codes_in.contiguous();
  const at::Tensor scale = k_scale_in.contiguous();
  const at::Tensor zero = k_zero_in.contiguous();
  const at::Tensor z_codes = z_codes_in.contiguous();
  const at::Tensor z_scale = z_scale_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t row_bytes = codes.size(3), D = row_bytes * 8 / key_bits, G = group_size;
  const int64_t z_row_bytes = z_codes.size(3), r = basis.size(2);
  const uint8_t* codes_p = codes.const_data_ptr<uint8_t>();
  const uint16_t* scale_p = half_bits(scale);
  const uint16_t* zero_p = half_bits(zero);
  const uint8_t* zc_p = z_codes.const_data_ptr<uint8_t>();
  const uint16_t* zs_p = half_bits(z_scale);
  const float* u_p = basis.const_data_ptr<float>();
  HEADQ_DISPATCH_FLOAT(out.scalar_type(), "reconstruct_keys", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        cpu::reconstruct_keys_slice<scalar_t>(
            codes_p + bh * T * row_bytes, scale_p + bh * (T / G) * D, zero_p + bh * (T / G) * D,
            zc_p + bh * T * z_row_bytes, zs_p + bh * T, u_p + (bh % H) * D * r, T, D, G,
            static_cast<int>(key_bits), r, static_cast<int>(side_bits),
            static_cast<float>(sign), slab_of<scalar_t>(out, bh, H));
      }
    });
  });
}

at::Tensor reconstruct_keys_cpu(const at::Tensor& k_codes, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& z_codes,
                                const at::Tensor& z_scale, const at::Tensor& basis,
                                int64_t key_bits, int64_t group_size, int64_t side_bits,
                                double sign, at::ScalarType out_dtype) {
  at::Tensor out = at::empty(validate_reconstruct_keys(k_codes, k_scale, k_zero, z_codes,
                                                       z_scale, basis, key_bits, group_size,
                                                       side_bits, sign, out_dtype),
                             k_codes.options().dtype(out_dtype));
  reconstruct_keys_fill(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits, group_size,
                        side_bits, sign, out);
  return out;
}

void reconstruct_keys_into_cpu(const at::Tensor& k_codes, const at::Tensor& k_scale,
                               const at::Tensor& k_zero, const at::Tensor& z_codes,
                               const at::Tensor& z_scale, const at::Tensor& basis,
                               int64_t key_bits, int64_t group_size, int64_t side_bits,
                               double sign, const at::Tensor& out) {
  validate_reconstruct_keys_into(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                                 group_size, side_bits, sign, out);
  fill_out(out, [&](const at::Tensor& o) {
    reconstruct_keys_fill(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                          group_size, side_bits, sign, o);
  });
}

// The three quantisers in one call; on the CPU exactly their composition (the CUDA op fuses
// them into one kernel that reads k once, with the same results bit for bit).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
quantize_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& basis,
                int64_t key_bits, int64_t group_size, int64_t side_bits, bool center,
                int64_t value_bits, int64_t value_group_size) {
  validate_quantize_kv(k, v, basis, key_bits, group_size, side_bits, center, value_bits,
                       value_group_size);
  auto [kc, ks, kz] = quantize_keys_cpu(k, key_bits, group_size);
  auto [zc, zs] = side_code_cpu(k, kc, ks, kz, basis, key_bits, group_size, side_bits, center);
  auto [vc, vs, vz] = quantize_values_cpu(v, value_bits, value_group_size);
  return {kc, ks, kz, zc, zs, vc, vs, vz};
}

}  // namespace
}  // namespace headq

TORCH_LIBRARY_IMPL(headq, CPU, m) {
  m.impl("quantize_kv", &headq::quantize_kv_cpu);
  m.impl("quantize_keys", &headq::quantize_keys_cpu);
  m.impl("dequantize_keys", &headq::dequantize_keys_cpu);
  m.impl("quantize_values", &headq::quantize_values_cpu);
  m.impl("dequantize_values", &headq::dequantize_values_cpu);
  m.impl("side_code", &headq::side_code_cpu);
  m.impl("dequantize_side", &headq::dequantize_side_cpu);
  m.impl("reconstruct_keys", &headq::reconstruct_keys_cpu);
  m.impl("dequantize_keys_into", &headq::dequantize_keys_into_cpu);
  m.impl("dequantize_values_into", &headq::dequantize_values_into_cpu);
  m.impl("reconstruct_keys_into", &headq::reconstruct_keys_into_cpu);
}

