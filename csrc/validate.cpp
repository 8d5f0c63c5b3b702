#include "validate.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace headq {
namespace {

// torch-style dtype names ("float16", "int32") for messages.
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kByte:
      return "uint8";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(t);
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims,
                const char* desc) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must have ", dims, " dims ", desc, ", got ",
              t.dim());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must have dtype float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", dtype_name(want),
              ", got ", dtype_name(t.scalar_type()));
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 const std::vector<int64_t>& want) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ",
              at::IntArrayRef(want), ", got ", t.sizes());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

void check_not_empty(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

void check_bits(const char* op, const char* name, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": ", name,
              " must be one of 2, 3, 4, 8, got ", bits);
}

void check_side_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": side_bits must be one of 4, 8, got ", bits);
}

void check_group(const char* op, const char* name, int64_t g) {
  TORCH_CHECK(g == 32 || g == 64 || g == 128, op, ": ", name,
              " must be one of 32, 64, 128, got ", g);
}

void check_head_dim(const char* op, int64_t D) {
  TORCH_CHECK(D > 0 && D % 8 == 0, op, ": head_dim must be a positive multiple of 8, got ", D);
}

void check_token_groups(const char* op, int64_t T, int64_t G) {
  TORCH_CHECK(T % G == 0, op, ": tokens (", T, ") must be a multiple of group_size (", G, ")");
}

// head_dim D implied by a packed code row of n_bytes bytes.
int64_t head_dim_of_codes(const char* op, const char* name, int64_t n_bytes, int64_t bits) {
  TORCH_CHECK((n_bytes * 8) % bits == 0, op, ": ", name, " last dim (", n_bytes,
              " bytes) * 8 must be a multiple of bits (", bits, ")");
  return n_bytes * 8 / bits;
}

void check_finite(const char* op, const char* name, double x) {
  TORCH_CHECK(std::isfinite(x), op, ": ", name, " must be finite, got ", x);
}

// Packed key tensors [B, H, T, D*bits/8], scale/zero [B, H, T/G, D].
void check_key_codes(const char* op, const at::Tensor& codes, const at::Tensor& scale,
                     const at::Tensor& zero, int64_t B, int64_t H, int64_t T, int64_t D,
                     int64_t bits, int64_t G) {
  check_dtype(op, "k_codes", codes, at::kByte);
  TORCH_CHECK(codes.size(3) * 8 == D * bits, op, ": k_codes last dim (", codes.size(3),
              " bytes) must hold head_dim (", D, ") codes of key_bits (", bits, "), i.e. ",
              D * bits / 8, " bytes");
  check_shape(op, "k_codes", codes, {B, H, T, D * bits / 8});
  check_dims(op, "k_scale", scale, 4, "[batch, heads, tokens/group_size, head_dim]");
  check_dtype(op, "k_scale", scale, at::kHalf);
  check_shape(op, "k_scale", scale, {B, H, T / G, D});
  check_dtype(op, "k_zero", zero, at::kHalf);
  check_shape(op, "k_zero", zero, {B, H, T / G, D});
}

// Optional side code: all of z_codes, z_scale and basis, or none. Returns true when present.
bool check_side(const char* op, const std::optional<at::Tensor>& z_codes,
                const std::optional<at::Tensor>& z_scale, const std::optional<at::Tensor>& basis,
                int64_t B, int64_t H, int64_t T, int64_t D, int64_t side_bits,
                const at::Tensor& ref) {
  const int n = int(z_codes.has_value()) + int(z_scale.has_value()) + int(basis.has_value());
  TORCH_CHECK(n == 0 || n == 3, op,
              ": z_codes, z_scale and basis must be given together (or all None), got ", n,
              " of 3");
  if (n == 0) return false;
  check_side_bits(op, side_bits);
  const at::Tensor& zc = *z_codes;
  const at::Tensor& zs = *z_scale;
  const at::Tensor& u = *basis;
  check_dims(op, "z_codes", zc, 4, "[batch, heads, tokens, r*side_bits/8]");
  check_dtype(op, "z_codes", zc, at::kByte);
  const int64_t r = zc.size(3) * 8 / side_bits;
  TORCH_CHECK(r >= 1 && r <= D, op, ": side-code rank r (", r, ") must be in [1, head_dim (",
              D, ")]");
  check_shape(op, "z_codes", zc, {B, H, T, r * side_bits / 8});
  check_dtype(op, "z_scale", zs, at::kHalf);
  check_shape(op, "z_scale", zs, {B, H, T});
  check_dims(op, "basis", u, 3, "[heads, head_dim, r]");
  check_dtype(op, "basis", u, at::kFloat);
  check_shape(op, "basis", u, {H, D, r});
  check_device(op, "z_codes", zc, "the first tensor", ref);
  check_device(op, "z_scale", zs, "the first tensor", ref);
  check_device(op, "basis", u, "the first tensor", ref);
  return true;
}

