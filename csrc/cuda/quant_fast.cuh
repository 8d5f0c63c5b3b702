// Bandwidth-oriented CUDA kernels of quantize_keys, quantize_values, side_code and quantize_kv.
// Included by quant_kernels.cu only (inside headq::cuda::{anonymous}); the launchers there pick
// these unless HEADQ_QUANT_IMPL=old or an input does not meet the fast path's needs.
//
// Bit-exactness (docs/LAYOUT.md) is argued, not approximated:
//  * min/max: the common case is a value-only NaN-propagating reduction (min_nanprop /
//    max_nanprop: min.NaN / max.NaN, one instruction per element) in any order; by
//    extremum_is_exact (headq/quant.h, argued there) its result IS the sequential nan_min /
//    nan_max result unless it is NaN or +-0. In those cases the set is reduced again exactly:
//    sequentially in ascending position (keys: thread c re-reads its channel in ascending t), or
//    (values) per lane in ascending channel order and then by the ordered segmented shuffle tree
//    that merges (lower lanes, higher lanes) at every level. nan_min/nan_max select the winner
//    of a TOTAL order on (value, position) (a NaN beats every non-NaN, a later NaN an earlier
//    one; among non-NaNs the smaller/larger value wins, ties go to the earlier element), which
//    is associative, so any tree that merges adjacent ranges as (earlier, later) returns the
//    sequential CPU result.
//  * codes: asym_code_try / sym_code_try (headq/quant.h) replace the division by a multiply
//    with the reciprocal scale and are accepted only when provably equal to asym_code /
//    sym_code (quotient >= 2^-13 from every half-integer, scale with a normal reciprocal);
//    otherwise that element takes asym_code / sym_code itself. Host tests:
//    tests/cpp/test_quant_fast.cc.
//  * scale/zero from headq/quant.h's asym_params (unchanged), dequantisation with asym_dequant
//    semantics (float(code) is exact; multiply, round, add, round; no FMA).
//  * the centring sum and the side-code projection are sequential in ascending t / c, one
//    thread per (channel) / (token, 4 columns), exactly the documented order.
//  * packing: code i of a row occupies bits [i*b, (i+1)*b) of the little-endian stream; 8
//    consecutive codes form exactly b whole bytes (chunk q of a row starts at byte q*b).
// The bit width is a template parameter of the per-element code (one kernel per element type
// dispatches on it at run time), so all shifts and masks are immediates.
#pragma once

namespace fastq {

constexpr int kChunk = 8;  // channels per thread chunk (16 bytes of fp16)

// 8 consecutive channels (element stride sd) as float32; vec: 16/32-byte aligned and sd == 1.
template <typename E>
__device__ __forceinline__ void load_chunk(const E* p, int64_t sd, bool vec, float (&f)[8]) {
  if (vec) {
    load8<E>(p, f);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_float(p[i * sd]);
  }
}

// 8 consecutive channels kept in their input encoding (16-bit types: one uint4 = 8 values, half
// the registers of 8 floats), converted exactly to float32 where the arithmetic needs it.
template <typename E>
struct Raw8 {
  float f[8];
};
template <>
struct Raw8<__half> {
  uint4 u;
};
template <>
struct Raw8<__nv_bfloat16> {
  uint4 u;
};

template <typename E>
__device__ __forceinline__ void load_raw(const E* p, int64_t sd, bool vec, Raw8<E>& r) {
  if constexpr (sizeof(E) == 4) {
    load_chunk<E>(p, sd, vec, r.f);
  } else {
    if (vec) {
      r.u = *reinterpret_cast<const uint4*>(p);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint16_t a = *reinterpret_cast<const uint16_t*>(p + (2 * i) * sd);
        const uint16_t b = *reinterpret_cast<const uint16_t*>(p + (2 * i + 1) * sd);
        w[i] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
      }
      r.u = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <typename E>
__device__ __forceinline__ void raw_to_float(const Raw8<E>& r, float (&f)[8]) {
  if constexpr (sizeof(E) == 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = r.f[i];
  } else {
    load8<E>(&r.u, f);  // exact conversion of the 8 packed values
  }
}

// Value-only NaN-propagating min/max of 8 channels over several chunks (see the header: only
// the VALUE matters; NaN / +-0 results are redone exactly). 16-bit types reduce packed pairs
// (min.NaN / max.NaN on f16x2 / bf16x2: exact selections, NaN-propagating; the conversion to
// float32 afterwards is exact and preserves NaN-ness, zero signs and order).
template <typename E>
struct MinMax8 {
  float mn[8], mx[8];
  __device__ __forceinline__ void init(const Raw8<E>& r) {
#pragma unroll
    for (int i = 0; i < 8; ++i) mn[i] = mx[i] = r.f[i];
  }
  __device__ __forceinline__ void fold(const Raw8<E>& r) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      mn[i] = min_nanprop(mn[i], r.f[i]);
      mx[i] = max_nanprop(mx[i], r.f[i]);
    }
  }
  __device__ __forceinline__ void get(float (&a)[8], float (&b)[8]) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      a[i] = mn[i];
      b[i] = mx[i];
    }
  }
};

template <typename E2>
struct MinMax8Packed {
  E2 mn[4], mx[4];
  __device__ __forceinline__ static E2 as2(uint32_t w) { return *reinterpret_cast<const E2*>(&w); }
  __device__ __forceinline__ void init_u(const uint4& u) {
    mn[0] = mx[0] = as2(u.x);
    mn[1] = mx[1] = as2(u.y);
    mn[2] = mx[2] = as2(u.z);
    mn[3] = mx[3] = as2(u.w);
  }
  __device__ __forceinline__ void fold_u(const uint4& u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      mn[i] = __hmin2_nan(mn[i], as2(w[i]));
      mx[i] = __hmax2_nan(mx[i], as2(w[i]));
    }
  }
  __device__ __forceinline__ void get_u(float (&a)[8], float (&b)[8]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 fa = to_float2(mn[i]), fb = to_float2(mx[i]);
      a[2 * i] = fa.x;
      a[2 * i + 1] = fa.y;
      b[2 * i] = fb.x;
      b[2 * i + 1] = fb.y;
    }
  }
  __device__ __forceinline__ static float2 to_float2(__half2 v) { return __half22float2(v); }
  __device__ __forceinline__ static float2 to_float2(__nv_bfloat162 v) {
    return __bfloat1622float2(v);
  }
};
template <>
struct MinMax8<__half> : MinMax8Packed<__half2> {
  __device__ __forceinline__ void init(const Raw8<__half>& r) { init_u(r.u); }
  __device__ __forceinline__ void fold(const Raw8<__half>& r) { fold_u(r.u); }
  __device__ __forceinline__ void get(float (&a)[8], float (&b)[8]) const { get_u(a, b); }
};
template <>
struct MinMax8<__nv_bfloat16> : MinMax8Packed<__nv_bfloat162> {
  __device__ __forceinline__ void init(const Raw8<__nv_bfloat16>& r) { init_u(r.u); }
  __device__ __forceinline__ void fold(const Raw8<__nv_bfloat16>& r) { fold_u(r.u); }
  __device__ __forceinline__ void get(float (&a)[8], float (&b)[8]) const { get_u(a, b); }
};

