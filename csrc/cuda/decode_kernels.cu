// Fused decode attention over the packed HeadQ cache (flash-decoding: split kernel + combine).
// Torch-free; launched from ops.cu.
//
// Work decomposition
// ------------------
// grid = (S splits, H * nchunk, B). A block owns one KV head and NG <= 8 of the query heads
// that read it (the GQA group, chunked when Hq/H > 8), and a contiguous, tile-aligned token
// range of the quantised region (splits 0..Sq-1) or of the dense window (splits Sq..S-1).
// Every packed byte of a (b, h) is read by exactly one block (once per head chunk), so the
// kernel moves the cache once. A block writes an unnormalised partial (acc, m, l) per query
// head; the combine kernel merges the S partials with the usual log-sum-exp rescaling.
//
// Bytes per token per KV head for the target shape (D=128, 2-bit K and V, r=8, bz=8, G=Gv=64):
//   K codes 32 + K scale/zero 2*2*128/64 = 8 + side code 8 + side scale 2 + V codes 32
//   + V scale/zero 2*2*2 = 8                                                    = 90 B
// B=8, H=8, 32k tokens: 189 MB per decode step -> 45 us at 4.2 TB/s.
//
// Tile pipeline (kTile = 128 tokens = one token per thread in the logit phase)
// ---------------------------------------------------------------------------
// The block streams tiles with cp.async into a double buffer in shared memory: the whole tile
// of every packed stream (K codes, K group scale/zero, side codes and scales, V codes and
// scale/zero) is a contiguous byte range, so each stream is copied with 16-byte vectors,
// perfectly coalesced, and the next tile is in flight while the current one is computed
// (11.5 KB per tile at the target shape, so ~35 KB of loads in flight per SM at 3 blocks/SM,
// enough for Little's law at ~4 TB/s x ~1 us over 132 SMs).
//   1. per key group in the tile, fold the fp16 scale into the query: qs[h][c] = q[h][c]*s[c]
//      (times 2^-p(c), see unpack below) and qz[h] = q[h].z; then q.khat = qs.code + qz costs
//      one FMA per code and query head.
//   2. logit phase: thread i owns token i; it unpacks the K row (and the r-dim side code) once
//      and accumulates the NG logits (q.khat + sign*(qU).zhat)*scale*log2(e); qU is computed
//      once per block. The qs table is read from shared memory as broadcast float4s (all lanes
//      of a warp are in the same key group since G >= 32).
//   3. online softmax: block max per head (warp shuffles + one shared-memory round), rescale,
//      p = exp2(x - m); each thread keeps its own partial l (summed once at the end). The
//      value zero-point term sum_t p_t*z_t is accumulated here per (head, value group), so the
//      value phase only multiplies codes: o[h][c] += (p_t*s_t)[h] * code[t][c].
//   4. value phase: thread (token lane tl, channel slice cs) owns 8 channels and NG heads
//      (8*NG fp32 accumulators) and walks every NTL-th token of the tile; partials of the
//      token lanes are reduced once at the end.
//
// Unpacking without conversions: a b-bit code at bit p (p + b <= 23) of a word w becomes
// float(code * 2^p) with one LOP3 (w & mask | 0x4B000000) and one FADD (- 2^23). The 2^-p is
// folded into the qs table (keys) or applied once to the accumulators at the end (values), so
// a code costs 2 instructions (+ one shift per 16-bit half word) shared by the NG heads.
//
// Expected speed: with NG = 4 every code costs ~NG FMAs in each phase, ~1.9k instructions per
// token per KV head in total, so at the target shape the SMs' issue rate (132 x 4 warps/clk)
// bounds the kernel to ~100 us, i.e. issue-bound at about half of the copy bandwidth (measured on
// the H200: 324 us at 32k tokens). decode_mma.cu runs both inner products on tensor cores and is
// the default for fp16/bf16 queries with 2/4-bit packed keys and values; this kernel remains the
// fallback (fp32 queries, 3/8-bit codes, dense values) and runs the window and heavy-slot splits
// of the tensor-core path (split0 = Sq).
//
// Heavy slots (A² value policy): splits Sq + Sw .. S-1 (plan_heavy, headq/split_plan.h), run by
// decode_heavy_kernel after the split kernels of either path, each take a chunk of the kept
// tokens' slots, recompute their logits from the packed cache and write a numerator-only partial:
// acc = sum_k 2^(x_k - m) delta_k with l = 0 (the kept tokens' weights are already in the
// quantised splits' sums; only their value error delta = v - vhat is added).
//
// Splits: chosen on the host so that B * H * nchunk * S fills one wave of resident blocks
// (occupancy query), in whole tiles; the window gets its own split(s) of the same size.
//
// Instantiations: D in {64, 128} x NG in {1, 2, 4, 8} = 8 split kernels and 8 heavy-slot kernels
// (+3 combine kernels).
// Key bits, value bits / dense values and the dense dtype are uniform runtime switches at tile
// level, so each variant of an inner phase is compiled once per instantiation.

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <cub/warp/warp_reduce.cuh>

#include "device_common.cuh"

