// Torch-free CPU kernels of the attention ops (corrected logits, decode attention), one
// (batch, KV head) slice per call: all query heads that read the KV head are processed together
// (GQA), so each block of packed keys/values is unpacked once.
//
// Blocks of kBlockTokens tokens are dequantised into small per-slice scratch buffers; no dense
// K or V of the whole cache is ever materialised. Accumulation is float32.
#pragma once

#include <algorithm>
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
  const T* k_window = nullptr;         // [W, D]
  const T* v_window = nullptr;         // [W, D]
  int64_t n_quant = 0;
  int64_t n_window = 0;
  int64_t kv_start = 0;
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
};

template <typename T>
void decode_attention_slice(const DecodeSlice<T>& a, const DecodeShape& sh) {
  const int64_t n_rep = sh.n_rep, D = sh.D;
  const bool has_side = a.side.codes != nullptr;
  const int64_t r = has_side ? a.side.r : 0;
  const int64_t nq = std::min(std::max<int64_t>(a.n_quant, 0), sh.Tq);
  const int64_t nw = std::min(std::max<int64_t>(a.n_window, 0), sh.W);
  const int64_t start = std::max<int64_t>(a.kv_start, 0);

  std::vector<float> qf(n_rep * D), qu(n_rep * r), acc(n_rep * D, 0.0f);
  std::vector<float> kb(kBlockTokens * D), vb(kBlockTokens * D), zb(kBlockTokens * r);
  std::vector<float> logits(n_rep * kBlockTokens);
  std::vector<OnlineSoftmax> st(n_rep);
  for (int64_t i = 0; i < n_rep * D; ++i) qf[i] = static_cast<float>(a.q[i]);
  if (has_side) project_queries(qf.data(), a.side.basis, n_rep, D, r, qu.data());

  // Online-softmax update of every query row with a block of n tokens in kb/zb/vb.
  auto consume = [&](int64_t n, bool corrected) {
    block_logits(qf.data(), corrected ? qu.data() : nullptr, n_rep, kb.data(),
                 corrected ? zb.data() : nullptr, n, D, r, sh.sign, sh.scale, logits.data(),
                 kBlockTokens);
    for (int64_t i = 0; i < n_rep; ++i) {
      const float* li = logits.data() + i * kBlockTokens;
      float bmax = -INFINITY;
      for (int64_t t = 0; t < n; ++t) bmax = fmaxf(bmax, li[t]);
      const float alpha = st[i].raise(bmax);
      float* ai = acc.data() + i * D;
      if (alpha != 1.0f)
        for (int64_t c = 0; c < D; ++c) ai[c] *= alpha;
      for (int64_t t = 0; t < n; ++t) {
        const float p = st[i].weight(li[t]);
        st[i].l += p;
        const float* vt = vb.data() + t * D;
        for (int64_t c = 0; c < D; ++c) ai[c] += p * vt[c];
      }
    }
  };

  // Quantised region: logical tokens [start, nq).
  for (int64_t t0 = std::min(start, nq); t0 < nq; t0 += kBlockTokens) {
    const int64_t t1 = std::min(t0 + kBlockTokens, nq);
    const int64_t n = t1 - t0;
    dequant_key_rows(a.k_codes, a.k_scale, a.k_zero, D, sh.G, sh.key_bits, t0, t1, kb.data());
    if (has_side) dequant_side_rows(a.side.codes, a.side.scale, r, a.side.bits, t0, t1, zb.data());
    if (a.v_codes != nullptr) {
      dequant_value_rows(a.v_codes, a.v_scale, a.v_zero, D, sh.Gv, sh.value_bits, t0, t1,
                         vb.data());
    } else {
      for (int64_t i = 0; i < n * D; ++i) vb[i] = static_cast<float>(a.v_dense[t0 * D + i]);
    }
    // Heavy tokens read vhat + delta: a_idx * vhat + a_idx * delta.
    for (int64_t s = 0; s < a.n_heavy; ++s) {
      const int64_t idx = a.heavy_idx[s];
      if (idx < t0 || idx >= t1) continue;
      float* vt = vb.data() + (idx - t0) * D;
      const T* dt = a.heavy_delta + s * D;
      for (int64_t c = 0; c < D; ++c) vt[c] += static_cast<float>(dt[c]);
    }
    consume(n, has_side);
  }

  // Window: logical tokens nq + w, visible when nq + w >= start.
  for (int64_t w0 = std::min(std::max<int64_t>(start - nq, 0), nw); w0 < nw; w0 += kBlockTokens) {
    const int64_t w1 = std::min(w0 + kBlockTokens, nw);
    const int64_t n = w1 - w0;
    for (int64_t i = 0; i < n * D; ++i) {
      kb[i] = static_cast<float>(a.k_window[w0 * D + i]);
      vb[i] = static_cast<float>(a.v_window[w0 * D + i]);
    }
    consume(n, false);
  }

  for (int64_t i = 0; i < n_rep; ++i) {
    const float inv = st[i].inv_sum();
    for (int64_t c = 0; c < D; ++c) a.out[i * D + c] = static_cast<T>(acc[i * D + c] * inv);
    a.lse[i] = st[i].lse();
  }
}

}  // namespace cpu
}  // namespace headq