// Values of an int32 [B] length tensor: >= 0 and, when hi >= 0, <= hi (its capacity).
// basis [H, D, r] float32 with 1 <= r <= D and whole bytes of side codes per token.
void check_basis(const char* op, const at::Tensor& basis, int64_t H, int64_t D,
                 int64_t side_bits) {
  check_dims(op, "basis", basis, 3, "[heads, head_dim, r]");
  check_dtype(op, "basis", basis, at::kFloat);
  const int64_t r = basis.size(2);
  TORCH_CHECK(basis.size(0) == H && basis.size(1) == D, op, ": basis must have shape [heads (",
              H, "), head_dim (", D, "), r], got ", basis.sizes());
  TORCH_CHECK(r >= 1 && r <= D, op, ": side-code rank r (", r, ") must be in [1, head_dim (", D,
              ")]");
  TORCH_CHECK((r * side_bits) % 8 == 0, op, ": r * side_bits (", r, " * ", side_bits,
              ") must be a multiple of 8");
}

void check_lengths_cpu(const char* op, const char* name, const at::Tensor& t, int64_t hi) {
  if (!t.is_cpu()) return;  // CUDA kernels clamp instead (a check would need a sync)
  const at::Tensor c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  for (int64_t b = 0; b < c.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0, op, ": ", name, "[", b, "] must be >= 0, got ", p[b]);
    TORCH_CHECK(hi < 0 || p[b] <= hi, op, ": ", name, "[", b, "] (", p[b],
                ") must be <= its capacity (", hi, ")");
  }
}

// A decode step's lengths: n_quant, n_window and kv_start (optional) int32 [B] on q's device;
// on the CPU also 0 <= n_quant <= quant_cap (-1: any), n_window <= window_cap, kv_start >= 0.
void check_step_lengths(const char* op, const at::Tensor& q, int64_t B, const at::Tensor& n_quant,
                        int64_t quant_cap, const at::Tensor& n_window, int64_t window_cap,
                        const std::optional<at::Tensor>& kv_start) {
  check_dtype(op, "n_quant", n_quant, at::kInt);
  check_shape(op, "n_quant", n_quant, {B});
  check_dtype(op, "n_window", n_window, at::kInt);
  check_shape(op, "n_window", n_window, {B});
  check_device(op, "n_quant", n_quant, "q", q);
  check_device(op, "n_window", n_window, "q", q);
  check_lengths_cpu(op, "n_quant", n_quant, quant_cap);
  check_lengths_cpu(op, "n_window", n_window, window_cap);
  if (kv_start.has_value()) {
    check_dtype(op, "kv_start", *kv_start, at::kInt);
    check_shape(op, "kv_start", *kv_start, {B});
    check_device(op, "kv_start", *kv_start, "q", q);
    check_lengths_cpu(op, "kv_start", *kv_start, -1);
  }
}

// The checks dequantize_keys and reconstruct_keys share: packed key codes [B, H, T,
// D*bits/8] named `codes_name` with their bit width `bits_name`, the key group and the output
// dtype. Returns {B, H, T, D}.
std::array<int64_t, 4> check_packed_keys(const char* op, const char* codes_name,
                                         const at::Tensor& codes, const char* bits_name,
                                         int64_t bits, int64_t group_size,
                                         at::ScalarType out_dtype) {
  check_dims(op, codes_name, codes, 4, "[batch, heads, tokens, head_dim*bits/8]");
  check_dtype(op, codes_name, codes, at::kByte);
  check_not_empty(op, codes_name, codes);
  check_bits(op, bits_name, bits);
  check_group(op, "group_size", group_size);
  TORCH_CHECK(is_float_dtype(out_dtype), op,
              ": out_dtype must be float32, float16 or bfloat16, got ", dtype_name(out_dtype));
  const int64_t T = codes.size(2);
  const int64_t D = head_dim_of_codes(op, codes_name, codes.size(3), bits);
  check_head_dim(op, D);
  check_token_groups(op, T, group_size);
  return {codes.size(0), codes.size(1), T, D};
}

