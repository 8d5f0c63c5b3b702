"""Bad input at every public entry point: the rows of docs/BAD_INPUT.md that tests/test_ops.py,
tests/test_cache.py and tests/test_calibration.py do not already check.

Each case names the exception type and a fragment of its message; non-finite inputs follow the
documented policy (not rejected, confined to their own quantiser set); non-contiguous inputs
are accepted and give exactly the contiguous result.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import headq_torch
from conftest import make_tiny
from headq_torch import attention, ops
from headq_torch.cache import HeadQCache
from headq_torch.calibration import Calibration, CalibrationError, calibrate
from headq_torch.config import config_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated")

CUDA = torch.cuda.is_available()


def _basis(H=2, D=64, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(H, D, r, generator=g, dtype=torch.float64))[0].float()


def _keys(shape=(1, 2, 64, 64), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


K = _keys()
KC = ops.quantize_keys(K, 2, 32)
VC = ops.quantize_values(K, 2, 32)
U = _basis()
ZC = ops.side_code(K, *KC, U, 2, 32, 8, False)
Q = _keys((1, 4, 3, 64), seed=1)


def _decode_args():
    from test_ops import _decode_case

    return list(_decode_case("cpu", torch.float32, heavy=3, kv_start=True))


DEC = {n: i for i, n in enumerate(
    ["q", "k_codes", "k_scale", "k_zero", "z_codes", "z_scale", "basis", "v_codes", "v_scale",
     "v_zero", "v_dense", "heavy_delta", "heavy_idx", "k_window", "v_window", "n_quant",
     "n_window", "kv_start", "key_bits", "group_size", "side_bits", "value_bits",
     "value_group_size", "sign", "scale"])}


def _decode(**changes):
    args = _decode_args()
    for name, value in changes.items():
        args[DEC[name]] = value(args[DEC[name]]) if callable(value) else value
    return ops.decode_attention(*args)


def _cut(t, n, dim=2):
    return t.narrow(dim, 0, n)


# ----------------------------------------------------------------------------- ops: errors

OP_ERRORS = {
    # empty tensors (T = 0 for quantize_keys is in test_ops)
    "quantize_keys/empty_batch": (lambda: ops.quantize_keys(_keys((0, 2, 64, 64)), 2, 32),
                                  "k must not be empty"),
    "quantize_keys/empty_head_dim": (lambda: ops.quantize_keys(_keys((1, 2, 64, 0)), 2, 32),
                                     "k must not be empty"),
    "quantize_values/empty_tokens": (lambda: ops.quantize_values(_keys((1, 2, 0, 64)), 2, 32),
                                     "v must not be empty"),
    "dequantize_keys/empty": (lambda: ops.dequantize_keys(*(_cut(t, 0) for t in KC), 2, 32),
                              "codes must not be empty"),
    "dequantize_values/empty": (lambda: ops.dequantize_values(*(_cut(t, 0) for t in VC), 2, 32),
                                "codes must not be empty"),
    "side_code/empty": (lambda: ops.side_code(_cut(K, 0), *(_cut(t, 0) for t in KC), U, 2, 32,
                                              8, False), "k must not be empty"),
    "dequantize_side/empty": (lambda: ops.dequantize_side(*(_cut(t, 0) for t in ZC), 8),
                              "z_codes must not be empty"),
    "reconstruct_keys/empty": (lambda: ops.reconstruct_keys(
        *(_cut(t, 0) for t in (*KC, *ZC)), U, 2, 32), "k_codes must not be empty"),
    "corrected_logits/empty_query": (lambda: ops.corrected_logits(
        _cut(Q, 0), *KC, *ZC, U, 2, 32, 8, 1.0, 1.0), "q must not be empty"),
    "corrected_logits/empty_batch": (lambda: ops.corrected_logits(
        _cut(Q, 0, 0), *(_cut(t, 0, 0) for t in (*KC, *ZC)), U, 2, 32, 8, 1.0, 1.0),
        "q must not be empty"),
    "decode_attention/empty_batch": (lambda: ops.decode_attention(*[
        _cut(a, 0, 0) if isinstance(a, torch.Tensor) and i != DEC["basis"] else a
        for i, a in enumerate(_decode_args())]), "q must not be empty"),
    # rank
    "quantize_values/rank": (lambda: ops.quantize_values(_keys((2, 3, 64)), 2, 32), "4 dims"),
    "dequantize_keys/rank": (lambda: ops.dequantize_keys(*(t[0] for t in KC), 2, 32), "4 dims"),
    "dequantize_values/rank": (lambda: ops.dequantize_values(*(t[0] for t in VC), 2, 32),
                               "4 dims"),
    "dequantize_side/rank": (lambda: ops.dequantize_side(*(t[0] for t in ZC), 8), "4 dims"),
    "side_code/basis_rank": (lambda: ops.side_code(K, *KC, U[0], 2, 32, 8, False), "3 dims"),
    "corrected_logits/rank": (lambda: ops.corrected_logits(Q[0], *KC, *ZC, U, 2, 32, 8, 1.0,
                                                           1.0), "4 dims"),
    "decode_attention/rank": (lambda: _decode(q=lambda q: q.unsqueeze(2)), "3 dims"),
    # dtype
    "quantize_values/float64": (lambda: ops.quantize_values(K.double(), 2, 32), "dtype"),
    "quantize_values/int": (lambda: ops.quantize_values(K.int(), 2, 32), "dtype"),
    "dequantize_keys/scale_float32": (lambda: ops.dequantize_keys(KC[0], KC[1].float(), KC[2],
                                                                  2, 32), "scale must have dtype"),
    "dequantize_keys/out_int": (lambda: ops.dequantize_keys(*KC, 2, 32, torch.int32),
                                "out_dtype"),
    "dequantize_keys/out_float64": (lambda: ops.dequantize_keys(*KC, 2, 32, torch.float64),
                                    "out_dtype"),
    "dequantize_values/codes_int": (lambda: ops.dequantize_values(VC[0].int(), *VC[1:], 2, 32),
                                    "codes must have dtype uint8"),
    "dequantize_side/scale_float32": (lambda: ops.dequantize_side(ZC[0], ZC[1].float(), 8),
                                      "z_scale must have dtype float16"),
    "side_code/k_float64": (lambda: ops.side_code(K.double(), *KC, U, 2, 32, 8, False),
                            "k must have dtype"),
    "side_code/basis_float16": (lambda: ops.side_code(K, *KC, U.half(), 2, 32, 8, False),
                                "basis must have dtype float32"),
    "corrected_logits/q_float64": (lambda: ops.corrected_logits(Q.double(), *KC, *ZC, U, 2, 32,
                                                                8, 1.0, 1.0), "q must have dtype"),
    "decode_attention/q_float64": (lambda: _decode(q=lambda q: q.double()), "q must have dtype"),
    "decode_attention/kv_start_int64": (lambda: _decode(kv_start=lambda t: t.long()),
                                        "kv_start must have dtype int32"),
    "decode_attention/heavy_idx_int64": (lambda: _decode(heavy_idx=lambda t: t.long()),
                                         "heavy_idx must have dtype int32"),
    "decode_attention/heavy_delta_dtype": (lambda: _decode(heavy_delta=lambda t: t.half()),
                                           "heavy_delta must have dtype"),
    # shapes
    "dequantize_keys/batch_mismatch": (lambda: ops.dequantize_keys(
        KC[0], KC[1].expand(2, -1, -1, -1), KC[2].expand(2, -1, -1, -1), 2, 32), "scale"),
    "dequantize_keys/tokens_not_multiple": (lambda: ops.dequantize_keys(
        _cut(KC[0], 40), KC[1], KC[2], 2, 32), "multiple of group_size"),
    "dequantize_values/tokens_mismatch": (lambda: ops.dequantize_values(
        _cut(VC[0], 10), VC[1], VC[2], 2, 32), "scale must have shape"),
    "dequantize_side/tokens_mismatch": (lambda: ops.dequantize_side(ZC[0], _cut(ZC[1], 5), 8),
                                        "z_scale must have shape"),
    "side_code/tokens_mismatch": (lambda: ops.side_code(_cut(K, 32), *KC, U, 2, 32, 8, False),
                                  "k_codes must have shape"),
    "corrected_logits/head_dim_mismatch": (lambda: ops.corrected_logits(
        _keys((1, 4, 3, 32)), *KC, *ZC, U, 2, 32, 8, 1.0, 1.0), "head_dim"),
    "corrected_logits/batch_mismatch": (lambda: ops.corrected_logits(
        _keys((2, 4, 3, 64)), *KC, *ZC, U, 2, 32, 8, 1.0, 1.0), "k_codes must have shape"),
    "decode_attention/query_heads": (lambda: _decode(q=_keys((3, 3, 64))), "multiple of KV"),
    "decode_attention/capacity_not_multiple": (lambda: _decode(k_codes=lambda t: _cut(t, 100)),
                                               "multiple of group_size"),
    "decode_attention/v_codes_tokens": (lambda: _decode(v_codes=lambda t: _cut(t, 64)),
                                        "v_codes must have shape"),
    "decode_attention/window_mismatch": (lambda: _decode(v_window=lambda t: _cut(t, 3)),
                                         "v_window must have shape"),
    "decode_attention/heavy_slots": (lambda: _decode(heavy_delta=lambda t: _cut(t, 2)),
                                     "heavy_delta must have shape"),
    "decode_attention/kv_start_len": (lambda: _decode(kv_start=lambda t: t[:2]),
                                      "kv_start must have shape"),
    "reconstruct_keys/rank": (lambda: ops.reconstruct_keys(*(t[0] for t in KC), *ZC, U, 2, 32),
                              "4 dims"),
    "reconstruct_keys/out_int": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 2, 32,
                                                              out_dtype=torch.int32), "out_dtype"),
    "reconstruct_keys/basis_float16": (lambda: ops.reconstruct_keys(*KC, *ZC, U.half(), 2, 32),
                                       "basis must have dtype float32"),
    "reconstruct_keys/z_tokens": (lambda: ops.reconstruct_keys(*KC, _cut(ZC[0], 32), ZC[1], U, 2,
                                                               32), "z_codes must have shape"),
    "reconstruct_keys/side_bits_mismatch": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 2, 32, 4),
                                            "basis must have shape"),
    "reconstruct_keys/side_bits": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 2, 32, 6),
                                   "side_bits"),
    "reconstruct_keys/key_bits_mismatch": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 4, 32),
                                           "k_scale must have shape"),
    "reconstruct_keys/group_mismatch": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 2, 64),
                                        "k_scale must have shape"),
    "reconstruct_keys/sign_nan": (lambda: ops.reconstruct_keys(*KC, *ZC, U, 2, 32, 8,
                                                               float("nan")), "sign must be finite"),
    "reconstruct_keys/mixed_meta": (lambda: ops.reconstruct_keys(*KC, *ZC, U.to("meta"), 2, 32),
                                    "same device"),
    # unsupported bits / group / rank, and arguments that do not match the tensors
    "dequantize_keys/bits_mismatch": (lambda: ops.dequantize_keys(*KC, 4, 32), "scale"),
    "dequantize_keys/group_mismatch": (lambda: ops.dequantize_keys(*KC, 2, 64), "scale"),
    "dequantize_values/group_mismatch": (lambda: ops.dequantize_values(*VC, 2, 64), "scale"),
    "dequantize_side/bits": (lambda: ops.dequantize_side(*ZC, 6), "side_bits"),
    "side_code/rank_zero": (lambda: ops.side_code(K, *KC, U[..., :0], 2, 32, 8, False), "rank"),
    "side_code/rank_above_head_dim": (lambda: ops.side_code(K, *KC, torch.randn(2, 64, 72), 2,
                                                            32, 8, False), "rank"),
    "side_code/key_bits_mismatch": (lambda: ops.side_code(K, *KC, U, 4, 32, 8, False),
                                    "key_bits"),
    "side_code/group_mismatch": (lambda: ops.side_code(K, *KC, U, 2, 64, 8, False),
                                 "k_scale must have shape"),
    "quantize_kv/v_shape": (lambda: ops.quantize_kv(K, _cut(K, 32), U, 2, 32, 8, False, 2, 32),
                            "v must have the shape of k"),
    "quantize_kv/v_dtype": (lambda: ops.quantize_kv(K, K.half(), U, 2, 32, 8, False, 2, 32),
                            "v must have the dtype of k"),
    "quantize_kv/basis_shape": (lambda: ops.quantize_kv(K, K, U[:1], 2, 32, 8, False, 2, 32),
                                "basis must have shape"),
    "quantize_kv/value_bits": (lambda: ops.quantize_kv(K, K, U, 2, 32, 8, False, 5, 32),
                               "value_bits"),
    "quantize_kv/value_group": (lambda: ops.quantize_kv(K, K, U, 2, 32, 8, False, 2, 48),
                                "value_group_size"),
    "quantize_kv/side_bits": (lambda: ops.quantize_kv(K, K, U, 2, 32, 6, False, 2, 32),
                              "side_bits"),
    "quantize_kv/tokens": (lambda: ops.quantize_kv(_cut(K, 48), _cut(K, 48), U, 2, 32, 8, False,
                                                   2, 32), "multiple of group_size"),
    "quantize_kv/mixed_meta": (lambda: ops.quantize_kv(K, K.to("meta"), U, 2, 32, 8, False, 2,
                                                       32), "same device"),
    "corrected_logits/side_bits_mismatch": (lambda: ops.corrected_logits(
        Q, *KC, *ZC, U, 2, 32, 4, 1.0, 1.0), "basis must have shape"),
    "corrected_logits/basis_rank_mismatch": (lambda: ops.corrected_logits(
        Q, *KC, *ZC, U[..., :4].contiguous(), 2, 32, 8, 1.0, 1.0), "basis must have shape"),
    "corrected_logits/key_bits_mismatch": (lambda: ops.corrected_logits(
        Q, *KC, *ZC, U, 4, 32, 8, 1.0, 1.0), "key_bits"),
    "corrected_logits/side_without_basis": (lambda: ops.corrected_logits(
        Q, *KC, *ZC, None, 2, 32, 8, 1.0, 1.0), "together"),
    "corrected_logits/basis_only": (lambda: ops.corrected_logits(
        Q, *KC, None, None, U, 2, 32, 8, 1.0, 1.0), "together"),
    "decode_attention/key_bits_mismatch": (lambda: _decode(key_bits=4), "key_bits"),
    "decode_attention/value_bits_mismatch": (lambda: _decode(value_bits=4),
                                             "v_codes must have shape"),
    "decode_attention/value_group_mismatch": (lambda: _decode(value_group_size=64),
                                              "v_scale must have shape"),
    "decode_attention/no_values": (lambda: _decode(v_codes=None), "exactly one of v_codes"),
    "decode_attention/v_scale_missing": (lambda: _decode(v_scale=None), "v_scale and v_zero"),
    # lengths out of range
    "decode_attention/n_quant_negative": (lambda: _decode(
        n_quant=torch.tensor([-1, 0, 0], dtype=torch.int32)), "n_quant\\[0\\] must be >= 0"),
    "decode_attention/n_window_above_capacity": (lambda: _decode(
        n_window=torch.tensor([6, 0, 0], dtype=torch.int32)), "capacity"),
    "decode_attention/n_window_negative": (lambda: _decode(
        n_window=torch.tensor([-1, 0, 0], dtype=torch.int32)), "n_window\\[0\\] must be >= 0"),
    "decode_attention/kv_start_negative": (lambda: _decode(
        kv_start=torch.tensor([-5, 0, 0], dtype=torch.int32)), "kv_start\\[0\\] must be >= 0"),
    # non-finite scalar arguments
    "corrected_logits/scale_nan": (lambda: ops.corrected_logits(
        Q, *KC, *ZC, U, 2, 32, 8, 1.0, float("nan")), "scale must be finite"),
    "decode_attention/scale_inf": (lambda: _decode(scale=float("inf")), "scale must be finite"),
    # device: a meta tensor mixed with CPU tensors (the wrapper's check)
    "dequantize_keys/mixed_meta": (lambda: ops.dequantize_keys(KC[0], KC[1].to("meta"), KC[2],
                                                               2, 32), "same device"),
    "side_code/mixed_meta": (lambda: ops.side_code(K, *KC, U.to("meta"), 2, 32, 8, False),
                             "same device"),
    "corrected_logits/mixed_meta": (lambda: ops.corrected_logits(
        Q.to("meta"), *KC, *ZC, U, 2, 32, 8, 1.0, 1.0), "same device"),
    "decode_attention/mixed_meta": (lambda: _decode(n_quant=lambda t: t.to("meta")),
                                    "same device"),
}


@pytest.mark.parametrize("case", list(OP_ERRORS))
def test_op_bad_input(case):
    call, match = OP_ERRORS[case]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_meta_tensors_follow_the_shape_rules():
    """Meta tensors (no data) go through the fake kernels: shapes only, no error."""
    k = K.to("meta")
    codes, scale, zero = ops.quantize_keys(k, 2, 32)
    assert codes.device.type == "meta" and codes.shape == (1, 2, 64, 16)
    assert scale.shape == (1, 2, 2, 64)
    out = ops.dequantize_keys(codes, scale, zero, 2, 32)
    assert out.device.type == "meta" and out.shape == K.shape


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_wrong_device_cuda():
    kc = [t.cuda() for t in KC]
    with pytest.raises(RuntimeError, match="device"):
        ops.dequantize_keys(kc[0], KC[1], kc[2], 2, 32)
    with pytest.raises(RuntimeError, match="device"):
        ops.corrected_logits(Q, *kc, None, None, None, 2, 32, 8, 1.0, 1.0)
    args = _decode_args()
    args[DEC["n_quant"]] = args[DEC["n_quant"]].cuda()
    with pytest.raises(RuntimeError, match="device"):
        ops.decode_attention(*args)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_op_errors_raise():
    """Errors raised in the C++ checks of the CUDA ops (thrown from libc10 through the
    extension's frames) reach Python as RuntimeErrors. An extension linked with a second, static
    C++ runtime crashed here instead (setup.py's _shared_libstdcxx)."""
    kc = [t.cuda() for t in KC]
    with pytest.raises(RuntimeError, match="bits must be one of"):
        ops.quantize_keys(K.cuda(), 5, 32)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[1, 2, 2, 64\]"):
        ops.dequantize_keys(kc[0], kc[1][:, :, :1], kc[2], 2, 32)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _decode_args()]
    bad = list(args)
    bad[DEC["key_bits"]] = 5
    with pytest.raises(RuntimeError, match="key_bits must be one of 2, 3, 4, 8, got 5"):
        ops.decode_attention(*bad)
    k32 = _keys((1, 2, 64, 32)).cuda()
    c32 = ops.quantize_keys(k32, 2, 32)
    win = torch.zeros(1, 2, 4, 32, device="cuda")
    n = torch.tensor([64], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="head dim must be 64 or 128, got 32"):
        ops.decode_attention(torch.zeros(1, 4, 32, device="cuda"), *c32, None, None, None,
                             None, None, None, torch.zeros(1, 2, 64, 32, device="cuda"), None,
                             None, win, win, n, n.clone().fill_(4), None, 2, 32, 8, 2, 32)


def test_corrected_logits_over_no_tokens_is_empty():
    out = ops.corrected_logits(Q, *(_cut(t, 0) for t in (*KC, *ZC)), U, 2, 32, 8, 1.0, 1.0)
    assert out.shape == (1, 4, 3, 0) and out.dtype == torch.float32


def test_decode_out_of_range_heavy_slots_and_kv_start_are_ignored():
    """Documented: slots outside ``[0, n_quant)`` are skipped (no check: it would need a device
    sync); a ``kv_start`` past every token leaves the sequence with no visible token (zeros)."""
    base, _ = _decode()
    out, _ = _decode(heavy_idx=lambda t: torch.full_like(t, 500))
    none, _ = _decode(heavy_idx=lambda t: torch.full_like(t, -1))
    assert torch.equal(out, none)
    assert not torch.equal(out, base)  # the valid slots did matter
    out, lse = _decode(kv_start=torch.tensor([10_000, 0, 0], dtype=torch.int32))
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


def test_dequantize_side_cannot_see_the_wrong_side_bits():
    """8-bit side codes read as 4-bit are a consistent shape (twice the rank): not detectable
    by dequantize_side itself; corrected_logits / decode catch it through the basis rank."""
    assert ops.dequantize_side(*ZC, 4).shape == (1, 2, 64, 16)
    with pytest.raises(RuntimeError, match="basis"):
        ops.corrected_logits(Q, *KC, *ZC, U, 2, 32, 4, 1.0, 1.0)


# ----------------------------------------------------------------------------- non-finite policy


def test_nonfinite_values_confined_to_their_channel_group():
    v = _keys((1, 2, 5, 64), seed=3)
    v[0, 1, 2, 40] = float("inf")
    v[0, 0, 4, 3] = float("nan")
    codes, scale, zero = ops.quantize_values(v, 2, 32)
    vhat = ops.dequantize_values(codes, scale, zero, 2, 32)
    bad = ~torch.isfinite(vhat)
    assert bad[0, 1, 2, 32:].all() and bad[0, 0, 4, :32].all()
    bad[0, 1, 2, 32:] = False
    bad[0, 0, 4, :32] = False
    assert not bad.any()


def test_nonfinite_key_poisons_the_side_code_of_its_group_only():
    k = _keys()
    k[0, 0, 3, 5] = float("nan")
    kc = ops.quantize_keys(k, 2, 32)
    for center in (False, True):
        zc, zs = ops.side_code(k, *kc, U, 2, 32, 8, center)
        nan = zs.isnan()
        assert nan[0, 0, :32].all()  # the key group of the NaN (head 0, tokens 0..31)
        nan[0, 0, :32] = False
        assert not nan.any()
        zhat = ops.dequantize_side(zc, zs, 8)
        assert torch.isfinite(zhat[0, 0, 32:]).all() and torch.isfinite(zhat[0, 1]).all()


def test_nonfinite_basis_poisons_the_side_code_visibly():
    zc, zs = ops.side_code(K, *KC, U * float("nan"), 2, 32, 8, False)
    assert zs.isnan().all()


def test_nonfinite_in_decode_confined_to_its_sequence():
    """A NaN in one sequence's window keys makes that sequence's output NaN (visible) and leaves
    the other sequences exact."""
    base, base_lse = _decode()

    def poison(t):
        t = t.clone()
        t[0, 0, 0, 0] = float("nan")
        return t

    out, lse = _decode(k_window=poison)
    assert out[0].isnan().any()
    assert torch.equal(out[1:], base[1:]) and torch.equal(lse[1:], base_lse[1:])

    def poison_scale(t):
        t = t.clone()
        t[2, 0, -1, 0] = float("nan")  # a group beyond sequence 2's n_quant: never read
        return t

    out, _ = _decode(k_scale=poison_scale)
    assert torch.equal(out, base)


@pytest.mark.parametrize("threads", [1, 16])
def test_nan_query_gives_nan_output(threads):
    """With 16 threads the CPU op also cuts each (sequence, KV head) into token ranges whose
    partial softmax states are merged (more threads than slices): the NaN survives the merge."""
    def poison(q):
        q = q.clone()
        q[0, 0, 0] = float("nan")
        return q

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = _decode(q=poison)
    finally:
        torch.set_num_threads(before)
    assert out[0, 0].isnan().all()
    assert lse[0, 0].isnan()
    assert torch.isfinite(out[0, 1:]).all() and torch.isfinite(out[1:]).all()


def test_overflow_beyond_float16_is_visible():
    k = _keys((1, 1, 32, 64)) * 1e5  # scale/zero overflow the float16 range
    kc = ops.quantize_keys(k, 2, 32)
    assert not torch.isfinite(ops.dequantize_keys(*kc, 2, 32)).all()


# ----------------------------------------------------------------------------- non-contiguous


def _nc(t, d0=1, d1=2):
    """Same values, non-contiguous strides."""
    out = t.transpose(d0, d1).contiguous().transpose(d0, d1)
    assert not out.is_contiguous() or t.shape[d0] == 1 or t.shape[d1] == 1
    return out


def test_noncontiguous_inputs_equal_contiguous():
    assert torch.equal(ops.dequantize_keys(_nc(KC[0]), KC[1], KC[2], 2, 32),
                       ops.dequantize_keys(*KC, 2, 32))
    assert torch.equal(ops.dequantize_values(_nc(VC[0]), _nc(VC[1]), VC[2], 2, 32),
                       ops.dequantize_values(*VC, 2, 32))
    assert torch.equal(ops.dequantize_side(_nc(ZC[0]), ZC[1], 8), ops.dequantize_side(*ZC, 8))
    for a, b in zip(ops.side_code(_nc(K), _nc(KC[0]), KC[1], KC[2], _nc(U), 2, 32, 8, True),
                    ops.side_code(K, *KC, U, 2, 32, 8, True)):
        assert torch.equal(a, b)
    want = ops.corrected_logits(Q, *KC, *ZC, U, 2, 32, 8, 1.0, 0.125)
    got = ops.corrected_logits(_nc(Q), _nc(KC[0]), KC[1], _nc(KC[2]), _nc(ZC[0]), ZC[1], _nc(U),
                               2, 32, 8, 1.0, 0.125)
    assert torch.equal(got, want)
    want = ops.reconstruct_keys(*KC, *ZC, U, 2, 32, 8, 1.0, torch.bfloat16)
    got = ops.reconstruct_keys(_nc(KC[0]), KC[1], _nc(KC[2]), _nc(ZC[0]), ZC[1], _nc(U), 2, 32,
                               8, 1.0, torch.bfloat16)
    assert torch.equal(got, want)
    base = _decode()
    for name in ("q", "k_codes", "basis", "k_window", "v_window", "v_codes", "heavy_delta"):
        d = (0, 1) if name == "q" else (1, 2)
        got = _decode(**{name: lambda t, d=d: _nc(t, *d)})
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), name


