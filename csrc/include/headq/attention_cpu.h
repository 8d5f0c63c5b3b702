// Torch-free CPU kernels of the attention ops (corrected logits, decode attention), one
// (batch, KV head) slice per call: all query heads that read the KV head are processed together
// (GQA), so each block of packed keys/values is unpacked once.
//
// Blocks of kBlockTokens tokens are dequantised (corrected_logits) or unpacked to float codes
// (decode attention) into small per-slice scratch buffers; no dense K or V of the whole cache is
// ever materialised. Accumulation is float32.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "headq/common.h"
#include "headq/quant_cpu.h"
#include "headq/softmax.h"

namespace headq {
namespace cpu {

// Tokens per block of the attention kernels.
constexpr int64_t kBlockTokens = 64;

// Optional side code of one (b, h) slice; codes == nullptr means no side code.
struct SideCodeSlice {
  const uint8_t* codes = nullptr;   // [n_tok, r*bits/8]
  const uint16_t* scale = nullptr;  // [n_tok] float16 bits
  const float* basis = nullptr;     // [D, r] of this KV head, contiguous
  int64_t r = 0;
  int bits = 8;
};

// qu[i, j] = sum_c q[i, c] * basis[c, j] (float32, ascending c).
inline void project_queries(const float* q,      // [n_rows, D]
                            const float* basis,  // [D, r]
                            int64_t n_rows, int64_t D, int64_t r,
                            float* qu) {  // [n_rows, r]
  for (int64_t i = 0; i < n_rows; ++i) {
    float* o = qu + i * r;
    for (int64_t j = 0; j < r; ++j) o[j] = 0.0f;
    for (int64_t c = 0; c < D; ++c) {
      const float qc = q[i * D + c];
      const float* u = basis + c * r;
      for (int64_t j = 0; j < r; ++j) o[j] += qc * u[j];
    }
  }
}

// logits[i, t] = (q_i . k_t + sign * qu_i . z_t) * scale for a block of n tokens.
inline void block_logits(const float* q,   // [n_rows, D]
                         const float* qu,  // [n_rows, r], or nullptr (no correction)
                         int64_t n_rows,
                         const float* kb,  // [n, D] dequantised keys
                         const float* zb,  // [n, r] dequantised side code, or nullptr
                         int64_t n, int64_t D, int64_t r, float sign, float scale,
                         float* logits,  // [n_rows, ld]
                         int64_t ld) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* qi = q + i * D;
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = kb + t * D;
      float dot = 0.0f;
      for (int64_t c = 0; c < D; ++c) dot += qi[c] * kt[c];
      if (qu != nullptr && zb != nullptr) {
        const float* qui = qu + i * r;
        const float* zt = zb + t * r;
        float dz = 0.0f;
        for (int64_t j = 0; j < r; ++j) dz += qui[j] * zt[j];
        dot += sign * dz;
      }
      logits[i * ld + t] = dot * scale;
    }
  }
}

// Corrected logits of one (b, h): the n_rows query rows (n_rep query heads x L positions,
// contiguous) against the n_tok quantised keys of the KV head.
template <typename T>
void corrected_logits_slice(const T* q,  // [n_rows, D]
                            int64_t n_rows,
                            const uint8_t* k_codes,   // [n_tok, D*key_bits/8]
                            const uint16_t* k_scale,  // [n_tok/G, D]
                            const uint16_t* k_zero,   // [n_tok/G, D]
                            const SideCodeSlice& side, int64_t n_tok, int64_t D, int64_t G,
                            int key_bits, float sign, float scale,
                            float* out) {  // [n_rows, n_tok]
  const bool has_side = side.codes != nullptr;
  const int64_t r = has_side ? side.r : 0;
  std::vector<float> qf(n_rows * D), qu(n_rows * r), kb(kBlockTokens * D), zb(kBlockTokens * r);
  for (int64_t i = 0; i < n_rows * D; ++i) qf[i] = static_cast<float>(q[i]);
  if (has_side) project_queries(qf.data(), side.basis, n_rows, D, r, qu.data());
  for (int64_t t0 = 0; t0 < n_tok; t0 += kBlockTokens) {
    const int64_t t1 = std::min(t0 + kBlockTokens, n_tok);
    dequant_key_rows(k_codes, k_scale, k_zero, D, G, key_bits, t0, t1, kb.data());
    if (has_side) dequant_side_rows(side.codes, side.scale, r, side.bits, t0, t1, zb.data());
    block_logits(qf.data(), has_side ? qu.data() : nullptr, n_rows, kb.data(),
                 has_side ? zb.data() : nullptr, t1 - t0, D, r, sign, scale, out + t0, n_tok);
  }
}