// The `out` of a *_into op, before the rest: a 4-d float tensor (its dtype is the output's).
void check_out_tensor(const char* op, const at::Tensor& out) {
  check_dims(op, "out", out, 4, "[batch, heads, tokens, head_dim]");
  check_float(op, "out", out);
}

// [first, last + 1) byte address of a tensor's elements (any strides, negative ones included).
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = (t.size(d) - 1) * t.stride(d);
    (span < 0 ? lo : hi) += span;
  }
  const auto es = static_cast<int64_t>(t.element_size());
  return {base + lo * es, base + (hi + 1) * es};
}

// ... and after: the result's shape, the inputs' device, no element written twice (an expanded
// tensor) and no memory shared with an input (the kernels read the inputs while writing out;
// checked on the address ranges, so an `out` interleaved with an input is refused too).
void check_out_against(const char* op, const at::Tensor& out, const std::array<int64_t, 4>& bhtd,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  check_shape(op, "out", out, {bhtd[0], bhtd[1], bhtd[2], bhtd[3]});
  const auto& first = *inputs.begin();
  check_device(op, "out", out, first.first, *first.second);
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have elements that share memory (an expanded or overlapping view), "
              "got strides ", out.strides());
  const auto [lo, hi] = byte_range(out);
  for (const auto& [name, t] : inputs) {
    const auto [tlo, thi] = byte_range(*t);
    TORCH_CHECK(t->numel() == 0 || out.numel() == 0 || thi <= lo || hi <= tlo, op,
                ": out must not share memory with ", name, " (their address ranges overlap)");
  }
}

// The *_into form of an op on (codes, scale, zero): `out` checked around the op's own checks
// (`check`, which gives the result's [B, H, T, D] for out's dtype).
using CodesCheck = std::array<int64_t, 4> (*)(const char*, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, int64_t, int64_t,
                                              at::ScalarType);
void validate_codes_into(const char* op, CodesCheck check, const at::Tensor& codes,
                         const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group_size, const at::Tensor& out) {
  check_out_tensor(op, out);
  const auto shape = check(op, codes, scale, zero, bits, group_size, out.scalar_type());
  check_out_against(op, out, shape, {{"codes", &codes}, {"scale", &scale}, {"zero", &zero}});
}

}  // namespace

void validate_quantize_keys(const at::Tensor& k, int64_t bits, int64_t group_size) {
  const char* op = "quantize_keys";
  check_dims(op, "k", k, 4, "[batch, heads, tokens, head_dim]");
  check_float(op, "k", k);
  check_not_empty(op, "k", k);
  check_bits(op, "bits", bits);
  check_group(op, "group_size", group_size);
  check_head_dim(op, k.size(3));
  check_token_groups(op, k.size(2), group_size);
}

namespace {
std::array<int64_t, 4> check_dequantize_keys(const char* op, const at::Tensor& codes,
                                             const at::Tensor& scale, const at::Tensor& zero,
                                             int64_t bits, int64_t group_size,
                                             at::ScalarType out_dtype) {
  const auto [B, H, T, D] = check_packed_keys(op, "codes", codes, "bits", bits, group_size,
                                              out_dtype);
  check_dims(op, "scale", scale, 4, "[batch, heads, tokens/group_size, head_dim]");
  check_dtype(op, "scale", scale, at::kHalf);
  check_shape(op, "scale", scale, {B, H, T / group_size, D});
  check_dtype(op, "zero", zero, at::kHalf);
  check_shape(op, "zero", zero, {B, H, T / group_size, D});
  check_device(op, "scale", scale, "codes", codes);
  check_device(op, "zero", zero, "codes", codes);
  return {B, H, T, D};
}
}  // namespace

std::array<int64_t, 4> validate_dequantize_keys(const at::Tensor& codes, const at::Tensor& scale,
                                                const at::Tensor& zero, int64_t bits,
                                                int64_t group_size, at::ScalarType out_dtype) {
  return check_dequantize_keys("dequantize_keys", codes, scale, zero, bits, group_size, out_dtype);
}