# ----------------------------------------------------------------------------- storage_report


@pytest.mark.parametrize("kw, match", [
    (dict(key_bits=5), "key_bits=5"),
    (dict(key_bits=2.0), "key_bits=2.0"),
    (dict(value_bits=1), "value_bits=1"),
    (dict(group_size=48), "group_size=48"),
    (dict(group_size=0), "group_size=0"),
    (dict(value_bits=2, value_group_size=48), "value_group_size=48"),
    (dict(value_bits=2, value_group_size=128), "value_group_size=128"),  # 64 % 128
    (dict(rank=-1), "rank=-1"),
    (dict(rank=65), "rank=65"),
    (dict(rank=8, key_bits=16), "rank=8"),
    (dict(rank=8, side_bits=3), "side_bits=3"),
    (dict(rank=3, side_bits=4), "rank=3"),
    (dict(residual_length=-5), "residual_length=-5"),
    (dict(context_len=10.5), "context_len"),
    (dict(context_len=float("nan")), "context_len"),
    (dict(context_len=True), "context_len"),
    (dict(head_dim=60), "head_dim"),
    (dict(value_keep_frac=float("nan")), "value_keep_frac"),
    (dict(num_kv_heads=0), "num_kv_heads=0"),
    (dict(num_layers=-1), "num_layers=-1"),
    (dict(dense_bits=0), "dense_bits=0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_storage_report_rejects_configurations_that_cannot_exist(kw, match):
    args = dict(head_dim=64, context_len=100)
    args.update(kw)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        headq_torch.storage_report(**args)


# ----------------------------------------------------------------------------- HeadQCache


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _cal(cfg, rank=8):
    from headq_torch.config import model_geometry

    n_layers, _, H, D = model_geometry(cfg)
    return Calibration([_basis(H, D, rank, i) for i in range(n_layers)], model_name="tiny",
                       fingerprint=config_fingerprint(cfg), num_layers=n_layers, num_kv_heads=H,
                       head_dim=D, rank=rank, method="random")


@pytest.mark.parametrize("config, exc, match", [
    (None, TypeError, "config must be the model's transformers config"),
    ({"num_hidden_layers": 2}, TypeError, "got dict"),
    ("model", TypeError, "pass model.config"),
])
def test_cache_config_type(llama, config, exc, match):
    with pytest.raises(exc, match=match):
        HeadQCache(llama if config == "model" else config)


@pytest.mark.parametrize("kw, match", [
    (dict(key_bits=2.0), "key_bits=2.0"),
    (dict(key_bits="2"), "key_bits='2'"),
    (dict(group_size=True), "group_size=True"),
    (dict(residual_length=1.5), "residual_length=1.5"),
    (dict(center="no"), "center='no'"),
    (dict(value_bits=2, value_group_size=32, value_policy="a2", value_keep_frac=float("nan")),
     "value_keep_frac=nan"),
    (dict(sign=float("nan")), "sign=nan"),
])
def test_cache_argument_types(llama, kw, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        HeadQCache(llama.config, **kw)


def _cache(llama, **kw):
    kw = dict(dict(key_bits=4, group_size=32), **kw)
    return HeadQCache(llama.config, _cal(llama.config), **kw)


@pytest.mark.parametrize("k_shape, v_shape, dtype, exc, match", [
    ((2, 5, 32), (2, 5, 32), torch.float32, ValueError, "must be \\[batch, kv_heads"),
    ((1, 3, 40, 32), (1, 3, 40, 32), torch.float32, ValueError, "2 KV heads of head_dim 32"),
    ((1, 2, 40, 64), (1, 2, 40, 64), torch.float32, ValueError, "2 KV heads of head_dim 32"),
    ((1, 2, 40, 32), (1, 2, 41, 32), torch.float32, ValueError, "same shape"),
    ((1, 2, 40, 32), (1, 2, 40, 32), torch.float64, TypeError, "float32, float16 or bfloat16"),
    ((1, 2, 40, 32), (1, 2, 40, 32), torch.int64, TypeError, "float32, float16 or bfloat16"),
], ids=["rank", "heads", "head_dim", "k_v_mismatch", "float64", "int"])
def test_cache_update_bad_states(llama, k_shape, v_shape, dtype, exc, match):
    cache = _cache(llama)
    with pytest.raises(exc, match=match):
        cache.update(torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype), 0)
    assert cache.get_seq_length() == 0  # nothing was stored


def test_cache_update_batch_change_and_layer_index(llama):
    cache = _cache(llama)
    cache.update(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), 0)
    with pytest.raises(ValueError, match="batch size 2 differs from the cache's 1"):
        cache.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), 0)
    assert cache.get_seq_length() == 40
    with pytest.raises(IndexError):
        cache.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), 5)
    with pytest.raises(ValueError, match="repeats=0"):
        cache.batch_repeat_interleave(0)
    with pytest.raises(TypeError, match="crop"):
        cache.crop(2.5)
    with pytest.raises(IndexError):
        cache.reorder_cache(torch.tensor([3]))
    with pytest.raises(IndexError):
        cache.batch_select_indices(torch.tensor([3]))