// ------------------------------------------------------------------------------------------
// Decode attention (docs/LAYOUT.md, "Decode attention").
//
// Speed notes. Measured on the 2-core AMD EPYC (Zen 5) dev box, B=1, 32 query / 8 KV heads,
// D=128, 2-bit K and V, G=Gv=64, rank-8 side code, 4096 tokens, 1 thread, median thread CPU
// time (the box is shared, so wall time is noisy): the previous kernel (per-element get_code,
// dequantise a block to float, scalar dot products) took 21.3 ms vs 6.2 ms for dense fp32 SDPA;
// the structure below takes 3.8 ms, and 3.5 ms after converting the value scales/zeros once per
// block instead of once per query row. benchmarks/bench_cpu.py has the 2-thread wall times.
//  * Keys are never dequantised. Within a key group, q . khat_t = sum_c (q_c s_c) code_tc +
//    sum_c q_c z_c, so qs = q (.) s and qz = q . z are computed once per group and query row
//    and the per-token work is a dot product of qs with the raw codes (as floats).
//  * Values are never dequantised either: o_c = sum_t (a_t s_tg) code_tc + sum_t a_t z_tg, so
//    per token and channel group only w = a_t s_tg is formed, the channel loop multiplies
//    w by the codes, and sum_t a_t z_tg is kept per group and added at the end.
//  * Codes of a 64-token block are unpacked once into a float buffer (shared by all query heads
//    of the KV head) with byte -> 4/2/1 float tables for 2/4/8 bits (3 bits: generic get_code).
//  * Inner loops use 8-float GCC vector types. The build has no -march, so on x86-64 the kernel
//    body is also compiled for AVX2 and picked at run time (__builtin_cpu_supports); no FMA is
//    enabled so both versions round identically (-ffp-contract=off is kept).
//  * This changes the float summation order of the logits and of the output (never of the
//    quantisers): tests compare against float64 within the float32 tolerances.
// ------------------------------------------------------------------------------------------

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__CUDACC__)
#define HEADQ_CPU_X86_DISPATCH 1
#else
#define HEADQ_CPU_X86_DISPATCH 0
#endif

#if defined(__GNUC__)
#define HEADQ_CPU_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HEADQ_CPU_ALWAYS_INLINE inline
#endif

