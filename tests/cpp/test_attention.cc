// CPU attention kernels (corrected logits, decode attention over the packed cache) against a
// naive dense float64 computation on small random data.
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "headq/attention_cpu.h"
#include "headq/quant_cpu.h"

namespace {

struct DecodeCase {
  const char* name;
  int64_t n_rep, D, G, Tq, W;
  int key_bits, value_bits;
  int64_t Gv;
  int64_t r;  // side-code rank, 0 = no side code
  int side_bits;
  bool dense_v;
  int64_t K;  // heavy slots
  int64_t n_quant, n_window, kv_start;
  float sign;
  // query_tokens L: row i (query head row0 + i) is token (row0 + i) % L of the window's last L
  // and sees the window tokens w < n_window - (L - 1 - (row0 + i) % L)
  int64_t query_tokens = 1, row0 = 0;
};

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

// A packed cache of one (b, h) slice built with the CPU quantise kernels.
struct Cache {
  std::vector<float> q, k, v, kw, vw, basis, heavy_delta;
  std::vector<int32_t> heavy_idx;
  std::vector<uint8_t> k_codes, z_codes, v_codes;
  std::vector<uint16_t> k_scale, k_zero, z_scale, v_scale, v_zero;
};

Cache make_cache(const DecodeCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& x, int64_t n, float s) {
    x.resize(n);
    for (auto& e : x) e = nd(rng) * s;
  };
  Cache m;
  const int64_t D = c.D, Tq = c.Tq;
  fill(m.q, c.n_rep * D, 1.0f);
  fill(m.k, Tq * D, 1.5f);
  fill(m.v, Tq * D, 1.0f);
  fill(m.kw, c.W * D, 1.5f);
  fill(m.vw, c.W * D, 1.0f);
  m.k_codes.resize(Tq * D * c.key_bits / 8);
  m.k_scale.resize((Tq / c.G) * D);
  m.k_zero.resize((Tq / c.G) * D);
  headq::cpu::quantize_keys_slice<float>(m.k.data(), D, 1, Tq, D, c.G, c.key_bits,
                                         m.k_codes.data(), m.k_scale.data(), m.k_zero.data());
  if (c.r > 0) {
    fill(m.basis, D * c.r, 1.0f / std::sqrt(static_cast<float>(D)));
    m.z_codes.resize(Tq * c.r * c.side_bits / 8);
    m.z_scale.resize(Tq);
    headq::cpu::side_code_slice<float>(m.k.data(), D, 1, m.k_codes.data(), m.k_scale.data(),
                                       m.k_zero.data(), m.basis.data(), Tq, D, c.r, c.G,
                                       c.key_bits, c.side_bits, true, m.z_codes.data(),
                                       m.z_scale.data());
  }
  if (!c.dense_v) {
    m.v_codes.resize(Tq * D * c.value_bits / 8);
    m.v_scale.resize(Tq * (D / c.Gv));
    m.v_zero.resize(Tq * (D / c.Gv));
    headq::cpu::quantize_values_slice<float>(m.v.data(), D, 1, Tq, D, c.Gv, c.value_bits,
                                             m.v_codes.data(), m.v_scale.data(),
                                             m.v_zero.data());
  }
  fill(m.heavy_delta, c.K * D, 0.5f);
  std::uniform_int_distribution<int32_t> idx(-1, static_cast<int32_t>(Tq) - 1);
  m.heavy_idx.resize(c.K);
  for (auto& i : m.heavy_idx) i = idx(rng);
  return m;
}

headq::cpu::SideCodeSlice side_of(const DecodeCase& c, const Cache& m) {
  headq::cpu::SideCodeSlice s;
  if (c.r == 0) return s;
  s.codes = m.z_codes.data();
  s.scale = m.z_scale.data();
  s.basis = m.basis.data();
  s.r = c.r;
  s.bits = c.side_bits;
  return s;
}

// Corrected logit of query row i against quantised token t, in float64.
double naive_logit(const DecodeCase& c, const Cache& m, int64_t i, int64_t t, float scale) {
  const int64_t D = c.D;
  std::vector<float> khat(D);
  headq::cpu::dequant_key_rows(m.k_codes.data(), m.k_scale.data(), m.k_zero.data(), D, c.G,
                               c.key_bits, t, t + 1, khat.data());
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += double(m.q[i * D + d]) * khat[d];
  if (c.r > 0) {
    std::vector<float> zhat(c.r);
    headq::cpu::dequant_side_rows(m.z_codes.data(), m.z_scale.data(), c.r, c.side_bits, t,
                                  t + 1, zhat.data());
    for (int64_t j = 0; j < c.r; ++j) {
      double qu = 0;
      for (int64_t d = 0; d < D; ++d) qu += double(m.q[i * D + d]) * m.basis[d * c.r + j];
      s += c.sign * qu * zhat[j];
    }
  }
  return s * scale;
}