// Codes of 8 elements packed into the low 8*BITS bits (code i at bit i*BITS). ZU: one zero and
// scale for all 8 elements (values) instead of one per element (keys: one per channel).
// Fast path: asym_code_try for all 8, accepted only if all 8 pass; otherwise the chunk is redone
// with asym_code_rcp (== asym_code) element by element. One branch per chunk instead of per
// element keeps the convergence bookkeeping out of the per-element cost.
// Packing: asym_code_try's code is bits(m) - 0x4B400000; the sum of bits(m_i) << (i*BITS) over 4
// codes, minus the same sum of 0x4B400000 << (i*BITS), is (mod 2^32) exactly the sum of
// code_i << (i*BITS) < 2^(4*BITS) <= 2^32 (the codes do not overlap, so + is |): one LEA each.
template <int BITS, bool ZU>
__device__ __forceinline__ uint64_t code8(const float (&x)[8], const float* z, const float* rs,
                                          const float* s) {
  constexpr float qmax = static_cast<float>((1 << BITS) - 1);
  constexpr uint32_t kSub = (kRintMagicBits) + (kRintMagicBits << BITS) +
                            (kRintMagicBits << (2 * BITS)) + (kRintMagicBits << (3 * BITS));
  uint32_t lo = 0, hi = 0;
  bool ok = true;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float zi = ZU ? z[0] : z[i];
    const float ri = ZU ? rs[0] : rs[i];
    const float y = mul_rn(sub_rn(x[i], zi), ri);
    const float yc = clamp_nanprop(y, 0.0f, qmax);
    const float m = add_rn(yc, kRintMagic);
    const float t = sub_rn(yc, sub_rn(m, kRintMagic));
    ok = ok & (fabsf(t) <= kNearHalfLimit);
    if (i < 4) {
      lo += __float_as_uint(m) << ((i & 3) * BITS);
    } else {
      hi += __float_as_uint(m) << ((i & 3) * BITS);
    }
  }
  uint64_t w = static_cast<uint64_t>(lo - kSub) | (static_cast<uint64_t>(hi - kSub) << (4 * BITS));
  if (__builtin_expect(!ok, 0)) {
    w = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float zi = ZU ? z[0] : z[i];
      const float ri = ZU ? rs[0] : rs[i];
      const float si = ZU ? s[0] : s[i];
      w |= static_cast<uint64_t>(asym_code_rcp(x[i], si, zi, ri, BITS)) << (i * BITS);
    }
  }
  return w;
}

// Store the BITS bytes of a packed chunk at p (p aligned to BITS for BITS 2/4/8).
template <int BITS>
__device__ __forceinline__ void store_packed(uint8_t* p, uint64_t w) {
  if constexpr (BITS == 2) {
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w);
  } else if constexpr (BITS == 4) {
    *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(w);
  } else if constexpr (BITS == 8) {
    *reinterpret_cast<unsigned long long*>(p) = static_cast<unsigned long long>(w);
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) p[i] = static_cast<uint8_t>(w >> (8 * i));
  }
}

// Load the BITS bytes of a packed chunk (same alignment as store_packed).
template <int BITS>
__device__ __forceinline__ uint64_t load_packed(const uint8_t* p) {
  if constexpr (BITS == 2) {
    return *reinterpret_cast<const uint16_t*>(p);
  } else if constexpr (BITS == 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (BITS == 8) {
    return *reinterpret_cast<const unsigned long long*>(p);
  } else {
    uint64_t w = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
    return w;
  }
}

template <int B>
struct BitsC {
  static constexpr int value = B;
};

// Runs f(BitsC<B>) for B = bits in {2, 3, 4, 8} (uniform branch; the ops accept no other).
template <typename F>
__device__ __forceinline__ void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2:
      f(BitsC<2>{});
      break;
    case 3:
      f(BitsC<3>{});
      break;
    case 4:
      f(BitsC<4>{});
      break;
    default:
      f(BitsC<8>{});
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// quantize_values: grid (ceil(T / blockDim.y), H, B), block (D/32, by). Thread (x, y) owns the
// 32 channels [32x, 32x+32) (4 chunks) of token blockIdx.x*by + y: a value group is Gv/32 in
// {1, 2, 4} consecutive threads (x aligned; blockDim.x*blockDim.y is a multiple of 32 and
// blockDim.x of Gv/32, so a group never straddles a warp). No integer division anywhere; 64-bit
// arithmetic only for the final offsets. Threads past T load nothing and store nothing but take
// part in the shuffles.
constexpr int kValChunks = 4;  // chunks per thread

template <typename E, int BITS>
__device__ __forceinline__ void quantize_values_body(const Raw8<E> (&f)[kValChunks], float mn,
                                                     float mx, bool valid, int lanes, int xthr,
                                                     uint8_t* __restrict__ out,
                                                     __half* __restrict__ scale,
                                                     __half* __restrict__ zero, int64_t si) {
  const AsymParams pr = asym_params(mn, mx, BITS);
  const float rs = quant_rcp(pr.scale);
  if (!valid) return;
  if ((xthr & (lanes - 1)) == 0) {
    scale[si] = __ushort_as_half(pr.scale_bits);
    zero[si] = __ushort_as_half(pr.zero_bits);
  }
  uint64_t w[kValChunks];
#pragma unroll
  for (int u = 0; u < kValChunks; ++u) {
    float x[8];
    raw_to_float<E>(f[u], x);
    w[u] = code8<BITS, true>(x, &pr.zero, &rs, &pr.scale);
  }
  // 32 codes = 4*BITS bytes at out (aligned to 4*BITS; 4-byte words for BITS = 3).
  if constexpr (BITS == 2) {
    *reinterpret_cast<uint2*>(out) =
        make_uint2(static_cast<uint32_t>(w[0] | (w[1] << 16)),
                   static_cast<uint32_t>(w[2] | (w[3] << 16)));
  } else if constexpr (BITS == 4) {
    *reinterpret_cast<uint4*>(out) = make_uint4(static_cast<uint32_t>(w[0]),
                                                static_cast<uint32_t>(w[1]),
                                                static_cast<uint32_t>(w[2]),
                                                static_cast<uint32_t>(w[3]));
  } else if constexpr (BITS == 8) {
    uint4* o = reinterpret_cast<uint4*>(out);
    o[0] = make_uint4(static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[0] >> 32),
                      static_cast<uint32_t>(w[1]), static_cast<uint32_t>(w[1] >> 32));
    o[1] = make_uint4(static_cast<uint32_t>(w[2]), static_cast<uint32_t>(w[2] >> 32),
                      static_cast<uint32_t>(w[3]), static_cast<uint32_t>(w[3] >> 32));
  } else {  // BITS == 3: 96 bits, chunk u at bit 24u
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    o[0] = static_cast<uint32_t>(w[0] | (w[1] << 24));
    o[1] = static_cast<uint32_t>((w[1] >> 8) | (w[2] << 16));
    o[2] = static_cast<uint32_t>((w[2] >> 16) | (w[3] << 8));
  }
}

// Value-only per-channel min / max over N chunks of the same 8 channels (any order; see the
// header): keys fold a thread's tokens, values a thread's channel chunks.
template <typename E, int N>
__device__ __forceinline__ void chunk_minmax(const Raw8<E> (&f)[N], float (&mn)[8],
                                             float (&mx)[8]) {
  MinMax8<E> m;
  m.init(f[0]);
#pragma unroll
  for (int i = 1; i < N; ++i) m.fold(f[i]);
  m.get(mn, mx);
}

