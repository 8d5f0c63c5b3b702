// CUDA kernels of the quantisation ops (quantize/dequantize keys and values, side code,
// dequantize_side, corrected_logits). Torch-free: raw pointers and strides in, launch error out.
//
// Codes, scales and zeros are bit-identical to docs/LAYOUT.md and the CPU path: all quantiser
// arithmetic goes through the separately rounded helpers of headq/quant.h (__fdiv_rn, rintf,
// __fmul_rn/__fadd_rn; never an FMA), and every reduction whose order is part of the contract
// (min/max ties, the centring mean, the side-code projection) runs in the documented order.
// None of these ops is on the decode hot path; they are written for exactness and clarity, with
// coalesced stores and enough parallelism (one block per key group, one warp per value group).

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "device_common.cuh"

namespace headq {
namespace cuda {
namespace {

constexpr int kThreads = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size of a grid-stride elementwise kernel (capped: the loop covers the rest).
unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 1 << 20)));
}

// Byte j of a packed row whose code i is code_of(i), for codes that may straddle bytes.
template <typename CodeFn>
__device__ __forceinline__ uint8_t pack_byte(int64_t j, int bits, int64_t n, CodeFn code_of) {
  uint32_t byte = 0;
  const int64_t c_lo = (8 * j) / bits;
  const int64_t c_last = (8 * j + 7) / bits;
  const int64_t c_hi = c_last < n - 1 ? c_last : n - 1;
  for (int64_t c = c_lo; c <= c_hi; ++c) {
    const uint32_t code = code_of(c);
    const int64_t shift = c * bits - 8 * j;  // -7 .. 7
    byte |= (shift >= 0) ? (code << shift) : (code >> (-shift));
  }
  return static_cast<uint8_t>(byte & 0xffu);
}

// ---------------------------------------------------------------------------------------------
// quantize_keys: one block per (b, h, key group). Thread c owns channel c for the min/max over
// the G tokens (sequential, ascending t: same tie/NaN behaviour as the CPU loop), then the
// block packs the group's G x D codes byte by byte (consecutive threads -> consecutive bytes).
// The exact min / max of one key channel over a group's G tokens: nan_min / nan_max in ascending
// token order, the CPU loop's order (kc: the channel's first element, st: token stride).
template <typename Elem>
__device__ __forceinline__ void channel_minmax_exact(const Elem* kc, int64_t st, int G,
                                                     float& mn, float& mx) {
  mn = to_float(kc[0]);
  mx = mn;
  for (int t = 1; t < G; ++t) {
    const float x = to_float(kc[t * st]);
    mn = nan_min(mn, x);
    mx = nan_max(mx, x);
  }
}

template <typename Elem>
__global__ void __launch_bounds__(kThreads)
quantize_keys_kernel(const Elem* __restrict__ k,  // [B, H, T, D], element strides sb, sh, st, sd
                     int64_t sb, int64_t sh, int64_t st, int64_t sd, int64_t H, int64_t T,
                     int64_t D, int bits, int G,
                     uint8_t* __restrict__ codes,  // [B, H, T, D*bits/8]
                     __half* __restrict__ scale,   // [B, H, T/G, D]
                     __half* __restrict__ zero) {  // [B, H, T/G, D]
  extern __shared__ float qk_smem[];
  float* s_s = qk_smem;      // [D] float32 value of the stored scale
  float* z_s = qk_smem + D;  // [D] float32 value of the stored zero
  const int64_t ngroups = T / G;
  const int64_t bh = blockIdx.x / ngroups;
  const int64_t g = blockIdx.x % ngroups;
  const int64_t b = bh / H, h = bh % H;
  const Elem* kbh = k + b * sb + h * sh + g * G * st;  // [G, D] of this group
  const int64_t sg = bh * ngroups + g;              // scale/zero row

  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    float mn, mx;
    channel_minmax_exact(kbh + c * sd, st, G, mn, mx);
    const AsymParams pr = asym_params(mn, mx, bits);
    scale[sg * D + c] = __ushort_as_half(pr.scale_bits);
    zero[sg * D + c] = __ushort_as_half(pr.zero_bits);
    s_s[c] = pr.scale;
    z_s[c] = pr.zero;
  }
  __syncthreads();

  const int64_t rowb = D * bits / 8;
  uint8_t* out = codes + (bh * T + g * G) * rowb;  // [G, rowb]
  for (int64_t idx = threadIdx.x; idx < G * rowb; idx += blockDim.x) {
    const int64_t t = idx / rowb, j = idx % rowb;
    const Elem* xr = kbh + t * st;
    out[idx] = pack_byte(j, bits, D, [&](int64_t c) {
      return asym_code(to_float(xr[c * sd]), s_s[c], z_s[c], bits);
    });
  }
}