void validate_dequantize_keys_into(const at::Tensor& codes, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t bits, int64_t group_size,
                                   const at::Tensor& out) {
  validate_codes_into("dequantize_keys_into", check_dequantize_keys, codes, scale, zero, bits,
                      group_size, out);
}

void validate_quantize_values(const at::Tensor& v, int64_t bits, int64_t group_size) {
  const char* op = "quantize_values";
  check_dims(op, "v", v, 4, "[batch, heads, tokens, head_dim]");
  check_float(op, "v", v);
  check_not_empty(op, "v", v);
  check_bits(op, "bits", bits);
  check_group(op, "group_size", group_size);
  check_head_dim(op, v.size(3));
  TORCH_CHECK(v.size(3) % group_size == 0, op, ": head_dim (", v.size(3),
              ") must be a multiple of group_size (", group_size, ")");
}

namespace {
std::array<int64_t, 4> check_dequantize_values(const char* op, const at::Tensor& codes,
                                               const at::Tensor& scale, const at::Tensor& zero,
                                               int64_t bits, int64_t group_size,
                                               at::ScalarType out_dtype) {
  check_dims(op, "codes", codes, 4, "[batch, heads, tokens, head_dim*bits/8]");
  check_dtype(op, "codes", codes, at::kByte);
  check_not_empty(op, "codes", codes);
  check_bits(op, "bits", bits);
  check_group(op, "group_size", group_size);
  TORCH_CHECK(is_float_dtype(out_dtype), op,
              ": out_dtype must be float32, float16 or bfloat16, got ", dtype_name(out_dtype));
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2);
  const int64_t D = head_dim_of_codes(op, "codes", codes.size(3), bits);
  check_head_dim(op, D);
  TORCH_CHECK(D % group_size == 0, op, ": head_dim (", D,
              ") must be a multiple of group_size (", group_size, ")");
  check_dims(op, "scale", scale, 4, "[batch, heads, tokens, head_dim/group_size]");
  check_dtype(op, "scale", scale, at::kHalf);
  check_shape(op, "scale", scale, {B, H, T, D / group_size});
  check_dtype(op, "zero", zero, at::kHalf);
  check_shape(op, "zero", zero, {B, H, T, D / group_size});
  check_device(op, "scale", scale, "codes", codes);
  check_device(op, "zero", zero, "codes", codes);
  return {B, H, T, D};
}
}  // namespace

std::array<int64_t, 4> validate_dequantize_values(const at::Tensor& codes,
                                                  const at::Tensor& scale, const at::Tensor& zero,
                                                  int64_t bits, int64_t group_size,
                                                  at::ScalarType out_dtype) {
  return check_dequantize_values("dequantize_values", codes, scale, zero, bits, group_size, out_dtype);
}

void validate_dequantize_values_into(const at::Tensor& codes, const at::Tensor& scale,
                                     const at::Tensor& zero, int64_t bits, int64_t group_size,
                                     const at::Tensor& out) {
  validate_codes_into("dequantize_values_into", check_dequantize_values, codes, scale, zero,
                      bits, group_size, out);
}

void validate_side_code(const at::Tensor& k, const at::Tensor& k_codes, const at::Tensor& k_scale,
                        const at::Tensor& k_zero, const at::Tensor& basis, int64_t key_bits,
                        int64_t group_size, int64_t side_bits, bool center) {
  (void)center;
  const char* op = "side_code";
  check_dims(op, "k", k, 4, "[batch, heads, tokens, head_dim]");
  check_float(op, "k", k);
  check_not_empty(op, "k", k);
  check_bits(op, "key_bits", key_bits);
  check_group(op, "group_size", group_size);
  check_side_bits(op, side_bits);
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  check_head_dim(op, D);
  check_token_groups(op, T, group_size);
  check_dims(op, "k_codes", k_codes, 4, "[batch, heads, tokens, head_dim*key_bits/8]");
  check_key_codes(op, k_codes, k_scale, k_zero, B, H, T, D, key_bits, group_size);
  check_basis(op, basis, H, D, side_bits);
  check_device(op, "k_codes", k_codes, "k", k);
  check_device(op, "k_scale", k_scale, "k", k);
  check_device(op, "k_zero", k_zero, "k", k);
  check_device(op, "basis", basis, "k", k);
}