namespace headq {
namespace cuda {
namespace {

constexpr int kTile = 128;  // tokens per tile
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

__host__ __device__ constexpr int align16(int x) { return (x + 15) & ~15; }

// Bit position (within its 16-bit half word; 12-bit half for 3 bits) at which the unpacker
// leaves channel c's code: the decoded float is code * 2^code_pos(c).
__host__ __device__ inline int code_pos(int c, int bits) {
  return bits == 3 ? 3 * (c & 3) : (c * bits) & 15;
}

// 2^-p as a float (p in 0..15).
__device__ __forceinline__ float pow2_neg(int p) { return __uint_as_float((127u - p) << 23); }

// code(c) * 2^code_pos(c), exact, from the packed row held in registers w (little endian).
// c is a compile-time constant after unrolling, so all indices and shifts are immediates.
template <int BITS, int NW>
__device__ __forceinline__ float unpack_scaled(const uint32_t (&w)[NW], int c) {
  uint32_t v;
  if constexpr (BITS == 3) {
    const int chunk = c >> 3, j = c & 7;  // 8 codes = 24 bits
    const int bit = chunk * 24, wi = bit >> 5, sh = bit & 31;
    uint32_t x = w[wi];
    if (sh + 24 > 32) x = __funnelshift_r(w[wi], w[wi + 1 < NW ? wi + 1 : wi], sh);
    else if (sh) x >>= sh;
    if (j >= 4) x >>= 12;
    v = x & (7u << (3 * (j & 3)));
  } else {
    const int bit = c * BITS, wi = bit >> 5, pos = bit & 31;
    uint32_t x = w[wi];
    if (pos >= 16) x >>= 16;
    v = x & (((1u << BITS) - 1u) << (pos & 15));
  }
  return __uint_as_float(v | 0x4B000000u) - 8388608.0f;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layout (bytes), identical on host and device.
struct Smem {
  int q, qu, qs, qz, wmax, pv, out, lsum, az;  // persistent regions
  int stage0, stage_bytes;                     // double-buffered tile staging
  int kc, ks, kz, zc, zs, vc, vs, vz;          // offsets inside a stage buffer
  int red;                                     // end-of-block reduction (aliases the stages)
  int total;
};

__host__ __device__ inline Smem decode_smem(const DecodeParams& p, int NG) {
  const int D = p.D;
  const bool side = p.z_codes.p != nullptr;
  const bool vcodes = p.v_codes.p != nullptr;
  const int ngv = vcodes ? D / p.Gv : 1;
  const int gpt = kTile / p.G;  // key groups per tile (G divides kTile)
  const int r = side ? p.r : 1;
  Smem s;
  int o = 0;
  s.q = o;    o += align16(NG * D * 4);
  s.qu = o;   o += align16(r * NG * 4);
  s.qs = o;   o += align16(gpt * NG * D * 4);
  s.qz = o;   o += align16(gpt * NG * 4);
  s.wmax = o; o += align16(kWarps * NG * 4);
  s.pv = o;   o += align16(kTile * ngv * NG * 4);
  s.out = o;  o += align16(NG * D * 4);
  s.lsum = o; o += align16(kWarps * NG * 4);
  s.az = o;   o += align16(kWarps * NG * (D / 32) * 4);
  int b = 0;
  s.kc = b; b += align16(kTile * D * p.kbits / 8);
  s.ks = b; b += align16(gpt * D * 2);
  s.kz = b; b += align16(gpt * D * 2);
  s.zc = b; b += side ? align16(kTile * p.r * p.zbits / 8) : 0;
  s.zs = b; b += side ? align16(kTile * 2) : 0;
  s.vc = b; b += vcodes ? align16(kTile * D * p.vbits / 8) : 0;
  s.vs = b; b += vcodes ? align16(kTile * ngv * 2) : 0;
  s.vz = b; b += vcodes ? align16(kTile * ngv * 2) : 0;
  s.stage0 = o;
  s.stage_bytes = b;
  s.red = o;
  const int red_bytes = kWarps * NG * D * 4;
  o += (2 * b > red_bytes) ? 2 * b : red_bytes;
  s.total = o;
  return s;
}

// Per-thread running state of the split (m is identical in every thread).
template <int NG, int NGV>
struct State {
  float m[NG];          // running max of the logits (log2 units)
  float l[NG];          // this thread's share of sum exp2(x - m)
  float acc[NG][8];     // value accumulators of this thread's 8 channels
  float az[NG][NGV];    // this thread's share of sum_t p_t * vzero_t[g] (code values)
};

// ----------------------------------------------------------------------------- logit phase ---
// Quantised key logits of token i of the staged tile: x[h] = qz[h] + sum_c qs'[h][c]*code'(c).
template <int D, int NG, int KB>
__device__ __forceinline__ void key_dot(const uint8_t* krow,  // smem [D*KB/8]
                                        const float* qs,      // smem [NG][D]
                                        const float* qz,      // smem [NG]
                                        float (&x)[NG]) {
  constexpr int NW = D * KB / 32;
  uint32_t w[NW];
#pragma unroll
  for (int i = 0; i < NW / 2; ++i) {
    const uint2 u = reinterpret_cast<const uint2*>(krow)[i];
    w[2 * i] = u.x;
    w[2 * i + 1] = u.y;
  }
#pragma unroll
  for (int h = 0; h < NG; ++h) x[h] = qz[h];
#pragma unroll
  for (int c = 0; c < D; c += 4) {
    const float f0 = unpack_scaled<KB, NW>(w, c);
    const float f1 = unpack_scaled<KB, NW>(w, c + 1);
    const float f2 = unpack_scaled<KB, NW>(w, c + 2);
    const float f3 = unpack_scaled<KB, NW>(w, c + 3);
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      const float4 s = *reinterpret_cast<const float4*>(qs + h * D + c);
      x[h] = fmaf(s.x, f0, x[h]);
      x[h] = fmaf(s.y, f1, x[h]);
      x[h] = fmaf(s.z, f2, x[h]);
      x[h] = fmaf(s.w, f3, x[h]);
    }
  }
}

// Side-code correction sum_j qu[j][h] * (code_j - 2^(bz-1)) (sign already folded into qu).
template <int NG>
__device__ __forceinline__ void side_dot(const uint8_t* zrow,  // smem [r*bz/8]
                                         const float* qu,      // smem [r][NG]
                                         int r, int bz, float (&corr)[NG]) {
#pragma unroll
  for (int h = 0; h < NG; ++h) corr[h] = 0.0f;
  if (bz == 8) {
    for (int j = 0; j < r; ++j) {
      const float f = __uint_as_float(0x4B000000u | zrow[j]) - (8388608.0f + 128.0f);
#pragma unroll
      for (int h = 0; h < NG; ++h) corr[h] = fmaf(qu[j * NG + h], f, corr[h]);
    }
  } else {
    for (int jb = 0; jb < r / 2; ++jb) {
      const uint32_t byte = zrow[jb];
      const float f0 = __uint_as_float(0x4B000000u | (byte & 15u)) - (8388608.0f + 8.0f);
      const float f1 = __uint_as_float(0x4B000000u | (byte >> 4)) - (8388608.0f + 8.0f);
#pragma unroll
      for (int h = 0; h < NG; ++h) {
        corr[h] = fmaf(qu[(2 * jb) * NG + h], f0, corr[h]);
        corr[h] = fmaf(qu[(2 * jb + 1) * NG + h], f1, corr[h]);
      }
    }
  }
}

// Dense key logits (window tokens): x[h] = q[h] . k (unscaled).
template <int D, int NG, typename E>
__device__ __forceinline__ void dense_key_dot(const char* krow,  // global [D] of E
                                              const float* q,    // smem [NG][D]
                                              float (&x)[NG]) {
#pragma unroll
  for (int h = 0; h < NG; ++h) x[h] = 0.0f;
#pragma unroll 4
  for (int c = 0; c < D; c += 8) {
    float f[8];
    load8<E>(krow + c * sizeof(E), f);
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      const float4 a = *reinterpret_cast<const float4*>(q + h * D + c);
      const float4 b = *reinterpret_cast<const float4*>(q + h * D + c + 4);
      x[h] = fmaf(a.x, f[0], x[h]);
      x[h] = fmaf(a.y, f[1], x[h]);
      x[h] = fmaf(a.z, f[2], x[h]);
      x[h] = fmaf(a.w, f[3], x[h]);
      x[h] = fmaf(b.x, f[4], x[h]);
      x[h] = fmaf(b.y, f[5], x[h]);
      x[h] = fmaf(b.z, f[6], x[h]);
      x[h] = fmaf(b.w, f[7], x[h]);
    }
  }
}

// Online-softmax step of a tile: x holds this thread's token logits (-inf when masked). Raises
// the block-wide running max, rescales the thread's state and returns p = exp2(x - m).
template <int NG, int NGV>
__device__ __forceinline__ void softmax_step(const float (&x)[NG], float* wmax_s,  // [kWarps][NG]
                                             State<NG, NGV>& st, float (&pw)[NG]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int h = 0; h < NG; ++h) {
    const float mw = warp_max(x[h]);
    if (lane == 0) wmax_s[warp * NG + h] = mw;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < NG; ++h) {
    float mt = wmax_s[h];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mt = fmaxf(mt, wmax_s[w * NG + h]);
    const float m_new = fmaxf(st.m[h], mt);
    // alpha rescales what was accumulated so far; nothing visible yet -> keep the zeros.
    const float alpha = (st.m[h] == -INFINITY || m_new == -INFINITY) ? 0.0f : exp2f(st.m[h] - m_new);
    st.m[h] = m_new;
    st.l[h] *= alpha;
#pragma unroll
    for (int j = 0; j < 8; ++j) st.acc[h][j] *= alpha;
#pragma unroll
    for (int g = 0; g < NGV; ++g) st.az[h][g] *= alpha;
    pw[h] = (x[h] == -INFINITY) ? 0.0f : exp2f(x[h] - m_new);
    st.l[h] += pw[h];
  }
}

// ------------------------------------------------------------------------------ value phase ---
// Packed values: acc[h][j] += (p*s)[t][g][h] * code'(t, c0 + j) over this thread's tokens.
template <int D, int NG, int NGV, int VB>
__device__ __forceinline__ void value_codes(const uint8_t* vc,  // smem [kTile][D*VB/8]
                                            const float* pv,    // smem [kTile][ngv][NG]
                                            int ngv, int Gv, int i_begin, int i_end,
                                            State<NG, NGV>& st) {
  constexpr int CS = D / 8;  // channel slices (threads per token)
  constexpr int NTL = kThreads / CS;
  constexpr int ROWB = D * VB / 8;
  constexpr int NW = VB == 8 ? 2 : 1;
  const int cs = threadIdx.x % CS, tl = threadIdx.x / CS;
  const int g = (cs * 8) / Gv;
  for (int i = i_begin + tl; i < i_end; i += NTL) {
    const uint8_t* src = vc + i * ROWB + cs * VB;  // the 8 codes of this slice: VB bytes
    uint32_t w[NW];
    if constexpr (VB == 2) {
      w[0] = *reinterpret_cast<const uint16_t*>(src);
    } else if constexpr (VB == 3) {
      w[0] = src[0] | (static_cast<uint32_t>(src[1]) << 8) | (static_cast<uint32_t>(src[2]) << 16);
    } else if constexpr (VB == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(src);
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(src);
      w[0] = u.x;
      w[1] = u.y;
    }
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = unpack_scaled<VB, NW>(w, j);
    const float* pt = pv + (i * ngv + g) * NG;
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      const float ph = pt[h];
#pragma unroll
      for (int j = 0; j < 8; ++j) st.acc[h][j] = fmaf(ph, f[j], st.acc[h][j]);
    }
  }
}