namespace simd {

// 8 floats; lowered to two SSE registers in the default build, one register under AVX2.
// Helpers take vectors by reference only: no vector crosses a call boundary by value (that
// would change the ABI between the default and AVX2 builds, -Wpsabi).
typedef float f8 __attribute__((vector_size(32)));

HEADQ_CPU_ALWAYS_INLINE void load8(f8* v, const float* p) { std::memcpy(v, p, sizeof(f8)); }
HEADQ_CPU_ALWAYS_INLINE void store8(float* p, const f8& v) { std::memcpy(p, &v, sizeof(f8)); }
HEADQ_CPU_ALWAYS_INLINE float hsum8(const f8& v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

}  // namespace simd

// Byte -> float tables of packed codes (code values are small integers: exact in float).
struct CodeTables {
  float b2[256][4];  // 2-bit: byte j holds codes 4j .. 4j+3, lowest bits first
  float b4[256][2];  // 4-bit
  float b8[256];     // 8-bit
};

inline const CodeTables& code_tables() {
  static const CodeTables tables = [] {
    CodeTables t;
    for (int x = 0; x < 256; ++x) {
      for (int k = 0; k < 4; ++k) t.b2[x][k] = static_cast<float>((x >> (2 * k)) & 3);
      for (int k = 0; k < 2; ++k) t.b4[x][k] = static_cast<float>((x >> (4 * k)) & 15);
      t.b8[x] = static_cast<float>(x);
    }
    return t;
  }();
  return tables;
}

// Rows [t0, t0+n) of a packed code matrix (n codes of `bits` bits per row) as floats
// out[t, c] = code(t, c) - offset.
HEADQ_CPU_ALWAYS_INLINE void unpack_code_rows(const CodeTables& lut, const uint8_t* codes,
                                              int64_t n_codes, int bits, int64_t t0, int64_t n,
                                              float offset,
                                              float* out) {  // [n, n_codes]
  const int64_t row_bytes = packed_row_bytes(n_codes, bits);
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = codes + (t0 + t) * row_bytes;
    float* o = out + t * n_codes;
    if (bits == 2) {
      for (int64_t j = 0; j < row_bytes; ++j) std::memcpy(o + 4 * j, lut.b2[row[j]], 16);
    } else if (bits == 4) {
      for (int64_t j = 0; j < row_bytes; ++j) std::memcpy(o + 2 * j, lut.b4[row[j]], 8);
    } else if (bits == 8) {
      for (int64_t j = 0; j < row_bytes; ++j) o[j] = lut.b8[row[j]];
    } else {
      for (int64_t c = 0; c < n_codes; ++c) o[c] = static_cast<float>(get_code(row, c, bits));
    }
    if (offset != 0.0f)
      for (int64_t c = 0; c < n_codes; ++c) o[c] -= offset;
  }
}

// out[i*ld + t] = sum_c w[i, c] * x[t, c] for i < n_rows, t < n (len-long rows). Per (i, t): 8
// lane partial sums over c, then a fixed tree; the same order for every token, so a logit does
// not depend on where its block starts. Tokens go 4 at a time: one weight load per 4
// multiply-adds.
HEADQ_CPU_ALWAYS_INLINE void dot_rows(const float* w,  // [n_rows, len]
                                      int64_t n_rows,
                                      const float* x,  // [n, len]
                                      int64_t n, int64_t len,
                                      float* out,  // [n_rows, ld]
                                      int64_t ld) {
  using namespace simd;
  const int64_t len8 = len & ~int64_t{7};
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* wi = w + i * len;
    float* oi = out + i * ld;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const float* x0 = x + t * len;
      f8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, wv, xv;
      for (int64_t c = 0; c < len8; c += 8) {
        load8(&wv, wi + c);
        load8(&xv, x0 + c);
        a0 += wv * xv;
        load8(&xv, x0 + len + c);
        a1 += wv * xv;
        load8(&xv, x0 + 2 * len + c);
        a2 += wv * xv;
        load8(&xv, x0 + 3 * len + c);
        a3 += wv * xv;
      }
      float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
      for (int64_t c = len8; c < len; ++c) {
        s0 += wi[c] * x0[c];
        s1 += wi[c] * x0[len + c];
        s2 += wi[c] * x0[2 * len + c];
        s3 += wi[c] * x0[3 * len + c];
      }
      oi[t] = s0;
      oi[t + 1] = s1;
      oi[t + 2] = s2;
      oi[t + 3] = s3;
    }
    for (; t < n; ++t) {
      const float* xt = x + t * len;
      f8 a0 = {}, wv, xv;
      for (int64_t c = 0; c < len8; c += 8) {
        load8(&wv, wi + c);
        load8(&xv, xt + c);
        a0 += wv * xv;
      }
      float s0 = hsum8(a0);
      for (int64_t c = len8; c < len; ++c) s0 += wi[c] * xt[c];
      oi[t] = s0;
    }
  }
}

