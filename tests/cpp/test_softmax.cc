// Online softmax: block-wise updates and merges of partial states against a direct softmax.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "headq/softmax.h"

namespace {

// Direct softmax-weighted sum of values v (one scalar value per logit) in double.
double direct(const std::vector<float>& x, const std::vector<float>& v, double* lse) {
  double m = -INFINITY;
  for (float xi : x) m = std::max<double>(m, xi);
  double l = 0, acc = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] == -INFINITY) continue;
    const double p = std::exp(x[i] - m);
    l += p;
    acc += p * v[i];
  }
  *lse = l > 0 ? m + std::log(l) : -INFINITY;
  return l > 0 ? acc / l : 0.0;
}

// Online softmax over x in blocks of `block`; returns the weighted value sum.
float online(const std::vector<float>& x, const std::vector<float>& v, size_t begin, size_t end,
             size_t block, headq::OnlineSoftmax* st) {
  float acc = 0.0f;
  for (size_t b0 = begin; b0 < end; b0 += block) {
    const size_t b1 = std::min(end, b0 + block);
    float bmax = -INFINITY;
    for (size_t i = b0; i < b1; ++i) bmax = std::fmax(bmax, x[i]);
    acc *= st->raise(bmax);
    for (size_t i = b0; i < b1; ++i) {
      const float p = st->weight(x[i]);
      st->l += p;
      acc += p * v[i];
    }
  }
  return acc;
}

class OnlineSoftmaxTest : public ::testing::TestWithParam<std::tuple<size_t, size_t, float>> {};

TEST_P(OnlineSoftmaxTest, BlockwiseAndMergedMatchDirect) {
  const size_t n = std::get<0>(GetParam()), block = std::get<1>(GetParam());
  const float spread = std::get<2>(GetParam());
  std::mt19937 rng(static_cast<uint32_t>(n * 31 + block));
  std::normal_distribution<float> dist(0.0f, spread);
  std::vector<float> x(n), v(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = dist(rng);
    v[i] = dist(rng) / spread;
  }
  x[n / 3] = -INFINITY;  // a masked logit
  double lse_ref;
  const double ref = direct(x, v, &lse_ref);

  headq::OnlineSoftmax st;
  const float acc = online(x, v, 0, n, block, &st);
  EXPECT_NEAR(acc * st.inv_sum(), ref, 1e-5 * (1 + std::fabs(ref)));
  EXPECT_NEAR(st.lse(), lse_ref, 1e-5 * (1 + std::fabs(lse_ref)));

  // Split in two halves processed independently, then merged (split-K).
  headq::OnlineSoftmax a, b;
  const float acc_a = online(x, v, 0, n / 2, block, &a);
  const float acc_b = online(x, v, n / 2, n, block, &b);
  float ca, cb;
  const headq::OnlineSoftmax m = headq::online_softmax_merge(a, b, &ca, &cb);
  EXPECT_NEAR((acc_a * ca + acc_b * cb) * m.inv_sum(), ref, 1e-5 * (1 + std::fabs(ref)));
  EXPECT_NEAR(m.lse(), lse_ref, 1e-5 * (1 + std::fabs(lse_ref)));
}

INSTANTIATE_TEST_SUITE_P(Grid, OnlineSoftmaxTest,
                         ::testing::Combine(::testing::Values<size_t>(2, 7, 64, 1000),
                                            ::testing::Values<size_t>(1, 16, 64),
                                            ::testing::Values(0.1f, 5.0f, 40.0f)));

TEST(OnlineSoftmax, NothingVisibleGivesZeroAndMinusInf) {
  headq::OnlineSoftmax st;
  float alpha, p;
  st.push(-INFINITY, &alpha, &p);
  EXPECT_EQ(p, 0.0f);
  EXPECT_EQ(st.inv_sum(), 0.0f);
  EXPECT_EQ(st.lse(), -INFINITY);
  headq::OnlineSoftmax other;
  float ca, cb;
  const headq::OnlineSoftmax m = headq::online_softmax_merge(st, other, &ca, &cb);
  EXPECT_EQ(m.inv_sum(), 0.0f);
  EXPECT_EQ(ca, 0.0f);
  EXPECT_EQ(cb, 0.0f);
}

TEST(OnlineSoftmax, MergeWithEmptyKeepsState) {
  headq::OnlineSoftmax a, empty;
  float alpha, p;
  a.push(3.0f, &alpha, &p);
  a.push(1.0f, &alpha, &p);
  float ca, cb;
  const headq::OnlineSoftmax m = headq::online_softmax_merge(a, empty, &ca, &cb);
  EXPECT_EQ(m.m, a.m);
  EXPECT_FLOAT_EQ(m.l, a.l);
  EXPECT_EQ(ca, 1.0f);
  EXPECT_EQ(cb, 0.0f);
}

}  // namespace
