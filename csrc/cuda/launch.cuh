// Torch-free launchers of the headq CUDA kernels: raw pointers, strides and a stream in,
// cudaError_t (of the launch) out. Implemented in quant_kernels.cu and decode_kernels.cu,
// called by the ATen wrappers in ops.cu. All indices and strides are 64-bit.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "headq/split_plan.h"

namespace headq {
namespace cuda {

// Floating element type of an op's dense tensors (inputs are float32, float16 or bfloat16).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// Quantisation ops (docs/LAYOUT.md). Packed outputs and float16 scale/zero tensors are
// contiguous; dense inputs take element strides (sb, sh, st, sd) of [B, H, T, D].

// The [B, H, T, D] tensor a dequantising op writes, element strides: the op's own contiguous
// result, or a caller's `out` of any layout (e.g. a token slice of a longer tensor).
struct OutTensor {
  void* ptr;
  int64_t sb, sh, st, sd;
};

// Where the packed inputs of a dequantising op keep their (b, h) slabs: the element stride from
// slab bh = b * H + h to the next, token rows contiguous within a slab. T times the row for a
// contiguous input; for a token slice of a longer buffer (the cache's), its capacity times the
// row, read in place without a copy. scale and zero share one; z_* only for reconstruct_keys.
struct InSlabs {
  int64_t codes, scale, z_codes, z_scale;
};

cudaError_t launch_quantize_keys(const void* k,  // [B, H, T, D] dtype, strides in elements
                                 DType dtype, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                                 int64_t B, int64_t H, int64_t T, int64_t D, int bits, int G,
                                 uint8_t* codes,  // [B, H, T, D*bits/8]
                                 void* scale,     // [B, H, T/G, D] f16
                                 void* zero,      // [B, H, T/G, D] f16
                                 cudaStream_t stream);

cudaError_t launch_dequantize_keys(const uint8_t* codes,  // [B, H, T, D*bits/8]
                                   const void* scale,     // [B, H, T/G, D] f16
                                   const void* zero,      // [B, H, T/G, D] f16
                                   const InSlabs& in,
                                   int64_t B, int64_t H, int64_t T, int64_t D, int bits, int G,
                                   const OutTensor& out,  // [B, H, T, D] out dtype
                                   DType out_dtype, cudaStream_t stream);

cudaError_t launch_reconstruct_keys(const uint8_t* codes,    // [B, H, T, D*bits/8]
                                    const void* scale,       // [B, H, T/G, D] f16
                                    const void* zero,        // [B, H, T/G, D] f16
                                    const uint8_t* z_codes,  // [B, H, T, r*side_bits/8]
                                    const void* z_scale,     // [B, H, T] f16
                                    const float* basis,      // [H, D, r]
                                    const InSlabs& in,
                                    int64_t B, int64_t H, int64_t T, int64_t D, int bits, int G,
                                    int64_t r, int side_bits, float sign,
                                    const OutTensor& out,  // [B, H, T, D] out dtype
                                    DType out_dtype, cudaStream_t stream);

cudaError_t launch_quantize_values(const void* v,  // [B, H, T, D] dtype, strides in elements
                                   DType dtype, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                                   int64_t B, int64_t H, int64_t T, int64_t D, int bits, int Gv,
                                   uint8_t* codes,  // [B, H, T, D*bits/8]
                                   void* scale,     // [B, H, T, D/Gv] f16
                                   void* zero,      // [B, H, T, D/Gv] f16
                                   cudaStream_t stream);

cudaError_t launch_dequantize_values(const uint8_t* codes,  // [B, H, T, D*bits/8]
                                     const void* scale,     // [B, H, T, D/Gv] f16
                                     const void* zero,      // [B, H, T, D/Gv] f16
                                     const InSlabs& in,
                                     int64_t B, int64_t H, int64_t T, int64_t D, int bits,
                                     int Gv,
                                     const OutTensor& out,  // [B, H, T, D] out dtype
                                     DType out_dtype, cudaStream_t stream);

cudaError_t launch_side_code(const void* k,  // [B, H, T, D] dtype, strides in elements
                             DType dtype, int64_t sb, int64_t sh, int64_t st, int64_t sd,
                             const uint8_t* k_codes,  // [B, H, T, D*key_bits/8]
                             const void* k_scale,     // [B, H, T/G, D] f16
                             const void* k_zero,      // [B, H, T/G, D] f16
                             const float* basis,      // [H, D, r]
                             int64_t B, int64_t H, int64_t T, int64_t D, int64_t r, int key_bits,
                             int G, int side_bits, bool center,
                             uint8_t* z_codes,  // [B, H, T, r*side_bits/8]
                             void* z_scale,     // [B, H, T] f16
                             cudaStream_t stream);

// quantize_keys + side_code + quantize_values of the same tokens: one fused kernel (k read
// once) for 16-bit inputs of the usual shapes when its blocks fit in one wave on sm_count SMs,
// else the three launchers above in turn. ks / vs: the element strides (b, h, t, d) of k and v.
// Outputs as those of the three ops.
cudaError_t launch_quantize_kv(const void* k, const void* v,  // [B, H, T, D] dtype
                               DType dtype, const int64_t* ks, const int64_t* vs,
                               const float* basis,  // [H, D, r]
                               int64_t B, int64_t H, int64_t T, int64_t D, int64_t r,
                               int key_bits, int G, int side_bits, bool center, int value_bits,
                               int Gv, uint8_t* k_codes, void* k_scale, void* k_zero,
                               uint8_t* z_codes, void* z_scale, uint8_t* v_codes, void* v_scale,
                               void* v_zero, int sm_count, cudaStream_t stream);

cudaError_t launch_dequantize_side(const uint8_t* z_codes,  // [rows, r*side_bits/8]
                                   const void* z_scale,     // [rows] f16
                                   int64_t rows, int64_t r, int side_bits,
                                   float* out,  // [rows, r]
                                   cudaStream_t stream);

// q [B, Hq, L, D] contiguous; z_codes/z_scale/basis may be null (no correction term).
cudaError_t launch_corrected_logits(const void* q, DType dtype,  // [B, Hq, L, D]
                                    const uint8_t* k_codes,      // [B, H, T, D*key_bits/8]
                                    const void* k_scale,         // [B, H, T/G, D] f16
                                    const void* k_zero,          // [B, H, T/G, D] f16
                                    const uint8_t* z_codes,      // [B, H, T, r*bz/8] or null
                                    const void* z_scale,         // [B, H, T] f16 or null
                                    const float* basis,          // [H, D, r] or null
                                    int64_t B, int64_t H, int64_t Hq, int64_t L, int64_t T,
                                    int64_t D, int64_t r, int key_bits, int G, int side_bits,
                                    float sign, float scale,
                                    float* qu,   // [B, Hq, L, r] workspace (null without side)
                                    float* out,  // [B, Hq, L, T]
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Fused decode attention (flash-decoding: split kernel + combine kernel).

// Base pointer and byte strides of the leading dims of a tensor whose last dim is contiguous:
// element (b, h, t, :) starts at p + b*sb + h*sh + t*st.
struct Strided {
  const char* p = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
};

struct DecodeParams {
  Strided q;            // [B, Hq, D] dtype (st unused)
  Strided k_codes;      // [B, H, Tq, D*kbits/8]   st == row bytes
  Strided k_scale;      // [B, H, Tq/G, D] f16     st == 2*D
  Strided k_zero;       // [B, H, Tq/G, D] f16
  Strided z_codes;      // [B, H, Tq, r*zbits/8]   (p == null: no side code)
  Strided z_scale;      // [B, H, Tq] f16
  const float* basis;   // [H, D, r] contiguous (null without side code)
  Strided v_codes;      // [B, H, Tq, D*vbits/8]   (p == null: dense values)
  Strided v_scale;      // [B, H, Tq, D/Gv] f16
  Strided v_zero;       // [B, H, Tq, D/Gv] f16
  Strided v_dense;      // [B, H, Tq, D] dtype
  Strided heavy_delta;  // [B, H, K, D] dtype (p == null: no heavy slots)
  const int32_t* heavy_idx;  // [B, H, K] contiguous
  float* heavy_logits;       // [B, Hq, K] contiguous out (null: not asked): visible slots' logits
  Strided k_window;     // [B, H, W, D] dtype
  Strided v_window;     // [B, H, W, D] dtype
  const int32_t* n_quant;    // [B]
  const int32_t* n_window;   // [B]
  const int32_t* kv_start;   // [B] or null
  float* part_acc;      // [B, Hq, S, D] unnormalised partial outputs of the splits
  float* part_ml;       // [B, Hq, S, 2] (running max in log2 units, sum of exp2)
  int B, H, Hq, D, ratio, nchunk, K;
  // splits: Sq over the quantised region (split_range: the tiles of each sequence's length
  // spread over them), Sw over the window in chunks of wchunk tokens, then Sh over the heavy
  // slots in chunks of hchunk (plan_heavy); S = Sq + Sw + Sh
  int Tq, W, S, Sq, wchunk, Sw, Sh, hchunk;
  int hstage;  // slots the heavy-slot kernel stages at a time (set by launch_decode_heavy)
  int kbits, G, zbits, r, vbits, Gv;
  DType dtype;
  float sign, scale_log2;  // scale * log2(e)
  int split0;  // first split index of this launch (the window splits of the tensor-core path)
  // query_tokens L: query head j (within the batch row) is token j % L of the window's last L
  // tokens and sees the window tokens w < n_window[b] - (L - 1 - j % L); 1 = a decode step
  int qtok;
  // 1: the tensor-core split kernel attends the dense window itself, each split block a slice of
  // at most kMmaWindowPerSplit tokens (Sw == 0: no window splits); set by plan_decode_mma
  int win_mma = 0;
};

// Window tokens one tensor-core split block attends at most (win_mma): ceil(W / Sq) must not
// exceed it, else the window goes to window splits of the SIMT kernel.
constexpr int kMmaWindowPerSplit = 8;

// Whether plan_decode_mma may give the window to the tensor-core splits (win_mma):
// HEADQ_MMA_WINDOW, read at every call; unset or anything but "0" = yes (A/B runs set 0).
bool decode_mma_window_enabled();

// Programmatic dependent launch of the kernels that follow the first split kernel of a decode
// call (the window splits, which then run alongside the tensor-core splits' last blocks, and the
// combine, scheduled before the splits end): allowed on compute capability >= 9.0 unless
// HEADQ_PDL=0 (read at every call, for A/B runs). See pdl_wait in device_common.cuh.
bool decode_pdl_enabled(int device_major);

struct DecodePlan {
  int ng;      // query heads per block (1, 2, 4, 8)
  int nchunk;  // ceil(ratio / ng)
  int Sq, Sw;  // quantised-region and window splits (each block's quantised tokens: split_range)
  int wchunk;  // window tokens per window split
  size_t smem;  // dynamic shared memory of the split kernel
  int variant = 0;  // tensor-core kernel configuration (decode_mma_variant)
  int win_mma = 0;  // the tensor-core splits attend the window (DecodeParams::win_mma)
};

// Minimum quantised tiles per split of the decode plans, forced by HEADQ_SPLIT_MIN_TILES (read
// at every call, for A/B runs: 1 = the full wave of one-tile splits where the tokens allow it,
// benchmarks/bench_decode_batch.py), else -1: the plan's own default (split_plan.h).
int decode_split_min_tiles();

// The split fields of a plan (Sq, wchunk, Sw) once its nchunk is set, from the
// kernel's resident blocks per SM: one full wave over the (batch, KV head, head chunk) pairs,
// quantised tokens in tiles of `tile`, window tokens in tiles of `wtile`, at least
// `min_tiles` tiles per split or kAutoMinTiles (headq/split_plan.h), unless
// HEADQ_SPLIT_MIN_TILES says otherwise.
inline void set_plan_splits(const DecodeParams& p, int sm_count, int blocks_per_sm, int tile,
                            int wtile, int min_tiles, DecodePlan* pl) {
  const int64_t pairs = static_cast<int64_t>(p.B) * p.H * pl->nchunk;
  const int64_t resident = static_cast<int64_t>(sm_count) * std::max(blocks_per_sm, 1);
  const int forced = decode_split_min_tiles();
  const SplitPlan sp =
      plan_splits(p.Tq, p.W, pairs, resident, tile, wtile, forced >= 1 ? forced : min_tiles);
  pl->Sq = sp.Sq;
  pl->wchunk = sp.wchunk;
  pl->Sw = sp.Sw;
}

// Fills the plan from the shape fields of p (B, H, Hq, D, ratio, Tq, W, knobs, dtype) and the
// device's SM count / occupancy. Returns cudaSuccess or the error of an occupancy query.
cudaError_t plan_decode_attention(const DecodeParams& p, int sm_count, DecodePlan* plan);

// Launches splits split0 .. Sq + Sw - 1 (quantised and window splits; the heavy-slot splits are
// launch_decode_heavy's). pdl: launched as a programmatic
// dependent of the previous kernel (the tensor-core splits): it runs alongside their last blocks
// and completes only after them.
cudaError_t launch_decode_split(const DecodeParams& p, const DecodePlan& plan,
                                cudaStream_t stream, bool pdl = false);

// Heavy-slot splits Sq + Sw .. S-1 (p.Sh of them, p.hchunk slots each; plan.ng / plan.nchunk of
// the SIMT plan, which p.nchunk must match): numerator-only partials of the kept tokens' value
// corrections (A² value policy). p.hstage is set here: HEADQ_HEAVY_STAGE, else
// heavy_stage_slots from the kernel's occupancy and sm_count. pdl: a programmatic dependent of
// the previous split kernel.
cudaError_t launch_decode_heavy(const DecodeParams& p, const DecodePlan& plan, int sm_count,
                                cudaStream_t stream, bool pdl = false);

// Tensor-core split kernel (decode_mma.cu) over the quantised region: splits 0 .. Sq-1 with the
// same partial layout; the window splits Sq .. Sq + Sw - 1 are left to launch_decode_split
// (split0 = Sq) and the heavy-slot splits to launch_decode_heavy.
// Supported: fp16/bf16 queries, D in {64, 128}, key bits in {2, 4}, packed values of 2 or 4
// bits, optional side code with bz in {4, 8}, r <= 32 and 4-byte side-code rows (heavy slots run
// in launch_decode_heavy's splits after it).
bool decode_mma_supported(const DecodeParams& p);

// Fills ng, nchunk, Sq (tensor-core kernel) and Sw, wchunk (window splits of the
// SIMT kernel, whose own ng/nchunk/smem come from plan_decode_attention).
// variant: a configuration index from decode_mma_variant (NT = 2 shapes always run variant 0).
cudaError_t plan_decode_mma(const DecodeParams& p, int sm_count, int variant, DecodePlan* plan);

// Configuration index of the tensor-core kernel named by HEADQ_MMA_VARIANT: null, "" or
// "default" -> the default (lean); "base", "ring4", "ring5", "lean" -> 0, 1, 2, 3; anything else -> -1.
int decode_mma_variant(const char* name);

cudaError_t launch_decode_mma(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream);

cudaError_t launch_decode_combine(const float* part_acc,  // [B, Hq, S, D]
                                  const float* part_ml,   // [B, Hq, S, 2]
                                  int64_t BHq, int S, int D,
                                  void* out,   // [B, Hq, D] dtype, contiguous
                                  float* lse,  // [B, Hq] natural-log sum exp of visible logits
                                  DType dtype,
                                  const Strided& q,  // [B, Hq, D]: a NaN query row -> NaN out/lse
                                  int Hq, cudaStream_t stream, bool pdl = false);

// a2_weights (a2_weights.cu): q [B, Hq, L, D] and k [B, H, T, D] contiguous in dtype, D 64 or
// 128; mask_bits [B or 1, L, ceil(T / 32)] uint32 contiguous (bits_sb: L · ceil(T / 32), 0 when
// broadcast), written by launch_a2_mask_bits from the bool mask, or null for causal. Writes lse
// [B, Hq, L] (float32, contiguous; read instead when lse_given: the row pass is skipped) and w
// [B, H, T] (float32, contiguous).
cudaError_t launch_a2_mask_bits(const bool* mask, int64_t mask_sb, int64_t mask_sl, int64_t Bm,
                                int64_t L, int64_t T, uint32_t* bits, cudaStream_t stream);
cudaError_t launch_a2_weights(const void* q, const void* k, DType dtype,
                              const uint32_t* mask_bits, int64_t bits_sb, int64_t B, int64_t H,
                              int64_t Hq, int64_t L, int64_t T, int64_t D, float scale,
                              float* lse, bool lse_given, float* w, cudaStream_t stream);

// a2_step_weights (a2_step.cu): q [B, Hq, D] and k [B, H, W, D] contiguous in dtype, lse
// [B, Hq], the lengths [B] int32 (kv_start may be null), w_window [B, H, W] and (when
// heavy_logits [B, Hq, K] is given) heavy_w [B, H, K] float32 contiguous, added to in place.
struct A2StepParams {
  const void* q = nullptr;
  const void* k = nullptr;
  DType dtype = DType::kFloat32;
  const float* lse = nullptr;
  const int32_t* n_quant = nullptr;
  const int32_t* n_window = nullptr;
  const int32_t* kv_start = nullptr;
  float* w_window = nullptr;
  const float* heavy_logits = nullptr;
  float* heavy_w = nullptr;
  int H = 0, n_rep = 0, D = 0, W = 0;
  int64_t K = 0;
  float scale = 1.0f;
  int qtok = 1;  // query_tokens, as in DecodeParams
};
// shared memory of one block (the query rows and their lse): at most 48 KB
int64_t a2_step_smem_bytes(int64_t n_rep, int64_t D);
cudaError_t launch_a2_step(const A2StepParams& p, int64_t B, cudaStream_t stream);

}  // namespace cuda
}  // namespace headq