// dequantize_keys / dequantize_values: one thread per output element (grid-stride).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
dequantize_keys_kernel(const uint8_t* __restrict__ codes,  // [BH, T, D*bits/8]
                       const __half* __restrict__ scale,   // [BH, T/G, D]
                       const __half* __restrict__ zero,    // [BH, T/G, D]
                       int64_t csh, int64_t ssh,  // slab strides of codes, scale / zero
                       int64_t n, int64_t T, int64_t D, int bits, int G, OutRows o,
                       Elem* __restrict__ out) {  // [B, H, T, D] as o says
  const int64_t rowb = D * bits / 8;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % D, row = idx / D;
    const int64_t t = row % T, bh = row / T;
    const int64_t si = bh * ssh + (t / G) * D + c;
    const uint32_t code = get_code(codes + bh * csh + t * rowb, c, bits);
    out[o.at(idx, bh, t, c)] =
        from_float<Elem>(asym_dequant(code, f16_at(scale, si), f16_at(zero, si)));
  }
}

// quantize_values: one warp per (token, channel group). Lane l reduces Gv/32 consecutive
// channels in order, then an order-preserving shuffle tree combines the lanes; the lanes then
// write the group's packed bytes (a group starts on a byte boundary: Gv*bits % 8 == 0).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
quantize_values_kernel(const Elem* __restrict__ v,  // [B, H, T, D], element strides
                       int64_t sb, int64_t sh, int64_t st, int64_t sd, int64_t H, int64_t T,
                       int64_t D, int bits, int Gv, int64_t nitems,
                       uint8_t* __restrict__ codes,  // [B, H, T, D*bits/8]
                       __half* __restrict__ scale,   // [B, H, T, D/Gv]
                       __half* __restrict__ zero) {  // [B, H, T, D/Gv]
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t ngv = D / Gv;
  const int per_lane = Gv / 32;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
       item < nitems; item += warps_total) {
    const int64_t row = item / ngv, g = item % ngv;
    const int64_t t = row % T, bh = row / T;
    const int64_t b = bh / H, h = bh % H;
    const Elem* xr = v + b * sb + h * sh + t * st + g * Gv * sd;  // [Gv] of this group
    float mn = to_float(xr[static_cast<int64_t>(lane) * per_lane * sd]);
    float mx = mn;
    for (int e = 1; e < per_lane; ++e) {
      const float x = to_float(xr[(static_cast<int64_t>(lane) * per_lane + e) * sd]);
      mn = nan_min(mn, x);
      mx = nan_max(mx, x);
    }
    warp_ordered_minmax(mn, mx);
    const AsymParams pr = asym_params(mn, mx, bits);
    if (lane == 0) {
      scale[item] = __ushort_as_half(pr.scale_bits);
      zero[item] = __ushort_as_half(pr.zero_bits);
    }
    const int64_t gbytes = static_cast<int64_t>(Gv) * bits / 8;
    uint8_t* out = codes + row * (D * bits / 8) + g * gbytes;
    for (int64_t j = lane; j < gbytes; j += 32) {
      out[j] = pack_byte(j, bits, Gv, [&](int64_t c) {
        return asym_code(to_float(xr[c * sd]), pr.scale, pr.zero, bits);
      });
    }
  }
}

template <typename Elem>
__global__ void __launch_bounds__(kThreads)
dequantize_values_kernel(const uint8_t* __restrict__ codes,  // [BH, T, D*bits/8]
                         const __half* __restrict__ scale,   // [BH, T, D/Gv]
                         const __half* __restrict__ zero,    // [BH, T, D/Gv]
                         int64_t csh, int64_t ssh,  // slab strides of codes, scale / zero
                         int64_t n, int64_t T, int64_t D, int bits, int Gv, OutRows o,
                         Elem* __restrict__ out) {  // [B, H, T, D] as o says
  const int64_t rowb = D * bits / 8, ngv = D / Gv;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % D, row = idx / D;
    const int64_t t = row % T, bh = row / T;
    const int64_t si = bh * ssh + t * ngv + c / Gv;
    const uint32_t code = get_code(codes + bh * csh + t * rowb, c, bits);
    out[o.at(idx, bh, t, c)] =
        from_float<Elem>(asym_dequant(code, f16_at(scale, si), f16_at(zero, si)));
  }
}

// side_code: one block per (b, h, key group). The residual e of the group's tokens is formed in
// shared memory 32 tokens at a time; thread (t, j) accumulates y[t, j] over ascending c with
// separately rounded products and sums (the contract's order), then the per-token scale and
// the offset-binary codes are written.
constexpr int kSideChunk = 32;  // tokens per pass (G is a multiple of 32)