// Dense values (v_dense or the window): acc[h][j] += p[t][h] * v[t][c0 + j].
template <int D, int NG, int NGV, typename E>
__device__ __forceinline__ void value_dense(const char* vbase,  // global [tokens][D] of E
                                            int64_t st_bytes,   // token stride
                                            const float* pv,    // smem [kTile][NG]
                                            int i_begin, int i_end, State<NG, NGV>& st) {
  constexpr int CS = D / 8;
  constexpr int NTL = kThreads / CS;
  const int cs = threadIdx.x % CS, tl = threadIdx.x / CS;
  for (int i = i_begin + tl; i < i_end; i += NTL) {
    float f[8];
    load8<E>(vbase + i * st_bytes + cs * 8 * sizeof(E), f);
    const float* pt = pv + i * NG;
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      const float ph = pt[h];
#pragma unroll
      for (int j = 0; j < 8; ++j) st.acc[h][j] = fmaf(ph, f[j], st.acc[h][j]);
    }
  }
}

template <typename F>
__device__ __forceinline__ void with_elem(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      f(float{});
      break;
  }
}

// q_s[hh * D + c] = q[b, qh0 + hh, c] as float for the block's nh query heads (0 for hh >= nh).
template <int D, int NG>
__device__ __forceinline__ void load_query_rows(const DecodeParams& p, int b, int qh0, int nh,
                                                float* q_s) {
  for (int idx = threadIdx.x; idx < NG * D; idx += kThreads) {
    const int hh = idx / D, c = idx % D;
    q_s[idx] = hh < nh ? load_as_float(p.q.p + b * p.q.sb + static_cast<int64_t>(qh0 + hh) * p.q.sh,
                                       p.dtype, c)
                       : 0.0f;
  }
}

// sign * q.U of the block's heads (side code): qu_s[j * NG + hh], float32. P threads (a power of
// two, <= 32, consecutive lanes) per output sum strided channels, then a shuffle reduction, so
// that the block's D * r * NG basis loads are spread over all its threads. Each thread issues its
// basis loads kQuBatch at a time into registers before the FMAs (one memory latency per batch
// instead of one per channel).
constexpr int kQuBatch = 16;

template <int D, int NG>
__device__ __forceinline__ void compute_qu(const DecodeParams& p, int h, const float* q_s,
                                           float* qu_s) {
  const float* u = p.basis + static_cast<int64_t>(h) * D * p.r;  // [D, r]
  const int O = p.r * NG;
  int P = 1;
  while (P < 32 && 2 * P * O <= kThreads) P *= 2;
  for (int base = 0; base < O * P; base += kThreads) {  // block-uniform: whole warps shuffle
    const int idx = base + static_cast<int>(threadIdx.x), o = idx / P, part = idx % P;
    float a = 0.0f;
    if (o < O) {
      const int j = o / NG, hh = o % NG;
      for (int c0 = part; c0 < D; c0 += kQuBatch * P) {
        float ub[kQuBatch];
#pragma unroll
        for (int i = 0; i < kQuBatch; ++i) {
          const int c = c0 + i * P;
          ub[i] = c < D ? u[c * p.r + j] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kQuBatch; ++i) {
          const int c = c0 + i * P;
          if (c < D) a = fmaf(q_s[hh * D + c], ub[i], a);
        }
      }
    }
    for (int off = 1; off < P; off <<= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (o < O && part == 0) qu_s[o] = p.sign * a;
  }
}

// Heavy slots (see heavy_split): a warp computes kHeavySlots slots' logits at a time.
constexpr int kHeavySlots = 4, kLanesPerSlot = 32 / kHeavySlots;

// Up to 16 bytes of a packed code row, 16-byte aligned row base (decode_ready) and a lane offset
// that is a multiple of nbytes, as little-endian 32-bit words.
__device__ __forceinline__ void load_code_bytes(const uint8_t* p, int nbytes, uint32_t (&w)[4]) {
  w[0] = w[1] = w[2] = w[3] = 0;
  switch (nbytes) {
    case 16: {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
      break;
    }
    case 8: {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      w[0] = u.x; w[1] = u.y;
      break;
    }
    case 4:
      w[0] = *reinterpret_cast<const uint32_t*>(p);
      break;
    case 2:
      w[0] = *reinterpret_cast<const uint16_t*>(p);
      break;
    default:  // 3-bit codes: 3 or 6 bytes
#pragma unroll
      for (int i = 0; i < 6; ++i)
        if (i < nbytes) w[i >> 2] |= static_cast<uint32_t>(p[i]) << (8 * (i & 3));
  }
}

// Code i (compile-time) of `bits` (KB if KB > 0) from the words of load_code_bytes. A code never
// straddles two 64-bit halves (2/4/8 bits are aligned; 3-bit chunks are at most 48 bits).
template <int KB>
__device__ __forceinline__ uint32_t code_of(const uint32_t (&w)[4], int i, int bits) {
  if constexpr (KB > 0) {
    constexpr uint32_t mask = (1u << KB) - 1u;
    const int bit = i * KB;  // folds: i is unrolled
    if ((bit & 31) + KB <= 32) return (w[bit >> 5] >> (bit & 31)) & mask;
    return static_cast<uint32_t>(((static_cast<uint64_t>(w[(bit >> 5) + 1]) << 32 | w[bit >> 5]) >> (bit & 31)) & mask);
  } else {
    const int bit = i * bits;
    const uint64_t lo = static_cast<uint64_t>(w[1]) << 32 | w[0];
    const uint64_t hi = static_cast<uint64_t>(w[3]) << 32 | w[2];
    return static_cast<uint32_t>((bit < 64 ? lo >> bit : hi >> (bit - 64)) & ((1u << bits) - 1u));
  }
}

// Sums of V values (a power of two <= L) over groups of L consecutive lanes (L a power of two):
// each halving step exchanges half the values left, so lane l ends with the sum of value
// (l % L) >> log2(L / V) in v[0] (also held by the L / V - 1 lanes next to it).
template <int V, int L>
__device__ __forceinline__ float transpose_sum(float (&v)[V]) {
  int n = V;
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    if (n > 1) {
      const bool upper = (lane & off) != 0;
#pragma unroll
      for (int i = 0; i < V / 2; ++i) {
        if (i < n / 2) {
          const float send = upper ? v[i] : v[i + n / 2];
          const float keep = upper ? v[i + n / 2] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
      }
      n /= 2;
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
    }
  }
  return v[0];
}

// Stage buffer of the heavy-slot kernel: the key rows of up to p.hstage slots at a time (pass
// 1), then as many delta rows as fit (pass 2), copied with cp.async so that a block's loads are
// all in flight at once without holding registers. Per slot: the code row, the key scale and
// zero rows of its group and the side-code row, each at a 16-byte offset. p.hstage is 32 or 64
// (heavy_stage_slots, launch_decode_heavy).
struct HeavyStage {
  int code, scale, zero, z, row;  // byte offsets in a slot's key row; row = its stride
};

__host__ __device__ inline HeavyStage heavy_stage(const DecodeParams& p) {
  HeavyStage s;
  int o = 0;
  s.code = o;  o += align16(p.D * p.kbits / 8);
  s.scale = o; o += 2 * p.D;
  s.zero = o;  o += 2 * p.D;
  s.z = o;     o += p.z_codes.p != nullptr ? align16((p.r * p.zbits + 7) / 8) : 0;
  s.row = o;
  return s;
}

template <int N>
__device__ __forceinline__ void cp_async_ca(void* smem_dst, const void* gmem_src) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "n"(N));
}

// Copies `rows` rows of `bytes` bytes (global row s at src(s), a multiple of `unit`-aligned;
// shared row s at dst + s * dstride) in `unit`-byte pieces (4, 8 or 16; 1: plain byte copies),
// skipping the rows whose slot is empty (t_s < 0). Returns nothing in flight for unit 1.
template <class Src>
__device__ __forceinline__ void stage_rows(unsigned char* dst, int dstride, int rows, int bytes,
                                           int unit, const int* t_s, Src src) {
  const int per = bytes / unit;
#pragma unroll 1
  for (int i = threadIdx.x; i < rows * per; i += kThreads) {
    const int s = i / per, off = (i % per) * unit;
    const int t = t_s[s];
    if (t < 0) continue;
    const char* g = src(s, t) + off;
    unsigned char* d = dst + s * dstride + off;
    switch (unit) {
      case 16: cp_async16(d, g); break;
      case 8: cp_async_ca<8>(d, g); break;
      case 4: cp_async_ca<4>(d, g); break;
      default: *d = *reinterpret_cast<const unsigned char*>(g);
    }
  }
}

