// Bandwidth-oriented CUDA kernels of quantize_keys, quantize_values and side_code.
// Included by quant_kernels.cu only (inside headq::cuda::{anonymous}); the launchers there pick
// these unless HEADQ_QUANT_IMPL=old or an input does not meet the fast path's alignment needs.
//
// Bit-exactness (docs/LAYOUT.md) is argued, not approximated:
//  * min/max: nan_min(a, b) / nan_max(a, b) always return one of their operands bit for bit,
//    namely the winner of a TOTAL order on (value, position): a NaN beats every non-NaN and a
//    later NaN beats an earlier one; among non-NaNs the smaller (larger) value wins and on
//    ties (-0.0 vs +0.0, equal values) the earlier element wins. Selecting the extremum of a
//    total order is associative, so ANY reduction tree that only merges adjacent, position-
//    ordered ranges as nan_min(earlier, later) returns exactly the element the sequential CPU
//    loop returns. All reductions below merge contiguous ranges in ascending position order.
//  * quantiser/dequantiser math goes through headq/quant.h (__fdiv_rn, rintf, __f*_rn).
//  * the centring sum and the side-code projection are sequential in ascending t / c, one
//    thread per (channel) / (token, j), exactly the documented order.
//  * packing: 8 consecutive codes of b bits form exactly b whole bytes of the little-endian
//    stream (chunk q of a row starts at byte q*b), written as one little-endian word.
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

// Pack 8 codes of `bits` bits into the low 8*bits bits (little-endian stream order).
__device__ __forceinline__ uint64_t pack8(const uint32_t (&c)[8], int bits) {
  uint64_t w = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) w |= static_cast<uint64_t>(c[i]) << (i * bits);
  return w;
}

// Store the `bits` bytes of a packed chunk at p (p aligned to `bits` for bits 2/4/8).
__device__ __forceinline__ void store_packed(uint8_t* p, uint64_t w, int bits) {
  switch (bits) {
    case 2:
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w);
      break;
    case 4:
      *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(w);
      break;
    case 8:
      *reinterpret_cast<unsigned long long*>(p) = static_cast<unsigned long long>(w);
      break;
    default:
      for (int i = 0; i < bits; ++i) p[i] = static_cast<uint8_t>(w >> (8 * i));
      break;
  }
}

