// ATen host wrappers of the headq CUDA kernels and their registration for the CUDA dispatch
// key. Each wrapper validates its arguments (validate.h), sets the device guard, allocates the
// outputs, and launches the torch-free kernels of quant_kernels.cu / decode_kernels.cu on the
// current stream, checking every launch. No kernel code lives here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "launch.cuh"
#include "validate.h"

namespace headq {
namespace {

using cuda::DType;

DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, ", expected float32, float16 or bfloat16");
  }
}

// The tensor itself when its layout suits the decode kernel, else a contiguous 16-byte aligned
// copy. rows: the last two dims must form contiguous [T, R] rows per (b, h) (packed streams,
// copied as one byte range per tile); otherwise every leading stride must be 16-byte aligned
// (dense rows read with 16-byte vectors). The last dim is always unit-stride.
at::Tensor decode_ready(const at::Tensor& t, bool rows) {
  if (t.numel() == 0) return t;
  const int64_t es = t.element_size();
  const int nd = static_cast<int>(t.dim());
  bool ok = t.stride(nd - 1) == 1 || t.size(nd - 1) <= 1;
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (rows) ok = ok && (t.size(nd - 2) <= 1 || t.stride(nd - 2) == t.size(nd - 1));
  const int lead = rows ? nd - 2 : nd - 1;
  for (int d = 0; d < lead; ++d) ok = ok && (t.size(d) <= 1 || (t.stride(d) * es) % 16 == 0);
  if (ok) return t;
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = t.clone(at::MemoryFormat::Contiguous);
  return c;
}