// acc[i, c] += sum_t w[i, t, c / Gv] * x[t, c] for i < n_rows, t < n (ascending t per element).
// D % 8 == 0 and Gv % 8 == 0 (Gv = D for dense rows with per-token weights). The 32-channel
// register block keeps acc in registers across the block's tokens: one broadcast and four code
// loads per 4 vector multiply-adds instead of a load + store of acc per multiply-add.
HEADQ_CPU_ALWAYS_INLINE void accumulate_rows(const float* w,  // [n_rows, n, D/Gv]
                                             int64_t n_rows,
                                             const float* x,  // [n, D]
                                             int64_t n, int64_t D, int64_t Gv,
                                             float* acc) {  // [n_rows, D]
  using namespace simd;
  const int64_t ng = D / Gv;
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* wi = w + i * n * ng;
    float* ai = acc + i * D;
    int64_t c = 0;
    f8 r0, r1, r2, r3, xv;
    if (Gv % 32 == 0) {
      for (; c + 32 <= D; c += 32) {
        const int64_t g = c / Gv;
        load8(&r0, ai + c);
        load8(&r1, ai + c + 8);
        load8(&r2, ai + c + 16);
        load8(&r3, ai + c + 24);
        for (int64_t t = 0; t < n; ++t) {
          const float wt = wi[t * ng + g];
          const float* xt = x + t * D + c;
          load8(&xv, xt);
          r0 += wt * xv;
          load8(&xv, xt + 8);
          r1 += wt * xv;
          load8(&xv, xt + 16);
          r2 += wt * xv;
          load8(&xv, xt + 24);
          r3 += wt * xv;
        }
        store8(ai + c, r0);
        store8(ai + c + 8, r1);
        store8(ai + c + 16, r2);
        store8(ai + c + 24, r3);
      }
    }
    for (; c < D; c += 8) {
      const int64_t g = c / Gv;
      load8(&r0, ai + c);
      for (int64_t t = 0; t < n; ++t) {
        load8(&xv, x + t * D + c);
        r0 += wi[t * ng + g] * xv;
      }
      store8(ai + c, r0);
    }
  }
}

// One (b, h) slice of decode_attention (docs/LAYOUT.md). Pointers are slice bases; the
// lengths are the raw values of n_quant[b], n_window[b], kv_start[b] and are clamped here
// (n_quant to [0, Tq], n_window to [0, W], kv_start to >= 0).
template <typename T>
struct DecodeSlice {
  const T* q = nullptr;                // [n_rep, D] query heads of this KV head
  const uint8_t* k_codes = nullptr;    // [Tq, D*key_bits/8]
  const uint16_t* k_scale = nullptr;   // [Tq/G, D]
  const uint16_t* k_zero = nullptr;    // [Tq/G, D]
  SideCodeSlice side;                  // [Tq, ...] or none
  const uint8_t* v_codes = nullptr;    // [Tq, D*value_bits/8], or nullptr: v_dense
  const uint16_t* v_scale = nullptr;   // [Tq, D/Gv]
  const uint16_t* v_zero = nullptr;    // [Tq, D/Gv]
  const T* v_dense = nullptr;          // [Tq, D]
  const T* heavy_delta = nullptr;      // [K, D], or nullptr: no heavy tokens
  const int32_t* heavy_idx = nullptr;  // [K], -1 = empty slot
  int64_t n_heavy = 0;                 // K
  float* heavy_logits = nullptr;       // [n_rep, K] out: visible kept tokens' logits, or null
  const T* k_window = nullptr;         // [W, D]
  const T* v_window = nullptr;         // [W, D]
  int64_t n_quant = 0;
  int64_t n_window = 0;
  int64_t kv_start = 0;
  int64_t row0 = 0;      // query-head index (within the batch row) of this slice's first head
  T* out = nullptr;      // [n_rep, D]
  float* lse = nullptr;  // [n_rep] log-sum-exp of the visible logits (-inf: none)
};

struct DecodeShape {
  int64_t n_rep = 1;  // query heads per KV head
  int64_t D = 0;      // head dim
  int64_t Tq = 0;     // capacity of the quantised region
  int64_t W = 0;      // capacity of the window
  int64_t G = 32;     // key group size (tokens)
  int64_t Gv = 32;    // value group size (channels)
  int key_bits = 4;
  int value_bits = 4;
  float sign = 1.0f;
  float scale = 1.0f;
  // L: query head j (= row0 + i) is token j % L of the window's last L tokens and sees the
  // window tokens w < n_window - (L - 1 - j % L) (causal among them); 1 = every window token
  int64_t query_tokens = 1;
};