template <typename Elem>
__global__ void __launch_bounds__(kThreads)
side_code_kernel(const Elem* __restrict__ k,  // [B, H, T, D], element strides
                 int64_t sb, int64_t sh, int64_t st, int64_t sd,
                 const uint8_t* __restrict__ k_codes,  // [B, H, T, D*key_bits/8]
                 const __half* __restrict__ k_scale,   // [B, H, T/G, D]
                 const __half* __restrict__ k_zero,    // [B, H, T/G, D]
                 const float* __restrict__ basis,      // [H, D, r]
                 int64_t H, int64_t T, int64_t D, int64_t r, int key_bits, int G, int side_bits,
                 bool center,
                 uint8_t* __restrict__ z_codes,   // [B, H, T, r*side_bits/8]
                 __half* __restrict__ z_scale) {  // [B, H, T]
  extern __shared__ float sc_smem[];
  float* mu_s = sc_smem;                    // [D] centring mean
  float* e_s = mu_s + D;                    // [kSideChunk, D] residuals
  float* y_s = e_s + kSideChunk * D;        // [kSideChunk, r] projections
  float* zsc_s = y_s + kSideChunk * r;      // [kSideChunk] float32 of the stored side scale
  const int64_t ngroups = T / G;
  const int64_t bh = blockIdx.x / ngroups;
  const int64_t g = blockIdx.x % ngroups;
  const int64_t b = bh / H, h = bh % H;
  const int64_t t0 = g * G;
  const int64_t krowb = D * key_bits / 8;
  const int64_t zrowb = r * side_bits / 8;
  const Elem* kbh = k + b * sb + h * sh;
  const uint8_t* kc = k_codes + bh * T * krowb;
  const __half* ksg = k_scale + (bh * ngroups + g) * D;  // [D]
  const __half* kzg = k_zero + (bh * ngroups + g) * D;   // [D]
  const float* u = basis + h * D * r;                    // [D, r]

  // Residual of token t (absolute index in [t0, t0+G)), channel c, before centring.
  auto residual = [&](int64_t t, int64_t c) {
    const float khat = asym_dequant(get_code(kc + t * krowb, c, key_bits), f16_at(ksg, c),
                                    f16_at(kzg, c));
    return sub_rn(to_float(kbh[t * st + c * sd]), khat);
  };

  if (center) {
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      float acc = 0.0f;
      for (int64_t t = t0; t < t0 + G; ++t) acc = add_rn(acc, residual(t, c));
      mu_s[c] = div_rn(acc, static_cast<float>(G));
    }
  }
  __syncthreads();

  for (int64_t tc = t0; tc < t0 + G; tc += kSideChunk) {
    for (int64_t idx = threadIdx.x; idx < kSideChunk * D; idx += blockDim.x) {
      const int64_t tt = idx / D, c = idx % D;
      const float e = residual(tc + tt, c);
      e_s[idx] = center ? sub_rn(e, mu_s[c]) : e;
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kSideChunk * r; idx += blockDim.x) {
      const int64_t tt = idx / r, j = idx % r;
      const float* et = e_s + tt * D;
      float acc = 0.0f;
      for (int64_t c = 0; c < D; ++c) acc = add_rn(acc, mul_rn(et[c], u[c * r + j]));
      y_s[idx] = acc;
    }
    __syncthreads();
    for (int64_t tt = threadIdx.x; tt < kSideChunk; tt += blockDim.x) {
      const float* yt = y_s + tt * r;
      float amax = fabsf(yt[0]);
      for (int64_t j = 1; j < r; ++j) amax = nan_max(amax, fabsf(yt[j]));
      const uint16_t sbits = sym_scale_bits(amax, side_bits);
      z_scale[bh * T + tc + tt] = __ushort_as_half(sbits);
      zsc_s[tt] = half_bits_to_float(sbits);
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kSideChunk * zrowb; idx += blockDim.x) {
      const int64_t tt = idx / zrowb, jb = idx % zrowb;
      const float* yt = y_s + tt * r;
      const float s = zsc_s[tt];
      uint32_t byte;
      if (side_bits == 8) {
        byte = sym_code(yt[jb], s, 8);
      } else {  // 4 bits: two codes a byte, the lower index in the low nibble
        byte = sym_code(yt[2 * jb], s, 4) | (sym_code(yt[2 * jb + 1], s, 4) << 4);
      }
      z_codes[(bh * T + tc + tt) * zrowb + jb] = static_cast<uint8_t>(byte);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads)
dequantize_side_kernel(const uint8_t* __restrict__ z_codes,  // [rows, r*bits/8]
                       const __half* __restrict__ z_scale,   // [rows]
                       int64_t n, int64_t r, int bits,
                       float* __restrict__ out) {  // [rows, r]
  const int64_t rowb = r * bits / 8;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % r, row = idx / r;
    out[idx] = sym_dequant(get_code(z_codes + row * rowb, j, bits), f16_at(z_scale, row), bits);
  }
}

// corrected_logits, step 1: qu[b, hq, l, j] = sign * sum_c q[c] * U[h, c, j].
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
query_basis_kernel(const Elem* __restrict__ q,        // [B, Hq, L, D]
                   const float* __restrict__ basis,  // [H, D, r]
                   int64_t n, int64_t Hq, int64_t ratio, int64_t L, int64_t D, int64_t r,
                   float sign, float* __restrict__ qu) {  // [B, Hq, L, r]
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % r, row = idx / r;  // row = (b*Hq + hq)*L + l
    const int64_t hq = (row / L) % Hq;
    const Elem* qr = q + row * D;
    const float* u = basis + (hq / ratio) * D * r;
    float acc = 0.0f;
    for (int64_t c = 0; c < D; ++c) acc = fmaf(to_float(qr[c]), u[c * r + j], acc);
    qu[idx] = sign * acc;
  }
}