void validate_quantize_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& basis,
                          int64_t key_bits, int64_t group_size, int64_t side_bits, bool center,
                          int64_t value_bits, int64_t value_group_size) {
  (void)center;
  const char* op = "quantize_kv";
  check_dims(op, "k", k, 4, "[batch, heads, tokens, head_dim]");
  check_float(op, "k", k);
  check_not_empty(op, "k", k);
  check_dims(op, "v", v, 4, "[batch, heads, tokens, head_dim]");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, ": v must have the dtype of k (",
              k.scalar_type(), "), got ", v.scalar_type());
  check_device(op, "v", v, "k", k);
  check_bits(op, "key_bits", key_bits);
  check_group(op, "group_size", group_size);
  check_side_bits(op, side_bits);
  check_bits(op, "value_bits", value_bits);
  check_group(op, "value_group_size", value_group_size);
  const int64_t H = k.size(1), T = k.size(2), D = k.size(3);
  check_head_dim(op, D);
  check_token_groups(op, T, group_size);
  TORCH_CHECK(D % value_group_size == 0, op, ": head_dim (", D,
              ") must be a multiple of value_group_size (", value_group_size, ")");
  check_basis(op, basis, H, D, side_bits);
  check_device(op, "basis", basis, "k", k);
}

void validate_dequantize_side(const at::Tensor& z_codes, const at::Tensor& z_scale,
                              int64_t side_bits) {
  const char* op = "dequantize_side";
  check_dims(op, "z_codes", z_codes, 4, "[batch, heads, tokens, r*side_bits/8]");
  check_dtype(op, "z_codes", z_codes, at::kByte);
  check_not_empty(op, "z_codes", z_codes);
  check_side_bits(op, side_bits);
  check_dims(op, "z_scale", z_scale, 3, "[batch, heads, tokens]");
  check_dtype(op, "z_scale", z_scale, at::kHalf);
  check_shape(op, "z_scale", z_scale, {z_codes.size(0), z_codes.size(1), z_codes.size(2)});
  check_device(op, "z_scale", z_scale, "z_codes", z_codes);
}

namespace {

// The checks corrected_logits and decode_attention share: the query (q_dims dimensions, head dim
// last), the key codes with their scales/zeros, the side code, sign and scale.
struct QueryKeyShape {
  int64_t B, Hq, D, H, T;
};

QueryKeyShape check_query_keys(const char* op, const at::Tensor& q, int64_t q_dims,
                               const char* q_layout, const at::Tensor& k_codes,
                               const at::Tensor& k_scale, const at::Tensor& k_zero,
                               const std::optional<at::Tensor>& z_codes,
                               const std::optional<at::Tensor>& z_scale,
                               const std::optional<at::Tensor>& basis, int64_t key_bits,
                               int64_t group_size, int64_t side_bits, double sign, double scale) {
  check_dims(op, "q", q, q_dims, q_layout);
  check_float(op, "q", q);
  check_not_empty(op, "q", q);
  check_bits(op, "key_bits", key_bits);
  check_group(op, "group_size", group_size);
  check_finite(op, "sign", sign);
  check_finite(op, "scale", scale);
  QueryKeyShape s{};
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.D = q.size(q_dims - 1);
  check_head_dim(op, s.D);
  check_dims(op, "k_codes", k_codes, 4, "[batch, heads, tokens, head_dim*key_bits/8]");
  s.H = k_codes.size(1);
  s.T = k_codes.size(2);
  TORCH_CHECK(s.H >= 1 && s.Hq % s.H == 0, op, ": query heads (", s.Hq,
              ") must be a multiple of KV heads (", s.H, ")");
  check_token_groups(op, s.T, group_size);
  check_key_codes(op, k_codes, k_scale, k_zero, s.B, s.H, s.T, s.D, key_bits, group_size);
  check_device(op, "k_codes", k_codes, "q", q);
  check_device(op, "k_scale", k_scale, "q", q);
  check_device(op, "k_zero", k_zero, "q", q);
  check_side(op, z_codes, z_scale, basis, s.B, s.H, s.T, s.D, side_bits, q);
  return s;
}

}  // namespace