// Load the `bits` bytes of a packed chunk (same alignment as store_packed).
__device__ __forceinline__ uint64_t load_packed(const uint8_t* p, int bits) {
  switch (bits) {
    case 2:
      return *reinterpret_cast<const uint16_t*>(p);
    case 4:
      return *reinterpret_cast<const uint32_t*>(p);
    case 8:
      return *reinterpret_cast<const unsigned long long*>(p);
    default: {
      uint64_t w = 0;
      for (int i = 0; i < bits; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
      return w;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// quantize_values: one thread per 8-channel chunk of a token row (flat chunk index
// idx = row * D/8 + q). A value group is Gv/8 in {4, 8, 16} consecutive chunks; since D/8 is a
// multiple of Gv/8 and Gv/8 divides 32, a group is an aligned segment of Gv/8 lanes of a warp.
// Each thread reduces its 8 channels in ascending order, then an ordered segmented shuffle tree
// (offsets 1, 2, 4, .., merging lower lanes with higher lanes) combines the segment. Threads
// beyond the end form whole segments (the total is a multiple of Gv/8) and only skip stores.
constexpr int kValThreads = 256;
constexpr int kValPer = 2;  // chunks per thread (independent loads in flight)

template <typename E>
__global__ void __launch_bounds__(kValThreads)
quantize_values_fast(const E* __restrict__ v, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                     int64_t H, int64_t T, int nq, int bits, int Gv, int64_t total, bool vec,
                     uint8_t* __restrict__ codes, __half* __restrict__ scale,
                     __half* __restrict__ zero) {
  const int lane = threadIdx.x & 31;
  const int seg = Gv / kChunk;  // lanes per value group
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kValThreads * kValPer) + threadIdx.x;
  float f[kValPer][8];
#pragma unroll
  for (int u = 0; u < kValPer; ++u) {
    const int64_t idx = base + u * kValThreads;
    if (idx < total) {
      const int64_t row = idx / nq;
      const int q = static_cast<int>(idx - row * nq);
      const int64_t bh = row / T, t = row - bh * T;
      const int64_t b = bh / H, h = bh - b * H;
      load_chunk<E>(v + b * sb + h * sh + t * st + static_cast<int64_t>(q) * kChunk * sd, sd,
                    vec, f[u]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) f[u][i] = 0.0f;
    }
  }
#pragma unroll
  for (int u = 0; u < kValPer; ++u) {
    const int64_t idx = base + u * kValThreads;
    float mn = f[u][0], mx = f[u][0];
#pragma unroll
    for (int i = 1; i < 8; ++i) {
      mn = nan_min(mn, f[u][i]);
      mx = nan_max(mx, f[u][i]);
    }
    for (int off = 1; off < seg; off <<= 1) {
      const float omn = __shfl_down_sync(0xffffffffu, mn, off);
      const float omx = __shfl_down_sync(0xffffffffu, mx, off);
      if ((lane & (2 * off - 1)) == 0) {
        mn = nan_min(mn, omn);
        mx = nan_max(mx, omx);
      }
    }
    const int leader = lane & ~(seg - 1);
    mn = __shfl_sync(0xffffffffu, mn, leader);
    mx = __shfl_sync(0xffffffffu, mx, leader);
    if (idx < total) {
      const AsymParams pr = asym_params(mn, mx, bits);
      if (lane == leader) {
        const int64_t si = idx / seg;  // = row * (D/Gv) + q / seg
        scale[si] = __ushort_as_half(pr.scale_bits);
        zero[si] = __ushort_as_half(pr.zero_bits);
      }
      uint32_t c[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = asym_code(f[u][i], pr.scale, pr.zero, bits);
      store_packed(codes + idx * bits, pack8(c, bits), bits);  // row*rowb + q*bits
    }
  }
}

// ---------------------------------------------------------------------------------------------
// quantize_keys: one block per (b, h, key group), blockDim = (G/4) * (D/8). Thread (s, q) loads
// tokens [4s, 4s+4) of the group, chunk q (all loads in flight), reduces them in ascending t,
// writes the partial to shared memory; thread c then merges the G/4 partials of channel c in
// ascending s (an ordered merge of contiguous token ranges), and the block quantises and packs
// its register tile (b bytes per token per thread, consecutive threads -> consecutive bytes).
constexpr int kKeyTok = 4;  // tokens per thread

template <typename E>
__global__ void __launch_bounds__(512)
quantize_keys_fast(const E* __restrict__ k, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                   int64_t H, int64_t T, int D, int bits, int G, bool vec,
                   uint8_t* __restrict__ codes, __half* __restrict__ scale,
                   __half* __restrict__ zero) {
  extern __shared__ float qkf_smem[];
  const int S = G / kKeyTok;
  float* pmn = qkf_smem;           // [S, D]
  float* pmx = pmn + S * D;        // [S, D]
  float* s_s = pmx + S * D;        // [D]
  float* z_s = s_s + D;            // [D]
  const int nq = D / kChunk;
  const int tid = threadIdx.x;
  const int q = tid % nq, s = tid / nq;
  const int64_t ngroups = T / G;
  const int64_t bh = blockIdx.x / ngroups;
  const int64_t g = blockIdx.x - bh * ngroups;
  const int64_t b = bh / H, h = bh - b * H;
  const int64_t t0 = g * G + static_cast<int64_t>(s) * kKeyTok;  // first token of this thread
  const E* kp = k + b * sb + h * sh + t0 * st + static_cast<int64_t>(q) * kChunk * sd;

  float f[kKeyTok][8];
#pragma unroll
  for (int t = 0; t < kKeyTok; ++t) load_chunk<E>(kp + t * st, sd, vec, f[t]);

  float* pm = pmn + s * D + q * kChunk;
  float* px = pmx + s * D + q * kChunk;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float mn = f[0][i], mx = f[0][i];
#pragma unroll
    for (int t = 1; t < kKeyTok; ++t) {
      mn = nan_min(mn, f[t][i]);
      mx = nan_max(mx, f[t][i]);
    }
    pm[i] = mn;
    px[i] = mx;
  }
  __syncthreads();

  const int64_t sg = bh * ngroups + g;  // scale/zero row
  for (int c = tid; c < D; c += blockDim.x) {
    float a = pmn[c], z = pmx[c];
    for (int j = 1; j < S; ++j) {
      a = nan_min(a, pmn[j * D + c]);
      z = nan_max(z, pmx[j * D + c]);
    }
    const AsymParams pr = asym_params(a, z, bits);
    scale[sg * D + c] = __ushort_as_half(pr.scale_bits);
    zero[sg * D + c] = __ushort_as_half(pr.zero_bits);
    s_s[c] = pr.scale;
    z_s[c] = pr.zero;
  }
  __syncthreads();

  uint64_t w[kKeyTok];
#pragma unroll
  for (int t = 0; t < kKeyTok; ++t) w[t] = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float sc = s_s[q * kChunk + i], zc = z_s[q * kChunk + i];
#pragma unroll
    for (int t = 0; t < kKeyTok; ++t) {
      w[t] |= static_cast<uint64_t>(asym_code(f[t][i], sc, zc, bits)) << (i * bits);
    }
  }
  const int64_t rowb = static_cast<int64_t>(nq) * bits;
  uint8_t* out = codes + (bh * T + t0) * rowb + static_cast<int64_t>(q) * bits;
#pragma unroll
  for (int t = 0; t < kKeyTok; ++t) store_packed(out + t * rowb, w[t], bits);
}

// ---------------------------------------------------------------------------------------------
// side_code: one block per (b, h, key group). Phase 1 forms the residual of all G tokens in
// shared memory (8-channel chunks, 4 chunks' loads in flight per thread); optional centring
// (thread c: sequential ascending-t sum, then subtract); phase 2: thread (t, 4 columns j)
// accumulates 4 independent projections over ascending c (the contract's order, separately
// rounded), reading e as float4 (row stride D+4: conflict-free) and the basis as a broadcast;
// then the per-token scale (sequential j) and the packed offset-binary codes.
constexpr int kSideThreads = 256;
constexpr int kSideBatch = 4;

template <typename E>
__global__ void __launch_bounds__(kSideThreads)
side_code_fast(const E* __restrict__ k, int64_t sb, int64_t sh, int64_t st, int64_t sd, bool vec,
               const uint8_t* __restrict__ k_codes, const __half* __restrict__ k_scale,
               const __half* __restrict__ k_zero, const float* __restrict__ basis, int64_t H,
               int64_t T, int D, int r, int key_bits, int G, int side_bits, bool center,
               uint8_t* __restrict__ z_codes, __half* __restrict__ z_scale) {
  extern __shared__ float scf_smem[];
  const int ES = D + 4;             // residual row stride (floats)
  const int R4 = (r + 3) & ~3;      // basis columns padded to 4
  float* e_s = scf_smem;            // [G, ES]
  float* u_s = e_s + G * ES;        // [D, R4]
  float* y_s = u_s + D * R4;        // [G, r]
  float* zsc_s = y_s + G * r;       // [G]
  const int tid = threadIdx.x;
  const int nq = D / kChunk;
  const int64_t ngroups = T / G;
  const int64_t bh = blockIdx.x / ngroups;
  const int64_t g = blockIdx.x - bh * ngroups;
  const int64_t b = bh / H, h = bh - b * H;
  const int64_t t0 = g * G;
  const int64_t krowb = static_cast<int64_t>(nq) * key_bits;
  const E* kg = k + b * sb + h * sh + t0 * st;
  const uint8_t* kc = k_codes + (bh * T + t0) * krowb;
  const __half* ksg = k_scale + (bh * ngroups + g) * D;
  const __half* kzg = k_zero + (bh * ngroups + g) * D;
  const float* u = basis + h * static_cast<int64_t>(D) * r;

  for (int i = tid; i < D * R4; i += kSideThreads) {
    const int c = i / R4, j = i - c * R4;
    u_s[i] = j < r ? u[c * r + j] : 0.0f;
  }

  const int nitems = G * nq;
  for (int base = tid; base < nitems; base += kSideThreads * kSideBatch) {
    float x[kSideBatch][8];
    uint64_t cw[kSideBatch];
    uint4 sv[kSideBatch], zv[kSideBatch];
#pragma unroll
    for (int w = 0; w < kSideBatch; ++w) {
      const int it = base + w * kSideThreads;
      if (it < nitems) {
        const int t = it / nq, q = it - t * nq;
        load_chunk<E>(kg + t * st + static_cast<int64_t>(q) * kChunk * sd, sd, vec, x[w]);
        cw[w] = load_packed(kc + t * krowb + q * key_bits, key_bits);
        sv[w] = *reinterpret_cast<const uint4*>(ksg + q * kChunk);
        zv[w] = *reinterpret_cast<const uint4*>(kzg + q * kChunk);
      }
    }
#pragma unroll
    for (int w = 0; w < kSideBatch; ++w) {
      const int it = base + w * kSideThreads;
      if (it < nitems) {
        const int t = it / nq, q = it - t * nq;
        const uint32_t mask = (1u << key_bits) - 1u;
        const uint16_t* sh16 = reinterpret_cast<const uint16_t*>(&sv[w]);
        const uint16_t* zh16 = reinterpret_cast<const uint16_t*>(&zv[w]);
        float e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t code = static_cast<uint32_t>(cw[w] >> (i * key_bits)) & mask;
          const float khat = asym_dequant(code, __half2float(__ushort_as_half(sh16[i])),
                                          __half2float(__ushort_as_half(zh16[i])));
          e[i] = sub_rn(x[w][i], khat);
        }
        float* dst = e_s + t * ES + q * kChunk;
        reinterpret_cast<float4*>(dst)[0] = make_float4(e[0], e[1], e[2], e[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(e[4], e[5], e[6], e[7]);
      }
    }
  }
  __syncthreads();

  if (center) {
    for (int c = tid; c < D; c += kSideThreads) {
      float acc = 0.0f;
      for (int t = 0; t < G; ++t) acc = add_rn(acc, e_s[t * ES + c]);
      const float mu = div_rn(acc, static_cast<float>(G));
      for (int t = 0; t < G; ++t) e_s[t * ES + c] = sub_rn(e_s[t * ES + c], mu);
    }
    __syncthreads();
  }

  const int nj4 = R4 / 4;
  for (int it = tid; it < G * nj4; it += kSideThreads) {
    const int t = it % G, jb = it / G;
    const float* et = e_s + t * ES;
    const float* uj = u_s + jb * 4;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int c = 0; c < D; c += 4) {
      const float4 e4 = *reinterpret_cast<const float4*>(et + c);
      const float ev[4] = {e4.x, e4.y, e4.z, e4.w};
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const float4 u4 = *reinterpret_cast<const float4*>(uj + (c + cc) * R4);
        a0 = add_rn(a0, mul_rn(ev[cc], u4.x));
        a1 = add_rn(a1, mul_rn(ev[cc], u4.y));
        a2 = add_rn(a2, mul_rn(ev[cc], u4.z));
        a3 = add_rn(a3, mul_rn(ev[cc], u4.w));
      }
    }
    const int j = jb * 4;
    float* yt = y_s + t * r;
    yt[j] = a0;
    if (j + 1 < r) yt[j + 1] = a1;
    if (j + 2 < r) yt[j + 2] = a2;
    if (j + 3 < r) yt[j + 3] = a3;
  }
  __syncthreads();

  for (int t = tid; t < G; t += kSideThreads) {
    const float* yt = y_s + t * r;
    float amax = fabsf(yt[0]);
    for (int j = 1; j < r; ++j) amax = nan_max(amax, fabsf(yt[j]));
    const uint16_t sbits = sym_scale_bits(amax, side_bits);
    z_scale[bh * T + t0 + t] = __ushort_as_half(sbits);
    zsc_s[t] = half_bits_to_float(sbits);
  }
  __syncthreads();

  const int zrowb = r * side_bits / 8;
  uint8_t* zout = z_codes + (bh * T + t0) * zrowb;  // [G, zrowb], contiguous
  for (int idx = tid; idx < G * zrowb; idx += kSideThreads) {
    const int tt = idx / zrowb, jb = idx - tt * zrowb;
    const float* yt = y_s + tt * r;
    const float s = zsc_s[tt];
    uint32_t byte;
    if (side_bits == 8) {
      byte = sym_code(yt[jb], s, 8);
    } else {
      byte = sym_code(yt[2 * jb], s, 4) | (sym_code(yt[2 * jb + 1], s, 4) << 4);
    }
    zout[idx] = static_cast<uint8_t>(byte);
  }
}

}  // namespace fastq