__device__ __forceinline__ int copy_unit(int bytes) {
  return bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : 1;
}

// Logits of slots [kb, kb + nb) from their staged key rows (stage): a warp takes kHeavySlots
// slots at a time, kLanesPerSlot lanes per slot, each lane D / kLanesPerSlot contiguous channels
// (codes in one vector load, scales and zeros in 16-byte loads), then a transposing shuffle
// reduction over the slot's lanes (every step halves the values left: NG logits take ~NG
// shuffles, not 3 * NG). xs[k][hh] = the corrected logit in log2 units, -inf for empty slots.
template <int D, int NG, int KB>
__device__ __forceinline__ void heavy_logits(const DecodeParams& p, const HeavyStage& S,
                                             const unsigned char* stage, int kb, int nb,
                                             const float* q_s, const float* qu_s, const int* t_s,
                                             const float* zs_s, float* xs) {
  constexpr int CL = D / kLanesPerSlot;  // channels per lane: 16 or 8
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sl = lane / kLanesPerSlot, sub = lane % kLanesPerSlot, c0 = sub * CL;
  const int kbits = KB > 0 ? KB : p.kbits;
  const int nbytes = CL * kbits / 8;
  const bool side = p.z_codes.p != nullptr;
  for (int k0 = warp * kHeavySlots; k0 < nb; k0 += kWarps * kHeavySlots) {  // warp-uniform
    const int s = k0 + sl;
    const bool live = s < nb && t_s[kb + s] >= 0;
    const unsigned char* row = stage + (s < nb ? s : 0) * S.row;
    uint32_t w[4];
    load_code_bytes(row + S.code + c0 * kbits / 8, nbytes, w);
    float khat[CL];
#pragma unroll
    for (int i = 0; i < CL; i += 8) {
      float sc[8], zc[8];
      load8<__half>(row + S.scale + (c0 + i) * 2, sc);
      load8<__half>(row + S.zero + (c0 + i) * 2, zc);
#pragma unroll
      for (int e = 0; e < 8; ++e) khat[i + e] = asym_dequant(code_of<KB>(w, i + e, kbits), sc[e], zc[e]);
    }
    float x[NG];
#pragma unroll
    for (int hh = 0; hh < NG; ++hh) {
      float a = 0.0f;
#pragma unroll
      for (int i = 0; i < CL; i += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(q_s + hh * D + c0 + i);
        a = fmaf(qv.x, khat[i], a);
        a = fmaf(qv.y, khat[i + 1], a);
        a = fmaf(qv.z, khat[i + 2], a);
        a = fmaf(qv.w, khat[i + 3], a);
      }
      x[hh] = a;
    }
    if (side) {
      const float zs = zs_s[s < nb ? s : 0];
      for (int j = sub; j < p.r; j += kLanesPerSlot) {
        const float zhat = sym_dequant(get_code(row + S.z, j, p.zbits), zs, p.zbits);
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) x[hh] = fmaf(qu_s[j * NG + hh], zhat, x[hh]);
      }
    }
    const float xsum = transpose_sum<NG, kLanesPerSlot>(x);
    constexpr int kHold = kLanesPerSlot / NG;  // lanes holding each head's sum
    if (s < nb && sub % kHold == 0) xs[(kb + s) * NG + sub / kHold] = live ? xsum * p.scale_log2 : -INFINITY;
  }
}