// corrected_logits, step 2: one thread per logit (t fastest, so stores coalesce).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
corrected_logits_kernel(const Elem* __restrict__ q,              // [B, Hq, L, D]
                        const uint8_t* __restrict__ k_codes,  // [B, H, T, D*kbits/8]
                        const __half* __restrict__ k_scale,   // [B, H, T/G, D]
                        const __half* __restrict__ k_zero,    // [B, H, T/G, D]
                        const uint8_t* __restrict__ z_codes,  // [B, H, T, r*zbits/8] or null
                        const __half* __restrict__ z_scale,   // [B, H, T] or null
                        const float* __restrict__ qu,         // [B, Hq, L, r] or null
                        int64_t n, int64_t H, int64_t Hq, int64_t L, int64_t T, int64_t D,
                        int64_t r, int key_bits, int G, int side_bits, float scale,
                        float* __restrict__ out) {  // [B, Hq, L, T]
  const int64_t krowb = D * key_bits / 8, zrowb = r * side_bits / 8;
  const int64_t ratio = Hq / H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx % T, row = idx / T;  // row = (b*Hq + hq)*L + l
    const int64_t bhq = row / L;
    const int64_t b = bhq / Hq, hq = bhq % Hq;
    const int64_t bh = b * H + hq / ratio;
    const Elem* qr = q + row * D;
    const uint8_t* kr = k_codes + (bh * T + t) * krowb;
    const int64_t so = (bh * (T / G) + t / G) * D;
    float acc = 0.0f;
    for (int64_t c = 0; c < D; ++c) {
      const float khat = asym_dequant(get_code(kr, c, key_bits), f16_at(k_scale, so + c),
                                      f16_at(k_zero, so + c));
      acc = fmaf(to_float(qr[c]), khat, acc);
    }
    if (z_codes != nullptr) {
      const uint8_t* zr = z_codes + (bh * T + t) * zrowb;
      const float zs = f16_at(z_scale, bh * T + t);
      const float* qur = qu + row * r;
      float corr = 0.0f;
      for (int64_t j = 0; j < r; ++j) {
        corr = fmaf(qur[j], sym_dequant(get_code(zr, j, side_bits), zs, side_bits), corr);
      }
      acc += corr;
    }
    out[idx] = acc * scale;
  }
}

// Runs f with the element type of dt (the typed kernels are instantiated for the 3 types).
template <typename F>
cudaError_t with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Dynamic shared memory above the 48 KiB default needs an explicit opt-in.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// The bandwidth-oriented kernels (quant_fast.cuh) are the default; HEADQ_QUANT_IMPL=old
// (read at every launch) selects the original kernels above, e.g. to isolate a failure.
#include "quant_fast.cuh"

bool use_old_impl() {
  const char* e = std::getenv("HEADQ_QUANT_IMPL");
  return e != nullptr && std::strcmp(e, "old") == 0;
}

// HEADQ_SIDE_IMPL=group (read at every launch): the side code by the block-per-key-group kernel
// (side_code_fast) also where the one-thread-per-token kernel applies, for A/B runs and tests.
bool use_group_side_impl() {
  const char* e = std::getenv("HEADQ_SIDE_IMPL");
  return e != nullptr && std::strcmp(e, "group") == 0;
}

size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

bool aligned_to(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// 16-byte vector loads of 8-channel chunks are legal: unit channel stride and every row start
// 16-byte aligned.
bool vec_rows(const void* p, DType dt, int64_t sb, int64_t sh, int64_t st, int64_t sd) {
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  return sd == 1 && aligned_to(p, 16) && (sb * es) % 16 == 0 && (sh * es) % 16 == 0 &&
         (st * es) % 16 == 0;
}

// `out` as the dequantise kernels take it. contig: exactly the strides of a fresh contiguous
// [B, H, T, D] tensor, so that chunk i is at 8i; vec: token rows contiguous and 16-byte aligned
// (16-byte stores at the strides); otherwise one element at a time.
bool contiguous_out(const OutTensor& o, int64_t H, int64_t T, int64_t D) {
  return o.sd == 1 && o.st == D && o.sh == T * D && o.sb == H * T * D;
}

OutRows out_rows(const OutTensor& o, DType dt, int64_t H, int64_t T, int64_t D) {
  const bool vec = vec_rows(o.ptr, dt, o.sb, o.sh, o.st, o.sd);
  return {o.sb, o.sh, o.st, o.sd, static_cast<uint32_t>(H), vec && contiguous_out(o, H, T, D),
          vec};
}

constexpr size_t kFastSmemLimit = 200 * 1024;

}  // namespace

