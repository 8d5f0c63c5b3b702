// Every headq op schema, in one place (layouts and arithmetic in
// docs/LAYOUT.md). Backends only register implementations: csrc/cpu/*.cpp with
// TORCH_LIBRARY_IMPL(headq, CPU, m), csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(headq, CUDA, m).
// Fake (meta) kernels are registered from Python (headq_torch/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import headq_torch._C` loads this shared library, which runs the static registrations
// below; the module itself is empty (pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(headq, m) {
  m.def("quantize_keys(Tensor k, int bits, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dequantize_keys(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, "
      "ScalarType out_dtype) -> Tensor");
  m.def("quantize_values(Tensor v, int bits, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dequantize_values(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "side_code(Tensor k, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor basis, "
      "int key_bits, int group_size, int side_bits, bool center) -> (Tensor, Tensor)");
  m.def(
      "quantize_kv(Tensor k, Tensor v, Tensor basis, int key_bits, int group_size, "
      "int side_bits, bool center, int value_bits, int value_group_size) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dequantize_side(Tensor z_codes, Tensor z_scale, int side_bits) -> Tensor");
  m.def(
      "reconstruct_keys(Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor z_codes, "
      "Tensor z_scale, Tensor basis, int key_bits, int group_size, int side_bits, float sign, "
      "ScalarType out_dtype) -> Tensor");
  // out= forms of the three dequantising ops: the result written into `out` [B, H, T, D] (any
  // float dtype and strides, e.g. a token slice of a longer tensor)
  m.def(
      "dequantize_keys_into(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, "
      "Tensor(a!) out) -> ()");
  m.def(
      "dequantize_values_into(Tensor codes, Tensor scale, Tensor zero, int bits, "
      "int group_size, Tensor(a!) out) -> ()");
  m.def(
      "reconstruct_keys_into(Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor z_codes, "
      "Tensor z_scale, Tensor basis, int key_bits, int group_size, int side_bits, float sign, "
      "Tensor(a!) out) -> ()");
  m.def(
      "corrected_logits(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, "
      "Tensor? z_codes, Tensor? z_scale, Tensor? basis, int key_bits, int group_size, "
      "int side_bits, float sign, float scale) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, "
      "Tensor? z_codes, Tensor? z_scale, Tensor? basis, Tensor? v_codes, Tensor? v_scale, "
      "Tensor? v_zero, Tensor? v_dense, Tensor? heavy_delta, Tensor? heavy_idx, "
      "Tensor k_window, Tensor v_window, Tensor n_quant, Tensor n_window, Tensor? kv_start, "
      "int key_bits, int group_size, int side_bits, int value_bits, int value_group_size, "
      "float sign, float scale, Tensor(a!)? heavy_logits=None, int query_tokens=1) -> "
      "(Tensor, Tensor)");
  m.def(
      "a2_weights(Tensor q, Tensor k, Tensor? mask, float scale, Tensor? lse=None) -> "
      "(Tensor, Tensor)");
  m.def(
      "a2_step_weights(Tensor q, Tensor k_window, Tensor lse, Tensor n_quant, Tensor n_window, "
      "Tensor? kv_start, float scale, Tensor(a!) w_window, Tensor? heavy_logits=None, "
      "Tensor(b!)? heavy_w=None, int query_tokens=1) -> ()");
}