// Min and max of a value group (lanes consecutive lanes, kValChunks chunks each): value-only
// (any order), then the exact fallback where it may differ (see the header). Every lane of the
// warp takes part in the shuffles.
template <typename E>
__device__ __forceinline__ void value_minmax(const Raw8<E> (&f)[kValChunks], int lanes, int lane,
                                             float& mn, float& mx) {
  {
    float a[8], c[8];
    chunk_minmax<E>(f, a, c);
    mn = a[0];
    mx = c[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) {
      mn = min_nanprop(mn, a[i]);
      mx = max_nanprop(mx, c[i]);
    }
  }
  for (int off = 1; off < lanes; off <<= 1) {
    mn = min_nanprop(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = max_nanprop(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  const bool bad = !(extremum_is_exact(mn) && extremum_is_exact(mx));
  if (__any_sync(0xffffffffu, bad)) {
    // Exact: ascending channels within the lane, then the ordered segmented tree.
    float x0[8];
    raw_to_float<E>(f[0], x0);
    mn = x0[0];
    mx = x0[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) {
      mn = nan_min(mn, x0[i]);
      mx = nan_max(mx, x0[i]);
    }
#pragma unroll
    for (int u = 1; u < kValChunks; ++u) {
      float x[8];
      raw_to_float<E>(f[u], x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        mn = nan_min(mn, x[i]);
        mx = nan_max(mx, x[i]);
      }
    }
    for (int off = 1; off < lanes; off <<= 1) {
      const float omn = __shfl_down_sync(0xffffffffu, mn, off);
      const float omx = __shfl_down_sync(0xffffffffu, mx, off);
      if ((lane & (2 * off - 1)) == 0) {
        mn = nan_min(mn, omn);
        mx = nan_max(mx, omx);
      }
    }
    const int leader = lane & ~(lanes - 1);
    mn = __shfl_sync(0xffffffffu, mn, leader);
    mx = __shfl_sync(0xffffffffu, mx, leader);
  }
}

template <typename E>
__global__ void __launch_bounds__(256)
quantize_values_fast(const E* __restrict__ v, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                     int T, int D, int bits, int Gv, bool vec, uint8_t* __restrict__ codes,
                     __half* __restrict__ scale, __half* __restrict__ zero) {
  const int lane = (threadIdx.y * blockDim.x + threadIdx.x) & 31;
  const int lanes = Gv / 32;  // threads per value group (1, 2 or 4)
  const int t = blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = t < T;
  const int h = blockIdx.y, b = blockIdx.z;
  Raw8<E> f[kValChunks];
  if (valid) {
    const E* p = v + b * sb + h * sh + static_cast<int64_t>(t) * st +
                 static_cast<int64_t>(threadIdx.x) * (kValChunks * kChunk) * sd;
#pragma unroll
    for (int u = 0; u < kValChunks; ++u) load_raw<E>(p + u * kChunk * sd, sd, vec, f[u]);
  } else {
    const E one = from_float<E>(1.0f);
#pragma unroll
    for (int u = 0; u < kValChunks; ++u) load_raw<E>(&one, 0, false, f[u]);
  }
  float mn, mx;
  value_minmax<E>(f, lanes, lane, mn, mx);
  const int64_t row = (static_cast<int64_t>(b) * gridDim.y + h) * T + t;
  const int ngv = D / Gv;
  const int64_t si = row * ngv + (threadIdx.x >> (__ffs(lanes) - 1));  // lanes: power of 2
  uint8_t* out = codes + row * (static_cast<int64_t>(D) * bits / 8) +
                 static_cast<int64_t>(threadIdx.x) * (kValChunks * bits);
  dispatch_bits(bits, [&](auto bc) {
    quantize_values_body<E, decltype(bc)::value>(f, mn, mx, valid, lanes, threadIdx.x, out, scale,
                                                 zero, si);
  });
}

// e[i] = x[i] - asym_dequant(code_i, s[i], z[i]) for the 8 codes of a packed chunk word.
// float(code) exactly: the float with bits 0x4B000000 | code is 2^23 + code (code < 2^8), so
// subtracting 2^23 is exact; then multiply, round, add, round, subtract (asym_dequant, no FMA).
template <int KB>
__device__ __forceinline__ void residual8(const float (&x)[8], uint64_t cw, const float (&sv)[8],
                                          const float (&zv)[8], float (&e)[8]) {
  constexpr uint32_t mask = (1u << KB) - 1u;
  const uint32_t lo = static_cast<uint32_t>(cw);
  const uint32_t hi = static_cast<uint32_t>(cw >> 32);  // only KB == 8 uses it
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t code;
    if constexpr (KB == 8) {
      code = ((i < 4 ? lo : hi) >> ((i & 3) * 8)) & mask;
    } else {
      code = (lo >> (i * KB)) & mask;
    }
    const float cf = sub_rn(__uint_as_float(0x4B000000u | code), 8388608.0f);
    const float khat = add_rn(mul_rn(cf, sv[i]), zv[i]);
    e[i] = sub_rn(x[i], khat);
  }
}

__device__ __forceinline__ void load8_smem(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void store8_smem(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// ---------------------------------------------------------------------------------------------
// quantize_keys: grid (T/G, H, B), block (D/8, G/4). Thread (q, s) loads tokens [4s, 4s+4) of
// the group, chunk q (all loads in flight), reduces them value-only and writes the partial to
// shared memory; thread c merges the G/4 partials of channel c (value-only) and, only when that
// result is NaN or +-0, re-reduces channel c exactly in ascending t from global memory. Then
// every thread quantises and packs its register tile (BITS bytes per token).
constexpr int kKeyTok = 4;  // tokens per thread

// RESID (quantize_kv): also the residuals e = x - (code*s + z) of the kKeyTok tokens, as
// residual8 forms them from the stored codes, into the rows e, e + ES, ... of shared memory.
template <typename E, int BITS, bool RESID = false>
__device__ __forceinline__ void quantize_keys_codes(const Raw8<E> (&f)[kKeyTok], int q,
                                                    const float* s_s, const float* z_s,
                                                    const float* rs_s, uint8_t* out,
                                                    int64_t rowb, float* e = nullptr,
                                                    int ES = 0) {
  const int c0 = q * kChunk;
  float zz[8], rr[8];
  {
    const float4 z0 = *reinterpret_cast<const float4*>(z_s + c0);
    const float4 z1 = *reinterpret_cast<const float4*>(z_s + c0 + 4);
    const float4 r0 = *reinterpret_cast<const float4*>(rs_s + c0);
    const float4 r1 = *reinterpret_cast<const float4*>(rs_s + c0 + 4);
    zz[0] = z0.x; zz[1] = z0.y; zz[2] = z0.z; zz[3] = z0.w;
    zz[4] = z1.x; zz[5] = z1.y; zz[6] = z1.z; zz[7] = z1.w;
    rr[0] = r0.x; rr[1] = r0.y; rr[2] = r0.z; rr[3] = r0.w;
    rr[4] = r1.x; rr[5] = r1.y; rr[6] = r1.z; rr[7] = r1.w;
  }
  float ss[8];
  if constexpr (RESID) load8_smem(s_s + c0, ss);
#pragma unroll
  for (int t = 0; t < kKeyTok; ++t) {
    float x[8];
    raw_to_float<E>(f[t], x);
    const uint64_t w = code8<BITS, false>(x, zz, rr, s_s + c0);
    store_packed<BITS>(out + t * rowb, w);
    if constexpr (RESID) {
      float ev[8];
      residual8<BITS>(x, w, ss, zz, ev);
      store8_smem(e + t * ES + c0, ev);
    }
  }
}

// Keys, step 1: the value-only min / max of one thread's 8 channels over its kKeyTok tokens,
// stored as float4 pairs at pm / px (row s of the [G/kKeyTok, D] partials, chunk q).
template <typename E>
__device__ __forceinline__ void key_partials(const Raw8<E> (&f)[kKeyTok], float* pm, float* px) {
  float mn[8], mx[8];
  chunk_minmax<E>(f, mn, mx);
  reinterpret_cast<float4*>(pm)[0] = make_float4(mn[0], mn[1], mn[2], mn[3]);
  reinterpret_cast<float4*>(pm)[1] = make_float4(mn[4], mn[5], mn[6], mn[7]);
  reinterpret_cast<float4*>(px)[0] = make_float4(mx[0], mx[1], mx[2], mx[3]);
  reinterpret_cast<float4*>(px)[1] = make_float4(mx[4], mx[5], mx[6], mx[7]);
}

// Keys, step 2 (after a block barrier): thread c (of nthreads) merges the S partials of channel
// c value-only and, only when that result is NaN or +-0, re-reduces the channel exactly in
// ascending t from global memory (kg: the group's first token); then the channel's stored
// scale / zero (sc, zc: the group's row) and their float32 values and reciprocal scale in
// shared memory.
template <typename E>
__device__ __forceinline__ void key_params(const E* __restrict__ kg, int64_t st, int64_t sd,
                                           int G, int D, int S, const float* pmn,
                                           const float* pmx, int tid, int nthreads, int bits,
                                           __half* __restrict__ sc, __half* __restrict__ zc,
                                           float* s_s, float* z_s, float* rs_s) {
  for (int c = tid; c < D; c += nthreads) {
    float a = pmn[c], z = pmx[c];
    for (int j = 1; j < S; ++j) {
      a = min_nanprop(a, pmn[j * D + c]);
      z = max_nanprop(z, pmx[j * D + c]);
    }
    if (!(extremum_is_exact(a) && extremum_is_exact(z))) {
      // Exact sequential reduction of channel c over the group (the CPU loop's order).
      channel_minmax_exact(kg + static_cast<int64_t>(c) * sd, st, G, a, z);
    }
    const AsymParams pr = asym_params(a, z, bits);
    sc[c] = __ushort_as_half(pr.scale_bits);
    zc[c] = __ushort_as_half(pr.zero_bits);
    s_s[c] = pr.scale;
    z_s[c] = pr.zero;
    rs_s[c] = quant_rcp(pr.scale);
  }
}

template <typename E>
__global__ void __launch_bounds__(512)
quantize_keys_fast(const E* __restrict__ k, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                   int T, int D, int bits, int G, bool vec, uint8_t* __restrict__ codes,
                   __half* __restrict__ scale, __half* __restrict__ zero) {
  extern __shared__ float qkf_smem[];
  const int nq = blockDim.x;  // D / 8
  const int S = blockDim.y;   // G / 4
  float* pmn = qkf_smem;      // [S, D]
  float* pmx = pmn + S * D;   // [S, D]
  float* s_s = pmx + S * D;   // [D]
  float* z_s = s_s + D;       // [D]
  float* rs_s = z_s + D;      // [D]
  const int q = threadIdx.x, s = threadIdx.y;
  const int tid = s * nq + q;
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * gridDim.y + h;
  const E* kg = k + b * sb + h * sh + static_cast<int64_t>(g) * G * st;  // [G, D] of the group
  const int t0 = s * kKeyTok;  // first token of this thread within the group
  const E* kp = kg + static_cast<int64_t>(t0) * st + static_cast<int64_t>(q) * kChunk * sd;

  Raw8<E> f[kKeyTok];
#pragma unroll
  for (int t = 0; t < kKeyTok; ++t) load_raw<E>(kp + t * st, sd, vec, f[t]);

  key_partials<E>(f, pmn + s * D + q * kChunk, pmx + s * D + q * kChunk);
  __syncthreads();
  key_params<E>(kg, st, sd, G, D, S, pmn, pmx, tid, nq * S, bits,
                scale + (bh * gridDim.x + g) * D, zero + (bh * gridDim.x + g) * D, s_s, z_s, rs_s);
  __syncthreads();

  const int64_t rowb = static_cast<int64_t>(nq) * bits;
  uint8_t* out = codes + (bh * T + static_cast<int64_t>(g) * G + t0) * rowb +
                 static_cast<int64_t>(q) * bits;
  dispatch_bits(bits, [&](auto bc) {
    quantize_keys_codes<E, decltype(bc)::value>(f, q, s_s, z_s, rs_s, out, rowb);
  });
}

// ---------------------------------------------------------------------------------------------
// side_code: grid (T/G, H, B), kSideThreads threads, one block per key group.
//  Phase 0: stored scale/zero of the group as float32, basis of the head transposed to
//           [R4/4][D][4] (4 columns of one channel contiguous: float4 broadcasts in phase 2).
//  Phase 1: residual e = x - (code*s + z) of all G tokens into shared memory (8-channel chunks,
//           4 chunks' loads in flight per thread, (t, q) stepped without division).
//  Optional centring (thread c: sequential ascending-t sum, then subtract).
//  Phase 2: thread (t, 4 columns j) accumulates 4 independent projections over ascending c
//           (the contract's order, separately rounded), e read as float4 (row stride D+4:
//           conflict-free), the basis as float4 broadcasts.
//  Phase 3: per token the scale (sequential j) and the packed offset-binary codes.
constexpr int kSideThreads = 128;
constexpr int kSideBatch = 4;

// Residual of the group's G tokens into e_s [G, ES]. When D/8 divides the block size (D = 8,
// 16, 32, 64, 128, ...), thread tid owns chunk q = tid % nq of tokens tid/nq + k*(128/nq): its
// scale/zero stay in registers and its pointers advance by a constant. Otherwise a generic
// mapping steps (t, q) through the flat item index without division.
template <typename E, int KB>
__device__ __forceinline__ void side_residual(const E* __restrict__ kg, int64_t st, int64_t sd,
                                              bool vec, const uint8_t* __restrict__ kc,
                                              int64_t krowb, const float* s_s, const float* z_s,
                                              int G, int nq, float* e_s, int ES) {
  const int tid = threadIdx.x;
  if (kSideThreads % nq == 0) {
    const int q = tid % nq, dt = kSideThreads / nq;
    float sv[8], zv[8];
    load8_smem(s_s + q * kChunk, sv);
    load8_smem(z_s + q * kChunk, zv);
    int t = tid / nq;
    const E* xp = kg + static_cast<int64_t>(t) * st + static_cast<int64_t>(q) * kChunk * sd;
    const uint8_t* cp = kc + t * krowb + q * KB;
    const int64_t xstep = dt * st, cstep = dt * krowb;
    float* ep = e_s + t * ES + q * kChunk;
    const int estep = dt * ES;
    for (; t < G; t += kSideBatch * dt) {
      Raw8<E> x[kSideBatch];
      uint64_t cw[kSideBatch];
#pragma unroll
      for (int w = 0; w < kSideBatch; ++w) {
        if (t + w * dt < G) {
          load_raw<E>(xp + w * xstep, sd, vec, x[w]);
          cw[w] = load_packed<KB>(cp + w * cstep);
        }
      }
#pragma unroll
      for (int w = 0; w < kSideBatch; ++w) {
        if (t + w * dt < G) {
          float xf[8], e[8];
          raw_to_float<E>(x[w], xf);
          residual8<KB>(xf, cw[w], sv, zv, e);
          store8_smem(ep + w * estep, e);
        }
      }
      xp += kSideBatch * xstep;
      cp += kSideBatch * cstep;
      ep += kSideBatch * estep;
    }
    return;
  }
  const int dt = kSideThreads / nq, dq = kSideThreads - dt * nq;  // step of (t, q) per item
  int t = tid / nq, q = tid - (tid / nq) * nq;
  while (t < G) {
    int tw[kSideBatch], qw[kSideBatch];
    Raw8<E> x[kSideBatch];
    uint64_t cw[kSideBatch];
#pragma unroll
    for (int w = 0; w < kSideBatch; ++w) {
      tw[w] = t;
      qw[w] = q;
      if (t < G) {
        load_raw<E>(kg + static_cast<int64_t>(t) * st + static_cast<int64_t>(q) * kChunk * sd,
                    sd, vec, x[w]);
        cw[w] = load_packed<KB>(kc + t * krowb + q * KB);
      }
      t += dt;
      q += dq;
      if (q >= nq) {
        q -= nq;
        ++t;
      }
    }
#pragma unroll
    for (int w = 0; w < kSideBatch; ++w) {
      if (tw[w] < G) {
        float sv[8], zv[8], xf[8], e[8];
        load8_smem(s_s + qw[w] * kChunk, sv);
        load8_smem(z_s + qw[w] * kChunk, zv);
        raw_to_float<E>(x[w], xf);
        residual8<KB>(xf, cw[w], sv, zv, e);
        store8_smem(e_s + tw[w] * ES + qw[w] * kChunk, e);
      }
    }
  }
}

// Phase 3 of both side-code kernels for one token: its scale (from the sequential nan_max of
// |y_j|, j ascending) and its r packed offset-binary codes.
__device__ __forceinline__ void side_code_token(const float* yt, int r, int side_bits, __half* zs,
                                                uint8_t* zout) {
  const int zrowb = r * side_bits / 8;
  float amax = fabsf(yt[0]);
  for (int j = 1; j < r; ++j) amax = nan_max(amax, fabsf(yt[j]));
  const uint16_t sbits = sym_scale_bits(amax, side_bits);
  *zs = __ushort_as_half(sbits);
  const float s = half_bits_to_float(sbits);
  const float rs = quant_rcp(s);
  // Bytes of the token's code row, gathered 4 at a time when the row is word aligned.
  const bool words = (zrowb & 3) == 0 && (reinterpret_cast<uintptr_t>(zout) & 3) == 0;
  for (int jb = 0; jb < zrowb; jb += 4) {
    uint32_t word = 0;
    const int nb = words ? 4 : (zrowb - jb < 4 ? zrowb - jb : 4);
    for (int bb = 0; bb < nb; ++bb) {
      const int byte_i = jb + bb;
      uint32_t byte;
      if (side_bits == 8) {
        byte = sym_code_rcp(yt[byte_i], s, rs, 8);
      } else {
        byte = sym_code_rcp(yt[2 * byte_i], s, rs, 4) |
               (sym_code_rcp(yt[2 * byte_i + 1], s, rs, 4) << 4);
      }
      if (words) {
        word |= byte << (8 * bb);
      } else {
        zout[byte_i] = static_cast<uint8_t>(byte);
      }
    }
    if (words) *reinterpret_cast<uint32_t*>(zout + jb) = word;
  }
}

// Phases of the block-per-key-group side code (side_code_fast, quantize_kv_fast); tid of nthreads
// threads, block barriers between the phases are the caller's.
// Basis of the head [D, r] transposed to u_s[(j/4*D + c)*4 + j%4] = u[c, j], columns r..R4-1 zero.
__device__ __forceinline__ void stage_basis_t(const float* __restrict__ u, int D, int r, int R4,
                                              float* u_s, int tid, int nthreads) {
  for (int c = tid; c < D; c += nthreads) {
    const float* uc = u + static_cast<int64_t>(c) * r;
    for (int j = 0; j < R4; ++j) u_s[((j >> 2) * D + c) * 4 + (j & 3)] = j < r ? uc[j] : 0.0f;
  }
}

// Centring: thread c sums channel c of the residual rows in ascending t (separately rounded from
// +0), divides by G and subtracts the mean from every row.
__device__ __forceinline__ void center_rows(float* e_s, int ES, int D, int G, int tid,
                                            int nthreads) {
  for (int c = tid; c < D; c += nthreads) {
    float acc = 0.0f;
    for (int t = 0; t < G; ++t) acc = add_rn(acc, e_s[t * ES + c]);
    const float mu = div_rn(acc, static_cast<float>(G));
    for (int t = 0; t < G; ++t) e_s[t * ES + c] = sub_rn(e_s[t * ES + c], mu);
  }
}

// Projections y[t, j] = sum_c e[t, c] u[c, j], ascending c, separately rounded products and sums
// from +0 (the contract's order): thread (t, 4 columns) keeps 4 independent sums; e rows as
// float4 (row stride ES = D + 4: conflict-free), u as float4 broadcasts. y_s: [G, 4 * nj4].
__device__ __forceinline__ void project_rows(const float* e_s, int ES, const float* u_s, int D,
                                             int G, int nj4, float* y_s, int tid, int nthreads) {
  for (int it = tid; it < G * nj4; it += nthreads) {
    const int jb = it / G, t = it - jb * G;
    const float* et = e_s + t * ES;
    const float* uj = u_s + jb * D * 4;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll 2
    for (int c = 0; c < D; c += 8) {  // D % 8 == 0
      const float4 e4a = *reinterpret_cast<const float4*>(et + c);
      const float4 e4b = *reinterpret_cast<const float4*>(et + c + 4);
      const float ev[8] = {e4a.x, e4a.y, e4a.z, e4a.w, e4b.x, e4b.y, e4b.z, e4b.w};
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        const float4 u4 = *reinterpret_cast<const float4*>(uj + (c + cc) * 4);
        a0 = add_rn(a0, mul_rn(ev[cc], u4.x));
        a1 = add_rn(a1, mul_rn(ev[cc], u4.y));
        a2 = add_rn(a2, mul_rn(ev[cc], u4.z));
        a3 = add_rn(a3, mul_rn(ev[cc], u4.w));
      }
    }
    *reinterpret_cast<float4*>(y_s + t * 4 * nj4 + jb * 4) = make_float4(a0, a1, a2, a3);
  }
}

// side_code_token for the G tokens of a group (thread t), from the projections y_s [G, R4];
// zs0 / zc0: the group's first token's scale and code row.
__device__ __forceinline__ void side_code_rows(const float* y_s, int R4, int r, int side_bits,
                                               int G, __half* zs0, uint8_t* zc0, int tid,
                                               int nthreads) {
  const int zrowb = r * side_bits / 8;
  for (int t = tid; t < G; t += nthreads) {
    side_code_token(y_s + t * R4, r, side_bits, zs0 + t, zc0 + static_cast<int64_t>(t) * zrowb);
  }
}

// The side code of a key group from its residual rows e_s [G, ES] (complete: after a block
// barrier) and the staged basis u_s: optional centring, projections into y_s [G, R4], then each
// token's scale and codes (zs0 / zc0: the group's first token's). Every thread of the block
// calls it (block barriers inside).
__device__ __forceinline__ void side_code_from_residuals(float* e_s, int ES, const float* u_s,
                                                         int D, int G, int r, int side_bits,
                                                         bool center, float* y_s, __half* zs0,
                                                         uint8_t* zc0, int tid, int nthreads) {
  const int R4 = (r + 3) & ~3;
  if (center) {
    center_rows(e_s, ES, D, G, tid, nthreads);
    __syncthreads();
  }
  project_rows(e_s, ES, u_s, D, G, R4 / 4, y_s, tid, nthreads);
  __syncthreads();
  side_code_rows(y_s, R4, r, side_bits, G, zs0, zc0, tid, nthreads);
}

template <typename E>
__global__ void __launch_bounds__(kSideThreads)
side_code_fast(const E* __restrict__ k, int64_t sb, int64_t sh, int64_t st, int64_t sd, bool vec,
               const uint8_t* __restrict__ k_codes, const __half* __restrict__ k_scale,
               const __half* __restrict__ k_zero, const float* __restrict__ basis, int T, int D,
               int r, int key_bits, int G, int side_bits, bool center,
               uint8_t* __restrict__ z_codes, __half* __restrict__ z_scale) {
  extern __shared__ float scf_smem[];
  const int ES = D + 4;             // residual row stride (floats)
  const int R4 = (r + 3) & ~3;      // basis columns padded to 4
  float* e_s = scf_smem;            // [G, ES]
  float* u_s = e_s + G * ES;        // [R4 / 4, D, 4]
  float* y_s = u_s + D * R4;        // [G, R4]
  float* s_s = y_s + G * R4;        // [D]
  float* z_s = s_s + D;             // [D]
  const int tid = threadIdx.x;
  const int nq = D / kChunk;
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int ngroups = gridDim.x;
  const int64_t bh = static_cast<int64_t>(b) * gridDim.y + h;
  const int64_t t0 = static_cast<int64_t>(g) * G;
  const int64_t krowb = static_cast<int64_t>(nq) * key_bits;
  const E* kg = k + b * sb + h * sh + t0 * st;
  const uint8_t* kc = k_codes + (bh * T + t0) * krowb;
  const __half* ksg = k_scale + (bh * ngroups + g) * D;
  const __half* kzg = k_zero + (bh * ngroups + g) * D;
  const float* u = basis + static_cast<int64_t>(h) * D * r;

  for (int c = tid; c < D; c += kSideThreads) {
    s_s[c] = __half2float(ksg[c]);
    z_s[c] = __half2float(kzg[c]);
  }
  stage_basis_t(u, D, r, R4, u_s, tid, kSideThreads);
  __syncthreads();  // side_residual reads other threads' s_s / z_s

  dispatch_bits(key_bits, [&](auto bc) {
    side_residual<E, decltype(bc)::value>(kg, st, sd, vec, kc, krowb, s_s, z_s, G, nq, e_s, ES);
  });
  __syncthreads();
  side_code_from_residuals(e_s, ES, u_s, D, G, r, side_bits, center, y_s,
                           z_scale + bh * T + t0, z_codes + (bh * T + t0) * (r * side_bits / 8),
                           tid, kSideThreads);
}

// ---------------------------------------------------------------------------------------------
// side_code_tok: grid (ceil(T / kSideThreads), H, B), one thread per token; used when there is
// no centring (the default) and r <= 16. The token's residual e = x - (code*s + z) is formed
// channel by channel and projected at once onto the NJ4*4 (zero-padded) basis columns: each
// projection sums ascending c with separately rounded products and sums from +0, as the
// contract (and side_code_fast) does, so the result is the same bit for bit. No residual
// buffer: shared memory holds the basis [D][NJ4*4] (float4 broadcasts), the (scale, zero)
// pairs of the block's key groups and the projections for the tail, ~10 KB against ~41 KB (so
// the occupancy is bound by registers, 52, instead of shared memory). At 32k tokens x batch 8 x
// 8 heads (ncu): 300M warp instructions against 345M, 54% against 27% of the warp slots active,
// 0.44 against 0.51 ms.
template <typename E, int NJ4>
__global__ void __launch_bounds__(kSideThreads)
side_code_tok(const E* __restrict__ k, int64_t sb, int64_t sh, int64_t st, int64_t sd, bool vec,
              const uint8_t* __restrict__ k_codes, const __half* __restrict__ k_scale,
              const __half* __restrict__ k_zero, const float* __restrict__ basis, int T, int D,
              int r, int key_bits, int G, int side_bits, uint8_t* __restrict__ z_codes,
              __half* __restrict__ z_scale) {
  constexpr int R4 = 4 * NJ4;
  extern __shared__ float scf_smem[];
  const int tid = threadIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tb0 = blockIdx.x * kSideThreads;           // first token of the block
  const int tb1 = min(tb0 + kSideThreads, T);          // G divides kSideThreads and T
  const int ngb = (tb1 - tb0) / G;                     // key groups of the block
  float* u_s = scf_smem;                               // [D][R4]
  float2* sz_s = reinterpret_cast<float2*>(u_s + D * R4);  // [ngb][D] (scale, zero)
  float* y_s = u_s + D * R4 + 2 * (kSideThreads / G) * D;  // [kSideThreads][R4]
  const int64_t bh = static_cast<int64_t>(b) * gridDim.y + h;
  const float* u = basis + static_cast<int64_t>(h) * D * r;
  for (int idx = tid; idx < D * R4; idx += kSideThreads) {
    const int c = idx / R4, j = idx - c * R4;
    u_s[idx] = j < r ? u[static_cast<int64_t>(c) * r + j] : 0.0f;
  }
  const int64_t g0 = bh * (T / G) + tb0 / G;
  for (int idx = tid; idx < ngb * D; idx += kSideThreads) {
    sz_s[idx] = make_float2(__half2float(k_scale[g0 * D + idx]), __half2float(k_zero[g0 * D + idx]));
  }
  __syncthreads();
  const int t = tb0 + tid;
  if (t >= tb1) return;  // no block barrier below
  const int nq = D / kChunk;
  const int64_t krowb = static_cast<int64_t>(nq) * key_bits;
  const E* xp = k + b * sb + h * sh + static_cast<int64_t>(t) * st;
  const uint8_t* cp = k_codes + (bh * T + t) * krowb;
  const float2* szg = sz_s + (tid / G) * D;
  float acc[R4];
#pragma unroll
  for (int j = 0; j < R4; ++j) acc[j] = 0.0f;
  dispatch_bits(key_bits, [&](auto bc) {
    constexpr int KB = decltype(bc)::value;
#pragma unroll 2
    for (int q = 0; q < nq; ++q) {
      Raw8<E> x;
      load_raw<E>(xp + static_cast<int64_t>(q) * kChunk * sd, sd, vec, x);
      const uint64_t cw = load_packed<KB>(cp + q * KB);
      float xf[8], sv[8], zv[8], e[8];
      raw_to_float<E>(x, xf);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float2 p = szg[q * kChunk + i];
        sv[i] = p.x;
        zv[i] = p.y;
      }
      residual8<KB>(xf, cw, sv, zv, e);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4* uc = reinterpret_cast<const float4*>(u_s + (q * kChunk + i) * R4);
#pragma unroll
        for (int jb = 0; jb < NJ4; ++jb) {
          const float4 u4 = uc[jb];
          acc[4 * jb] = add_rn(acc[4 * jb], mul_rn(e[i], u4.x));
          acc[4 * jb + 1] = add_rn(acc[4 * jb + 1], mul_rn(e[i], u4.y));
          acc[4 * jb + 2] = add_rn(acc[4 * jb + 2], mul_rn(e[i], u4.z));
          acc[4 * jb + 3] = add_rn(acc[4 * jb + 3], mul_rn(e[i], u4.w));
        }
      }
    }
  });
  float* yt = y_s + tid * R4;
#pragma unroll
  for (int jb = 0; jb < NJ4; ++jb) {
    reinterpret_cast<float4*>(yt)[jb] =
        make_float4(acc[4 * jb], acc[4 * jb + 1], acc[4 * jb + 2], acc[4 * jb + 3]);
  }
  const int zrowb = r * side_bits / 8;
  side_code_token(yt, r, side_bits, z_scale + bh * T + t, z_codes + (bh * T + t) * zrowb);
}

// ---------------------------------------------------------------------------------------------
// quantize_kv: the three quantisers of one key group in one block, k read once. grid (T/G, H, B),
// NT = G*D/32 threads (a multiple of 32, <= kKvMaxThreads), 16-bit inputs.
//  Loads: thread tid = s*(D/8) + q holds tokens [4s, 4s+4) x chunk q of the keys (as
//         quantize_keys_fast) and the value chunks [32xv, 32xv+32) of token tv = tid/(D/32)
//         (as quantize_values_fast: a value group is Gv/32 consecutive lanes), all in flight at
//         once; the head's basis is staged meanwhile.
//  Keys:  partial min/max -> per-channel scale/zero (key_partials, key_params), then each
//         thread's codes and their residuals e = x - (code*s + z) straight into shared memory
//         (the partials' space): the side code reads neither k nor the codes back.
//  Values: value_minmax + quantize_values_body first (their registers are free before the
//         key phase: 80 instead of 104 registers).
//  Side code: optional centring, project_rows (threads (t, 4 columns)), side_code_rows.
// Every step is the separate kernels' code on the same operands, so the outputs are theirs (and
// the CPU kernels') bit for bit.
// Measured (H200, batch 8 x 8 heads, fp16, 2-bit K/V, rank-8 8-bit side code): reading k once
// does not pay at scale: 32k tokens 1.05-1.11 ms vs 0.89-0.95 ms for the three kernels, with
// the same instruction count (668M vs ~657M warp instructions; ncu: 63% issue-active, 21 of 24
// warps resident, DRAM 25% busy). The append is bound by instruction issue (the side code's
// 2,048 separately rounded float ops per token alone are ~134M), and here the parameter,
// projection and side-code phases run on half or a quarter of the block between barriers.
// Within one wave it wins (one launch instead of three): quantize_kv uses it there only.
constexpr int kKvMaxThreads = 256;
// Blocks per SM quantize_kv_fast is compiled for (register cap 65536 / (256 * blocks)): 3 gives
// 80 registers (68 B of spills) and 24 warps per SM; unbounded it takes 104 (16 warps).
#ifndef HEADQ_KV_MIN_BLOCKS
#define HEADQ_KV_MIN_BLOCKS 3
#endif

template <typename E>
__global__ void __launch_bounds__(kKvMaxThreads, HEADQ_KV_MIN_BLOCKS)
quantize_kv_fast(const E* __restrict__ k, int64_t ksb, int64_t ksh, int64_t kst, int64_t ksd,
                 bool kvec, const E* __restrict__ v, int64_t vsb, int64_t vsh, int64_t vst,
                 int64_t vsd, bool vvec, const float* __restrict__ basis, int T, int D, int r,
                 int key_bits, int G, int side_bits, bool center, int value_bits, int Gv,
                 uint8_t* __restrict__ k_codes, __half* __restrict__ k_scale,
                 __half* __restrict__ k_zero, uint8_t* __restrict__ z_codes,
                 __half* __restrict__ z_scale, uint8_t* __restrict__ v_codes,
                 __half* __restrict__ v_scale, __half* __restrict__ v_zero) {
  extern __shared__ float qkv_smem[];
  const int NT = blockDim.x;
  const int tid = threadIdx.x;
  const int nq = D / kChunk, S = G / kKeyTok;  // NT == nq * S
  const int ES = D + 4;
  const int R4 = (r + 3) & ~3;
  float* e_s = qkv_smem;            // [G, ES] residuals; first the partials:
  float* pmn = e_s;                 //   [S, D] min
  float* pmx = e_s + S * D;         //   [S, D] max
  float* u_s = e_s + G * ES;        // [R4 / 4, D, 4] basis
  float* y_s = u_s + D * R4;        // [G, R4] projections
  float* s_s = y_s + G * R4;        // [D] key scale, zero, reciprocal scale
  float* z_s = s_s + D;
  float* rs_s = z_s + D;
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(b) * gridDim.y + h;
  const int64_t t0 = static_cast<int64_t>(g) * G;

  const int s = tid / nq, q = tid - s * nq;
  const E* kg = k + b * ksb + h * ksh + t0 * kst;
  Raw8<E> fk[kKeyTok];
  {
    const E* kp =
        kg + static_cast<int64_t>(s * kKeyTok) * kst + static_cast<int64_t>(q) * kChunk * ksd;
#pragma unroll
    for (int t = 0; t < kKeyTok; ++t) load_raw<E>(kp + t * kst, ksd, kvec, fk[t]);
  }
  const int nxv = D / 32;
  const int tv = tid / nxv, xv = tid - tv * nxv;
  Raw8<E> fv[kValChunks];
  {
    const E* vp = v + b * vsb + h * vsh + (t0 + tv) * vst + static_cast<int64_t>(xv) * 32 * vsd;
#pragma unroll
    for (int u = 0; u < kValChunks; ++u) load_raw<E>(vp + u * kChunk * vsd, vsd, vvec, fv[u]);
  }
  stage_basis_t(basis + static_cast<int64_t>(h) * D * r, D, r, R4, u_s, tid, NT);

  {
    const int lanes = Gv / 32;
    float mn, mx;
    value_minmax<E>(fv, lanes, tid & 31, mn, mx);
    const int64_t row = bh * T + t0 + tv;
    const int64_t si = row * (D / Gv) + (xv >> (__ffs(lanes) - 1));
    uint8_t* out = v_codes + row * (static_cast<int64_t>(D) * value_bits / 8) +
                   static_cast<int64_t>(xv) * (kValChunks * value_bits);
    dispatch_bits(value_bits, [&](auto bc) {
      quantize_values_body<E, decltype(bc)::value>(fv, mn, mx, true, lanes, xv, out, v_scale,
                                                   v_zero, si);
    });
  }
  key_partials<E>(fk, pmn + s * D + q * kChunk, pmx + s * D + q * kChunk);
  __syncthreads();
  key_params<E>(kg, kst, ksd, G, D, S, pmn, pmx, tid, NT, key_bits,
                k_scale + (bh * gridDim.x + g) * D, k_zero + (bh * gridDim.x + g) * D, s_s, z_s,
                rs_s);
  __syncthreads();  // s_s / z_s / rs_s complete; the partials are dead (e_s may overwrite them)

  {
    const int64_t rowb = static_cast<int64_t>(nq) * key_bits;
    uint8_t* out =
        k_codes + (bh * T + t0 + s * kKeyTok) * rowb + static_cast<int64_t>(q) * key_bits;
    float* e = e_s + s * kKeyTok * ES;
    dispatch_bits(key_bits, [&](auto bc) {
      quantize_keys_codes<E, decltype(bc)::value, true>(fk, q, s_s, z_s, rs_s, out, rowb, e, ES);
    });
  }
  __syncthreads();  // e_s complete
  side_code_from_residuals(e_s, ES, u_s, D, G, r, side_bits, center, y_s,
                           z_scale + bh * T + t0, z_codes + (bh * T + t0) * (r * side_bits / 8),
                           tid, NT);
}

// ---------------------------------------------------------------------------------------------
// dequantize_keys / dequantize_values, 8 channels per thread (the dequantised prefill path
// rebuilds the whole quantised region with them). The 8 codes of a chunk are `bits` whole bytes
// (8 * bits bits, starting on a byte boundary), read once and unpacked from one 64-bit word
// (LSB first, as get_code); the 8 scales / zeros of a key chunk are one 16-byte load each; a
// value chunk lies in one value group (Gv % 8 == 0), one scale and zero. Same arithmetic as the
// one-thread-per-element kernels (asym_dequant), so the same bits. 32-bit indices (the launcher
// checks the sizes); grid-stride over chunks.
__device__ __forceinline__ uint64_t load_code_bytes(const uint8_t* p, int bits) {
  uint64_t w = 0;
  for (int i = 0; i < bits; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
  return w;
}

template <typename E>
__global__ void __launch_bounds__(256)
dequantize_keys_fast(const uint8_t* __restrict__ codes,  // [BH, T, D*bits/8], slabs csh apart
                     const __half* __restrict__ scale,   // [BH, T/G, D], slabs ssh apart
                     const __half* __restrict__ zero,    // (scale, zero: 16-byte aligned)
                     InSlabs in, uint32_t nchunks, uint32_t T, uint32_t D, int bits,
                     uint32_t G, OutRows o, E* __restrict__ out) {  // [B, H, T, D] as o says
  const uint32_t cpr = D / 8;  // chunks per token row
  const uint32_t mask = (1u << bits) - 1u;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < nchunks;
       i += gridDim.x * blockDim.x) {
    const uint32_t row = i / cpr, j = i - row * cpr;
    const uint32_t bh = row / T, t = row - bh * T;
    const uint64_t w = load_code_bytes(
        codes + bh * in.codes + static_cast<size_t>(t * cpr + j) * bits, bits);
    const size_t si = bh * in.scale + static_cast<size_t>(t / G) * D + 8 * j;
    union {
      uint4 u;
      __half h[8];
    } sc, zr;
    sc.u = *reinterpret_cast<const uint4*>(scale + si);
    zr.u = *reinterpret_cast<const uint4*>(zero + si);
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t code = static_cast<uint32_t>(w >> (k * bits)) & mask;
      x[k] = asym_dequant(code, __half2float(sc.h[k]), __half2float(zr.h[k]));
    }
    o.store(out, i, bh, t, j, x);
  }
}