cudaError_t launch_quantize_keys(const void* k, DType dtype, int64_t sb, int64_t sh, int64_t st,
                                 int64_t sd, int64_t B, int64_t H, int64_t T, int64_t D, int bits,
                                 int G, uint8_t* codes, void* scale, void* zero,
                                 cudaStream_t stream) {
  const int64_t blocks = B * H * (T / G);
  if (blocks == 0) return cudaSuccess;
  {
    // Fast path: grid (T/G, H, B), block (D/8, G/4); partial min/max [G/4, D] x 2 and the
    // float32 scale, zero and reciprocal scale [D] x 3 in shared memory.
    const int64_t threads = (G / fastq::kKeyTok) * (D / 8);
    const size_t fsmem = (2 * (G / fastq::kKeyTok) * D + 3 * D) * sizeof(float);
    if (!use_old_impl() && D % 8 == 0 && G % fastq::kKeyTok == 0 && threads >= 32 &&
        threads <= 512 && fsmem <= kFastSmemLimit && aligned_to(codes, 8) && H <= 65535 &&
        B <= 65535 && T / G <= 0x7fffffff && T <= 0x7fffffff) {
      const bool vec = vec_rows(k, dtype, sb, sh, st, sd);
      const dim3 grid(static_cast<unsigned>(T / G), static_cast<unsigned>(H),
                      static_cast<unsigned>(B));
      const dim3 block(static_cast<unsigned>(D / 8), static_cast<unsigned>(G / fastq::kKeyTok));
      return with_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        auto kernel = fastq::quantize_keys_fast<E>;
        cudaError_t err = allow_smem(kernel, fsmem);
        if (err != cudaSuccess) return err;
        kernel<<<grid, block, fsmem, stream>>>(
            static_cast<const E*>(k), sb, sh, st, sd, static_cast<int>(T), static_cast<int>(D),
            bits, G, vec, codes, static_cast<__half*>(scale), static_cast<__half*>(zero));
        return cudaGetLastError();
      });
    }
  }
  const size_t smem = 2 * D * sizeof(float);
  return with_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    auto kernel = quantize_keys_kernel<E>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        static_cast<const E*>(k), sb, sh, st, sd, H, T, D, bits, G, codes,
        static_cast<__half*>(scale), static_cast<__half*>(zero));
    return cudaGetLastError();
  });
}

cudaError_t launch_dequantize_keys(const uint8_t* codes, const void* scale, const void* zero,
                                   const InSlabs& in, int64_t B, int64_t H, int64_t T, int64_t D,
                                   int bits, int G, const OutTensor& out, DType out_dtype,
                                   cudaStream_t stream) {
  const int64_t n = B * H * T * D;
  if (n == 0) return cudaSuccess;
  const OutRows o = out_rows(out, out_dtype, H, T, D);
  if (!use_old_impl() && D % 8 == 0 && n / 8 <= 0x7fffffff && T <= 0x7fffffff &&
      aligned_to(scale, 16) && aligned_to(zero, 16) && (in.scale * 2) % 16 == 0) {
    const int64_t nchunks = n / 8;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(nchunks, 256), 1 << 20));
    return with_dtype(out_dtype, [&](auto tag) {
      using E = decltype(tag);
      fastq::dequantize_keys_fast<E><<<blocks, 256, 0, stream>>>(
          codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), in,
          static_cast<uint32_t>(nchunks), static_cast<uint32_t>(T), static_cast<uint32_t>(D),
          bits, static_cast<uint32_t>(G), o, static_cast<E*>(out.ptr));
      return cudaGetLastError();
    });
  }
  return with_dtype(out_dtype, [&](auto tag) {
    using E = decltype(tag);
    dequantize_keys_kernel<E><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), in.codes,
        in.scale, n, T, D, bits, G, o, static_cast<E*>(out.ptr));
    return cudaGetLastError();
  });
}

cudaError_t launch_quantize_values(const void* v, DType dtype, int64_t sb, int64_t sh, int64_t st,
                                   int64_t sd, int64_t B, int64_t H, int64_t T, int64_t D,
                                   int bits, int Gv, uint8_t* codes, void* scale, void* zero,
                                   cudaStream_t stream) {
  const int64_t nitems = B * H * T * (D / Gv);
  if (nitems == 0) return cudaSuccess;
  // Fast path: grid (ceil(T/by), H, B), block (D/32, by), each thread 32 channels of a token;
  // a value group is Gv/32 (a power of two <= 32) consecutive threads.
  const int64_t spr = D / 32;
  const int64_t by = 32 * std::max<int64_t>(1, 8 / std::max<int64_t>(spr, 1));
  if (!use_old_impl() && D % 32 == 0 && Gv % 32 == 0 && Gv / 32 <= 32 &&
      ((Gv / 32) & (Gv / 32 - 1)) == 0 && D % Gv == 0 && spr * by <= 1024 &&
      aligned_to(codes, 16) && H <= 65535 && B <= 65535 && T <= 0x7fffffff &&
      ceil_div(T, by) <= 0x7fffffff) {
    const bool vec = vec_rows(v, dtype, sb, sh, st, sd);
    const dim3 grid(static_cast<unsigned>(ceil_div(T, by)), static_cast<unsigned>(H),
                    static_cast<unsigned>(B));
    const dim3 block(static_cast<unsigned>(spr), static_cast<unsigned>(by));
    return with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      fastq::quantize_values_fast<E><<<grid, block, 0, stream>>>(
          static_cast<const E*>(v), sb, sh, st, sd, static_cast<int>(T), static_cast<int>(D),
          bits, Gv, vec, codes, static_cast<__half*>(scale), static_cast<__half*>(zero));
      return cudaGetLastError();
    });
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(nitems, kThreads / 32), 1 << 20);
  return with_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    quantize_values_kernel<E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const E*>(v), sb, sh, st, sd, H, T, D, bits, Gv, nitems, codes,
        static_cast<__half*>(scale), static_cast<__half*>(zero));
    return cudaGetLastError();
  });
}