class DecodeAttention : public ::testing::TestWithParam<DecodeCase> {};

// The decode inputs of a case's cache (outputs left for the caller to set).
headq::cpu::DecodeSlice<float> slice_of(const DecodeCase& c, const Cache& m) {
  headq::cpu::DecodeSlice<float> a;
  a.q = m.q.data();
  a.k_codes = m.k_codes.data();
  a.k_scale = m.k_scale.data();
  a.k_zero = m.k_zero.data();
  a.side = side_of(c, m);
  if (c.dense_v) {
    a.v_dense = m.v.data();
  } else {
    a.v_codes = m.v_codes.data();
    a.v_scale = m.v_scale.data();
    a.v_zero = m.v_zero.data();
  }
  if (c.K > 0) {
    a.heavy_delta = m.heavy_delta.data();
    a.heavy_idx = m.heavy_idx.data();
    a.n_heavy = c.K;
  }
  a.k_window = m.kw.data();
  a.v_window = m.vw.data();
  a.n_quant = c.n_quant;
  a.n_window = c.n_window;
  a.kv_start = c.kv_start;
  a.row0 = c.row0;
  return a;
}

// The decode shape of a case at softmax scale `scale`.
headq::cpu::DecodeShape shape_of(const DecodeCase& c, float scale) {
  headq::cpu::DecodeShape sh;
  sh.n_rep = c.n_rep;
  sh.D = c.D;
  sh.Tq = c.Tq;
  sh.W = c.W;
  sh.G = c.G;
  sh.Gv = c.Gv;
  sh.key_bits = c.key_bits;
  sh.value_bits = c.value_bits;
  sh.sign = c.sign;
  sh.scale = scale;
  sh.query_tokens = c.query_tokens;
  return sh;
}

