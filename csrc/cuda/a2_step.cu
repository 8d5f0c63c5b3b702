// a2_step_weights: the A² weights one decode step adds, in one launch. Per (batch, KV head) a
// block:
//   window tokens t < n_window[b] (and n_quant[b] + t >= kv_start[b]): a warp per token, the
//   logits s = (q . k) * scale of the KV head's query heads (lanes split the head dim, float32
//   FMAs of the inputs), a = exp(s - lse) (0 unless finite), w_window[b, h, t] += sum of a^2
//   over the query heads in order (with query_tokens L > 1, query head j only for
//   t < n_window[b] - (L - 1 - j % L): a few-token call's own tokens, causal);
//   kept-token slots: a thread per slot, a from the slot's logit that decode_attention wrote
//   (heavy_logits, -inf for an empty slot), heavy_w[b, h, k] += sum of a^2.
// Replaces ~30 small PyTorch kernels per layer and step of a graph-decoded A² cache. Each
// block owns its (b, h) rows: plain read-modify-writes, no atomics. The dtype is read at run
// time (load_as_float): one instantiation, off any hot path.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device_common.cuh"
#include "launch.cuh"

namespace headq {
namespace cuda {
namespace {

constexpr int kStepThreads = 256;

__device__ __forceinline__ float a_squared(float a) { return isfinite(a) ? a * a : 0.0f; }

__global__ void __launch_bounds__(kStepThreads) a2_step_kernel(A2StepParams p) {
  extern __shared__ float sm[];
  float* qs = sm;                    // [n_rep, D] the query rows as float32
  float* ls = sm + p.n_rep * p.D;    // [n_rep] their lse
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H;
  const int64_t hq0 = b * p.H * p.n_rep + (bh % p.H) * p.n_rep;
  for (int i = threadIdx.x; i < p.n_rep * p.D; i += blockDim.x)
    qs[i] = load_as_float(p.q, p.dtype, hq0 * p.D + i);
  for (int i = threadIdx.x; i < p.n_rep; i += blockDim.x) ls[i] = p.lse[hq0 + i];
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const int64_t n_quant = p.n_quant[b];
  const int64_t start = p.kv_start != nullptr ? p.kv_start[b] : 0;
  const int64_t t_end = min(static_cast<int64_t>(p.n_window[b]), static_cast<int64_t>(p.W));
  for (int64_t t = warp; t < t_end; t += n_warps) {
    if (n_quant + t < start) continue;
    const int64_t k0 = (bh * p.W + t) * p.D;
    float acc = 0.0f;
    for (int r = 0; r < p.n_rep; ++r) {
      // the call's own tokens (qtok > 1): causal among them
      if (t >= window_end_of_row<int64_t>(t_end, p.qtok, (bh % p.H) * p.n_rep + r)) continue;
      float s = 0.0f;
      for (int d = lane; d < p.D; d += 32)
        s = fmaf(qs[r * p.D + d], load_as_float(p.k, p.dtype, k0 + d), s);
      s = warp_sum(s);
      acc += a_squared(expf(s * p.scale - ls[r]));
    }
    if (lane == 0) p.w_window[bh * p.W + t] += acc;
  }
  if (p.heavy_logits == nullptr) return;
  for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    float acc = 0.0f;
    for (int r = 0; r < p.n_rep; ++r)
      acc += a_squared(expf(p.heavy_logits[(hq0 + r) * p.K + k] - ls[r]));
    p.heavy_w[bh * p.K + k] += acc;
  }
}

}  // namespace

int64_t a2_step_smem_bytes(int64_t n_rep, int64_t D) {
  return static_cast<int64_t>(sizeof(float)) * n_rep * (D + 1);
}

cudaError_t launch_a2_step(const A2StepParams& p, int64_t B, cudaStream_t stream) {
  const int64_t blocks = B * p.H;
  if (blocks == 0) return cudaSuccess;
  const int64_t smem = a2_step_smem_bytes(p.n_rep, p.D);
  a2_step_kernel<<<static_cast<unsigned>(blocks), kStepThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace headq