def test_cache_empty_update_then_tokens(llama):
    """An empty first update (0 tokens) is a no-op, not a crash."""
    cache = _cache(llama)
    k, v = cache.update(torch.randn(1, 2, 0, 32), torch.randn(1, 2, 0, 32), 0)
    assert k.shape == (1, 2, 0, 32) and cache.get_seq_length() == 0
    cache.update(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), 0)
    assert cache.get_seq_length() == 40


def test_cache_storage_report_of_an_empty_cache(llama):
    with pytest.raises(ValueError, match="the cache is empty"):
        _cache(llama).storage_report()


def test_cache_built_for_another_geometry(llama):
    from transformers import LlamaConfig

    other = LlamaConfig(num_hidden_layers=2, vocab_size=128, hidden_size=64,
                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=16)
    cache = HeadQCache(other, None, key_bits=4, group_size=32)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="4 KV heads of head_dim 16"), torch.no_grad():
        llama(ids, past_key_values=cache)


def test_cache_of_another_model_through_headq_attention(llama):
    """Same geometry, another model: the headq attention function sees a different config
    fingerprint and refuses (the bases would belong to the other model)."""
    qwen = make_tiny("qwen2")
    cfg = copy.deepcopy(llama.config)
    cache = HeadQCache(cfg, _cal(cfg), key_bits=4, group_size=32)
    attention.enable(qwen)
    cfg._attn_implementation = "headq"
    try:
        ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="built for"), torch.no_grad():
            qwen(ids, past_key_values=cache)
    finally:
        attention.disable(qwen)