// Heavy-slot split (A² value policy) of (b, h): slots [k_lo, k_lo + n) of heavy_idx, n <=
// kMaxHeavyChunk. The partial is acc[hh][c] = sum_k 2^(x_k - m) delta_k[c] over the slots whose
// token is visible (ks <= t < nq; -1 marks an empty slot), with m the largest such corrected
// logit (-inf: none) and l = 0. t_s holds the slots' tokens, already -1 where invisible.
//  - Pass 1, per p.hstage slots: their key rows are staged (stage_rows) and their
//    logits computed from shared memory (heavy_logits).
//  - Pass 2, per as many slots as the stage holds: their delta rows are staged and accumulated,
//    two channels per thread, kThreads / (D / 2) slots at a time; the row groups' partial sums
//    are added in a fixed order at the end.
// Scratch: xs [kMaxHeavyChunk][NG] floats, zs_s [p.hstage], hm_s [NG], red_s
// [kThreads * 2 * NG] floats, stage (heavy_stage rows; the caller writes m and l = 0).
template <int D, int NG>
__device__ __forceinline__ void heavy_split(const DecodeParams& p, int b, int h, int qh0, int nh,
                                            int k_lo, int n, const float* q_s, const float* qu_s,
                                            const int* t_s, unsigned char* stage, float* zs_s,
                                            float* xs, float* hm_s, float* red_s, float* out_s) {
  static_assert(NG <= kLanesPerSlot, "transpose_sum needs NG <= lanes per slot");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const HeavyStage S = heavy_stage(p);
  const bool side = p.z_codes.p != nullptr;
  const int cbytes = D * p.kbits / 8, zbytes = side ? (p.r * p.zbits + 7) / 8 : 0;
  const int gshift = __ffs(p.G) - 1;  // key groups are 32, 64 or 128 tokens
  const char* kc_g = p.k_codes.p + b * p.k_codes.sb + h * p.k_codes.sh;
  const char* ks_g = p.k_scale.p + b * p.k_scale.sb + h * p.k_scale.sh;
  const char* kz_g = p.k_zero.p + b * p.k_zero.sb + h * p.k_zero.sh;
  const char* zc_g = side ? p.z_codes.p + b * p.z_codes.sb + h * p.z_codes.sh : nullptr;
  const char* zs_g = side ? p.z_scale.p + b * p.z_scale.sb + h * p.z_scale.sh : nullptr;
  for (int kb = 0; kb < n; kb += p.hstage) {
    const int nb = min(p.hstage, n - kb);
    const int* tb = t_s + kb;
    stage_rows(stage + S.scale, S.row, nb, 2 * D, 16, tb,
               [&](int, int t) { return ks_g + static_cast<int64_t>(t >> gshift) * p.k_scale.st; });
    stage_rows(stage + S.zero, S.row, nb, 2 * D, 16, tb,
               [&](int, int t) { return kz_g + static_cast<int64_t>(t >> gshift) * p.k_zero.st; });
    stage_rows(stage + S.code, S.row, nb, cbytes, copy_unit(cbytes), tb,
               [&](int, int t) { return kc_g + static_cast<int64_t>(t) * p.k_codes.st; });
    if (side) {
      stage_rows(stage + S.z, S.row, nb, zbytes, copy_unit(zbytes), tb,
                 [&](int, int t) { return zc_g + static_cast<int64_t>(t) * p.z_codes.st; });
      for (int s = tid; s < nb; s += kThreads) {
        const int t = tb[s];
        zs_s[s] = t < 0 ? 0.0f : __half2float(*reinterpret_cast<const __half*>(zs_g + static_cast<int64_t>(t) * 2));
      }
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (p.kbits == 2) {
      heavy_logits<D, NG, 2>(p, S, stage, kb, nb, q_s, qu_s, t_s, zs_s, xs);
    } else if (p.kbits == 4) {
      heavy_logits<D, NG, 4>(p, S, stage, kb, nb, q_s, qu_s, t_s, zs_s, xs);
    } else {
      heavy_logits<D, NG, 0>(p, S, stage, kb, nb, q_s, qu_s, t_s, zs_s, xs);
    }
    __syncthreads();  // the stage is free again; all logits written
  }
  for (int hh = warp; hh < NG; hh += kWarps) {  // m per head (NaN logits ignored, as the splits do)
    float m = -INFINITY;
    for (int k = lane; k < n; k += 32) m = fmaxf(m, xs[k * NG + hh]);
    m = warp_max(m);
    if (lane == 0) hm_s[hh] = m;
  }
  if (p.heavy_logits != nullptr) {  // the logits themselves, in natural units (A² step weights)
    for (int idx = tid; idx < n * NG; idx += kThreads) {
      const int k = idx / NG, hh = idx % NG;
      if (hh < nh)
        p.heavy_logits[(static_cast<int64_t>(b) * p.Hq + qh0 + hh) * p.K + k_lo + k] =
            xs[idx] * 0.6931471805599453f;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < n * NG; idx += kThreads) {
    const float x = xs[idx];
    xs[idx] = x == -INFINITY ? 0.0f : exp2f(x - hm_s[idx % NG]);  // a NaN logit stays NaN
  }
  constexpr int TPS = D / 2, SR = kThreads / TPS;  // threads per slot row, rows at a time
  static_assert(SR * TPS == kThreads, "whole slot rows per block");
  const int rg = tid / TPS, c = 2 * (tid % TPS);
  const char* drow0 = p.heavy_delta.p + b * p.heavy_delta.sb + h * p.heavy_delta.sh +
                      static_cast<int64_t>(k_lo) * p.heavy_delta.st;
  const int64_t dst = p.heavy_delta.st;
  float o[NG][2];
#pragma unroll
  for (int hh = 0; hh < NG; ++hh) o[hh][0] = o[hh][1] = 0.0f;
  with_elem(p.dtype, [&](auto tag) {
    using E = decltype(tag);
    constexpr int kRow = D * static_cast<int>(sizeof(E));
    // delta rows the stage holds (>= p.hstage), a multiple of SR: each row group keeps its rows
    // (ascending), so the sums are those of one pass over all n rows, whatever the stage size
    const int per = p.hstage * S.row / kRow / SR * SR;
    for (int kb = 0; kb < n; kb += per) {
      const int nb = min(per, n - kb);
      stage_rows(stage, kRow, nb, kRow, 16, t_s + kb,
                 [&](int s, int) { return drow0 + (kb + s) * dst; });
      cp_async_commit();
      cp_async_wait_all();
      __syncthreads();  // (the first time also: the weights xs are ready)
      for (int s = rg; s < nb; s += SR) {
        if (t_s[kb + s] < 0) continue;  // an invisible slot's delta never enters
        const E* dp = reinterpret_cast<const E*>(stage + s * kRow) + c;
        float d0, d1;
        if constexpr (sizeof(E) == 2) {
          const uint32_t bits = *reinterpret_cast<const uint32_t*>(dp);
          d0 = to_float(*reinterpret_cast<const E*>(&bits));
          d1 = to_float(reinterpret_cast<const E*>(&bits)[1]);
        } else {
          const float2 v = *reinterpret_cast<const float2*>(dp);
          d0 = v.x;
          d1 = v.y;
        }
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) {
          const float wgt = xs[(kb + s) * NG + hh];
          o[hh][0] = fmaf(wgt, d0, o[hh][0]);
          o[hh][1] = fmaf(wgt, d1, o[hh][1]);
        }
      }
      __syncthreads();  // the stage is free again
    }
  });
#pragma unroll
  for (int hh = 0; hh < NG; ++hh) {
    red_s[(rg * NG + hh) * D + c] = o[hh][0];
    red_s[(rg * NG + hh) * D + c + 1] = o[hh][1];
  }
  __syncthreads();
  for (int idx = tid; idx < nh * D; idx += kThreads) {  // the SR row groups, in a fixed order
    float a = red_s[idx];
    for (int g = 1; g < SR; ++g) a += red_s[g * NG * D + idx];
    out_s[idx] = a;
  }
}

// ------------------------------------------------------------------------------ split kernel --
// Minimum resident blocks per SM requested from ptxas (caps registers at 128 for NG <= 4).
template <int NG>
constexpr int min_blocks() { return NG <= 4 ? 4 : 2; }

template <int D, int NG>
__global__ void __launch_bounds__(kThreads, min_blocks<NG>())
decode_split_kernel(const DecodeParams p) {
  constexpr int NGV = D / 32;  // max value groups (Gv >= 32)
  constexpr int CS = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const Smem L = decode_smem(p, NG);
  float* q_s = reinterpret_cast<float*>(smem + L.q);        // [NG][D]
  float* qu_s = reinterpret_cast<float*>(smem + L.qu);      // [r][NG] sign * q.U
  float* qs_s = reinterpret_cast<float*>(smem + L.qs);      // [G/tile][NG][D] q*s*2^-p
  float* qz_s = reinterpret_cast<float*>(smem + L.qz);      // [G/tile][NG] q.z
  float* wmax_s = reinterpret_cast<float*>(smem + L.wmax);  // [kWarps][NG]
  float* pv_s = reinterpret_cast<float*>(smem + L.pv);      // [kTile][ngv][NG]
  float* out_s = reinterpret_cast<float*>(smem + L.out);    // [NG][D]
  float* lsum_s = reinterpret_cast<float*>(smem + L.lsum);  // [kWarps][NG]
  float* az_s = reinterpret_cast<float*>(smem + L.az);      // [kWarps][NG][NGV]
  float* red_s = reinterpret_cast<float*>(smem + L.red);    // [kWarps][NG][D]

  const int split = blockIdx.x + p.split0;
  const int h = blockIdx.y / p.nchunk;
  const int chunk = blockIdx.y % p.nchunk;
  const int b = blockIdx.z;
  const int qh0 = h * p.ratio + chunk * NG;
  const int nh = min(NG, p.ratio - chunk * NG);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nq = min(max(p.n_quant[b], 0), p.Tq);
  const int nw = min(max(p.n_window[b], 0), p.W);
  const int ks = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  const bool vcodes = p.v_codes.p != nullptr;
  const bool side = p.z_codes.p != nullptr;
  const int ngv = vcodes ? D / p.Gv : 1;

  load_query_rows<D, NG>(p, b, qh0, nh, q_s);
  __syncthreads();

  State<NG, NGV> st;
#pragma unroll
  for (int hh = 0; hh < NG; ++hh) {
    st.m[hh] = -INFINITY;
    st.l[hh] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) st.acc[hh][j] = 0.0f;
#pragma unroll
    for (int g = 0; g < NGV; ++g) st.az[hh][g] = 0.0f;
  }

  int s0 = 0, s1 = 0;  // quantised token range of this block (empty for window and heavy splits)
  if (split < p.Sq) split_range(split, p.Sq, nq, kTile, &s0, &s1);

  if (s0 < s1) {
    // ---- quantised region ----
    if (side) compute_qu<D, NG>(p, h, q_s, qu_s);
    const PackedStreams<D> ps(p, b, h, side, vcodes);
    const char* vd_g = vcodes ? nullptr : p.v_dense.p + b * p.v_dense.sb + h * p.v_dense.sh;

    // Stage tile [t0, t0 + kTile) into buffer buf: whole 16-token chunks up to the capacity
    // (Tq % 32 == 0, so every stream's byte range is a multiple of 16 bytes).
    // End of the staged range of the tile starting at t0 (whole 16-token chunks, <= Tq).
    auto staged_end = [&](int t0) { return min((min(t0 + kTile, s1) + 15) & ~15, p.Tq); };
    auto stage_tile = [&](int t0, int buf) {
      const int tc = staged_end(t0);
      unsigned char* sb = smem + L.stage0 + buf * L.stage_bytes;
      ps.stage_keys(sb, L, t0, tc, p.G, side, tid, kThreads);
      if (vcodes) ps.stage_values(sb, L, t0, tc - t0, ngv, tid, kThreads);
      cp_async_commit();
    };

    // Tiles entirely before kv_start are skipped without being read.
    const int t_first = s0 + max(0, ks - s0) / kTile * kTile;
    if (t_first < s1) stage_tile(t_first, 0);
    int buf = 0;
    for (int t0 = t_first; t0 < s1; t0 += kTile, buf ^= 1) {
      cp_async_wait_all();
      __syncthreads();  // tile t0 staged; the previous tile's readers are done
      if (t0 + kTile < s1) stage_tile(t0 + kTile, buf ^ 1);
      const unsigned char* sb = smem + L.stage0 + buf * L.stage_bytes;
      const __half* ks_t = reinterpret_cast<const __half*>(sb + L.ks);  // [groups][D]
      const __half* kz_t = reinterpret_cast<const __half*>(sb + L.kz);
      const int ng_tile = (staged_end(t0) + p.G - 1) / p.G - t0 / p.G;  // staged key groups

      // 1. qs / qz tables of the tile's key groups.
      for (int idx = tid; idx < ng_tile * NG * D; idx += kThreads) {
        const int gl = idx / (NG * D), hh = (idx / D) % NG, c = idx % D;
        qs_s[idx] = q_s[hh * D + c] * __half2float(ks_t[gl * D + c]) * pow2_neg(code_pos(c, p.kbits));
      }
      for (int pair = warp; pair < ng_tile * NG; pair += kWarps) {
        const int gl = pair / NG, hh = pair % NG;
        float a = 0.0f;
        for (int c = lane; c < D; c += 32) a = fmaf(q_s[hh * D + c], __half2float(kz_t[gl * D + c]), a);
        a = warp_sum(a);
        if (lane == 0) qz_s[pair] = a;
      }
      __syncthreads();

      // 2. logits of token i = tid.
      const int i = tid, t = t0 + i;
      const bool valid = t < s1 && t >= ks;
      float x[NG];
      if (valid) {
        const int gl = i / p.G;
        const uint8_t* krow = sb + L.kc + i * ps.krowb;
        const float* qs = qs_s + gl * NG * D;
        const float* qz = qz_s + gl * NG;
        switch (p.kbits) {
          case 2: key_dot<D, NG, 2>(krow, qs, qz, x); break;
          case 3: key_dot<D, NG, 3>(krow, qs, qz, x); break;
          case 4: key_dot<D, NG, 4>(krow, qs, qz, x); break;
          default: key_dot<D, NG, 8>(krow, qs, qz, x); break;
        }
        if (side) {
          float corr[NG];
          side_dot<NG>(sb + L.zc + i * ps.zrowb, qu_s, p.r, p.zbits, corr);
          const float zs = __half2float(reinterpret_cast<const __half*>(sb + L.zs)[i]);
#pragma unroll
          for (int hh = 0; hh < NG; ++hh) x[hh] = fmaf(zs, corr[hh], x[hh]);
        }
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) x[hh] *= p.scale_log2;
      } else {
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) x[hh] = -INFINITY;
      }

      // 3. online softmax; p*s (and the zero-point term) for the value phase.
      float pw[NG];
      softmax_step<NG, NGV>(x, wmax_s, st, pw);
      if (vcodes) {
        const __half* vs_t = reinterpret_cast<const __half*>(sb + L.vs) + i * ngv;
        const __half* vz_t = reinterpret_cast<const __half*>(sb + L.vz) + i * ngv;
#pragma unroll
        for (int g = 0; g < NGV; ++g) {
          if (g < ngv) {
            const float s = valid ? __half2float(vs_t[g]) : 0.0f;
            const float z = valid ? __half2float(vz_t[g]) : 0.0f;
#pragma unroll
            for (int hh = 0; hh < NG; ++hh) {
              pv_s[(i * ngv + g) * NG + hh] = pw[hh] * s;
              st.az[hh][g] = fmaf(pw[hh], z, st.az[hh][g]);
            }
          }
        }
      } else {
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) pv_s[i * NG + hh] = pw[hh];
      }
      __syncthreads();

      // 4. values of the visible tokens [i_begin, i_end) of the tile.
      const int i_begin = max(0, ks - t0), i_end = min(kTile, s1 - t0);
      if (vcodes) {
        const uint8_t* vc = sb + L.vc;
        switch (p.vbits) {
          case 2: value_codes<D, NG, NGV, 2>(vc, pv_s, ngv, p.Gv, i_begin, i_end, st); break;
          case 3: value_codes<D, NG, NGV, 3>(vc, pv_s, ngv, p.Gv, i_begin, i_end, st); break;
          case 4: value_codes<D, NG, NGV, 4>(vc, pv_s, ngv, p.Gv, i_begin, i_end, st); break;
          default: value_codes<D, NG, NGV, 8>(vc, pv_s, ngv, p.Gv, i_begin, i_end, st); break;
        }
      } else {
        const char* vbase = vd_g + static_cast<int64_t>(t0) * p.v_dense.st;
        with_elem(p.dtype, [&](auto tag) {
          value_dense<D, NG, NGV, decltype(tag)>(vbase, p.v_dense.st, pv_s, i_begin, i_end, st);
        });
      }
    }
    // Undo the 2^p of the unpacked value codes (exact power-of-two scaling).
    if (vcodes) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float f = pow2_neg(code_pos(j, p.vbits));
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) st.acc[hh][j] *= f;
      }
    }
  } else if (split >= p.Sq && split < p.Sq + p.Sw) {
    // ---- dense window ----
    const int w_lo = (split - p.Sq) * p.wchunk;
    const int w_hi = min(w_lo + p.wchunk, nw);
    const char* kw_g = p.k_window.p + b * p.k_window.sb + h * p.k_window.sh;
    const char* vw_g = p.v_window.p + b * p.v_window.sb + h * p.v_window.sh;
    for (int w0 = w_lo; w0 < w_hi; w0 += kTile) {
      __syncthreads();  // pv_s of the previous tile is consumed
      const int i = tid, w = w0 + i;
      const bool valid = w < w_hi && nq + w >= ks;
      float x[NG];
      if (valid) {
        const char* krow = kw_g + static_cast<int64_t>(w) * p.k_window.st;
        with_elem(p.dtype, [&](auto tag) { dense_key_dot<D, NG, decltype(tag)>(krow, q_s, x); });
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) x[hh] *= p.scale_log2;
        if (p.qtok > 1) {  // a few-token call's own tokens (query_tokens): causal among them
#pragma unroll
          for (int hh = 0; hh < NG; ++hh)
            if (w >= window_end_of_row(nw, p.qtok, qh0 + hh)) x[hh] = -INFINITY;
        }
      } else {
#pragma unroll
        for (int hh = 0; hh < NG; ++hh) x[hh] = -INFINITY;
      }
      float pw[NG];
      softmax_step<NG, NGV>(x, wmax_s, st, pw);
#pragma unroll
      for (int hh = 0; hh < NG; ++hh) pv_s[i * NG + hh] = pw[hh];
      __syncthreads();
      const int i_begin = max(0, ks - nq - w0), i_end = min(kTile, w_hi - w0);
      const char* vbase = vw_g + static_cast<int64_t>(w0) * p.v_window.st;
      with_elem(p.dtype, [&](auto tag) {
        value_dense<D, NG, NGV, decltype(tag)>(vbase, p.v_window.st, pv_s, i_begin, i_end, st);
      });
    }
  }

  // ---- end of split: reduce the per-thread partials ----
  pdl_launch_dependents();  // the combine may be scheduled (it waits for this grid; pdl_*)
  __syncthreads();  // staging buffers are free (red_s aliases them)