template <typename E>
__global__ void __launch_bounds__(256)
dequantize_values_fast(const uint8_t* __restrict__ codes,  // [BH, T, D*bits/8], slabs csh apart
                       const __half* __restrict__ scale,   // [BH, T, D/Gv], slabs ssh apart
                       const __half* __restrict__ zero,
                       InSlabs in, uint32_t nchunks, uint32_t T, uint32_t D, int bits,
                       uint32_t Gv, OutRows o, E* __restrict__ out) {  // [B, H, T, D] as o says
  const uint32_t cpr = D / 8, ngv = D / Gv;
  const uint32_t mask = (1u << bits) - 1u;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < nchunks;
       i += gridDim.x * blockDim.x) {
    const uint32_t row = i / cpr, j = i - row * cpr;
    const uint32_t bh = row / T, t = row - bh * T;
    const uint64_t w = load_code_bytes(
        codes + bh * in.codes + static_cast<size_t>(t * cpr + j) * bits, bits);
    const size_t si = bh * in.scale + static_cast<size_t>(t) * ngv + (8 * j) / Gv;
    const float s = __half2float(scale[si]), z = __half2float(zero[si]);
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k)
      x[k] = asym_dequant(static_cast<uint32_t>(w >> (k * bits)) & mask, s, z);
    o.store(out, i, bh, t, j, x);
  }
}

