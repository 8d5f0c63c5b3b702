// Online softmax state (running max m and running sum l of exp(x - m)) and the merge of two
// partial states (split-K / block reductions). Accumulators that belong to a state (the
// weighted value sums) are rescaled by the factors these functions return.
//
//   OnlineSoftmax st;                       // m = -inf, l = 0
//   float alpha = st.raise(block_max);      // acc *= alpha
//   float p = st.weight(x); st.l += p;      // acc += p * v   (for every x of the block)
//   out = acc * st.inv_sum();               // 0 when nothing was visible
#pragma once

#include "headq/common.h"

namespace headq {

struct OnlineSoftmax {
  float m = -INFINITY;  // running max of the logits seen (-inf: none yet)
  float l = 0.0f;       // running sum of exp(x - m)

  // Raise the running max to include x_max; rescales l and returns the factor exp(m_old -
  // m_new) by which accumulators of this state must be multiplied (0 when nothing was seen).
  HEADQ_HD HEADQ_INLINE float raise(float x_max) {
    const float m_new = fmaxf(m, x_max);
    if (m_new == -INFINITY) return 1.0f;  // still nothing visible: keep zeros
    const float alpha = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    m = m_new;
    l = l * alpha;
    return alpha;
  }

  // exp(x - m) for a logit x <= m (0 for a masked logit x = -inf). Call after raise().
  HEADQ_HD HEADQ_INLINE float weight(float x) const {
    return (x == -INFINITY) ? 0.0f : expf(x - m);
  }

  // Push one logit: returns the rescale factor of the accumulators in *alpha and the weight
  // of x in *p (acc = acc * alpha + p * v).
  HEADQ_HD HEADQ_INLINE void push(float x, float* alpha, float* p) {
    *alpha = raise(x);
    *p = weight(x);
    l += *p;
  }

  // 1 / l, or 0 when no logit was visible (so the output is zeros).
  HEADQ_HD HEADQ_INLINE float inv_sum() const { return (l > 0.0f) ? 1.0f / l : 0.0f; }

  // log(sum exp(x)) of everything pushed, -inf when nothing was visible.
  // A NaN sum (a NaN logit or query) stays NaN: -inf would claim that nothing was visible.
  HEADQ_HD HEADQ_INLINE float lse() const { return (l > 0.0f || l != l) ? m + logf(l) : -INFINITY; }
};

// Merge partial states a and b into one; the merged accumulator is acc_a * (*ca) + acc_b * (*cb).
HEADQ_HD HEADQ_INLINE OnlineSoftmax online_softmax_merge(const OnlineSoftmax& a,
                                                         const OnlineSoftmax& b, float* ca,
                                                         float* cb) {
  OnlineSoftmax r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {
    *ca = 0.0f;
    *cb = 0.0f;
    // 0 when nothing was visible; NaN stays NaN (a part whose logits were all NaN keeps m at
    // -inf, fmaxf skipping NaN, and l NaN): the merged lse must not claim "nothing visible"
    r.l = a.l + b.l;
    return r;
  }
  *ca = (a.m == -INFINITY) ? 0.0f : expf(a.m - r.m);
  *cb = (b.m == -INFINITY) ? 0.0f : expf(b.m - r.m);
  r.l = a.l * (*ca) + b.l * (*cb);
  return r;
}

}  // namespace headq