# ----------------------------------------------------------------------------- calibration files


@pytest.fixture
def good_file(tmp_path, llama):
    p = tmp_path / "c.safetensors"
    _cal(llama.config).save(p)
    return p


class _Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_file_is_rejected_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "calib.pt"
    p.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CalibrationError, match="not a safetensors|truncated|corrupt"):
        Calibration.load(p)
    assert not marker.exists()
    torch.save({"layer.0.basis": torch.zeros(2, 32, 8)}, tmp_path / "calib2.pt")
    with pytest.raises(CalibrationError):
        Calibration.load(tmp_path / "calib2.pt")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CalibrationError, match="not a safetensors"):
        Calibration.load(tmp_path / "empty")


def _with_tensors(src, dst, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = fn(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_bad_tensors_in_file(tmp_path, good_file):
    def nan(t):
        t["layer.0.basis"] = t["layer.0.basis"].clone().fill_(float("nan"))
        return t

    _with_tensors(good_file, tmp_path / "nan", nan)
    with pytest.raises(CalibrationError, match="non-finite"):
        Calibration.load(tmp_path / "nan")
    _with_tensors(good_file, tmp_path / "f16",
                  lambda t: {k: v.half() for k, v in t.items()})
    with pytest.raises(CalibrationError, match="float32"):
        Calibration.load(tmp_path / "f16")
    _with_tensors(good_file, tmp_path / "missing",
                  lambda t: {k: v for k, v in t.items() if k != "layer.1.basis"})
    with pytest.raises(CalibrationError, match="do not match"):
        Calibration.load(tmp_path / "missing")


def test_calibration_for_a_cache_with_another_rank(llama):
    with pytest.raises(CalibrationError, match="rank=4"):
        HeadQCache(llama.config, _cal(llama.config), rank=4)
    with pytest.raises(ValueError, match="rank=3 is not supported"):
        HeadQCache(llama.config, _cal(llama.config, rank=3), side_bits=4)


# ----------------------------------------------------------------------------- calibrate()


@pytest.mark.parametrize("kw, match", [
    (dict(rank=33), "rank"),
    (dict(chunk_len=1), "chunk_len"),
    (dict(n_tokens=1), "fewer than 2 tokens"),
], ids=["rank_above_head_dim", "chunk_len", "too_few_tokens"])
def test_calibrate_bad_arguments(llama, kw, match):
    ids = torch.arange(64) % 128
    with pytest.raises(ValueError, match=match):
        calibrate(llama, None, ids, progress=False, **kw)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_arguments_exit_non_zero_with_a_message(tmp_path, capsys):
    from headq_torch.cli import main

    for argv, fragment in ((["calibrate"], "required"),
                           ([], "required"),
                           (["calibrate", "--model", "x", "--out", "o", "--method", "svd"],
                            "invalid choice"),
                           (["calibrate", "--model", "x", "--out", "o", "--rank", "two"],
                            "invalid int")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code != 0
        assert fragment in capsys.readouterr().err
    # a model path that does not exist: exit status 2 and one line, no traceback
    rc = main(["calibrate", "--model", str(tmp_path / "no-such-model"), "--out",
               str(tmp_path / "o.safetensors"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "headq calibrate: error:" in err and "Traceback" not in err


def test_cli_bad_rank_exits_2(tmp_path, capsys, llama):
    from conftest import save_tiny_folder
    from headq_torch.cli import main

    d = save_tiny_folder(llama, tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 128}" for i in range(200)))
    for extra, fragment in ((["--rank", "0"], "rank"), (["--tokens", "1"], "fewer than 2"),
                            (["--chunk-len", "1"], "chunk_len")):
        rc = main(["calibrate", "--model", str(d), "--text", str(text), "--out",
                   str(tmp_path / "o.safetensors"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err, (extra, err)
    assert not (tmp_path / "o.safetensors").exists()