cudaError_t launch_dequantize_values(const uint8_t* codes, const void* scale, const void* zero,
                                     const InSlabs& in, int64_t B, int64_t H, int64_t T,
                                     int64_t D, int bits, int Gv, const OutTensor& out,
                                     DType out_dtype, cudaStream_t stream) {
  const int64_t n = B * H * T * D;
  if (n == 0) return cudaSuccess;
  const OutRows o = out_rows(out, out_dtype, H, T, D);
  if (!use_old_impl() && D % 8 == 0 && Gv % 8 == 0 && n / 8 <= 0x7fffffff) {
    const int64_t nchunks = n / 8;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(nchunks, 256), 1 << 20));
    return with_dtype(out_dtype, [&](auto tag) {
      using E = decltype(tag);
      fastq::dequantize_values_fast<E><<<blocks, 256, 0, stream>>>(
          codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), in,
          static_cast<uint32_t>(nchunks), static_cast<uint32_t>(T), static_cast<uint32_t>(D),
          bits, static_cast<uint32_t>(Gv), o, static_cast<E*>(out.ptr));
      return cudaGetLastError();
    });
  }
  return with_dtype(out_dtype, [&](auto tag) {
    using E = decltype(tag);
    dequantize_values_kernel<E><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), in.codes,
        in.scale, n, T, D, bits, Gv, o, static_cast<E*>(out.ptr));
    return cudaGetLastError();
  });
}

cudaError_t launch_side_code(const void* k, DType dtype, int64_t sb, int64_t sh, int64_t st,
                             int64_t sd, const uint8_t* k_codes, const void* k_scale,
                             const void* k_zero, const float* basis, int64_t B, int64_t H,
                             int64_t T, int64_t D, int64_t r, int key_bits, int G, int side_bits,
                             bool center, uint8_t* z_codes, void* z_scale, cudaStream_t stream) {
  const int64_t blocks = B * H * (T / G);
  if (blocks == 0) return cudaSuccess;
  if (!use_old_impl() && !use_group_side_impl() && !center && r <= 16 && D % 8 == 0 &&
      fastq::kSideThreads % G == 0 && aligned_to(k_codes, 8) && H <= 65535 && B <= 65535 &&
      T <= 0x7fffffff) {
    // Token path (the default): grid (ceil(T / 128), H, B), one thread per token; basis
    // [D, NJ4*4], (scale, zero) of the block's groups, projections [128, NJ4*4] in shared memory.
    const int nj4 = r <= 8 ? 2 : 4;
    const size_t tsmem = (D * 4 * nj4 + 2 * (fastq::kSideThreads / G) * D +
                          fastq::kSideThreads * 4 * nj4) * sizeof(float);
    const bool vec = vec_rows(k, dtype, sb, sh, st, sd);
    const dim3 grid(static_cast<unsigned>((T + fastq::kSideThreads - 1) / fastq::kSideThreads),
                    static_cast<unsigned>(H), static_cast<unsigned>(B));
    return with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      auto kernel = nj4 == 2 ? fastq::side_code_tok<E, 2> : fastq::side_code_tok<E, 4>;
      cudaError_t err = allow_smem(kernel, tsmem);
      if (err != cudaSuccess) return err;
      kernel<<<grid, fastq::kSideThreads, tsmem, stream>>>(
          static_cast<const E*>(k), sb, sh, st, sd, vec, k_codes,
          static_cast<const __half*>(k_scale), static_cast<const __half*>(k_zero), basis,
          static_cast<int>(T), static_cast<int>(D), static_cast<int>(r), key_bits, G, side_bits,
          z_codes, static_cast<__half*>(z_scale));
      return cudaGetLastError();
    });
  }
  {
    // Group path (centring, r > 16, or HEADQ_SIDE_IMPL=group): grid (T/G, H, B); residual [G, D+4], basis [D, R4], projections [G, R4],
    // scale and zero [D] in shared memory.
    const int64_t R4 = (r + 3) / 4 * 4;
    const size_t fsmem = (G * (D + 4) + D * R4 + G * R4 + 2 * D) * sizeof(float);
    if (!use_old_impl() && D % 8 == 0 && G % 4 == 0 && fsmem <= kFastSmemLimit &&
        aligned_to(k_codes, 8) && H <= 65535 && B <= 65535 && T <= 0x7fffffff) {
      const bool vec = vec_rows(k, dtype, sb, sh, st, sd);
      const dim3 grid(static_cast<unsigned>(T / G), static_cast<unsigned>(H),
                      static_cast<unsigned>(B));
      return with_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        auto kernel = fastq::side_code_fast<E>;
        cudaError_t err = allow_smem(kernel, fsmem);
        if (err != cudaSuccess) return err;
        kernel<<<grid, fastq::kSideThreads, fsmem, stream>>>(
            static_cast<const E*>(k), sb, sh, st, sd, vec, k_codes,
            static_cast<const __half*>(k_scale), static_cast<const __half*>(k_zero), basis,
            static_cast<int>(T), static_cast<int>(D), static_cast<int>(r), key_bits, G,
            side_bits, center, z_codes, static_cast<__half*>(z_scale));
        return cudaGetLastError();
      });
    }
  }
  const size_t smem = (D + kSideChunk * D + kSideChunk * r + kSideChunk) * sizeof(float);
  return with_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    auto kernel = side_code_kernel<E>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        static_cast<const E*>(k), sb, sh, st, sd, k_codes, static_cast<const __half*>(k_scale),
        static_cast<const __half*>(k_zero), basis, H, T, D, r, key_bits, G, side_bits, center,
        z_codes, static_cast<__half*>(z_scale));
    return cudaGetLastError();
  });
}