#pragma unroll
  for (int hh = 0; hh < NG; ++hh) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float a = st.acc[hh][j];
#pragma unroll
      for (int off = CS; off < 32; off <<= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
      st.acc[hh][j] = a;
    }
    const float lw = warp_sum(st.l[hh]);
    if (lane == 0) lsum_s[warp * NG + hh] = lw;
#pragma unroll
    for (int g = 0; g < NGV; ++g) {
      const float zw = warp_sum(st.az[hh][g]);
      if (lane == 0) az_s[(warp * NG + hh) * NGV + g] = zw;
    }
  }
  if (lane < CS) {
#pragma unroll
    for (int hh = 0; hh < NG; ++hh) {
#pragma unroll
      for (int j = 0; j < 8; ++j) red_s[(warp * NG + hh) * D + lane * 8 + j] = st.acc[hh][j];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < NG * D; idx += kThreads) {
    const int hh = idx / D, c = idx % D;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red_s[w * NG * D + idx];
    if (vcodes && split < p.Sq) {
      const int g = c / p.Gv;
      float z = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) z += az_s[(w * NG + hh) * NGV + g];
      o += z;
    }
    out_s[idx] = o;
  }
  __syncthreads();

  // Partial results of this split.
  for (int idx = tid; idx < nh * D; idx += kThreads) {
    const int hh = idx / D, c = idx % D;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + hh) * p.S + split;
    p.part_acc[row * D + c] = out_s[idx];
  }
  if (tid < nh) {
    float l = 0.0f, m = st.m[0];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) l += lsum_s[w * NG + tid];
#pragma unroll
    for (int hh = 1; hh < NG; ++hh) m = (hh == tid) ? st.m[hh] : m;  // static register index
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + tid) * p.S + split;
    p.part_ml[row * 2] = m;
    p.part_ml[row * 2 + 1] = l;
  }
  // Window splits launched as programmatic dependents of the tensor-core splits (launch_decode_split
  // with pdl) run alongside them, reading nothing they write; this grid completes only after
  // them, so that the combine, which waits for this grid, also waits for them. (No-op otherwise.)
  pdl_wait();
}