TEST_P(DecodeAttention, MatchesNaiveDense) {
  const DecodeCase& c = GetParam();
  const Cache m = make_cache(c, 42);
  const int64_t D = c.D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));

  headq::cpu::DecodeSlice<float> a = slice_of(c, m);
  std::vector<float> out(c.n_rep * D, -1.0f), lse(c.n_rep);
  a.out = out.data();
  a.lse = lse.data();
  const headq::cpu::DecodeShape sh = shape_of(c, scale);
  headq::cpu::decode_attention_slice<float>(a, sh);

  const int64_t nq = c.n_quant, nw = c.n_window;
  for (int64_t i = 0; i < c.n_rep; ++i) {
    std::vector<double> logit;
    std::vector<std::vector<double>> val;
    std::vector<int64_t> token;
    for (int64_t t = c.kv_start; t < nq; ++t) {
      logit.push_back(naive_logit(c, m, i, t, scale));
      std::vector<float> vh(D);
      if (c.dense_v) {
        for (int64_t d = 0; d < D; ++d) vh[d] = m.v[t * D + d];
      } else {
        headq::cpu::dequant_value_rows(m.v_codes.data(), m.v_scale.data(), m.v_zero.data(), D,
                                       c.Gv, c.value_bits, t, t + 1, vh.data());
      }
      val.emplace_back(vh.begin(), vh.end());
      token.push_back(t);
    }
    const int64_t w_end = nw - (c.query_tokens - 1 - (c.row0 + i) % c.query_tokens);
    for (int64_t w = std::max<int64_t>(c.kv_start - nq, 0); w < w_end; ++w) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += double(m.q[i * D + d]) * m.kw[w * D + d];
      logit.push_back(s * scale);
      val.emplace_back(m.vw.begin() + w * D, m.vw.begin() + (w + 1) * D);
      token.push_back(-1);
    }
    if (logit.empty()) {
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(out[i * D + d], 0.0f);
      EXPECT_EQ(lse[i], -INFINITY);
      continue;
    }
    double mx = -INFINITY, l = 0;
    for (double x : logit) mx = std::max(mx, x);
    for (double x : logit) l += std::exp(x - mx);
    EXPECT_NEAR(lse[i], mx + std::log(l), 1e-4);
    for (int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (size_t n = 0; n < logit.size(); ++n) {
        const double p = std::exp(logit[n] - mx) / l;
        o += p * val[n][d];
        for (int64_t s = 0; s < c.K; ++s)
          if (token[n] >= 0 && m.heavy_idx[s] == token[n]) o += p * m.heavy_delta[s * D + d];
      }
      ASSERT_NEAR(out[i * D + d], o, 2e-5 * (1 + std::fabs(o))) << "row " << i << " dim " << d;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DecodeAttention,
    ::testing::Values(
        // name, n_rep, D, G, Tq, W, kb, vb, Gv, r, bz, dense_v, K, nq, nw, kv_start, sign
        DecodeCase{"plain_mha", 1, 32, 32, 64, 0, 4, 4, 32, 0, 8, false, 0, 64, 0, 0, 1.0f},
        DecodeCase{"gqa_side8_window", 4, 64, 32, 128, 16, 2, 2, 32, 16, 8, false, 0, 100, 9, 0,
                   1.0f},
        DecodeCase{"three_bit_side4_wrong_sign", 2, 64, 64, 128, 8, 3, 3, 64, 8, 4, false, 0, 128,
                   8, 0, -1.0f},
        DecodeCase{"dense_v_heavy", 2, 32, 32, 96, 4, 8, 4, 32, 32, 8, true, 6, 70, 4, 0, 1.0f},
        DecodeCase{"heavy_kv_start", 3, 64, 32, 192, 12, 4, 8, 64, 16, 8, false, 8, 150, 12, 37,
                   1.0f},
        DecodeCase{"kv_start_in_window", 1, 32, 32, 64, 20, 4, 2, 32, 0, 8, false, 4, 64, 20, 70,
                   1.0f},
        DecodeCase{"window_only", 2, 32, 32, 0, 10, 4, 4, 32, 0, 8, false, 0, 0, 10, 0, 1.0f},
        DecodeCase{"nothing_visible", 2, 32, 32, 64, 8, 4, 4, 32, 8, 8, false, 2, 40, 5, 60,
                   1.0f},
        DecodeCase{"empty_cache", 1, 32, 32, 32, 4, 4, 4, 32, 0, 8, false, 0, 0, 0, 0, 1.0f},
        // a few-token call: 8 rows = 2 query heads x 4 tokens, the window's last 4 its own
        DecodeCase{"query_tokens", 8, 64, 32, 128, 40, 2, 2, 32, 8, 8, false, 5, 100, 37, 0,
                   1.0f, 4, 0},
        // rows of a later KV head (row0 = 6, 3 tokens) and kv_start at the last token but one:
        // the rows of the call's first token see nothing
        DecodeCase{"query_tokens_row0_late_start", 6, 32, 32, 64, 20, 4, 4, 32, 0, 8, false, 0,
                   64, 20, 82, 1.0f, 3, 6}),
    [](const ::testing::TestParamInfo<DecodeCase>& info) { return std::string(info.param.name); });

// Split-K: partials over chunks of the logical token range (on block boundaries, as the ATen
// wrapper cuts them when there are fewer slices than threads), merged, equal the one-pass slice.
TEST_P(DecodeAttention, SplitPartialsMergeToOnePass) {
  const DecodeCase& c = GetParam();
  const Cache m = make_cache(c, 42);
  const int64_t D = c.D;
  headq::cpu::DecodeSlice<float> a = slice_of(c, m);
  const headq::cpu::DecodeShape sh = shape_of(c, 1.0f / std::sqrt(static_cast<float>(D)));

  std::vector<float> out1(c.n_rep * D), lse1(c.n_rep);
  a.out = out1.data();
  a.lse = lse1.data();
  headq::cpu::decode_attention_slice<float>(a, sh);

  const int64_t len = headq::cpu::decode_logical_length(a, sh);
  const int64_t NB = headq::cpu::kBlockTokens;
  for (int64_t n_split : {2, 3, 5}) {
    const int64_t n_blocks = (len + NB - 1) / NB;
    std::vector<headq::OnlineSoftmax> st(n_split * c.n_rep);
    std::vector<float> acc(n_split * c.n_rep * D);
    for (int64_t k = 0; k < n_split; ++k) {
      const int64_t l0 = std::min(n_blocks * k / n_split * NB, len);
      const int64_t l1 = std::min(n_blocks * (k + 1) / n_split * NB, len);
      headq::cpu::decode_attention_partial<float>(a, sh, l0, l1, st.data() + k * c.n_rep,
                                                  acc.data() + k * c.n_rep * D);
    }
    for (int64_t k = 1; k < n_split; ++k)
      headq::cpu::merge_decode_partial(st.data(), acc.data(), st.data() + k * c.n_rep,
                                       acc.data() + k * c.n_rep * D, c.n_rep, D);
    std::vector<float> out2(c.n_rep * D, -1.0f), lse2(c.n_rep);
    a.out = out2.data();
    a.lse = lse2.data();
    headq::cpu::decode_attention_finish<float>(a, sh, st.data(), acc.data());
    for (int64_t i = 0; i < c.n_rep; ++i) {
      if (std::isinf(lse1[i])) {
        EXPECT_EQ(lse2[i], lse1[i]);
      } else {
        EXPECT_NEAR(lse2[i], lse1[i], 1e-5);
      }
      for (int64_t d = 0; d < D; ++d)
        ASSERT_NEAR(out2[i * D + d], out1[i * D + d], 1e-5 * (1 + std::fabs(out1[i * D + d])))
            << "split " << n_split << " row " << i << " dim " << d;
    }
  }
}