namespace {
// quantize_kv's choice between its fused kernel and the three separate ones (HEADQ_KV_IMPL =
// "fused" / "separate", read at every launch, forces one, e.g. for A/B runs and tests). By
// default the fused kernel runs when all its blocks are resident at once (one wave:
// HEADQ_KV_MIN_BLOCKS per SM): a decode append or short prompt then costs one launch instead of
// three (H200, batch 8 x 8 heads, fp16, 2-bit: 64 tokens 32-47 vs 41-60 us, 256 tokens 34-45
// vs 43-56 us). Over several waves the separate kernels are faster (4k tokens 0.168-0.190 vs
// 0.154-0.173 ms, 32k 1.05-1.11 vs 0.89-0.95 ms): the append is bound by instruction issue,
// not by memory (docs/PERF.md), and the fused kernel's phases (min/max, parameters, codes,
// projection, side code) leave part of each block idle at every block barrier.
bool fused_kv(int64_t blocks, int sm_count) {
  const char* e = std::getenv("HEADQ_KV_IMPL");
  if (e != nullptr && std::strcmp(e, "fused") == 0) return true;
  if (e != nullptr && std::strcmp(e, "separate") == 0) return false;
  return blocks <= static_cast<int64_t>(HEADQ_KV_MIN_BLOCKS) * sm_count;
}
}  // namespace

cudaError_t launch_quantize_kv(const void* k, const void* v, DType dtype, const int64_t* ks,
                               const int64_t* vs, const float* basis, int64_t B, int64_t H,
                               int64_t T, int64_t D, int64_t r, int key_bits, int G,
                               int side_bits, bool center, int value_bits, int Gv,
                               uint8_t* k_codes, void* k_scale, void* k_zero, uint8_t* z_codes,
                               void* z_scale, uint8_t* v_codes, void* v_scale, void* v_zero,
                               int sm_count, cudaStream_t stream) {
  if (B * H * T == 0) return cudaSuccess;
  // Fused path: one block of NT = G*D/32 threads per key group (quantize_kv_fast).
  const int64_t NT = G * D / 32;
  const int64_t R4 = (r + 3) / 4 * 4;
  const size_t smem = (G * (D + 4) + D * R4 + G * R4 + 3 * D) * sizeof(float);
  const int64_t lanes = Gv / 32;
  if (!use_old_impl() && fused_kv(B * H * (T / G), sm_count) && dtype != DType::kFloat32 &&
      D % 32 == 0 &&
      G % fastq::kKeyTok == 0 && (G * D) % 1024 == 0 && NT <= fastq::kKvMaxThreads &&
      Gv % 32 == 0 && (lanes & (lanes - 1)) == 0 && D % Gv == 0 && r <= 16 &&
      smem <= kFastSmemLimit && aligned_to(k_codes, 8) && aligned_to(v_codes, 16) &&
      H <= 65535 && B <= 65535 && T <= 0x7fffffff) {
    const bool kvec = vec_rows(k, dtype, ks[0], ks[1], ks[2], ks[3]);
    const bool vvec = vec_rows(v, dtype, vs[0], vs[1], vs[2], vs[3]);
    const dim3 grid(static_cast<unsigned>(T / G), static_cast<unsigned>(H),
                    static_cast<unsigned>(B));
    return with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      if constexpr (sizeof(E) == 4) {
        return cudaErrorInvalidValue;  // excluded above (fp32 takes the separate kernels)
      } else {
        auto kernel = fastq::quantize_kv_fast<E>;
        cudaError_t err = allow_smem(kernel, smem);
        if (err != cudaSuccess) return err;
        kernel<<<grid, static_cast<unsigned>(NT), smem, stream>>>(
            static_cast<const E*>(k), ks[0], ks[1], ks[2], ks[3], kvec, static_cast<const E*>(v),
            vs[0], vs[1], vs[2], vs[3], vvec, basis, static_cast<int>(T), static_cast<int>(D),
            static_cast<int>(r), key_bits, G, side_bits, center, value_bits, Gv, k_codes,
            static_cast<__half*>(k_scale), static_cast<__half*>(k_zero), z_codes,
            static_cast<__half*>(z_scale), v_codes, static_cast<__half*>(v_scale),
            static_cast<__half*>(v_zero));
        return cudaGetLastError();
      }
    });
  }
  cudaError_t err = launch_quantize_keys(k, dtype, ks[0], ks[1], ks[2], ks[3], B, H, T, D,
                                         key_bits, G, k_codes, k_scale, k_zero, stream);
  if (err != cudaSuccess) return err;
  err = launch_side_code(k, dtype, ks[0], ks[1], ks[2], ks[3], k_codes, k_scale, k_zero, basis, B,
                         H, T, D, r, key_bits, G, side_bits, center, z_codes, z_scale, stream);
  if (err != cudaSuccess) return err;
  return launch_quantize_values(v, dtype, vs[0], vs[1], vs[2], vs[3], B, H, T, D, value_bits, Gv,
                                v_codes, v_scale, v_zero, stream);
}