namespace {
std::array<int64_t, 4> check_reconstruct_keys(const char* op, const at::Tensor& k_codes,
                                              const at::Tensor& k_scale,
                                              const at::Tensor& k_zero, const at::Tensor& z_codes,
                                              const at::Tensor& z_scale, const at::Tensor& basis,
                                              int64_t key_bits, int64_t group_size,
                                              int64_t side_bits, double sign,
                                              at::ScalarType out_dtype) {
  const auto [B, H, T, D] = check_packed_keys(op, "k_codes", k_codes, "key_bits", key_bits,
                                              group_size, out_dtype);
  check_finite(op, "sign", sign);
  check_key_codes(op, k_codes, k_scale, k_zero, B, H, T, D, key_bits, group_size);
  check_device(op, "k_scale", k_scale, "k_codes", k_codes);
  check_device(op, "k_zero", k_zero, "k_codes", k_codes);
  check_side(op, z_codes, z_scale, basis, B, H, T, D, side_bits, k_codes);
  return {B, H, T, D};
}
}  // namespace

std::array<int64_t, 4> validate_reconstruct_keys(const at::Tensor& k_codes,
                                                 const at::Tensor& k_scale,
                                                 const at::Tensor& k_zero,
                                                 const at::Tensor& z_codes,
                                                 const at::Tensor& z_scale,
                                                 const at::Tensor& basis, int64_t key_bits,
                                                 int64_t group_size, int64_t side_bits,
                                                 double sign, at::ScalarType out_dtype) {
  return check_reconstruct_keys("reconstruct_keys", k_codes, k_scale, k_zero, z_codes, z_scale, basis,
                         key_bits, group_size, side_bits, sign, out_dtype);
}

void validate_reconstruct_keys_into(const at::Tensor& k_codes, const at::Tensor& k_scale,
                                    const at::Tensor& k_zero, const at::Tensor& z_codes,
                                    const at::Tensor& z_scale, const at::Tensor& basis,
                                    int64_t key_bits, int64_t group_size, int64_t side_bits,
                                    double sign, const at::Tensor& out) {
  const char* op = "reconstruct_keys_into";
  check_out_tensor(op, out);
  const auto shape = check_reconstruct_keys(op, k_codes, k_scale, k_zero, z_codes, z_scale, basis,
                                            key_bits, group_size, side_bits, sign,
                                            out.scalar_type());
  check_out_against(op, out, shape,
                    {{"k_codes", &k_codes}, {"k_scale", &k_scale}, {"k_zero", &k_zero},
                     {"z_codes", &z_codes}, {"z_scale", &z_scale}, {"basis", &basis}});
}

void validate_corrected_logits(const at::Tensor& q, const at::Tensor& k_codes,
                               const at::Tensor& k_scale, const at::Tensor& k_zero,
                               const std::optional<at::Tensor>& z_codes,
                               const std::optional<at::Tensor>& z_scale,
                               const std::optional<at::Tensor>& basis, int64_t key_bits,
                               int64_t group_size, int64_t side_bits, double sign,
                               double scale) {
  check_query_keys("corrected_logits", q, 4, "[batch, query_heads, query_len, head_dim]",
                   k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits, group_size,
                   side_bits, sign, scale);
}

void check_query_tokens(const char* op, int64_t query_tokens, int64_t query_heads) {
  TORCH_CHECK(query_tokens >= 1, op, ": query_tokens must be >= 1, got ", query_tokens);
  TORCH_CHECK(query_heads % query_tokens == 0, op, ": query_heads (", query_heads,
              ") must be a multiple of query_tokens (", query_tokens, ")");
}