// Logical length of a slice's sequence: quantised tokens [0, nq), then window tokens
// [nq, nq + nw) (clamped as in decode_attention_slice).
template <typename T>
int64_t decode_logical_length(const DecodeSlice<T>& a, const DecodeShape& sh) {
  const int64_t nq = std::min(std::max<int64_t>(a.n_quant, 0), sh.Tq);
  const int64_t nw = std::min(std::max<int64_t>(a.n_window, 0), sh.W);
  return nq + nw;
}

namespace detail {

template <typename T>
HEADQ_CPU_ALWAYS_INLINE void decode_partial_body(const DecodeSlice<T>& a, const DecodeShape& sh,
                                                 int64_t l_begin, int64_t l_end,
                                                 OnlineSoftmax* st,  // [n_rep] out
                                                 float* acc) {       // [n_rep, D] out
  const int64_t n_rep = sh.n_rep, D = sh.D;
  const bool has_side = a.side.codes != nullptr;
  const int64_t r = has_side ? a.side.r : 0;
  const int64_t nq = std::min(std::max<int64_t>(a.n_quant, 0), sh.Tq);
  const int64_t nw = std::min(std::max<int64_t>(a.n_window, 0), sh.W);
  const int64_t start = std::max<int64_t>(a.kv_start, 0);
  const bool v_coded = a.v_codes != nullptr;
  const int64_t Gv = v_coded ? sh.Gv : D;
  const int64_t ng = D / Gv;
  constexpr int64_t NB = kBlockTokens;
  const CodeTables& lut = code_tables();

  // Scratch of this call (one allocation): see the uses below.
  const int64_t n_scratch = n_rep * D          // qf
                            + n_rep * r        // qu
                            + n_rep * D        // qs
                            + n_rep            // qz
                            + NB * D           // xb: unpacked key / value codes of a block
                            + NB * r           // zb: side codes of a block (code - offset)
                            + n_rep * NB * 2   // logits, corr
                            + NB * ng * 2      // value scales / zeros of a block (float)
                            + NB               // side-code scales of a block (float)
                            + n_rep * NB * ng  // wb: per (row, token, group) value weights
                            + n_rep * ng       // zacc: sum_t a_t z_tg of a block
                            + n_rep * D;       // accb: sum_t a_t v_t of a block
  std::vector<float> scratch(n_scratch, 0.0f);
  // Running sums across blocks in double: each block's sums (<= NB terms) are float, then added
  // here, so the rounding error does not grow with the context (float sums over every token
  // reached ~1e-5 absolute at 4k tokens, 50x the float32 PyTorch path's).
  std::vector<double> dsum(n_rep * D + n_rep * ng + n_rep, 0.0);
  double* acc_d = dsum.data();         // [n_rep, D]
  double* zacc_d = acc_d + n_rep * D;  // [n_rep, ng]
  double* l_d = zacc_d + n_rep * ng;   // [n_rep]
  float* qf = scratch.data();
  float* qu = qf + n_rep * D;
  float* qs = qu + n_rep * r;
  float* qz = qs + n_rep * D;
  float* xb = qz + n_rep;
  float* zb = xb + NB * D;
  float* logits = zb + NB * r;
  float* corr = logits + n_rep * NB;
  float* vsf = corr + n_rep * NB;
  float* vzf = vsf + NB * ng;
  float* zsf = vzf + NB * ng;
  float* wb = zsf + NB;
  float* zacc = wb + n_rep * NB * ng;
  float* accb = zacc + n_rep * ng;

  for (int64_t i = 0; i < n_rep * D; ++i) qf[i] = static_cast<float>(a.q[i]);
  if (has_side) project_queries(qf, a.side.basis, n_rep, D, r, qu);
  for (int64_t i = 0; i < n_rep; ++i) st[i] = OnlineSoftmax();

  // Online softmax over logits[i, 0..n) (already scaled); leaves the weights in logits and
  // rescales the running sums.
  auto softmax_block = [&](int64_t n) {
    for (int64_t i = 0; i < n_rep; ++i) {
      float* li = logits + i * NB;
      float bmax = -INFINITY;
      // Same result as fmaxf (a NaN logit is skipped) but inlined: fmaxf is a libm call
      // without -ffast-math and took as many cycles as expf here (perf: 2.6% vs 2.8%).
      for (int64_t t = 0; t < n; ++t) bmax = (li[t] > bmax) ? li[t] : bmax;
      const float alpha = st[i].raise(bmax);
      if (alpha != 1.0f) {
        double* ai = acc_d + i * D;
        for (int64_t c = 0; c < D; ++c) ai[c] *= alpha;
        for (int64_t g = 0; g < ng; ++g) zacc_d[i * ng + g] *= alpha;
        l_d[i] *= alpha;
      }
      float l = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        const float p = st[i].weight(li[t]);
        l += p;
        li[t] = p;
      }
      l_d[i] += l;
    }
  };
  // The block's sums (accb, zacc) into the running ones; clears them for the next block.
  auto add_block = [&]() {
    for (int64_t k = 0; k < n_rep * D; ++k) {
      acc_d[k] += accb[k];
      accb[k] = 0.0f;
    }
    for (int64_t k = 0; k < n_rep * ng; ++k) {
      zacc_d[k] += zacc[k];
      zacc[k] = 0.0f;
    }
  };

