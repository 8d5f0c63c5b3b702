// Device-agnostic argument checks of every headq op, shared by the CPU and CUDA host code.
//
// Each validate_<op> takes exactly the op's arguments and throws a c10::Error (TORCH_CHECK)
// whose message names the op, the argument and what was expected. They check ranks, shapes,
// dtypes, supported knobs and that all tensors live on the device of the first tensor.
//
// Lengths held in tensors (n_quant <= Tq, n_window <= W, kv_start >= 0, all >= 0) are only
// checked for CPU tensors: reading them on CUDA would need a device sync. The CUDA kernels
// clamp them instead (n_quant to [0, Tq], n_window to [0, W], kv_start to >= 0), like the CPU
// kernel does after these checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <array>
#include <optional>

namespace headq {

void validate_quantize_keys(const at::Tensor& k,  // [B, H, T, D]
                            int64_t bits, int64_t group_size);

// The three dequantising ops' validators return the result's shape [B, H, T, D].
std::array<int64_t, 4> validate_dequantize_keys(
    const at::Tensor& codes,  // [B, H, T, D*bits/8] uint8
    const at::Tensor& scale,  // [B, H, T/G, D] float16
    const at::Tensor& zero,   // [B, H, T/G, D] float16
    int64_t bits, int64_t group_size, at::ScalarType out_dtype);

// The *_into forms of the three dequantising ops: the same inputs, and `out` [B, H, T, D] of
// any float dtype and strides, on their device, that shares no memory with them or itself.
void validate_dequantize_keys_into(const at::Tensor& codes, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t bits, int64_t group_size,
                                   const at::Tensor& out);

void validate_quantize_values(const at::Tensor& v,  // [B, H, T, D]
                              int64_t bits, int64_t group_size);

std::array<int64_t, 4> validate_dequantize_values(
    const at::Tensor& codes,  // [B, H, T, D*bits/8] uint8
    const at::Tensor& scale,  // [B, H, T, D/Gv] float16
    const at::Tensor& zero,   // [B, H, T, D/Gv] float16
    int64_t bits, int64_t group_size, at::ScalarType out_dtype);

void validate_dequantize_values_into(const at::Tensor& codes, const at::Tensor& scale,
                                     const at::Tensor& zero, int64_t bits, int64_t group_size,
                                     const at::Tensor& out);

void validate_side_code(const at::Tensor& k,        // [B, H, T, D]
                        const at::Tensor& k_codes,  // [B, H, T, D*key_bits/8] uint8
                        const at::Tensor& k_scale,  // [B, H, T/G, D] float16
                        const at::Tensor& k_zero,   // [B, H, T/G, D] float16
                        const at::Tensor& basis,    // [H, D, r] float32
                        int64_t key_bits, int64_t group_size, int64_t side_bits, bool center);

// quantize_kv = quantize_keys(k) + side_code(k, its codes, basis) + quantize_values(v) in one
// call; v has k's shape, dtype and device.
void validate_quantize_kv(const at::Tensor& k,      // [B, H, T, D]
                          const at::Tensor& v,      // [B, H, T, D]
                          const at::Tensor& basis,  // [H, D, r] float32
                          int64_t key_bits, int64_t group_size, int64_t side_bits, bool center,
                          int64_t value_bits, int64_t value_group_size);

void validate_dequantize_side(const at::Tensor& z_codes,  // [B, H, T, r*side_bits/8] uint8
                              const at::Tensor& z_scale,  // [B, H, T] float16
                              int64_t side_bits);

// reconstruct_keys: the key codes as in dequantize_keys plus a (required) side code.
std::array<int64_t, 4> validate_reconstruct_keys(
    const at::Tensor& k_codes,  // [B, H, T, D*key_bits/8] uint8
    const at::Tensor& k_scale,  // [B, H, T/G, D] float16
    const at::Tensor& k_zero,   // [B, H, T/G, D] float16
    const at::Tensor& z_codes,  // [B, H, T, r*side_bits/8] uint8
    const at::Tensor& z_scale,  // [B, H, T] float16
    const at::Tensor& basis,    // [H, D, r] float32
    int64_t key_bits, int64_t group_size, int64_t side_bits, double sign,
    at::ScalarType out_dtype);

void validate_reconstruct_keys_into(const at::Tensor& k_codes, const at::Tensor& k_scale,
                                    const at::Tensor& k_zero, const at::Tensor& z_codes,
                                    const at::Tensor& z_scale, const at::Tensor& basis,
                                    int64_t key_bits, int64_t group_size, int64_t side_bits,
                                    double sign, const at::Tensor& out);

void validate_corrected_logits(const at::Tensor& q,        // [B, Hq, L, D]
                               const at::Tensor& k_codes,  // [B, H, T, D*key_bits/8] uint8
                               const at::Tensor& k_scale,  // [B, H, T/G, D] float16
                               const at::Tensor& k_zero,   // [B, H, T/G, D] float16
                               const std::optional<at::Tensor>& z_codes,  // [B, H, T, r*bz/8]
                               const std::optional<at::Tensor>& z_scale,  // [B, H, T] float16
                               const std::optional<at::Tensor>& basis,    // [H, D, r] float32
                               int64_t key_bits, int64_t group_size, int64_t side_bits,
                               double sign, double scale);

// query_tokens L of decode_attention / a2_step_weights: query head j is token j % L of the
// window's last L tokens and sees the window tokens t < n_window[b] - (L - 1 - j % L); L = 1 is
// a decode step (every window token visible). Needs L >= 1 and query_heads % L == 0.
void check_query_tokens(const char* op, int64_t query_tokens, int64_t query_heads);

void validate_decode_attention(
    const at::Tensor& q,                            // [B, Hq, D]
    const at::Tensor& k_codes,                      // [B, H, Tq, D*key_bits/8] uint8
    const at::Tensor& k_scale,                      // [B, H, Tq/G, D] float16
    const at::Tensor& k_zero,                       // [B, H, Tq/G, D] float16
    const std::optional<at::Tensor>& z_codes,       // [B, H, Tq, r*bz/8] uint8
    const std::optional<at::Tensor>& z_scale,       // [B, H, Tq] float16
    const std::optional<at::Tensor>& basis,         // [H, D, r] float32
    const std::optional<at::Tensor>& v_codes,       // [B, H, Tq, D*value_bits/8] uint8
    const std::optional<at::Tensor>& v_scale,       // [B, H, Tq, D/Gv] float16
    const std::optional<at::Tensor>& v_zero,        // [B, H, Tq, D/Gv] float16
    const std::optional<at::Tensor>& v_dense,       // [B, H, Tq, D] q.dtype
    const std::optional<at::Tensor>& heavy_delta,   // [B, H, K, D] q.dtype
    const std::optional<at::Tensor>& heavy_idx,     // [B, H, K] int32
    const at::Tensor& k_window,                     // [B, H, W, D] q.dtype
    const at::Tensor& v_window,                     // [B, H, W, D] q.dtype
    const at::Tensor& n_quant,                      // [B] int32
    const at::Tensor& n_window,                     // [B] int32
    const std::optional<at::Tensor>& kv_start,      // [B] int32
    int64_t key_bits, int64_t group_size, int64_t side_bits, int64_t value_bits,
    int64_t value_group_size, double sign, double scale,
    const std::optional<at::Tensor>& heavy_logits,  // [B, Hq, K] float32, written
    int64_t query_tokens);  // L >= 1, Hq % L == 0 (see check_query_tokens)

// a2_weights: dense attention of L query rows over T keys; the visible keys of query row i are
// mask[b, i, :] when a mask is given, else t <= T - L + i (causal, the queries are the last L).
void validate_a2_weights(const at::Tensor& q,                    // [B, Hq, L, D]
                         const at::Tensor& k,                    // [B, H, T, D] q.dtype
                         const std::optional<at::Tensor>& mask,  // [B or 1, L, T] bool
                         double scale,
                         const std::optional<at::Tensor>& lse);  // [B, Hq, L] float32, given

// a2_step_weights: the A² weights one decode step adds to the window tokens (w_window += sum
// over a KV head's query heads of a^2, a = exp(scale q.k - lse), for t < n_window[b] and
// n_quant[b] + t >= kv_start[b]) and to the kept-token slots (heavy_w += sum of
// exp(heavy_logits - lse)^2).
void validate_a2_step_weights(const at::Tensor& q,         // [B, Hq, D]
                              const at::Tensor& k_window,  // [B, H, W, D] q.dtype
                              const at::Tensor& lse,       // [B, Hq] float32
                              const at::Tensor& n_quant,   // [B] int32
                              const at::Tensor& n_window,  // [B] int32
                              const std::optional<at::Tensor>& kv_start,  // [B] int32
                              double scale,
                              const at::Tensor& w_window,  // [B, H, W] float32, written
                              const std::optional<at::Tensor>& heavy_logits,  // [B, Hq, K] f32
                              const std::optional<at::Tensor>& heavy_w,  // [B, H, K] f32, written
                              int64_t query_tokens);  // as in decode_attention

}  // namespace headq