void validate_decode_attention(
    const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
    const at::Tensor& k_zero, const std::optional<at::Tensor>& z_codes,
    const std::optional<at::Tensor>& z_scale, const std::optional<at::Tensor>& basis,
    const std::optional<at::Tensor>& v_codes, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& v_zero, const std::optional<at::Tensor>& v_dense,
    const std::optional<at::Tensor>& heavy_delta, const std::optional<at::Tensor>& heavy_idx,
    const at::Tensor& k_window, const at::Tensor& v_window, const at::Tensor& n_quant,
    const at::Tensor& n_window, const std::optional<at::Tensor>& kv_start, int64_t key_bits,
    int64_t group_size, int64_t side_bits, int64_t value_bits, int64_t value_group_size,
    double sign, double scale,
    const std::optional<at::Tensor>& heavy_logits, int64_t query_tokens) {
  const char* op = "decode_attention";
  const QueryKeyShape qk =
      check_query_keys(op, q, 3, "[batch, query_heads, head_dim]", k_codes, k_scale, k_zero,
                       z_codes, z_scale, basis, key_bits, group_size, side_bits, sign, scale);
  const int64_t B = qk.B, D = qk.D, H = qk.H, Tq = qk.T;
  check_query_tokens(op, query_tokens, q.size(1));

  TORCH_CHECK(v_codes.has_value() != v_dense.has_value(), op,
              ": exactly one of v_codes and v_dense must be given, got ",
              v_codes.has_value() ? "both" : "neither");
  TORCH_CHECK(v_scale.has_value() == v_codes.has_value() &&
                  v_zero.has_value() == v_codes.has_value(),
              op, ": v_scale and v_zero must be given exactly when v_codes is");
  if (v_codes.has_value()) {
    check_bits(op, "value_bits", value_bits);
    check_group(op, "value_group_size", value_group_size);
    TORCH_CHECK(D % value_group_size == 0, op, ": head_dim (", D,
                ") must be a multiple of value_group_size (", value_group_size, ")");
    check_dims(op, "v_codes", *v_codes, 4, "[batch, heads, tokens, head_dim*value_bits/8]");
    check_dtype(op, "v_codes", *v_codes, at::kByte);
    check_shape(op, "v_codes", *v_codes, {B, H, Tq, D * value_bits / 8});
    check_dtype(op, "v_scale", *v_scale, at::kHalf);
    check_shape(op, "v_scale", *v_scale, {B, H, Tq, D / value_group_size});
    check_dtype(op, "v_zero", *v_zero, at::kHalf);
    check_shape(op, "v_zero", *v_zero, {B, H, Tq, D / value_group_size});
    check_device(op, "v_codes", *v_codes, "q", q);
    check_device(op, "v_scale", *v_scale, "q", q);
    check_device(op, "v_zero", *v_zero, "q", q);
  } else {
    check_dtype(op, "v_dense", *v_dense, q.scalar_type());
    check_shape(op, "v_dense", *v_dense, {B, H, Tq, D});
    check_device(op, "v_dense", *v_dense, "q", q);
  }

  TORCH_CHECK(heavy_delta.has_value() == heavy_idx.has_value(), op,
              ": heavy_delta and heavy_idx must be given together (or both None)");
  if (heavy_delta.has_value()) {
    check_dims(op, "heavy_idx", *heavy_idx, 3, "[batch, heads, slots]");
    check_dtype(op, "heavy_idx", *heavy_idx, at::kInt);
    const int64_t K = heavy_idx->size(2);
    check_shape(op, "heavy_idx", *heavy_idx, {B, H, K});
    check_dtype(op, "heavy_delta", *heavy_delta, q.scalar_type());
    check_shape(op, "heavy_delta", *heavy_delta, {B, H, K, D});
    check_device(op, "heavy_idx", *heavy_idx, "q", q);
    check_device(op, "heavy_delta", *heavy_delta, "q", q);
  }

  check_dims(op, "k_window", k_window, 4, "[batch, heads, window, head_dim]");
  check_dtype(op, "k_window", k_window, q.scalar_type());
  const int64_t W = k_window.size(2);
  check_shape(op, "k_window", k_window, {B, H, W, D});
  check_dtype(op, "v_window", v_window, q.scalar_type());
  check_shape(op, "v_window", v_window, {B, H, W, D});
  check_device(op, "k_window", k_window, "q", q);
  check_device(op, "v_window", v_window, "q", q);

  check_step_lengths(op, q, B, n_quant, Tq, n_window, W, kv_start);
  if (heavy_logits.has_value()) {
    TORCH_CHECK(heavy_idx.has_value(), op,
                ": heavy_logits (the kept tokens' logits, an output) needs heavy_idx");
    check_dtype(op, "heavy_logits", *heavy_logits, at::kFloat);
    check_shape(op, "heavy_logits", *heavy_logits, {B, q.size(1), heavy_idx->size(2)});
    check_device(op, "heavy_logits", *heavy_logits, "q", q);
    TORCH_CHECK(heavy_logits->is_contiguous(), op, ": heavy_logits must be contiguous");
  }
}