  // Quantised region: logical tokens [max(start, l_begin), min(nq, l_end)), in blocks that end
  // on multiples of NB (so that with G >= NB a block never straddles a key group).
  const int64_t q_begin = std::max(start, l_begin), q_end = std::min(nq, l_end);
  int64_t cur_group = -1;
  for (int64_t t0 = q_begin; t0 < q_end;) {
    const int64_t t1 = std::min((t0 / NB + 1) * NB, q_end);
    const int64_t n = t1 - t0;
    // Logits: per key group segment, qs . codes + qz.
    unpack_code_rows(lut, a.k_codes, D, sh.key_bits, t0, n, 0.0f, xb);
    for (int64_t s0 = t0; s0 < t1;) {
      const int64_t g = s0 / sh.G;
      const int64_t s1 = std::min((g + 1) * sh.G, t1);
      if (g != cur_group) {
        cur_group = g;
        const uint16_t* sg = a.k_scale + g * D;
        const uint16_t* zg = a.k_zero + g * D;
        for (int64_t c = 0; c < D; ++c) {
          const float s = half_bits_to_float(sg[c]);
          for (int64_t i = 0; i < n_rep; ++i) qs[i * D + c] = qf[i * D + c] * s;
        }
        for (int64_t i = 0; i < n_rep; ++i) {
          float z = 0.0f;
          for (int64_t c = 0; c < D; ++c) z += qf[i * D + c] * half_bits_to_float(zg[c]);
          qz[i] = z;
        }
      }
      dot_rows(qs, n_rep, xb + (s0 - t0) * D, s1 - s0, D, logits + (s0 - t0), NB);
      for (int64_t i = 0; i < n_rep; ++i)
        for (int64_t t = s0 - t0; t < s1 - t0; ++t) logits[i * NB + t] += qz[i];
      s0 = s1;
    }
    if (has_side) {
      const float off = static_cast<float>(1 << (a.side.bits - 1));
      unpack_code_rows(lut, a.side.codes, r, a.side.bits, t0, n, off, zb);
      dot_rows(qu, n_rep, zb, n, r, corr, NB);
      for (int64_t t = 0; t < n; ++t) zsf[t] = half_bits_to_float(a.side.scale[t0 + t]);
      for (int64_t i = 0; i < n_rep; ++i) {
        float* li = logits + i * NB;
        const float* ci = corr + i * NB;
        for (int64_t t = 0; t < n; ++t) li[t] = (li[t] + sh.sign * (ci[t] * zsf[t])) * sh.scale;
      }
    } else {
      for (int64_t i = 0; i < n_rep; ++i)
        for (int64_t t = 0; t < n; ++t) logits[i * NB + t] *= sh.scale;
    }
    if (a.heavy_logits != nullptr) {  // the kept tokens' logits, before the softmax overwrites them
      for (int64_t s = 0; s < a.n_heavy; ++s) {
        const int64_t idx = a.heavy_idx[s];
        if (idx < t0 || idx >= t1) continue;
        for (int64_t i = 0; i < n_rep; ++i) a.heavy_logits[i * a.n_heavy + s] = logits[i * NB + (idx - t0)];
      }
    }
    softmax_block(n);

    // Values.
    if (v_coded) {
      unpack_code_rows(lut, a.v_codes, D, sh.value_bits, t0, n, 0.0f, xb);
      // Scales/zeros converted once per block, not once per query row (3.8 -> 3.5 ms above).
      for (int64_t k = 0; k < n * ng; ++k) {
        vsf[k] = half_bits_to_float(a.v_scale[t0 * ng + k]);
        vzf[k] = half_bits_to_float(a.v_zero[t0 * ng + k]);
      }
      for (int64_t i = 0; i < n_rep; ++i) {
        const float* pi = logits + i * NB;
        float* wi = wb + i * n * ng;
        float* zi = zacc + i * ng;
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t g = 0; g < ng; ++g) {
            wi[t * ng + g] = pi[t] * vsf[t * ng + g];
            zi[g] += pi[t] * vzf[t * ng + g];
          }
        }
      }
    } else {
      for (int64_t i = 0; i < n * D; ++i) xb[i] = static_cast<float>(a.v_dense[t0 * D + i]);
      for (int64_t i = 0; i < n_rep; ++i)
        for (int64_t t = 0; t < n; ++t) wb[i * n + t] = logits[i * NB + t];
    }
    accumulate_rows(wb, n_rep, xb, n, D, Gv, accb);
    // Heavy tokens read vhat + delta: a_idx * delta on top.
    for (int64_t s = 0; s < a.n_heavy; ++s) {
      const int64_t idx = a.heavy_idx[s];
      if (idx < t0 || idx >= t1) continue;
      const T* dt = a.heavy_delta + s * D;
      for (int64_t i = 0; i < n_rep; ++i) {
        const float p = logits[i * NB + (idx - t0)];
        float* ai = accb + i * D;
        for (int64_t c = 0; c < D; ++c) ai[c] += p * static_cast<float>(dt[c]);
      }
    }
    add_block();
    t0 = t1;
  }

  // Window: logical tokens nq + w, visible when nq + w >= start; dense keys and values.
  const int64_t w_begin = std::max(std::max(start, l_begin), nq) - nq;
  const int64_t w_end = std::min(l_end - nq, nw);
  for (int64_t w0 = w_begin; w0 < w_end; w0 += NB) {
    const int64_t n = std::min(w0 + NB, w_end) - w0;
    for (int64_t i = 0; i < n * D; ++i) xb[i] = static_cast<float>(a.k_window[w0 * D + i]);
    dot_rows(qf, n_rep, xb, n, D, logits, NB);
    for (int64_t i = 0; i < n_rep; ++i)
      for (int64_t t = 0; t < n; ++t) logits[i * NB + t] *= sh.scale;
    if (sh.query_tokens > 1) {  // the call's own tokens: causal
      for (int64_t i = 0; i < n_rep; ++i) {
        const int64_t lim = window_end_of_row<int64_t>(nw, sh.query_tokens, a.row0 + i);
        for (int64_t t = std::max<int64_t>(lim - w0, 0); t < n; ++t) logits[i * NB + t] = -INFINITY;
      }
    }
    softmax_block(n);
    for (int64_t i = 0; i < n * D; ++i) xb[i] = static_cast<float>(a.v_window[w0 * D + i]);
    for (int64_t i = 0; i < n_rep; ++i)
      for (int64_t t = 0; t < n; ++t) wb[i * n + t] = logits[i * NB + t];
    if (sh.query_tokens > 1) {
      // Each row sums only the tokens it sees (a prefix of the block): weight 0 times a NaN or
      // Inf value row it cannot see would be NaN.
      for (int64_t i = 0; i < n_rep; ++i) {
        const int64_t lim = window_end_of_row<int64_t>(nw, sh.query_tokens, a.row0 + i);
        const int64_t ni = std::min(std::max<int64_t>(lim - w0, 0), n);
        if (ni > 0) accumulate_rows(wb + i * n, 1, xb, ni, D, D, accb + i * D);
      }
    } else {
      accumulate_rows(wb, n_rep, xb, n, D, D, accb);
    }
    add_block();
  }

  // Fold the value zeros in: acc[i, c] = sum_t a_t v_t + sum_t a_t z_{t, c/Gv}.
  for (int64_t i = 0; i < n_rep; ++i) {
    st[i].l = static_cast<float>(l_d[i]);
    for (int64_t c = 0; c < D; ++c)
      acc[i * D + c] = static_cast<float>(acc_d[i * D + c] + (v_coded ? zacc_d[i * ng + c / Gv] : 0.0));
  }
}

