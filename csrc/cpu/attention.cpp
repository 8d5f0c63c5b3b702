// CPU host wrappers of the attention ops (corrected_logits, decode_attention): validate, make
// inputs contiguous, dispatch the dtype and run the torch-free slice kernels
// (csrc/include/headq/attention_cpu.h) in parallel over (batch, KV head).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "headq/attention_cpu.h"
#include "validate.h"

namespace headq {
namespace {

const uint16_t* half_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::Half>());
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Side code of KV head (b, h), or an empty view when there is none.
cpu::SideCodeSlice side_slice(const std::optional<at::Tensor>& z_codes,  // [B, H, T, nb]
                              const std::optional<at::Tensor>& z_scale,  // [B, H, T]
                              const std::optional<at::Tensor>& basis,    // [H, D, r]
                              int64_t side_bits, int64_t bh, int64_t h) {
  cpu::SideCodeSlice s;
  if (!z_codes.has_value()) return s;
  const int64_t T = z_codes->size(2), nb = z_codes->size(3);
  const int64_t D = basis->size(1), r = basis->size(2);
  s.codes = z_codes->const_data_ptr<uint8_t>() + bh * T * nb;
  s.scale = half_bits(*z_scale) + bh * T;
  s.basis = basis->const_data_ptr<float>() + h * D * r;
  s.r = r;
  s.bits = static_cast<int>(side_bits);
  return s;
}

at::Tensor corrected_logits_cpu(const at::Tensor& q_in,        // [B, Hq, L, D]
                                const at::Tensor& k_codes_in,  // [B, H, T, D*key_bits/8]
                                const at::Tensor& k_scale_in,  // [B, H, T/G, D] f16
                                const at::Tensor& k_zero_in,   // [B, H, T/G, D] f16
                                const std::optional<at::Tensor>& z_codes_in,  // [B, H, T, nb]
                                const std::optional<at::Tensor>& z_scale_in,  // [B, H, T]
                                const std::optional<at::Tensor>& basis_in,    // [H, D, r]
                                int64_t key_bits, int64_t group_size, int64_t side_bits,
                                double sign, double scale) {
  validate_corrected_logits(q_in, k_codes_in, k_scale_in, k_zero_in, z_codes_in, z_scale_in,
                            basis_in, key_bits, group_size, side_bits, sign, scale);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k_codes = k_codes_in.contiguous();
  const at::Tensor k_scale = k_scale_in.contiguous();
  const at::Tensor k_zero = k_zero_in.contiguous();
  const std::optional<at::Tensor> z_codes = contiguous_opt(z_codes_in);
  const std::optional<at::Tensor> z_scale = contiguous_opt(z_scale_in);
  const std::optional<at::Tensor> basis = contiguous_opt(basis_in);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t H = k_codes.size(1), T = k_codes.size(2), G = group_size;
  const int64_t n_rep = Hq / H, row_bytes = k_codes.size(3);
  at::Tensor out = at::empty({B, Hq, L, T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const uint8_t* kc_p = k_codes.const_data_ptr<uint8_t>();  // [B, H, T, D*key_bits/8]
  const uint16_t* ks_p = half_bits(k_scale);                // [B, H, T/G, D]
  const uint16_t* kz_p = half_bits(k_zero);                 // [B, H, T/G, D]
  float* out_p = out.data_ptr<float>();                     // [B, Hq, L, T]
  HEADQ_DISPATCH_FLOAT(q.scalar_type(), "corrected_logits", [&] {
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();  // [B, Hq, L, D]
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t row0 = (b * Hq + h * n_rep) * L;  // first query row of this KV head
        cpu::corrected_logits_slice<scalar_t>(
            q_p + row0 * D, n_rep * L, kc_p + bh * T * row_bytes, ks_p + bh * (T / G) * D,
            kz_p + bh * (T / G) * D, side_slice(z_codes, z_scale, basis, side_bits, bh, h), T, D,
            G, static_cast<int>(key_bits), static_cast<float>(sign), static_cast<float>(scale),
            out_p + row0 * T);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q_in,                            // [B, Hq, D]
    const at::Tensor& k_codes_in,                      // [B, H, Tq, D*key_bits/8] uint8
    const at::Tensor& k_scale_in,                      // [B, H, Tq/G, D] f16
    const at::Tensor& k_zero_in,                       // [B, H, Tq/G, D] f16
    const std::optional<at::Tensor>& z_codes_in,       // [B, H, Tq, r*bz/8] uint8
    const std::optional<at::Tensor>& z_scale_in,       // [B, H, Tq] f16
    const std::optional<at::Tensor>& basis_in,         // [H, D, r] f32
    const std::optional<at::Tensor>& v_codes_in,       // [B, H, Tq, D*value_bits/8] uint8
    const std::optional<at::Tensor>& v_scale_in,       // [B, H, Tq, D/Gv] f16
    const std::optional<at::Tensor>& v_zero_in,        // [B, H, Tq, D/Gv] f16
    const std::optional<at::Tensor>& v_dense_in,       // [B, H, Tq, D]
    const std::optional<at::Tensor>& heavy_delta_in,   // [B, H, K, D]
    const std::optional<at::Tensor>& heavy_idx_in,     // [B, H, K] int32
    const at::Tensor& k_window_in,                     // [B, H, W, D]
    const at::Tensor& v_window_in,                     // [B, H, W, D]
    const at::Tensor& n_quant_in,                      // [B] int32
    const at::Tensor& n_window_in,                     // [B] int32
    const std::optional<at::Tensor>& kv_start_in,      // [B] int32
    int64_t key_bits, int64_t group_size, int64_t side_bits, int64_t value_bits,
    int64_t value_group_size, double sign, double scale,
    const std::optional<at::Tensor>& heavy_logits,  // [B, Hq, K] float32, written
    int64_t query_tokens) {
  validate_decode_attention(q_in, k_codes_in, k_scale_in, k_zero_in, z_codes_in, z_scale_in,
                            basis_in, v_codes_in, v_scale_in, v_zero_in, v_dense_in,
                            heavy_delta_in, heavy_idx_in, k_window_in, v_window_in, n_quant_in,
                            n_window_in, kv_start_in, key_bits, group_size, side_bits,
                            value_bits, value_group_size, sign, scale, heavy_logits,
                            query_tokens);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k_codes = k_codes_in.contiguous();
  const at::Tensor k_scale = k_scale_in.contiguous();
  const at::Tensor k_zero = k_zero_in.contiguous();
  const std::optional<at::Tensor> z_codes = contiguous_opt(z_codes_in);
  const std::optional<at::Tensor> z_scale = contiguous_opt(z_scale_in);
  const std::optional<at::Tensor> basis = contiguous_opt(basis_in);
  const std::optional<at::Tensor> v_codes = contiguous_opt(v_codes_in);
  const std::optional<at::Tensor> v_scale = contiguous_opt(v_scale_in);
  const std::optional<at::Tensor> v_zero = contiguous_opt(v_zero_in);
  const std::optional<at::Tensor> v_dense = contiguous_opt(v_dense_in);
  const std::optional<at::Tensor> heavy_delta = contiguous_opt(heavy_delta_in);
  const std::optional<at::Tensor> heavy_idx = contiguous_opt(heavy_idx_in);
  const at::Tensor k_window = k_window_in.contiguous();
  const at::Tensor v_window = v_window_in.contiguous();
  const at::Tensor n_quant = n_quant_in.contiguous();
  const at::Tensor n_window = n_window_in.contiguous();
  const std::optional<at::Tensor> kv_start = contiguous_opt(kv_start_in);

  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t H = k_codes.size(1), Tq = k_codes.size(2), W = k_window.size(2);
  const int64_t n_rep = Hq / H, G = group_size, Gv = value_group_size;
  const int64_t K = heavy_idx.has_value() ? heavy_idx->size(2) : 0;
  const int64_t k_row_bytes = k_codes.size(3);
  const int64_t v_row_bytes = v_codes.has_value() ? v_codes->size(3) : 0;

  cpu::DecodeShape sh;
  sh.n_rep = n_rep;
  sh.D = D;
  sh.Tq = Tq;
  sh.W = W;
  sh.G = G;
  sh.Gv = Gv;
  sh.key_bits = static_cast<int>(key_bits);
  sh.value_bits = static_cast<int>(value_bits);
  sh.sign = static_cast<float>(sign);
  sh.scale = static_cast<float>(scale);
  sh.query_tokens = query_tokens;

  at::Tensor out = at::empty({B, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  const int32_t* nq_p = n_quant.const_data_ptr<int32_t>();  // [B]
  const int32_t* nw_p = n_window.const_data_ptr<int32_t>();  // [B]
  const int32_t* ks0_p = kv_start.has_value() ? kv_start->const_data_ptr<int32_t>() : nullptr;
  float* lse_p = lse.data_ptr<float>();  // [B, Hq]
  float* hl_p = nullptr;                 // [B, Hq, K]: -inf unless a visible kept token's logit
  if (heavy_logits.has_value() && heavy_logits->numel() > 0) {
    at::Tensor hl = *heavy_logits;
    hl.fill_(-std::numeric_limits<float>::infinity());
    hl_p = hl.data_ptr<float>();
  }

  // Work split: one task per (batch, KV head) slice. When there are fewer slices than
  // threads (e.g. batch 1 with few KV heads), each slice's token range is also cut into
  // n_split chunks (on kBlockTokens boundaries) whose online-softmax partials are merged.
  const int64_t n_threads = at::get_num_threads();
  const int64_t n_split = (B * H >= n_threads) ? 1 : (n_threads + B * H - 1) / (B * H);

  HEADQ_DISPATCH_FLOAT(q.scalar_type(), "decode_attention", [&] {
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();  // [B, Hq, D]
    scalar_t* out_p = out.data_ptr<scalar_t>();          // [B, Hq, D]
    auto slice_of = [&](int64_t bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t hq0 = b * Hq + h * n_rep;  // first query head of this KV head
      cpu::DecodeSlice<scalar_t> a;
      a.q = q_p + hq0 * D;
      a.k_codes = k_codes.const_data_ptr<uint8_t>() + bh * Tq * k_row_bytes;
      a.k_scale = half_bits(k_scale) + bh * (Tq / G) * D;
      a.k_zero = half_bits(k_zero) + bh * (Tq / G) * D;
      a.side = side_slice(z_codes, z_scale, basis, side_bits, bh, h);
      if (v_codes.has_value()) {
        a.v_codes = v_codes->const_data_ptr<uint8_t>() + bh * Tq * v_row_bytes;
        a.v_scale = half_bits(*v_scale) + bh * Tq * (D / Gv);
        a.v_zero = half_bits(*v_zero) + bh * Tq * (D / Gv);
      } else {
        a.v_dense = v_dense->const_data_ptr<scalar_t>() + bh * Tq * D;
      }
      if (heavy_idx.has_value()) {
        a.heavy_delta = heavy_delta->const_data_ptr<scalar_t>() + bh * K * D;
        a.heavy_idx = heavy_idx->const_data_ptr<int32_t>() + bh * K;
        a.n_heavy = K;
        if (hl_p != nullptr) a.heavy_logits = hl_p + hq0 * K;
      }
      a.k_window = k_window.const_data_ptr<scalar_t>() + bh * W * D;
      a.v_window = v_window.const_data_ptr<scalar_t>() + bh * W * D;
      a.n_quant = nq_p[b];
      a.n_window = nw_p[b];
      a.kv_start = ks0_p != nullptr ? ks0_p[b] : 0;
      a.row0 = h * n_rep;
      a.out = out_p + hq0 * D;
      a.lse = lse_p + hq0;
      return a;
    };
    if (n_split == 1) {
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh)
          cpu::decode_attention_slice<scalar_t>(slice_of(bh), sh);
      });
      return;
    }
    const int64_t n_tasks = B * H * n_split;
    std::vector<OnlineSoftmax> st(n_tasks * n_rep);
    std::vector<float> acc(n_tasks * n_rep * D);
    at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / n_split, k = task % n_split;
        const cpu::DecodeSlice<scalar_t> a = slice_of(bh);
        const int64_t len = cpu::decode_logical_length(a, sh);
        const int64_t n_blocks = (len + cpu::kBlockTokens - 1) / cpu::kBlockTokens;
        const int64_t l0 = std::min(n_blocks * k / n_split * cpu::kBlockTokens, len);
        const int64_t l1 = std::min(n_blocks * (k + 1) / n_split * cpu::kBlockTokens, len);
        cpu::decode_attention_partial<scalar_t>(a, sh, l0, l1, st.data() + task * n_rep,
                                                acc.data() + task * n_rep * D);
      }
    });
    for (int64_t bh = 0; bh < B * H; ++bh) {
      OnlineSoftmax* st0 = st.data() + bh * n_split * n_rep;
      float* acc0 = acc.data() + bh * n_split * n_rep * D;
      for (int64_t k = 1; k < n_split; ++k)
        cpu::merge_decode_partial(st0, acc0, st0 + k * n_rep, acc0 + k * n_rep * D, n_rep, D);
      cpu::decode_attention_finish<scalar_t>(slice_of(bh), sh, st0, acc0);
    }
  });
  return {out, lse};
}

// a2_weights on the CPU: blocks of query rows (all query heads of a KV head together, so the
// keys are read once per block and never repeated per query head), float64 logits by ATen's
// matmul, the block's log-sum-exp and sum of squared probabilities per key. Memory per block
// is bounded (kLogitBytes of logits); under the causal rule a block never computes the
// columns after its last row.
std::tuple<at::Tensor, at::Tensor> a2_weights_cpu(const at::Tensor& q,  // [B, Hq, L, D]
                                                  const at::Tensor& k,  // [B, H, T, D]
                                                  const std::optional<at::Tensor>& mask,
                                                  double scale,
                                                  const std::optional<at::Tensor>& lse_in) {
  validate_a2_weights(q, k, mask, scale, lse_in);
  constexpr int64_t kLogitBytes = int64_t(1) << 28;
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t H = k.size(1), T = k.size(2), n_rep = Hq / H;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor w = at::zeros({B, H, T}, f32);
  at::Tensor lse = lse_in.has_value()
                       ? lse_in->clone(at::MemoryFormat::Contiguous)
                       : at::full({B, Hq, L}, -std::numeric_limits<float>::infinity(), f32);
  if (B == 0 || L == 0 || T == 0) return {w, lse};
  // given row lse (e.g. from the flash attention that produced the output): the rows' own
  // log-sum-exp is not computed, the weights use the given one
  std::optional<at::Tensor> lse_given;  // from the contiguous copy returned as lse
  if (lse_in.has_value()) lse_given = lse.to(at::kDouble).view({B, H, n_rep, L});
  // float64 inside (float32 out): the CPU op is the accurate twin of the CUDA kernels, and
  // float32 matrix products on the CPU can take reduced-precision library paths (a first call
  // was seen 1.5e-5 off in relative terms, once in ~10 processes)
  const at::Tensor qf = q.to(at::kDouble).view({B, H, n_rep, L, D});
  const at::Tensor kt = k.to(at::kDouble).transpose(2, 3);  // [B, H, D, T]
  at::Tensor lse5 = lse.view({B, H, n_rep, L});
  const int64_t rows = std::max<int64_t>(1, kLogitBytes / (8 * B * Hq * T));
  for (int64_t r0 = 0; r0 < L; r0 += rows) {
    const int64_t r1 = std::min(L, r0 + rows), nr = r1 - r0;
    const int64_t tv = mask.has_value() ? T : T - L + r1;  // columns the block may see
    at::Tensor s = at::matmul(qf.narrow(3, r0, nr).reshape({B, H, n_rep * nr, D}),
                              kt.narrow(3, 0, tv))
                       .mul_(scale)
                       .view({B, H, n_rep, nr, tv});
    at::Tensor vis;
    if (mask.has_value()) {
      vis = mask->narrow(1, r0, nr).view({mask->size(0), 1, 1, nr, T});
    } else {  // row i sees t <= T - L + i
      const at::Tensor i = at::arange(r0, r1, q.options().dtype(at::kLong)).view({nr, 1});
      const at::Tensor t = at::arange(tv, q.options().dtype(at::kLong)).view({1, tv});
      vis = t.le(i + (T - L));
    }
    s.masked_fill_(vis.logical_not(), -std::numeric_limits<double>::infinity());
    // [B, H, n_rep, nr]; -inf: nothing visible
    const at::Tensor l = lse_given.has_value() ? lse_given->narrow(3, r0, nr)
                                               : at::logsumexp(s, {-1});
    // rows with nothing visible -> 0; a given lse that is not finite adds nothing (the CUDA rule)
    at::Tensor p = (s - l.unsqueeze(-1)).exp_().nan_to_num_(0.0);
    if (lse_given.has_value()) p.masked_fill_(l.isfinite().logical_not().unsqueeze(-1), 0.0);
    w.narrow(2, 0, tv).add_(p.mul_(p).sum({2, 3}).to(at::kFloat));
    if (!lse_given.has_value()) lse5.narrow(3, r0, nr).copy_(l);
  }
  return {w, lse};
}

// a2_step_weights on the CPU: per (batch, KV head), the window tokens' logits as float64 dot
// products of the inputs (times scale, rounded to float32 as the float32 einsum it replaces),
// a = exp(s - lse) (0 unless finite), a^2 summed over the KV head's query heads in order and
// added to w_window (with query_tokens L > 1, query head j only over t < n_window[b] - (L - 1 -
// j % L)); the kept slots likewise from heavy_logits.
void a2_step_weights_cpu(const at::Tensor& q, const at::Tensor& k_window_in,
                         const at::Tensor& lse_in, const at::Tensor& n_quant,
                         const at::Tensor& n_window, const std::optional<at::Tensor>& kv_start,
                         double scale, const at::Tensor& w_window,
                         const std::optional<at::Tensor>& heavy_logits,
                         const std::optional<at::Tensor>& heavy_w, int64_t query_tokens) {
  validate_a2_step_weights(q, k_window_in, lse_in, n_quant, n_window, kv_start, scale, w_window,
                           heavy_logits, heavy_w, query_tokens);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t H = k_window_in.size(1), W = k_window_in.size(2), n_rep = Hq / H;
  const at::Tensor qd = q.to(at::kDouble).contiguous();                // [B, Hq, D]
  const at::Tensor kd = k_window_in.to(at::kDouble).contiguous();      // [B, H, W, D]
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor nq = n_quant.contiguous(), nw = n_window.contiguous();
  const std::optional<at::Tensor> ks = contiguous_opt(kv_start);
  const std::optional<at::Tensor> hl = contiguous_opt(heavy_logits);
  const double* qp = qd.const_data_ptr<double>();
  const double* kp = kd.const_data_ptr<double>();
  const float* lp = lse.const_data_ptr<float>();
  const int32_t* nqp = nq.const_data_ptr<int32_t>();
  const int32_t* nwp = nw.const_data_ptr<int32_t>();
  const int32_t* ksp = ks.has_value() ? ks->const_data_ptr<int32_t>() : nullptr;
  float* wp = w_window.data_ptr<float>();
  const float* hlp = hl.has_value() ? hl->const_data_ptr<float>() : nullptr;
  float* hwp = heavy_w.has_value() ? heavy_w->data_ptr<float>() : nullptr;
  const int64_t K = hl.has_value() ? hl->size(2) : 0;
  const float sc = static_cast<float>(scale);
  auto a_sq = [](float a) { return std::isfinite(a) ? a * a : 0.0f; };
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hq0 = b * Hq + (bh % H) * n_rep;
      const int64_t tend = std::min<int64_t>(nwp[b], W);
      for (int64_t t = 0; t < tend; ++t) {
        if (ksp != nullptr && int64_t(nqp[b]) + t < ksp[b]) continue;
        const double* kr = kp + (bh * W + t) * D;
        float acc = 0.0f;
        for (int64_t r = 0; r < n_rep; ++r) {
          // the call's own tokens (query_tokens > 1): causal among them
          if (t >= window_end_of_row<int64_t>(tend, query_tokens, (bh % H) * n_rep + r)) continue;
          const double* qr = qp + (hq0 + r) * D;
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
          acc += a_sq(std::exp(static_cast<float>(s) * sc - lp[hq0 + r]));
        }
        wp[bh * W + t] += acc;
      }
      for (int64_t k = 0; k < K; ++k) {
        float acc = 0.0f;
        for (int64_t r = 0; r < n_rep; ++r)
          acc += a_sq(std::exp(hlp[(hq0 + r) * K + k] - lp[hq0 + r]));
        hwp[bh * K + k] += acc;
      }
    }
  });
}

}  // namespace
}  // namespace headq

TORCH_LIBRARY_IMPL(headq, CPU, m) {
  m.impl("corrected_logits", &headq::corrected_logits_cpu);
  m.impl("decode_attention", &headq::decode_attention_cpu);
  m.impl("a2_weights", &headq::a2_weights_cpu);
  m.impl("a2_step_weights", &headq::a2_step_weights_cpu);
}