// Side code j of a token's row (side_bits 8 or 4: whole bytes or nibbles, LSB first; what
// get_code gives for these two widths without its general bit arithmetic).
__device__ __forceinline__ uint32_t side_code_at(const uint8_t* zrow, int j, int side_bits) {
  return side_bits == 8 ? zrow[j] : (zrow[j >> 1] >> ((j & 1) * 4)) & 15u;
}

// One 8-channel chunk of reconstruct_keys, shared by its two kernels: the dequantised key
// (asym_dequant of the 8 codes in w) plus sign * Σ_j ẑ_j U[8c + k, j], per channel in the
// order of docs/LAYOUT.md (as cpu::reconstruct_keys_slice: j ascending, every product and sum
// rounded once), in x. basis_row(j, u) fills u[k] = U[8c + k, j].
template <typename BasisRow>
__device__ __forceinline__ void reconstruct_chunk(uint64_t w, int bits, const float (&sc)[8],
                                                  const float (&zr)[8],
                                                  const uint8_t* __restrict__ zrow, float zs,
                                                  int r, int side_bits, float sign,
                                                  BasisRow basis_row, float (&x)[8]) {
  const uint32_t mask = (1u << bits) - 1u;
  float corr[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    x[k] = asym_dequant(static_cast<uint32_t>(w >> (k * bits)) & mask, sc[k], zr[k]);
    corr[k] = 0.0f;
  }
  for (int j = 0; j < r; ++j) {
    const float zj = sym_dequant(side_code_at(zrow, j, side_bits), zs, side_bits);
    float u[8];
    basis_row(j, u);
#pragma unroll
    for (int k = 0; k < 8; ++k) corr[k] = add_rn(corr[k], mul_rn(zj, u[k]));
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = add_rn(x[k], mul_rn(sign, corr[k]));
}

// reconstruct_keys: dequantize_keys_fast's 8 channels per thread plus the side-code correction
// (reconstruct_chunk), written once in E. One block per (b, h) and tile of tokens: the head's
// basis is staged in shared memory rank-major per chunk, u_s[c * (8r + 4) + 8j + k] =
// U[h, 8c + k, j], so that a rank's 8 values are two 16-byte loads; the row length 8r + 4 (an
// odd multiple of 4 floats) puts the 8 chunks of a quarter-warp's 16-byte loads in distinct
// banks. Thread (lane, c) keeps chunk c and walks the tile's tokens lane, lane + lanes, ...,
// reloading the scales and zeros only when it crosses into the next key group. The launcher
// takes reconstruct_keys_l1 where the basis does not fit (48 KB) or a token row has more than
// 256 chunks.
template <typename E>
__global__ void __launch_bounds__(256)
reconstruct_keys_smem(const uint8_t* __restrict__ codes,    // [BH, T, D*bits/8]
                      const __half* __restrict__ scale,     // [BH, T/G, D]
                      const __half* __restrict__ zero,      // [BH, T/G, D]
                      const uint8_t* __restrict__ z_codes,  // [BH, T, r*side_bits/8]
                      const __half* __restrict__ z_scale,   // [BH, T]
                      const float* __restrict__ basis,      // [H, D, r]
                      InSlabs in,  // the five inputs' slab strides
                      uint32_t n_tiles, uint32_t tile_tokens, uint32_t H, uint32_t T, int D,
                      int bits, uint32_t G, int r, int side_bits, float sign, OutRows o,
                      E* __restrict__ out) {  // [B, H, T, D] as o says
  extern __shared__ float4 u_s4[];  // [D/8][(8r + 4) / 4]
  float* u_s = reinterpret_cast<float*>(u_s4);
  const uint32_t bh = blockIdx.x / n_tiles, tile = blockIdx.x - bh * n_tiles;
  const int cpr = D / 8, row_len = 8 * r + 4;
  const float* ub = basis + static_cast<size_t>(bh % H) * D * r;
  for (int i = threadIdx.x; i < D * r; i += blockDim.x) {
    const int d = i / r, j = i - d * r;
    u_s[(d / 8) * row_len + 8 * j + (d % 8)] = ub[i];
  }
  __syncthreads();
  const int lanes = blockDim.x / cpr, c = threadIdx.x % cpr, lane = threadIdx.x / cpr;
  if (lane >= lanes) return;
  const float4* u = u_s4 + c * (row_len / 4);
  const auto basis_row = [u](int j, float (&v)[8]) {
    const float4 a = u[2 * j], b = u[2 * j + 1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  };
  const int z_row_bytes = r * side_bits / 8;
  const uint32_t t_end = min(T, (tile + 1) * tile_tokens);
  // this block's slab of each input
  const uint8_t* cs = codes + bh * in.codes + c * bits;
  const __half* ss = scale + bh * in.scale + 8 * c;
  const __half* zs = zero + bh * in.scale + 8 * c;
  const uint8_t* zcs = z_codes + bh * in.z_codes;
  const __half* zss = z_scale + bh * in.z_scale;
  const size_t bhT = static_cast<size_t>(bh) * T;
  uint32_t g_end = 0;  // end of the key group whose scales are loaded
  float sc[8], zr[8];
  for (uint32_t t = tile * tile_tokens + lane; t < t_end; t += lanes) {
    if (t >= g_end) {
      const uint32_t g = t / G;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sc[k] = __half2float(ss[static_cast<size_t>(g) * D + k]);
        zr[k] = __half2float(zs[static_cast<size_t>(g) * D + k]);
      }
      g_end = (g + 1) * G;
    }
    const uint64_t w = load_code_bytes(cs + static_cast<size_t>(t) * cpr * bits, bits);
    float x[8];
    reconstruct_chunk(w, bits, sc, zr, zcs + static_cast<size_t>(t) * z_row_bytes,
                      __half2float(zss[t]), r, side_bits, sign, basis_row, x);
    o.store(out, static_cast<int64_t>((bhT + t) * cpr + c), bh, t, c, x);
  }
}

// reconstruct_keys where the basis does not fit in shared memory: one thread per 8-channel
// chunk, grid-stride, the basis read through L1 (the same arithmetic and bits).
template <typename E>
__global__ void __launch_bounds__(256)
reconstruct_keys_l1(const uint8_t* __restrict__ codes,    // [BH, T, D*bits/8]
                    const __half* __restrict__ scale,     // [BH, T/G, D]
                    const __half* __restrict__ zero,      // [BH, T/G, D]
                    const uint8_t* __restrict__ z_codes,  // [BH, T, r*side_bits/8]
                    const __half* __restrict__ z_scale,   // [BH, T]
                    const float* __restrict__ basis,      // [H, D, r]
                    InSlabs in,  // the five inputs' slab strides
                    int64_t nchunks, int64_t H, int64_t T, int64_t D, int bits, int64_t G,
                    int64_t r, int side_bits, float sign, OutRows o,  // H, T < 2^32
                    E* __restrict__ out) {  // [B, H, T, D] as o says
  const int64_t cpr = D / 8;  // chunks per token row
  const int64_t z_row_bytes = r * side_bits / 8;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nchunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cpr, j = i - row * cpr;
    const int64_t bh = row / T, t = row - bh * T;
    const uint64_t w = load_code_bytes(codes + bh * in.codes + (t * cpr + j) * bits, bits);
    const int64_t si = bh * in.scale + (t / G) * D + 8 * j;
    float sc[8], zr[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      sc[k] = __half2float(scale[si + k]);
      zr[k] = __half2float(zero[si + k]);
    }
    const float* u = basis + ((bh % H) * D + 8 * j) * r;  // U[h, 8j + k, jj] = u[k * r + jj]
    const auto basis_row = [u, r](int jj, float (&v)[8]) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = __ldg(u + k * r + jj);
    };
    float x[8];
    reconstruct_chunk(w, bits, sc, zr, z_codes + bh * in.z_codes + t * z_row_bytes,
                      __half2float(z_scale[bh * in.z_scale + t]), static_cast<int>(r), side_bits,
                      sign, basis_row, x);
    o.store(out, i, static_cast<uint32_t>(bh), static_cast<uint32_t>(t), static_cast<uint32_t>(j),
            x);
  }
}

}  // namespace fastq