#if HEADQ_CPU_X86_DISPATCH
template <typename T>
__attribute__((target("avx2"))) void decode_partial_avx2(const DecodeSlice<T>& a,
                                                         const DecodeShape& sh, int64_t l_begin,
                                                         int64_t l_end, OnlineSoftmax* st,
                                                         float* acc) {
  decode_partial_body<T>(a, sh, l_begin, l_end, st, acc);
}

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#endif

template <typename T>
void decode_partial_default(const DecodeSlice<T>& a, const DecodeShape& sh, int64_t l_begin,
                            int64_t l_end, OnlineSoftmax* st, float* acc) {
  decode_partial_body<T>(a, sh, l_begin, l_end, st, acc);
}

}  // namespace detail

// Partial decode of one (b, h) slice over the visible logical tokens in [l_begin, l_end):
// writes the online-softmax state st[n_rep] and the unnormalised output acc[n_rep, D]
// (sum_t exp(x_t - st.m) v_t). Partials over disjoint ranges merge with
// merge_decode_partial; decode_attention_finish writes out and lse.
template <typename T>
void decode_attention_partial(const DecodeSlice<T>& a, const DecodeShape& sh, int64_t l_begin,
                              int64_t l_end, OnlineSoftmax* st, float* acc) {
#if HEADQ_CPU_X86_DISPATCH
  if (detail::cpu_has_avx2()) {
    detail::decode_partial_avx2<T>(a, sh, l_begin, l_end, st, acc);
    return;
  }
#endif
  detail::decode_partial_default<T>(a, sh, l_begin, l_end, st, acc);
}