void validate_a2_weights(const at::Tensor& q, const at::Tensor& k,
                         const std::optional<at::Tensor>& mask, double scale,
                         const std::optional<at::Tensor>& lse) {
  const char* op = "a2_weights";
  check_dims(op, "q", q, 4, "[batch, query_heads, query_len, head_dim]");
  check_float(op, "q", q);
  check_dims(op, "k", k, 4, "[batch, heads, tokens, head_dim]");
  check_dtype(op, "k", k, q.scalar_type());
  check_device(op, "k", k, "q", q);
  check_finite(op, "scale", scale);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t H = k.size(1), T = k.size(2);
  TORCH_CHECK(k.size(0) == B, op, ": k batch (", k.size(0), ") must equal q batch (", B, ")");
  TORCH_CHECK(k.size(3) == D, op, ": k head_dim (", k.size(3), ") must equal q head_dim (", D,
              ")");
  TORCH_CHECK(D > 0, op, ": head_dim must be positive, got ", D);
  TORCH_CHECK(H > 0 && Hq % H == 0, op, ": query_heads (", Hq,
              ") must be a positive multiple of k heads (", H, ")");
  TORCH_CHECK(L <= T, op, ": query_len (", L, ") must be at most the tokens of k (", T,
              "): the queries are the last query_len of the tokens");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_dims(op, "mask", m, 3, "[batch or 1, query_len, tokens]");
    check_dtype(op, "mask", m, at::kBool);
    check_device(op, "mask", m, "q", q);
    TORCH_CHECK((m.size(0) == B || m.size(0) == 1) && m.size(1) == L && m.size(2) == T, op,
                ": mask must have shape [", B, " or 1, ", L, ", ", T, "], got ", m.sizes());
  }
  if (lse.has_value()) {
    check_dtype(op, "lse", *lse, at::kFloat);
    check_shape(op, "lse", *lse, {B, Hq, L});
    check_device(op, "lse", *lse, "q", q);
  }
}

void validate_a2_step_weights(const at::Tensor& q, const at::Tensor& k_window,
                              const at::Tensor& lse, const at::Tensor& n_quant,
                              const at::Tensor& n_window,
                              const std::optional<at::Tensor>& kv_start, double scale,
                              const at::Tensor& w_window,
                              const std::optional<at::Tensor>& heavy_logits,
                              const std::optional<at::Tensor>& heavy_w, int64_t query_tokens) {
  const char* op = "a2_step_weights";
  check_dims(op, "q", q, 3, "[batch, query_heads, head_dim]");
  check_float(op, "q", q);
  check_dims(op, "k_window", k_window, 4, "[batch, heads, window, head_dim]");
  check_dtype(op, "k_window", k_window, q.scalar_type());
  check_device(op, "k_window", k_window, "q", q);
  check_finite(op, "scale", scale);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t H = k_window.size(1), W = k_window.size(2);
  TORCH_CHECK(H > 0 && Hq % H == 0, op, ": query_heads (", Hq,
              ") must be a positive multiple of k_window heads (", H, ")");
  check_query_tokens(op, query_tokens, Hq);
  check_shape(op, "k_window", k_window, {B, H, W, D});
  check_dtype(op, "lse", lse, at::kFloat);
  check_shape(op, "lse", lse, {B, Hq});
  check_device(op, "lse", lse, "q", q);
  check_step_lengths(op, q, B, n_quant, -1, n_window, W, kv_start);
  check_dtype(op, "w_window", w_window, at::kFloat);
  check_shape(op, "w_window", w_window, {B, H, W});
  check_device(op, "w_window", w_window, "q", q);
  TORCH_CHECK(w_window.is_contiguous(), op, ": w_window (written in place) must be contiguous");
  TORCH_CHECK(heavy_logits.has_value() == heavy_w.has_value(), op,
              ": heavy_logits and heavy_w must be given together");
  if (heavy_logits.has_value()) {
    const int64_t K = heavy_logits->dim() == 3 ? heavy_logits->size(2) : -1;
    check_dims(op, "heavy_logits", *heavy_logits, 3, "[batch, query_heads, slots]");
    check_dtype(op, "heavy_logits", *heavy_logits, at::kFloat);
    check_shape(op, "heavy_logits", *heavy_logits, {B, Hq, K});
    check_device(op, "heavy_logits", *heavy_logits, "q", q);
    check_dtype(op, "heavy_w", *heavy_w, at::kFloat);
    check_shape(op, "heavy_w", *heavy_w, {B, H, K});
    check_device(op, "heavy_w", *heavy_w, "q", q);
    TORCH_CHECK(heavy_w->is_contiguous(), op, ": heavy_w (written in place) must be contiguous");
  }
}

}  // namespace headq