// A few-token call: a NaN in the value row of the call's last token reaches only the rows of
// that token (the channel of the NaN); the earlier rows do not see the token and leave it out
// of their value sum (0 * NaN would be NaN).
TEST(DecodeAttentionNonFinite, HiddenWindowValueRowStaysOutOfEarlierRows) {
  const DecodeCase c{"query_tokens", 8, 64, 32, 128, 40, 2, 2, 32, 8, 8, false, 5, 100, 37, 0,
                     1.0f, 4, 0};
  Cache m = make_cache(c, 42);
  const int64_t D = c.D, L = c.query_tokens, last = c.n_window - 1;
  m.vw[last * D + 3] = NAN;
  headq::cpu::DecodeSlice<float> a = slice_of(c, m);
  std::vector<float> out(c.n_rep * D), lse(c.n_rep);
  a.out = out.data();
  a.lse = lse.data();
  headq::cpu::decode_attention_slice<float>(a, shape_of(c, 1.0f / std::sqrt(float(D))));
  for (int64_t i = 0; i < c.n_rep; ++i) {
    const bool sees_last = (c.row0 + i) % L == L - 1;
    EXPECT_TRUE(std::isfinite(lse[i])) << "row " << i;
    for (int64_t d = 0; d < D; ++d) {
      if (sees_last && d == 3) {
        EXPECT_TRUE(std::isnan(out[i * D + d])) << "row " << i;
      } else {
        ASSERT_TRUE(std::isfinite(out[i * D + d])) << "row " << i << " dim " << d;
      }
    }
  }
}

class CorrectedLogits : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CorrectedLogits, MatchesNaive) {
  const DecodeCase& c = GetParam();
  const Cache m = make_cache(c, 7);
  const float scale = 0.3f;
  std::vector<float> out(c.n_rep * c.Tq);
  headq::cpu::corrected_logits_slice<float>(m.q.data(), c.n_rep, m.k_codes.data(),
                                            m.k_scale.data(), m.k_zero.data(), side_of(c, m),
                                            c.Tq, c.D, c.G, c.key_bits, c.sign, scale, out.data());
  for (int64_t i = 0; i < c.n_rep; ++i) {
    for (int64_t t = 0; t < c.Tq; ++t) {
      const double want = naive_logit(c, m, i, t, scale);
      ASSERT_NEAR(out[i * c.Tq + t], want, 1e-5 * (1 + std::fabs(want)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CorrectedLogits,
    ::testing::Values(
        DecodeCase{"no_side", 3, 32, 32, 96, 0, 4, 4, 32, 0, 8, false, 0, 0, 0, 0, 1.0f},
        DecodeCase{"side8", 2, 64, 64, 128, 0, 2, 4, 32, 24, 8, false, 0, 0, 0, 0, 1.0f},
        DecodeCase{"side4_wrong_sign", 1, 64, 32, 64, 0, 3, 4, 32, 64, 4, false, 0, 0, 0, 0,
                   -1.0f}),
    [](const ::testing::TestParamInfo<DecodeCase>& info) { return std::string(info.param.name); });

}  // namespace