// (st, acc) <- merge of (st, acc) and (st2, acc2) (online_softmax_merge).
inline void merge_decode_partial(OnlineSoftmax* st, float* acc,  // [n_rep], [n_rep, D]
                                 const OnlineSoftmax* st2, const float* acc2, int64_t n_rep,
                                 int64_t D) {
  for (int64_t i = 0; i < n_rep; ++i) {
    float ca, cb;
    st[i] = online_softmax_merge(st[i], st2[i], &ca, &cb);
    for (int64_t c = 0; c < D; ++c) acc[i * D + c] = acc[i * D + c] * ca + acc2[i * D + c] * cb;
  }
}

// out = acc / l (zeros when nothing was visible), lse = m + log(l).
template <typename T>
void decode_attention_finish(const DecodeSlice<T>& a, const DecodeShape& sh,
                             const OnlineSoftmax* st, const float* acc) {
  for (int64_t i = 0; i < sh.n_rep; ++i) {
    const float inv = st[i].inv_sum();
    for (int64_t c = 0; c < sh.D; ++c)
      a.out[i * sh.D + c] = static_cast<T>(acc[i * sh.D + c] * inv);
    a.lse[i] = st[i].lse();
  }
}

template <typename T>
void decode_attention_slice(const DecodeSlice<T>& a, const DecodeShape& sh) {
  std::vector<OnlineSoftmax> st(sh.n_rep);
  std::vector<float> acc(sh.n_rep * sh.D);
  decode_attention_partial(a, sh, 0, decode_logical_length(a, sh), st.data(), acc.data());
  decode_attention_finish(a, sh, st.data(), acc.data());
}

}  // namespace cpu
}  // namespace headq