// ------------------------------------------------------------------------ heavy-slot kernel --
// Splits Sq + Sw .. S-1: grid = (Sh, H * nchunk, B), one chunk of hchunk slots per block (the
// SIMT plan's query-head chunking). Launched after the split kernels (as a programmatic
// dependent, it runs in the slots their blocks leave free) and before the combine; a kernel of
// its own so that its small shared memory and register needs let many blocks be resident.
struct HeavySmem {
  int q, qu, xs, t, zs, out, hm, stage, red, total;
};

__host__ __device__ inline HeavySmem heavy_smem(const DecodeParams& p, int NG) {
  const int r = p.z_codes.p != nullptr ? p.r : 1;
  const int stage = p.hstage * heavy_stage(p).row;
  const int red = kThreads * 2 * NG * 4;
  HeavySmem s;
  int o = 0;
  s.q = o;     o += align16(NG * p.D * 4);
  s.qu = o;    o += align16(r * NG * 4);
  s.xs = o;    o += align16(kMaxHeavyChunk * NG * 4);
  s.t = o;     o += align16(kMaxHeavyChunk * 4);
  s.zs = o;    o += align16(p.hstage * 4);
  s.out = o;   o += align16(NG * p.D * 4);
  s.hm = o;    o += align16(NG * 4);
  s.stage = o;
  s.red = o;   o += align16(stage > red ? stage : red);  // red_s is used once the stage is free
  s.total = o;
  return s;
}

template <int D, int NG>
__global__ void __launch_bounds__(kThreads) decode_heavy_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const HeavySmem L = heavy_smem(p, NG);
  float* q_s = reinterpret_cast<float*>(smem + L.q);
  float* qu_s = reinterpret_cast<float*>(smem + L.qu);
  float* out_s = reinterpret_cast<float*>(smem + L.out);
  float* hm_s = reinterpret_cast<float*>(smem + L.hm);
  pdl_launch_dependents();  // the combine may be scheduled (it waits for this grid)
  const int split = p.Sq + p.Sw + blockIdx.x;
  const int h = blockIdx.y / p.nchunk, chunk = blockIdx.y % p.nchunk, b = blockIdx.z;
  const int qh0 = h * p.ratio + chunk * NG;
  const int nh = min(NG, p.ratio - chunk * NG);
  const int tid = threadIdx.x;
  const int nq = min(max(p.n_quant[b], 0), p.Tq);
  const int ks = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  const int k_lo = blockIdx.x * p.hchunk;
  const int n = nq > 0 ? max(0, min(p.hchunk, p.K - k_lo)) : 0;  // nq <= 0: nothing visible
  static_assert(kMaxHeavyChunk <= kThreads, "one slot index per thread");
  int* t_s = reinterpret_cast<int*>(smem + L.t);
  int t = -1;
  if (tid < n) t = p.heavy_idx[(static_cast<int64_t>(b) * p.H + h) * p.K + k_lo + tid];
  load_query_rows<D, NG>(p, b, qh0, nh, q_s);  // its loads overlap the index load's latency
  if (tid < n) t_s[tid] = t >= ks && t < nq ? t : -1;  // -1: empty or invisible
  __syncthreads();
  if (p.z_codes.p != nullptr) {
    compute_qu<D, NG>(p, h, q_s, qu_s);
    __syncthreads();
  }
  heavy_split<D, NG>(p, b, h, qh0, nh, k_lo, n, q_s, qu_s, t_s, smem + L.stage,
                     reinterpret_cast<float*>(smem + L.zs), reinterpret_cast<float*>(smem + L.xs),
                     hm_s, reinterpret_cast<float*>(smem + L.red), out_s);
  __syncthreads();
  for (int idx = tid; idx < nh * D; idx += kThreads) {
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + idx / D) * p.S + split;
    p.part_acc[row * D + idx % D] = out_s[idx];
  }
  if (tid < nh) {  // numerator only: l = 0 (the kept tokens' weights are in the quantised splits)
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + tid) * p.S + split;
    p.part_ml[row * 2] = hm_s[tid];
    p.part_ml[row * 2 + 1] = 0.0f;
  }
  // Completes only after the previous grid (itself after the tensor-core splits, see the end of
  // decode_split_kernel), so that the combine, which waits for this grid, waits for all of them.
  pdl_wait();
}

// ---------------------------------------------------------------------------- combine kernel --
// One warp per (batch, query head) row, kCombineWarps rows per block: the splits' maxima and
// weighted sums are reduced with cub::WarpReduce (shuffles: no shared-memory round trips or block
// barriers), lane i owns channels i, i + 32, ... (D <= 32 * kCombineMaxCj), and the partials of
// the first 8 splits are loaded before anything else, so that a row costs about one memory
// latency. (A block per row with cub::BlockReduce took 5.2-5.8 us at 32k, batch 8, on the H200.)
constexpr int kCombineWarps = 2;
constexpr int kCombineMaxCj = 4;

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// out[b, hq, c] = sum_s 2^(m_s - M) acc_s[c] / sum_s 2^(m_s - M) l_s  (0 when nothing visible),
// lse[b, hq] = ln(sum_t exp(logit_t)) = (M + log2(sum_s 2^(m_s - M) l_s)) * ln 2  (-inf: none).
template <typename E>
__global__ void __launch_bounds__(32 * kCombineWarps)
decode_combine_kernel(const float* __restrict__ part_acc,  // [BHq, S, D]
                      const float* __restrict__ part_ml,   // [BHq, S, 2]
                      int64_t BHq, int S, int D,
                      E* __restrict__ out,                 // [BHq, D]
                      float* __restrict__ lse,             // [BHq]
                      const Strided q, int Hq) {           // [B, Hq, D], last dim unit stride
  pdl_wait();  // launched as a programmatic dependent of the split kernels (pdl): nothing is read before
  using WarpReduceF = cub::WarpReduce<float>;
  __shared__ typename WarpReduceF::TempStorage red_tmp[kCombineWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row >= BHq) return;  // warp-uniform
  const float* ml = part_ml + row * S * 2;
  const float* pa_row = part_acc + row * S * D;
  const int nj = D / 32;  // channels per lane (host: D % 32 == 0, D <= 32 * kCombineMaxCj)
  // Partials of the first (up to) 8 splits, issued before the checks and reductions below.
  const int s_pre = min(S, 8);
  float a_pre[8][kCombineMaxCj];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
#pragma unroll
    for (int j = 0; j < kCombineMaxCj; ++j)
      a_pre[u][j] = (u < s_pre && j < nj) ? pa_row[u * D + 32 * j + lane] : 0.0f;
  }
  // A NaN query makes every logit NaN, which the splits' NaN-ignoring max turns into "nothing
  // visible" (zeros, lse -inf): a silent wrong answer. Propagate it instead, as the reference
  // and the CPU kernel do.
  const E* qr = reinterpret_cast<const E*>(q.p + (row / Hq) * q.sb + (row % Hq) * q.sh);
  bool bad = false;
  for (int c = lane; c < D; c += 32) bad |= isnan(to_float(qr[c]));
  float m_part = -INFINITY;
  for (int s = lane; s < S; s += 32) {
    const float m = ml[2 * s], l = ml[2 * s + 1];
    bad |= isnan(m) || isnan(l);
    m_part = fmaxf(m_part, m);
  }
  if (__any_sync(0xffffffffu, bad)) {
    if (lane == 0) lse[row] = NAN;
    for (int c = lane; c < D; c += 32) out[row * D + c] = from_float<E>(NAN);
    return;
  }
  // M = max_s m_s and Lsum = sum_s 2^(m_s - M) l_s (valid in lane 0, then broadcast).
  const float M = __shfl_sync(0xffffffffu, WarpReduceF(red_tmp[warp]).Reduce(m_part, MaxOp{}), 0);
  float l_part = 0.0f;
  if (M != -INFINITY) {
    for (int s = lane; s < S; s += 32) {
      if (ml[2 * s] != -INFINITY) l_part += exp2f(ml[2 * s] - M) * ml[2 * s + 1];
    }
  }
  __syncwarp();  // red_tmp reuse
  const float Lsum = __shfl_sync(0xffffffffu, WarpReduceF(red_tmp[warp]).Sum(l_part), 0);
  const float inv = Lsum > 0.0f ? 1.0f / Lsum : 0.0f;
  if (lane == 0) lse[row] = Lsum > 0.0f ? (M + log2f(Lsum)) * 0.6931471805599453f : -INFINITY;
  // Sequential in ascending s per channel, splits in blocks of 8 whose loads are issued together.
  float o[kCombineMaxCj] = {};
  if (inv != 0.0f) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float m = u < s_pre ? ml[2 * u] : -INFINITY;
      if (m != -INFINITY) {
        const float w = exp2f(m - M);
#pragma unroll
        for (int j = 0; j < kCombineMaxCj; ++j) o[j] = fmaf(w, a_pre[u][j], o[j]);
      }
    }
    int s = s_pre;
    for (; s + 8 <= S; s += 8) {
      float a[8][kCombineMaxCj], m[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        m[u] = ml[2 * (s + u)];
#pragma unroll
        for (int j = 0; j < kCombineMaxCj; ++j)
          a[u][j] = j < nj ? pa_row[(s + u) * D + 32 * j + lane] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (m[u] != -INFINITY) {
          const float w = exp2f(m[u] - M);
#pragma unroll
          for (int j = 0; j < kCombineMaxCj; ++j) o[j] = fmaf(w, a[u][j], o[j]);
        }
      }
    }
    for (; s < S; ++s) {
      const float m = ml[2 * s];
      if (m != -INFINITY) {
        const float w = exp2f(m - M);
#pragma unroll
        for (int j = 0; j < kCombineMaxCj; ++j)
          if (j < nj) o[j] = fmaf(w, pa_row[s * D + 32 * j + lane], o[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kCombineMaxCj; ++j)
    if (j < nj) out[row * D + 32 * j + lane] = from_float<E>(o[j] * inv);
}

template <int D, int NG>
cudaError_t launch_split_typed(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream,
                               bool pdl) {
  auto kernel = decode_split_kernel<D, NG>;
  if (plan.smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.Sq + p.Sw - p.split0, p.H * p.nchunk, p.B);
  return launch_maybe_pdl(kernel, grid, dim3(kThreads), plan.smem, stream, pdl, p);
}

template <int D, int NG>
cudaError_t occupancy_typed(size_t smem, int* blocks) {
  auto kernel = decode_split_kernel<D, NG>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem);
}

template <typename F>
cudaError_t with_shape(int D, int NG, F&& f) {
#define HEADQ_DECODE_CASE(d, ng) \
  if (D == d && NG == ng) return f(std::integral_constant<int, d>{}, std::integral_constant<int, ng>{});
  HEADQ_DECODE_CASE(64, 1) HEADQ_DECODE_CASE(64, 2) HEADQ_DECODE_CASE(64, 4) HEADQ_DECODE_CASE(64, 8)
  HEADQ_DECODE_CASE(128, 1) HEADQ_DECODE_CASE(128, 2) HEADQ_DECODE_CASE(128, 4)
  HEADQ_DECODE_CASE(128, 8)
#undef HEADQ_DECODE_CASE
  return cudaErrorInvalidValue;  // head dim / group not supported by the fused kernel
}

}  // namespace