cudaError_t launch_reconstruct_keys(const uint8_t* codes, const void* scale, const void* zero,
                                    const uint8_t* z_codes, const void* z_scale,
                                    const float* basis, const InSlabs& in, int64_t B, int64_t H,
                                    int64_t T,
                                    int64_t D, int bits, int G, int64_t r, int side_bits,
                                    float sign, const OutTensor& out, DType out_dtype,
                                    cudaStream_t stream) {
  const int64_t nchunks = B * H * T * D / 8;  // D % 8 == 0 (validated)
  if (nchunks == 0) return cudaSuccess;
  if (T > 0x7fffffff || B * H > 0x7fffffff) return cudaErrorInvalidValue;  // 32-bit t, bh
  const int64_t cpr = D / 8;
  const size_t smem = static_cast<size_t>(cpr * (8 * r + 4)) * sizeof(float);
  // HEADQ_RECON_IMPL=l1 (read at every launch): the L1 kernel also where the staged one applies
  const char* e = std::getenv("HEADQ_RECON_IMPL");
  const bool force_l1 = e != nullptr && std::strcmp(e, "l1") == 0;
  constexpr int64_t kTileTokens = 128;
  const int64_t n_tiles = ceil_div(T, kTileTokens);
  const OutRows o = out_rows(out, out_dtype, H, T, D);
  return with_dtype(out_dtype, [&](auto tag) {
    using E = decltype(tag);
    if (!force_l1 && cpr <= 256 && smem <= 48 * 1024 && B * H * n_tiles <= 0x7fffffff) {
      fastq::reconstruct_keys_smem<E><<<static_cast<unsigned>(B * H * n_tiles), 256, smem,
                                        stream>>>(
          codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), z_codes,
          static_cast<const __half*>(z_scale), basis, in, static_cast<uint32_t>(n_tiles),
          static_cast<uint32_t>(kTileTokens), static_cast<uint32_t>(H),
          static_cast<uint32_t>(T), static_cast<int>(D), bits, static_cast<uint32_t>(G),
          static_cast<int>(r), side_bits, sign, o, static_cast<E*>(out.ptr));
    } else {
      const unsigned blocks =
          static_cast<unsigned>(std::min<int64_t>(ceil_div(nchunks, 256), 1 << 20));
      fastq::reconstruct_keys_l1<E><<<blocks, 256, 0, stream>>>(
          codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero), z_codes,
          static_cast<const __half*>(z_scale), basis, in, nchunks, H, T, D, bits, G, r,
          side_bits, sign, o, static_cast<E*>(out.ptr));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_dequantize_side(const uint8_t* z_codes, const void* z_scale, int64_t rows,
                                   int64_t r, int side_bits, float* out, cudaStream_t stream) {
  const int64_t n = rows * r;
  if (n == 0) return cudaSuccess;
  dequantize_side_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(
      z_codes, static_cast<const __half*>(z_scale), n, r, side_bits, out);
  return cudaGetLastError();
}

cudaError_t launch_corrected_logits(const void* q, DType dtype, const uint8_t* k_codes,
                                    const void* k_scale, const void* k_zero,
                                    const uint8_t* z_codes, const void* z_scale,
                                    const float* basis, int64_t B, int64_t H, int64_t Hq,
                                    int64_t L, int64_t T, int64_t D, int64_t r, int key_bits,
                                    int G, int side_bits, float sign, float scale, float* qu,
                                    float* out, cudaStream_t stream) {
  const int64_t n = B * Hq * L * T;
  if (n == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    const bool side = z_codes != nullptr;
    if (side) {
      const int64_t nq = B * Hq * L * r;
      query_basis_kernel<E><<<elementwise_blocks(nq), kThreads, 0, stream>>>(
          static_cast<const E*>(q), basis, nq, Hq, Hq / H, L, D, r, sign, qu);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    corrected_logits_kernel<E><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        static_cast<const E*>(q), k_codes, static_cast<const __half*>(k_scale),
        static_cast<const __half*>(k_zero), side ? z_codes : nullptr,
        side ? static_cast<const __half*>(z_scale) : nullptr, side ? qu : nullptr, n, H, Hq, L,
        T, D, r, key_bits, G, side_bits, scale, out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace headq