// Base pointer and byte strides of dims 0, 1, 2 (those that exist).
cuda::Strided strided(const at::Tensor& t) {
  cuda::Strided s;
  if (t.numel() == 0) return s;
  const int64_t es = t.element_size();
  s.p = static_cast<const char*>(t.data_ptr());
  s.sb = t.stride(0) * es;
  s.sh = t.dim() > 1 ? t.stride(1) * es : 0;
  s.st = t.dim() > 2 ? t.stride(2) * es : es;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_keys_cuda(
    const at::Tensor& k,  // [B, H, T, D] any strides
    int64_t bits, int64_t group_size) {
  validate_quantize_keys(k, bits, group_size);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), G = group_size;
  at::Tensor codes = at::empty({B, H, T, D * bits / 8}, k.options().dtype(at::kByte));
  at::Tensor scale = at::empty({B, H, T / G, D}, k.options().dtype(at::kHalf));
  at::Tensor zero = at::empty({B, H, T / G, D}, k.options().dtype(at::kHalf));
  const cudaError_t err = cuda::launch_quantize_keys(
      k.data_ptr(), dtype_of(k.scalar_type(), "quantize_keys"), k.stride(0), k.stride(1),
      k.stride(2), k.stride(3), B, H, T, D, static_cast<int>(bits), static_cast<int>(G),
      codes.data_ptr<uint8_t>(), scale.data_ptr(), zero.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

// The three dequantising ops write into `out` [B, H, T, D] (validated) of any strides (the
// kernels take them): their functional forms into a fresh tensor, their *_into forms into the
// caller's.
cuda::OutTensor out_tensor(const at::Tensor& out) {
  return {out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
}

// A packed input as the kernels read it (cuda::InSlabs): in place where its token rows are
// contiguous within each (b, h) slab and the slabs evenly spaced (b * H + h at that times one
// stride: a token slice of the cache's buffers), else a contiguous copy. The tensor to read and
// its slab stride in elements.
std::pair<at::Tensor, int64_t> slabs_of(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2);
  const int64_t R = x.dim() == 4 ? x.size(3) : 1;  // elements per token row
  const bool rows = (R == 1 || x.stride(3) == 1) && (T == 1 || x.stride(2) == R);
  const bool even = B == 1 || H == 1 || x.stride(0) == H * x.stride(1);
  const int64_t sh = H > 1 ? x.stride(1) : (B > 1 ? x.stride(0) : T * R);
  if (rows && even && sh >= 0) return {x, sh};
  return {x.contiguous(), T * R};
}

// scale and zero of one op share a slab stride: both in place, or both copied.
std::tuple<at::Tensor, at::Tensor, int64_t> scale_zero_slabs(const at::Tensor& scale,
                                                             const at::Tensor& zero) {
  auto [s, ss] = slabs_of(scale);
  auto [z, zs] = slabs_of(zero);
  if (ss == zs) return {s, z, ss};
  return {scale.contiguous(), zero.contiguous(), scale.size(2) * scale.size(3)};
}

void dequantize_keys_fill(const at::Tensor& codes_in,  // [B, H, T, D*bits/8] uint8
                          const at::Tensor& scale_in,  // [B, H, T/G, D] f16
                          const at::Tensor& zero_in,   // [B, H, T/G, D] f16
                          int64_t bits, int64_t group_size, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const auto [codes, csh] = slabs_of(codes_in);
  const auto [scale, zero, ssh] = scale_zero_slabs(scale_in, zero_in);
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t D = codes.size(3) * 8 / bits;
  const cudaError_t err = cuda::launch_dequantize_keys(
      codes.const_data_ptr<uint8_t>(), scale.const_data_ptr(), zero.const_data_ptr(),
      {csh, ssh, 0, 0}, B, H, T, D,
      static_cast<int>(bits), static_cast<int>(group_size), out_tensor(out),
      dtype_of(out.scalar_type(), "dequantize_keys"), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_keys_cuda(const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t bits, int64_t group_size,
                                at::ScalarType out_dtype) {
  at::Tensor out = at::empty(
      validate_dequantize_keys(codes, scale, zero, bits, group_size, out_dtype),
      codes.options().dtype(out_dtype));
  dequantize_keys_fill(codes, scale, zero, bits, group_size, out);
  return out;
}

void dequantize_keys_into_cuda(const at::Tensor& codes, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               const at::Tensor& out) {
  validate_dequantize_keys_into(codes, scale, zero, bits, group_size, out);
  dequantize_keys_fill(codes, scale, zero, bits, group_size, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cuda(
    const at::Tensor& v,  // [B, H, T, D] any strides
    int64_t bits, int64_t group_size) {
  validate_quantize_values(v, bits, group_size);
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t B = v.size(0), H = v.size(1), T = v.size(2), D = v.size(3), Gv = group_size;
  at::Tensor codes = at::empty({B, H, T, D * bits / 8}, v.options().dtype(at::kByte));
  at::Tensor scale = at::empty({B, H, T, D / Gv}, v.options().dtype(at::kHalf));
  at::Tensor zero = at::empty({B, H, T, D / Gv}, v.options().dtype(at::kHalf));
  const cudaError_t err = cuda::launch_quantize_values(
      v.data_ptr(), dtype_of(v.scalar_type(), "quantize_values"), v.stride(0), v.stride(1),
      v.stride(2), v.stride(3), B, H, T, D, static_cast<int>(bits), static_cast<int>(Gv),
      codes.data_ptr<uint8_t>(), scale.data_ptr(), zero.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

void dequantize_values_fill(const at::Tensor& codes_in,  // [B, H, T, D*bits/8] uint8
                            const at::Tensor& scale_in,  // [B, H, T, D/Gv] f16
                            const at::Tensor& zero_in,   // [B, H, T, D/Gv] f16
                            int64_t bits, int64_t group_size, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const auto [codes, csh] = slabs_of(codes_in);
  const auto [scale, zero, ssh] = scale_zero_slabs(scale_in, zero_in);
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t D = codes.size(3) * 8 / bits;
  const cudaError_t err = cuda::launch_dequantize_values(
      codes.const_data_ptr<uint8_t>(), scale.const_data_ptr(), zero.const_data_ptr(),
      {csh, ssh, 0, 0}, B, H, T, D,
      static_cast<int>(bits), static_cast<int>(group_size), out_tensor(out),
      dtype_of(out.scalar_type(), "dequantize_values"), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_values_cuda(const at::Tensor& codes, const at::Tensor& scale,
                                  const at::Tensor& zero, int64_t bits, int64_t group_size,
                                  at::ScalarType out_dtype) {
  at::Tensor out = at::empty(
      validate_dequantize_values(codes, scale, zero, bits, group_size, out_dtype),
      codes.options().dtype(out_dtype));
  dequantize_values_fill(codes, scale, zero, bits, group_size, out);
  return out;
}

void dequantize_values_into_cuda(const at::Tensor& codes, const at::Tensor& scale,
                                 const at::Tensor& zero, int64_t bits, int64_t group_size,
                                 const at::Tensor& out) {
  validate_dequantize_values_into(codes, scale, zero, bits, group_size, out);
  dequantize_values_fill(codes, scale, zero, bits, group_size, out);
}

std::tuple<at::Tensor, at::Tensor> side_code_cuda(
    const at::Tensor& k,          // [B, H, T, D] any strides
    const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8] uint8
    const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
    const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
    const at::Tensor& basis_in,    // [H, D, r] f32
    int64_t key_bits, int64_t group_size, int64_t side_bits, bool center) {
  validate_side_code(k, k_codes_in, k_scale_in, k_zero_in, basis_in, key_bits, group_size,
                     side_bits, center);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor k_codes = k_codes_in.contiguous();
  const at::Tensor k_scale = k_scale_in.contiguous();
  const at::Tensor k_zero = k_zero_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const int64_t r = basis.size(2);
  at::Tensor z_codes = at::empty({B, H, T, r * side_bits / 8}, k.options().dtype(at::kByte));
  at::Tensor z_scale = at::empty({B, H, T}, k.options().dtype(at::kHalf));
  const cudaError_t err = cuda::launch_side_code(
      k.data_ptr(), dtype_of(k.scalar_type(), "side_code"), k.stride(0), k.stride(1), k.stride(2),
      k.stride(3), k_codes.const_data_ptr<uint8_t>(), k_scale.const_data_ptr(),
      k_zero.const_data_ptr(), basis.const_data_ptr<float>(), B, H, T, D, r,
      static_cast<int>(key_bits), static_cast<int>(group_size), static_cast<int>(side_bits), center,
      z_codes.data_ptr<uint8_t>(), z_scale.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z_codes, z_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
quantize_kv_cuda(const at::Tensor& k,         // [B, H, T, D] any strides
                 const at::Tensor& v,         // [B, H, T, D] any strides, k's dtype
                 const at::Tensor& basis_in,  // [H, D, r] f32
                 int64_t key_bits, int64_t group_size, int64_t side_bits, bool center,
                 int64_t value_bits, int64_t value_group_size) {
  validate_quantize_kv(k, v, basis_in, key_bits, group_size, side_bits, center, value_bits,
                       value_group_size);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const int64_t G = group_size, Gv = value_group_size, r = basis.size(2);
  const auto u8 = k.options().dtype(at::kByte), f16 = k.options().dtype(at::kHalf);
  at::Tensor kc = at::empty({B, H, T, D * key_bits / 8}, u8);
  at::Tensor ks = at::empty({B, H, T / G, D}, f16);
  at::Tensor kz = at::empty({B, H, T / G, D}, f16);
  at::Tensor zc = at::empty({B, H, T, r * side_bits / 8}, u8);
  at::Tensor zs = at::empty({B, H, T}, f16);
  at::Tensor vc = at::empty({B, H, T, D * value_bits / 8}, u8);
  at::Tensor vs = at::empty({B, H, T, D / Gv}, f16);
  at::Tensor vz = at::empty({B, H, T, D / Gv}, f16);
  const int64_t kst[4] = {k.stride(0), k.stride(1), k.stride(2), k.stride(3)};
  const int64_t vst[4] = {v.stride(0), v.stride(1), v.stride(2), v.stride(3)};
  const cudaError_t err = cuda::launch_quantize_kv(
      k.data_ptr(), v.data_ptr(), dtype_of(k.scalar_type(), "quantize_kv"), kst, vst,
      basis.const_data_ptr<float>(), B, H, T, D, r, static_cast<int>(key_bits),
      static_cast<int>(G), static_cast<int>(side_bits), center, static_cast<int>(value_bits),
      static_cast<int>(Gv), kc.data_ptr<uint8_t>(), ks.data_ptr(), kz.data_ptr(),
      zc.data_ptr<uint8_t>(), zs.data_ptr(), vc.data_ptr<uint8_t>(), vs.data_ptr(), vz.data_ptr(),
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
      at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kc, ks, kz, zc, zs, vc, vs, vz};
}

at::Tensor dequantize_side_cuda(const at::Tensor& z_codes_in,  // [B, H, T, r*side_bits/8] uint8
                                const at::Tensor& z_scale_in,  // [B, H, T] f16
                                int64_t side_bits) {
  validate_dequantize_side(z_codes_in, z_scale_in, side_bits);
  const c10::cuda::CUDAGuard guard(z_codes_in.device());
  const at::Tensor z_codes = z_codes_in.contiguous();
  const at::Tensor z_scale = z_scale_in.contiguous();
  const int64_t r = 8 * z_codes.size(-1) / side_bits;
  std::vector<int64_t> shape(z_scale.sizes().begin(), z_scale.sizes().end());
  shape.push_back(r);
  at::Tensor out = at::empty(shape, z_codes.options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_dequantize_side(
      z_codes.const_data_ptr<uint8_t>(), z_scale.const_data_ptr(), z_scale.numel(), r,
      static_cast<int>(side_bits), out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void reconstruct_keys_fill(const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8] u8
                           const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
                           const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
                           const at::Tensor& z_codes_in,  // [B, H, T, r*side_bits/8] u8
                           const at::Tensor& z_scale_in,  // [B, H, T] f16
                           const at::Tensor& basis_in,    // [H, D, r] f32
                           int64_t key_bits, int64_t group_size, int64_t side_bits, double sign,
                           const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(k_codes_in.device());
  const auto [codes, csh] = slabs_of(k_codes_in);
  const auto [scale, zero, ssh] = scale_zero_slabs(k_scale_in, k_zero_in);
  const auto [z_codes, zsh] = slabs_of(z_codes_in);
  const auto [z_scale, zssh] = slabs_of(z_scale_in);
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t D = codes.size(3) * 8 / key_bits, r = basis.size(2);
  const cudaError_t err = cuda::launch_reconstruct_keys(
      codes.const_data_ptr<uint8_t>(), scale.const_data_ptr(), zero.const_data_ptr(),
      z_codes.const_data_ptr<uint8_t>(), z_scale.const_data_ptr(), basis.const_data_ptr<float>(),
      {csh, ssh, zsh, zssh}, B, H, T, D, static_cast<int>(key_bits), static_cast<int>(group_size), r,
      static_cast<int>(side_bits), static_cast<float>(sign), out_tensor(out),
      dtype_of(out.scalar_type(), "reconstruct_keys"), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor reconstruct_keys_cuda(const at::Tensor& k_codes, const at::Tensor& k_scale,
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

void reconstruct_keys_into_cuda(const at::Tensor& k_codes, const at::Tensor& k_scale,
                                const at::Tensor& k_zero, const at::Tensor& z_codes,
                                const at::Tensor& z_scale, const at::Tensor& basis,
                                int64_t key_bits, int64_t group_size, int64_t side_bits,
                                double sign, const at::Tensor& out) {
  validate_reconstruct_keys_into(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                                 group_size, side_bits, sign, out);
  reconstruct_keys_fill(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits, group_size,
                        side_bits, sign, out);
}

at::Tensor corrected_logits_cuda(const at::Tensor& q_in,        // [B, Hq, L, D]
                                 const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8] uint8
                                 const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
                                 const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
                                 const std::optional<at::Tensor>& z_codes_in,  // [B, H, T, r*bz/8]
                                 const std::optional<at::Tensor>& z_scale_in,  // [B, H, T] f16
                                 const std::optional<at::Tensor>& basis_in,    // [H, D, r] f32
                                 int64_t key_bits, int64_t group_size, int64_t side_bits,
                                 double sign, double scale) {
  validate_corrected_logits(q_in, k_codes_in, k_scale_in, k_zero_in, z_codes_in, z_scale_in,
                            basis_in, key_bits, group_size, side_bits, sign, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k_codes = k_codes_in.contiguous();
  const at::Tensor k_scale = k_scale_in.contiguous();
  const at::Tensor k_zero = k_zero_in.contiguous();
  const bool side = z_codes_in.has_value();
  const at::Tensor z_codes = side ? z_codes_in->contiguous() : at::Tensor();
  const at::Tensor z_scale = side ? z_scale_in->contiguous() : at::Tensor();
  const at::Tensor basis = side ? basis_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t H = k_codes.size(1), T = k_codes.size(2);
  const int64_t r = side ? basis.size(2) : 0;
  at::Tensor out = at::empty({B, Hq, L, T}, q.options().dtype(at::kFloat));
  at::Tensor qu = side ? at::empty({B, Hq, L, r}, q.options().dtype(at::kFloat)) : at::Tensor();
  const cudaError_t err = cuda::launch_corrected_logits(
      q.const_data_ptr(), dtype_of(q.scalar_type(), "corrected_logits"),
      k_codes.const_data_ptr<uint8_t>(), k_scale.const_data_ptr(), k_zero.const_data_ptr(),
      side ? z_codes.const_data_ptr<uint8_t>() : nullptr, side ? z_scale.const_data_ptr() : nullptr,
      side ? basis.const_data_ptr<float>() : nullptr, B, H, Hq, L, T, D, r,
      static_cast<int>(key_bits), static_cast<int>(group_size), static_cast<int>(side_bits),
      static_cast<float>(sign), static_cast<float>(scale), side ? qu.data_ptr<float>() : nullptr,
      out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q_in,                          // [B, Hq, D]
    const at::Tensor& k_codes_in,                    // [B, H, Tq, D*key_bits/8] uint8
    const at::Tensor& k_scale_in,                    // [B, H, Tq/G, D] f16
    const at::Tensor& k_zero_in,                     // [B, H, Tq/G, D] f16
    const std::optional<at::Tensor>& z_codes_in,     // [B, H, Tq, r*bz/8] uint8
    const std::optional<at::Tensor>& z_scale_in,     // [B, H, Tq] f16
    const std::optional<at::Tensor>& basis_in,       // [H, D, r] f32
    const std::optional<at::Tensor>& v_codes_in,     // [B, H, Tq, D*value_bits/8] uint8
    const std::optional<at::Tensor>& v_scale_in,     // [B, H, Tq, D/Gv] f16
    const std::optional<at::Tensor>& v_zero_in,      // [B, H, Tq, D/Gv] f16
    const std::optional<at::Tensor>& v_dense_in,     // [B, H, Tq, D] q.dtype
    const std::optional<at::Tensor>& heavy_delta_in,  // [B, H, K, D] q.dtype
    const std::optional<at::Tensor>& heavy_idx_in,   // [B, H, K] int32
    const at::Tensor& k_window_in,                   // [B, H, W, D] q.dtype
    const at::Tensor& v_window_in,                   // [B, H, W, D] q.dtype
    const at::Tensor& n_quant_in,                    // [B] int32
    const at::Tensor& n_window_in,                   // [B] int32
    const std::optional<at::Tensor>& kv_start_in,    // [B] int32
    int64_t key_bits, int64_t group_size, int64_t side_bits, int64_t value_bits,
    int64_t value_group_size, double sign, double scale,
    const std::optional<at::Tensor>& heavy_logits,  // [B, Hq, K] float32, written
    int64_t query_tokens) {
  validate_decode_attention(q_in, k_codes_in, k_scale_in, k_zero_in, z_codes_in, z_scale_in,
                            basis_in, v_codes_in, v_scale_in, v_zero_in, v_dense_in,
                            heavy_delta_in, heavy_idx_in, k_window_in, v_window_in, n_quant_in,
                            n_window_in, kv_start_in, key_bits, group_size, side_bits, value_bits,
                            value_group_size, sign, scale, heavy_logits, query_tokens);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t H = k_codes_in.size(1), Tq = k_codes_in.size(2), W = k_window_in.size(2);
  TORCH_CHECK(D == 64 || D == 128, "decode_attention (CUDA): head dim must be 64 or 128, got ", D,
              " (the fused kernel is specialised on the head dim; use the CPU op otherwise)");
  TORCH_CHECK(Tq <= INT32_MAX && W <= INT32_MAX && B <= 65535 && Hq <= 65535,
              "decode_attention (CUDA): shape too large for the launch grid");

  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k_codes = decode_ready(k_codes_in, true);
  const at::Tensor k_scale = decode_ready(k_scale_in, true);
  const at::Tensor k_zero = decode_ready(k_zero_in, true);
  const bool side = z_codes_in.has_value();
  const at::Tensor z_codes = side ? decode_ready(*z_codes_in, true) : at::Tensor();
  const at::Tensor z_scale = side ? decode_ready(*z_scale_in, false) : at::Tensor();
  const at::Tensor basis = side ? basis_in->contiguous() : at::Tensor();
  const bool vcodes = v_codes_in.has_value();
  const at::Tensor v_codes = vcodes ? decode_ready(*v_codes_in, true) : at::Tensor();
  const at::Tensor v_scale = vcodes ? decode_ready(*v_scale_in, true) : at::Tensor();
  const at::Tensor v_zero = vcodes ? decode_ready(*v_zero_in, true) : at::Tensor();
  const at::Tensor v_dense = vcodes ? at::Tensor() : decode_ready(*v_dense_in, false);
  const bool heavy = heavy_delta_in.has_value() && heavy_delta_in->numel() > 0;
  const at::Tensor heavy_delta = heavy ? decode_ready(*heavy_delta_in, false) : at::Tensor();
  const at::Tensor heavy_idx = heavy ? heavy_idx_in->contiguous() : at::Tensor();
  const at::Tensor k_window = decode_ready(k_window_in, false);
  const at::Tensor v_window = decode_ready(v_window_in, false);
  const at::Tensor n_quant = n_quant_in.contiguous();
  const at::Tensor n_window = n_window_in.contiguous();
  const at::Tensor kv_start = kv_start_in.has_value() ? kv_start_in->contiguous() : at::Tensor();

  cuda::DecodeParams p{};
  p.q = strided(q);
  p.k_codes = strided(k_codes);
  p.k_scale = strided(k_scale);
  p.k_zero = strided(k_zero);
  if (side) {
    p.z_codes = strided(z_codes);
    p.z_scale = strided(z_scale);
    p.basis = basis.const_data_ptr<float>();
  }
  if (vcodes) {
    p.v_codes = strided(v_codes);
    p.v_scale = strided(v_scale);
    p.v_zero = strided(v_zero);
  } else {
    p.v_dense = strided(v_dense);
  }
  if (heavy) {
    p.heavy_delta = strided(heavy_delta);
    p.heavy_idx = heavy_idx.const_data_ptr<int32_t>();
    p.K = static_cast<int>(heavy_idx.size(2));
    if (heavy_logits.has_value()) {  // -inf unless the heavy kernel writes a visible slot's logit
      at::Tensor hl = *heavy_logits;
      hl.fill_(-std::numeric_limits<float>::infinity());
      p.heavy_logits = hl.data_ptr<float>();
    }
  }
  p.k_window = strided(k_window);
  p.v_window = strided(v_window);
  p.n_quant = n_quant.const_data_ptr<int32_t>();
  p.n_window = n_window.const_data_ptr<int32_t>();
  p.kv_start = kv_start.defined() ? kv_start.const_data_ptr<int32_t>() : nullptr;
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Hq = static_cast<int>(Hq);
  p.D = static_cast<int>(D);
  p.ratio = static_cast<int>(Hq / H);
  p.Tq = static_cast<int>(Tq);
  p.W = static_cast<int>(W);
  p.kbits = static_cast<int>(key_bits);
  p.G = static_cast<int>(group_size);
  p.zbits = static_cast<int>(side_bits);
  p.r = side ? static_cast<int>(basis.size(2)) : 0;
  p.vbits = static_cast<int>(value_bits);
  p.Gv = static_cast<int>(value_group_size);
  p.dtype = dtype_of(q.scalar_type(), "decode_attention");
  p.sign = static_cast<float>(sign);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.qtok = static_cast<int>(query_tokens);  // <= Hq (validated)

  // Tensor-core kernel where it applies (decode_mma.cu), the SIMT kernel otherwise.
  // HEADQ_DECODE_IMPL=simt forces the SIMT kernel (A/B runs); mma (or unset) is the default.
  const char* impl = std::getenv("HEADQ_DECODE_IMPL");
  const bool force_simt = impl != nullptr && std::strcmp(impl, "simt") == 0;
  const bool use_mma = !force_simt && cuda::decode_mma_supported(p);
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cuda::DecodePlan plan{};
  if (use_mma) {
    // HEADQ_MMA_VARIANT (base | ring4 | ring5 | lean, unset: default) picks the tensor-core kernel's
    // configuration; read at every call like HEADQ_DECODE_IMPL so that one process can A/B them.
    const char* vname = std::getenv("HEADQ_MMA_VARIANT");
    const int variant = cuda::decode_mma_variant(vname);
    TORCH_CHECK(variant >= 0, "decode_attention (CUDA): unknown HEADQ_MMA_VARIANT '",
                vname != nullptr ? vname : "", "' (expected base, ring4, ring5, lean or default)");
    C10_CUDA_CHECK(cuda::plan_decode_mma(p, sm_count, variant, &plan));
  } else {
    C10_CUDA_CHECK(cuda::plan_decode_attention(p, sm_count, &plan));
  }
  p.nchunk = plan.nchunk;
  p.Sq = plan.Sq;
  p.Sw = plan.Sw;  // 0 when the tensor-core splits attend the window (plan.win_mma)
  p.wchunk = plan.wchunk;
  p.win_mma = plan.win_mma;
  // SIMT plan: the window and heavy-slot splits of the tensor-core path use its head chunking.
  cuda::DecodePlan splan = plan;
  if (use_mma && (p.Sw > 0 || p.K > 0)) C10_CUDA_CHECK(cuda::plan_decode_attention(p, sm_count, &splan));
  // heavy-slot splits after the window's (A² policy), over the heavy kernel's rows of blocks
  // (batch x KV heads x the SIMT plan's head chunks); chunks of 32 while 4 blocks per SM hold
  // them all (the heavy kernel's blocks are 128 threads of <= 128 registers)
  const HeavyPlan hplan = plan_heavy(p.K, static_cast<int64_t>(B) * p.H * splan.nchunk,
                                     4 * static_cast<int64_t>(sm_count));
  p.Sh = hplan.Sh;
  p.hchunk = hplan.hchunk;
  p.S = p.Sq + p.Sw + p.Sh;

  at::Tensor out = at::empty({B, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  at::Tensor part_acc = at::empty({B, Hq, p.S, D}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({B, Hq, p.S, 2}, q.options().dtype(at::kFloat));
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The kernels after the first split kernel are programmatic dependents (sm_90+): the window
  // and heavy-slot splits run in the slots the tensor-core splits leave free as they finish, the
  // combine is scheduled early and waits for both on the device (HEADQ_PDL=0: plain launches).
  const bool pdl = cuda::decode_pdl_enabled(at::cuda::getCurrentDeviceProperties()->major);
  cuda::DecodeParams ps = p;
  ps.nchunk = splan.nchunk;
  if (use_mma) {
    C10_CUDA_CHECK(cuda::launch_decode_mma(p, plan, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.Sw > 0) {  // dense-window splits Sq .. Sq + Sw - 1: SIMT kernel
      ps.split0 = p.Sq;
      C10_CUDA_CHECK(cuda::launch_decode_split(ps, splan, stream, pdl));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    C10_CUDA_CHECK(cuda::launch_decode_split(p, plan, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.Sh > 0) {  // heavy-slot splits Sq + Sw .. S-1 (A² value policy)
    C10_CUDA_CHECK(cuda::launch_decode_heavy(ps, splan, sm_count, stream, pdl));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  C10_CUDA_CHECK(cuda::launch_decode_combine(p.part_acc, p.part_ml, B * Hq, p.S,
                                             static_cast<int>(D), out.data_ptr(),
                                             lse.data_ptr<float>(), p.dtype, p.q,
                                             static_cast<int>(Hq), stream, pdl));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> a2_weights_cuda(const at::Tensor& q_in,  // [B, Hq, L, D]
                                                   const at::Tensor& k_in,  // [B, H, T, D]
                                                   const std::optional<at::Tensor>& mask_in,
                                                   double scale,
                                                   const std::optional<at::Tensor>& lse_in) {
  validate_a2_weights(q_in, k_in, mask_in, scale, lse_in);
  const int64_t D = q_in.size(3);
  TORCH_CHECK(D == 64 || D == 128, "a2_weights: head_dim must be 64 or 128 on CUDA, got ", D);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
  const int64_t H = k.size(1), T = k.size(2);
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->stride(2) == 1 ? *mask_in : mask_in->contiguous();
  }
  const auto f32 = q.options().dtype(at::kFloat);
  // the row pass writes every row's lse; a given lse (the flash attention's) replaces that pass
  at::Tensor lse = lse_in.has_value() ? lse_in->clone(at::MemoryFormat::Contiguous)
                                      : at::empty({B, Hq, L}, f32);
  at::Tensor w = at::empty({B, H, T}, f32);
  // the kernels read the mask as bits: 1/8 of the bytes, one word per lane for 32 keys
  at::Tensor bits;
  if (mask.defined()) {
    const int64_t Bm = mask.size(0), nw = (T + 31) / 32;
    bits = at::empty({Bm, L, nw}, q.options().dtype(at::kInt));
    C10_CUDA_CHECK(cuda::launch_a2_mask_bits(
        mask.const_data_ptr<bool>(), Bm > 1 ? mask.stride(0) : 0, mask.stride(1), Bm, L, T,
        reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()), at::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const cudaError_t err = cuda::launch_a2_weights(
      q.const_data_ptr(), k.const_data_ptr(), dtype_of(q.scalar_type(), "a2_weights"),
      bits.defined() ? reinterpret_cast<const uint32_t*>(bits.const_data_ptr<int32_t>())
                     : nullptr,
      bits.defined() && bits.size(0) > 1 ? bits.stride(0) : 0, B, H, Hq, L, T, D,
      static_cast<float>(scale),
      lse.data_ptr<float>(), lse_in.has_value(), w.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, lse};
}

void a2_step_weights_cuda(const at::Tensor& q_in, const at::Tensor& k_window_in,
                          const at::Tensor& lse_in, const at::Tensor& n_quant_in,
                          const at::Tensor& n_window_in,
                          const std::optional<at::Tensor>& kv_start_in, double scale,
                          const at::Tensor& w_window,
                          const std::optional<at::Tensor>& heavy_logits_in,
                          const std::optional<at::Tensor>& heavy_w, int64_t query_tokens) {
  validate_a2_step_weights(q_in, k_window_in, lse_in, n_quant_in, n_window_in, kv_start_in,
                           scale, w_window, heavy_logits_in, heavy_w, query_tokens);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t H = k_window_in.size(1), W = k_window_in.size(2);
  TORCH_CHECK(cuda::a2_step_smem_bytes(Hq / H, D) <= 48 * 1024,
              "a2_step_weights (CUDA): query_heads per KV head x head_dim (", Hq / H, " x ", D,
              ") must fit 48 KB of float32 query rows");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_window_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor nq = n_quant_in.contiguous(), nw = n_window_in.contiguous();
  at::Tensor ks, hl;
  if (kv_start_in.has_value()) ks = kv_start_in->contiguous();
  if (heavy_logits_in.has_value()) hl = heavy_logits_in->contiguous();
  cuda::A2StepParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.dtype = dtype_of(q.scalar_type(), "a2_step_weights");
  p.lse = lse.const_data_ptr<float>();
  p.n_quant = nq.const_data_ptr<int32_t>();
  p.n_window = nw.const_data_ptr<int32_t>();
  p.kv_start = ks.defined() ? ks.const_data_ptr<int32_t>() : nullptr;
  p.w_window = w_window.data_ptr<float>();
  if (hl.defined()) {
    p.heavy_logits = hl.const_data_ptr<float>();
    p.heavy_w = heavy_w->data_ptr<float>();
    p.K = hl.size(2);
  }
  p.H = static_cast<int>(H);
  p.n_rep = static_cast<int>(Hq / H);
  p.D = static_cast<int>(D);
  p.W = static_cast<int>(W);
  p.scale = static_cast<float>(scale);
  p.qtok = static_cast<int>(query_tokens);
  C10_CUDA_CHECK(cuda::launch_a2_step(p, B, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace headq

TORCH_LIBRARY_IMPL(headq, CUDA, m) {
  m.impl("quantize_keys", &headq::quantize_keys_cuda);
  m.impl("dequantize_keys", &headq::dequantize_keys_cuda);
  m.impl("quantize_values", &headq::quantize_values_cuda);
  m.impl("dequantize_values", &headq::dequantize_values_cuda);
  m.impl("side_code", &headq::side_code_cuda);
  m.impl("quantize_kv", &headq::quantize_kv_cuda);
  m.impl("dequantize_side", &headq::dequantize_side_cuda);
  m.impl("reconstruct_keys", &headq::reconstruct_keys_cuda);
  m.impl("dequantize_keys_into", &headq::dequantize_keys_into_cuda);
  m.impl("dequantize_values_into", &headq::dequantize_values_into_cuda);
  m.impl("reconstruct_keys_into", &headq::reconstruct_keys_into_cuda);
  m.impl("corrected_logits", &headq::corrected_logits_cuda);
  m.impl("decode_attention", &headq::decode_attention_cuda);
  m.impl("a2_weights", &headq::a2_weights_cuda);
  m.impl("a2_step_weights", &headq::a2_step_weights_cuda);
}