cudaError_t plan_decode_attention(const DecodeParams& p, int sm_count, DecodePlan* plan) {
  DecodePlan pl{};
  pl.ng = p.ratio >= 8 ? 8 : (p.ratio >= 4 ? 4 : (p.ratio >= 2 ? 2 : 1));
  if (p.ratio == 3) pl.ng = 4;
  pl.nchunk = (p.ratio + pl.ng - 1) / pl.ng;
  pl.smem = static_cast<size_t>(decode_smem(p, pl.ng).total);
  int per_sm = 1;
  const cudaError_t err = with_shape(p.D, pl.ng, [&](auto d, auto ng) {
    return occupancy_typed<decltype(d)::value, decltype(ng)::value>(pl.smem, &per_sm);
  });
  if (err != cudaSuccess) return err;
  // the full wave (the shorter-splits rule, kAutoMinTiles, was measured on the tensor-core kernel)
  set_plan_splits(p, sm_count, per_sm, kTile, kTile, 1, &pl);
  *plan = pl;
  return cudaSuccess;
}

cudaError_t launch_decode_split(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream,
                                bool pdl) {
  if (p.Sq + p.Sw - p.split0 <= 0 || p.B == 0 || p.H == 0) return cudaSuccess;
  return with_shape(p.D, plan.ng, [&](auto d, auto ng) {
    return launch_split_typed<decltype(d)::value, decltype(ng)::value>(p, plan, stream, pdl);
  });
}

// Stage size forced by HEADQ_HEAVY_STAGE ("32" or "64", read at every call, for A/B runs);
// 0 (unset, or anything else): heavy_stage_slots decides.
static int heavy_stage_override() {
  const char* env = std::getenv("HEADQ_HEAVY_STAGE");
  if (env == nullptr) return 0;
  if (std::strcmp(env, "32") == 0) return kHeavyStageSmall;
  if (std::strcmp(env, "64") == 0) return kHeavyStageLarge;
  return 0;
}

cudaError_t launch_decode_heavy(const DecodeParams& p0, const DecodePlan& plan, int sm_count,
                                cudaStream_t stream, bool pdl) {
  if (p0.Sh <= 0 || p0.B == 0 || p0.H == 0) return cudaSuccess;
  return with_shape(p0.D, plan.ng, [&](auto d, auto ng) {
    auto kernel = decode_heavy_kernel<decltype(d)::value, decltype(ng)::value>;
    DecodeParams p = p0;
    const dim3 grid(p.Sh, p.H * plan.nchunk, p.B);
    // The 64-slot stage's shared memory bounds both sizes': allowed before the occupancy query
    // (which counts 0 blocks for more than the kernel's allowance) and the launch.
    p.hstage = kHeavyStageLarge;
    const size_t smem64 = static_cast<size_t>(heavy_smem(p, ng).total);
    if (smem64 > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem64));
      if (err != cudaSuccess) return err;
    }
    p.hstage = heavy_stage_override();
    if (p.hstage == 0) {  // 64 if every block is resident at once with the 64-slot stage
      int per_sm = 0;
      const cudaError_t err =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem64);
      if (err != cudaSuccess) return err;
      p.hstage = heavy_stage_slots(static_cast<int64_t>(grid.x) * grid.y * grid.z,
                                   static_cast<int64_t>(per_sm) * sm_count);
    }
    const size_t smem = static_cast<size_t>(heavy_smem(p, ng).total);
    return launch_maybe_pdl(kernel, grid, dim3(kThreads), smem, stream, pdl, p);
  });
}

namespace {
// An A/B switch read at every call: on unless the variable is "0".
bool env_switch_on(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::strcmp(env, "0") != 0;
}
}  // namespace

bool decode_mma_window_enabled() { return env_switch_on("HEADQ_MMA_WINDOW"); }

int decode_split_min_tiles() {
  const char* env = std::getenv("HEADQ_SPLIT_MIN_TILES");
  if (env == nullptr) return -1;
  const int v = std::atoi(env);
  return v >= 1 && v <= 4096 ? v : -1;
}

bool decode_pdl_enabled(int device_major) {
  return device_major >= 9 && env_switch_on("HEADQ_PDL");
}

cudaError_t launch_decode_combine(const float* part_acc, const float* part_ml, int64_t BHq, int S,
                                  int D, void* out, float* lse, DType dtype, const Strided& q,
                                  int Hq, cudaStream_t stream, bool pdl) {
  if (BHq == 0) return cudaSuccess;
  if (D % 32 != 0 || D > 32 * kCombineMaxCj) return cudaErrorInvalidValue;  // D in {64, 128}
  const dim3 grid(static_cast<unsigned>((BHq + kCombineWarps - 1) / kCombineWarps));
  const dim3 block(32 * kCombineWarps);
  switch (dtype) {
    case DType::kFloat16:
      return launch_maybe_pdl(decode_combine_kernel<__half>, grid, block, 0, stream, pdl, part_acc,
                              part_ml, BHq, S, D, static_cast<__half*>(out), lse, q, Hq);
    case DType::kBFloat16:
      return launch_maybe_pdl(decode_combine_kernel<__nv_bfloat16>, grid, block, 0, stream, pdl,
                              part_acc, part_ml, BHq, S, D, static_cast<__nv_bfloat16*>(out), lse,
                              q, Hq);
    default:
      return launch_maybe_pdl(decode_combine_kernel<float>, grid, block, 0, stream, pdl, part_acc,
                              part_ml, BHq, S, D, static_cast<float*>(out), lse, q, Hq);
  }
}

}  // namespace cuda
}  // namespace headq
