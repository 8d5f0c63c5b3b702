"""The headq ops (CPU kernels, and CUDA kernels where a GPU exists) against the pure-PyTorch
reference in headq_torch.reference.

Codes, scales and zeros must match the reference bit for bit. Floating results are judged the
flash-attention way: the kernel's error against a float64 computation must stay within twice
the error of the float32 reference path (plus a tiny absolute floor).
"""

from __future__ import annotations

import math

import pytest
import torch

import headq_torch
from headq_torch import ops
from headq_torch import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dev_id(d):
    return str(d)


def _dt_id(d):
    return str(d).replace("torch.", "")


def make(shape, device, dtype=torch.float32, seed=0, noncontig=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        # [B, T, H, D] storage viewed as [B, H, T, D]: the layout transformers' projections give.
        B, H, T, D = shape
        x = torch.randn(B, T, H, D, generator=g) * scale
        return x.to(device=device, dtype=dtype).transpose(1, 2)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def orthonormal_basis(H, D, r, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(H, D, r, generator=g, dtype=torch.float64))
    return q.to(torch.float32).to(device)


def assert_close_to_fp64(out, ref32, ref64, floor=1e-6):
    """Kernel error vs fp64 <= 2 x (fp32 reference error vs fp64) + floor."""
    out, ref32, ref64 = (t.detach().to("cpu", torch.float64) for t in (out, ref32, ref64))
    assert torch.isfinite(out).all()
    err = (out - ref64).abs().max().item()
    base = (ref32 - ref64).abs().max().item()
    assert err <= 2 * base + floor, f"kernel error {err:.3e} vs reference error {base:.3e}"


# ----------------------------------------------------------------------------- keys


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_keys_bit_exact(device, bits, group_size):
    k = make((2, 3, 2 * group_size, 64), device, seed=bits + group_size)
    got = ops.quantize_keys(k, bits, group_size)
    want = ref.quantize_keys(k.cpu(), bits, group_size)
    for g, w, name in zip(got, want, ("codes", "scale", "zero")):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name} differs from the reference"


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantize_keys_dtypes_noncontiguous(device, dtype, head_dim):
    k = make((2, 4, 64, head_dim), device, dtype, seed=3, noncontig=True)
    assert not k.is_contiguous()
    got = ops.quantize_keys(k, 2, 32)
    want = ref.quantize_keys(k.cpu(), 2, 32)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_keys_and_error_bound(device, bits):
    k = make((1, 2, 128, 64), device, seed=7)
    codes, scale, zero = ops.quantize_keys(k, bits, 64)
    khat = ops.dequantize_keys(codes, scale, zero, bits, 64)
    want = ref.dequantize_keys(codes.cpu(), scale.cpu(), zero.cpu(), bits, 64)
    torch.testing.assert_close(khat.cpu(), want, rtol=0, atol=1e-6)
    # |x - xhat| <= scale / 2 (+ fp16 rounding of the zero point).
    s = scale.float().cpu().repeat_interleave(64, dim=2)
    z_err = (zero.float().cpu() - k.cpu().reshape(1, 2, 2, 64, 64).amin(3)).abs()
    bound = s / 2 + z_err.repeat_interleave(64, dim=2) + 1e-6
    assert ((khat.cpu() - k.cpu()).abs() <= bound).all()
    half = ops.dequantize_keys(codes, scale, zero, bits, 64, torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_quantize_keys_constant_channel_and_single_group(device):
    k = make((1, 1, 32, 64), device, seed=1)
    k[..., 5] = 3.25  # zero range: scale 0, every code 0, exact reconstruction
    codes, scale, zero = ops.quantize_keys(k, 2, 32)
    assert scale[0, 0, 0, 5].item() == 0.0
    khat = ops.dequantize_keys(codes, scale, zero, 2, 32)
    assert torch.all(khat[..., 5] == 3.25)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_quantize_values_bit_exact(device, bits, group_size, tokens):
    v = make((2, 3, tokens, 128), device, seed=bits * 10 + tokens)
    got = ops.quantize_values(v, bits, group_size)
    want = ref.quantize_values(v.cpu(), bits, group_size)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    vhat = ops.dequantize_values(*got, bits, group_size)
    torch.testing.assert_close(vhat.cpu(), ref.dequantize_values(*want, bits, group_size),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_quantize_values_noncontiguous(device, dtype):
    v = make((3, 2, 5, 64), device, dtype, seed=11, noncontig=True)
    got = ops.quantize_values(v, 4, 64)
    want = ref.quantize_values(v.cpu(), 4, 64)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


# ----------------------------------------------------------------------------- side code


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("side_bits", [4, 8])
@pytest.mark.parametrize("rank", [4, 8, 16])
@pytest.mark.parametrize("center", [False, True])
def test_side_code_bit_exact(device, side_bits, rank, center):
    H, D, G = 3, 64, 32
    k = make((2, H, 2 * G, D), device, seed=rank + side_bits)
    basis = orthonormal_basis(H, D, rank, device)
    kc = ops.quantize_keys(k, 2, G)
    z_codes, z_scale = ops.side_code(k, *kc, basis, 2, G, side_bits, center)
    wz_codes, wz_scale = ref.side_code(k.cpu(), *(t.cpu() for t in kc), basis.cpu(), 2, G,
                                       side_bits, center)
    assert z_codes.shape == (2, H, 2 * G, rank * side_bits // 8)
    assert torch.equal(z_scale.cpu(), wz_scale)
    assert torch.equal(z_codes.cpu(), wz_codes)
    zhat = ops.dequantize_side(z_codes, z_scale, side_bits)
    torch.testing.assert_close(zhat.cpu(), ref.dequantize_side(wz_codes, wz_scale, side_bits),
                               rtol=0, atol=0)


KV_CASES = [  # key_bits, value_bits, side_bits, G, Gv, D, r, center, noncontig
    (2, 2, 8, 64, 64, 128, 8, False, False),  # the default format (the fused CUDA kernel)
    (4, 8, 4, 32, 32, 64, 4, False, True),
    (3, 4, 8, 64, 128, 128, 16, True, False),
    (8, 3, 8, 128, 64, 128, 12, False, True),  # 512 threads: three kernels on CUDA
    (2, 2, 8, 32, 64, 64, 8, True, True),
]


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_quantize_kv_is_the_three_ops(device, dtype, case):
    """quantize_kv returns exactly quantize_keys + side_code + quantize_values, and for float32
    input the reference's codes."""
    kb, vb, zb, G, Gv, D, r, center, noncontig = case
    H = 3
    k = make((2, H, 2 * G, D), device, dtype, seed=kb + 10 * vb, noncontig=noncontig)
    v = make((2, H, 2 * G, D), device, dtype, seed=kb + 10 * vb + 1, noncontig=noncontig)
    basis = orthonormal_basis(H, D, r, device)
    got = ops.quantize_kv(k, v, basis, kb, G, zb, center, vb, Gv)
    kc = ops.quantize_keys(k, kb, G)
    want = (*kc, *ops.side_code(k, *kc, basis, kb, G, zb, center),
            *ops.quantize_values(v, vb, Gv))
    assert len(got) == 8
    for name, a, b in zip(("k_codes", "k_scale", "k_zero", "z_codes", "z_scale", "v_codes",
                           "v_scale", "v_zero"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.uint8 else a.view(torch.int16),
                           b.view(torch.uint8) if b.dtype == torch.uint8 else b.view(torch.int16)
                           ), f"{name} differs from the separate op"
    if dtype == torch.float32:
        kr = ref.quantize_keys(k.cpu(), kb, G)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got[:3], kr))
        zr = ref.side_code(k.cpu(), *kr, basis.cpu(), kb, G, zb, center)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got[3:5], zr))
        vr = ref.quantize_values(v.cpu(), vb, Gv)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got[5:], vr))


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_side_code_bound_and_projection(device):
    """The dequantised side code is the projected residual within half a side-code step."""
    H, D, G, r = 2, 128, 64, 8
    k = make((1, H, G, D), device, torch.bfloat16, seed=5, noncontig=True)
    basis = orthonormal_basis(H, D, r, device, seed=2)
    kc = ops.quantize_keys(k, 2, G)
    zc, zs = ops.side_code(k, *kc, basis, 2, G, 8, False)
    e = k.float() - ops.dequantize_keys(*kc, 2, G)
    y = torch.einsum("bhtd,hdr->bhtr", e.double(), basis.double())
    zhat = ops.dequantize_side(zc, zs, 8).double()
    step = zs.double().unsqueeze(-1)
    assert ((zhat - y).abs() <= step / 2 + 1e-3 * step + 1e-7).all()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("fmt", [(2, 8, 64, 8, 1.0), (4, 4, 32, 4, -1.0), (3, 8, 128, 16, 1.0),
                                 (8, 8, 64, 12, 1.0)], ids=lambda f: "-".join(map(str, f)))
def test_reconstruct_keys(device, out_dtype, fmt):
    """reconstruct_keys equals the reference bit for bit (its float32 order is the contract):
    khat + sign * zhat Uᵀ rounded once to out_dtype, and q · it is corrected_logits' logit."""
    key_bits, side_bits, D, r, sign = fmt
    H, G = 3, 32
    k = make((2, H, 3 * G, D), device, seed=key_bits + r, noncontig=True)
    basis = orthonormal_basis(H, D, r, device, seed=r)
    kc = ops.quantize_keys(k, key_bits, G)
    zc = ops.side_code(k, *kc, basis, key_bits, G, side_bits, False)
    got = ops.reconstruct_keys(*kc, *zc, basis, key_bits, G, side_bits, sign, out_dtype)
    cpu = [t.cpu() for t in (*kc, *zc, basis)]
    want = ref.reconstruct_keys(*cpu, key_bits, G, side_bits, sign, out_dtype)
    assert got.dtype == out_dtype and got.shape == (2, H, 3 * G, D) and got.device == k.device
    assert torch.equal(got.cpu(), want)
    # without the side code's effect (sign 0) it is dequantize_keys
    base = ops.reconstruct_keys(*kc, *zc, basis, key_bits, G, side_bits, 0.0, out_dtype)
    assert torch.equal(base, ops.dequantize_keys(*kc, key_bits, G, out_dtype))
    assert not torch.equal(got, base)
    # q · reconstructed keys = the corrected logits (float64 from the float32 keys)
    q = make((2, H * 2, 2, D), device, seed=3)
    logits = ops.corrected_logits(q, *kc, *zc, basis, key_bits, G, side_bits, sign, 1.0)
    full = ops.reconstruct_keys(*kc, *zc, basis, key_bits, G, side_bits, sign).double()
    q64 = q.double()
    via_keys = q64 @ ref.expand_kv(full, 2).transpose(-1, -2)
    torch.testing.assert_close(logits.double(), via_keys, rtol=1e-4, atol=1e-4)


def _packed_case(device, B, H, T, bits, seed, basis_seed, v_seed=None, D=64, G=32, r=8):
    """Packed keys (groups of G tokens), their 8-bit side code on a rank-r basis and packed
    values (groups of 32 channels) of random ``[B, H, T, D]`` keys (values: those keys, or
    their own with ``v_seed``): ``(kc, zc, vc, basis)``."""
    k = make((B, H, T, D), device, seed=seed)
    basis = orthonormal_basis(H, D, r, device, seed=basis_seed)
    kc = ops.quantize_keys(k, bits, G)
    zc = ops.side_code(k, *kc, basis, bits, G, 8, False)
    v = k if v_seed is None else make((B, H, T, D), device, seed=v_seed)
    return kc, zc, ops.quantize_values(v, bits, 32), basis


def _out_layouts(B, H, T, D, dtype, device):
    """``out`` tensors ``[B, H, T, D]`` of the layouts a caller may pass, each with the storage
    around it (to check that nothing outside ``out`` is written), filled with NaN."""
    nan = dict(dtype=dtype, device=device)
    big = torch.full((B, H, T + 40, D), float("nan"), **nan)
    yield "token_slice", big, big[:, :, 16:16 + T]  # rows contiguous, slabs (T + 40) * D apart
    flat = torch.full((B * H * T * D + 1,), float("nan"), **nan)
    yield "misaligned", flat, flat[1:].view(B, H, T, D)  # rows 2-4 bytes off 16-byte alignment
    tr = torch.full((B, H, D, T), float("nan"), **nan)
    yield "transposed", tr, tr.transpose(2, 3)  # channel stride T
    heads = torch.full((B, T, H, D), float("nan"), **nan)
    yield "bthd", heads, heads.transpose(1, 2)  # transformers' [B, T, H, D] storage
    fresh = torch.full((B, H, T, D), float("nan"), **nan)
    yield "contiguous", fresh, fresh


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("impl", ["default", "old"])
def test_out_forms_write_exactly_out(monkeypatch, device, out_dtype, bits, impl):
    """dequantize_keys / dequantize_values / reconstruct_keys with ``out=``: the functional
    result bit for bit, in every layout of ``out`` (token slice of a longer tensor, misaligned,
    transposed, [B, T, H, D] storage, contiguous), and nothing outside ``out`` written; on CUDA
    also through the per-element dequantise kernels (``HEADQ_QUANT_IMPL=old``)."""
    if impl == "old":
        if device == "cpu":
            pytest.skip("HEADQ_QUANT_IMPL selects a CUDA kernel")
        monkeypatch.setenv("HEADQ_QUANT_IMPL", "old")
    B, H, T, D, G = 2, 3, 64, 64, 32
    kc, zc, vc, basis = _packed_case(device, B, H, T, bits, seed=bits, basis_seed=1, v_seed=7)
    calls = {
        "dequantize_keys": lambda **o: ops.dequantize_keys(*kc, bits, G, **o),
        "dequantize_values": lambda **o: ops.dequantize_values(*vc, bits, 32, **o),
        "reconstruct_keys": lambda **o: ops.reconstruct_keys(*kc, *zc, basis, bits, G, 8, -1.0,
                                                             **o),
    }
    for name, call in calls.items():
        want = call(out_dtype=out_dtype)
        for layout, storage, out in _out_layouts(B, H, T, D, out_dtype, device):
            before = storage.clone()
            got = call(out=out)
            assert got is out, (name, layout)
            assert torch.equal(out, want), (name, layout)
            outside = torch.ones_like(storage, dtype=torch.bool)
            outside_view = outside.view(-1)[1:].view(B, H, T, D) if layout == "misaligned" else (
                outside[:, :, 16:16 + T] if layout == "token_slice" else
                outside.transpose(2, 3) if layout == "transposed" else
                outside.transpose(1, 2) if layout == "bthd" else outside)
            outside_view.fill_(False)
            assert storage[outside].isnan().all(), (name, layout)  # untouched
            assert torch.equal(storage[outside].isnan(), before[outside].isnan())
            # out_dtype may repeat out's dtype, not contradict it
            assert call(out=out, out_dtype=out_dtype) is out
            other = torch.float16 if out_dtype != torch.float16 else torch.float32
            with pytest.raises(ValueError, match="out_dtype .* and out.dtype .* differ"):
                call(out=out, out_dtype=other)


def _in_layouts(t):
    """A packed input ``[B, H, T, ...]`` in the layouts the ops read without or with a copy:
    a token slice of a longer buffer (the cache's: read in place on CUDA), the [B, T, H, ...]
    storage (slabs not evenly spaced: copied), heads expanded from one (slab stride 0)."""
    B, H, T = t.shape[:3]
    buf = torch.full((B, H, T + 96, *t.shape[3:]), 255 if t.dtype == torch.uint8 else 7.0,
                     dtype=t.dtype, device=t.device)
    buf[:, :, 32:32 + T] = t
    yield "token_slice", buf[:, :, 32:32 + T]
    yield "bthd", t.transpose(1, 2).contiguous().transpose(1, 2)
    yield "expanded_heads", t[:, :1].expand(B, H, *t.shape[2:]), t[:, :1].expand(
        B, H, *t.shape[2:]).contiguous()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=_dt_id)
@pytest.mark.parametrize("recon_impl", ["default", "l1"])
def test_inputs_read_in_place_equal_contiguous(monkeypatch, device, out_dtype, recon_impl):
    """The three dequantising ops on inputs in other layouts (a token slice of a longer buffer,
    as the cache passes them; [B, T, H, ...] storage; heads expanded): the result for the same
    values in contiguous tensors, bit for bit, functional and out=. ``l1``: reconstruct_keys'
    CUDA kernel without the staged basis (HEADQ_RECON_IMPL), which reads the inputs the same
    way."""
    if recon_impl == "l1":
        if device == "cpu":
            pytest.skip("HEADQ_RECON_IMPL selects a CUDA kernel")
        monkeypatch.setenv("HEADQ_RECON_IMPL", "l1")
    G = 32
    kc, zc, vc, basis = _packed_case(device, 2, 3, 128, 2, seed=11, basis_seed=2, v_seed=12)
    calls = {
        "dequantize_keys": (lambda a, **o: ops.dequantize_keys(*a, 2, G, **o), kc),
        "dequantize_values": (lambda a, **o: ops.dequantize_values(*a, 2, 32, **o), vc),
        "reconstruct_keys": (lambda a, **o: ops.reconstruct_keys(*a[:5], basis, 2, G, 8, 1.0,
                                                                 **o), (*kc, *zc)),
    }
    for name, (call, inputs) in calls.items():
        n = len(inputs)
        # one input in another layout at a time, then all as token slices (the cache's case)
        cases = [([i], layout) for i in range(n) for layout in ("token_slice", "bthd",
                                                                 "expanded_heads")]
        for which, layout in cases + [(list(range(n)), "token_slice")]:
            args, want_args = list(inputs), list(inputs)
            for j in which:
                chosen = dict((x[0], x[1:]) for x in _in_layouts(inputs[j]))[layout]
                args[j] = chosen[0]
                if len(chosen) > 1:  # expanded: the values it stands for, contiguous
                    want_args[j] = chosen[1]
            want = call(want_args, out_dtype=out_dtype)
            assert torch.equal(call(args, out_dtype=out_dtype), want), (name, which, layout)
            out = torch.empty_like(want)
            assert torch.equal(call(args, out=out), want), (name, which, layout)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_out_forms_bad_out(device):
    """A bad ``out`` raises an error that names the op and ``out``, and writes nothing."""
    B, H, T, D, G = 1, 2, 64, 64, 32
    kc, zc, vc, basis = _packed_case(device, B, H, T, 2, seed=3, basis_seed=0)
    calls = {
        "dequantize_keys_into": lambda o: torch.ops.headq.dequantize_keys_into(*kc, 2, G, o),
        "dequantize_values_into": lambda o: torch.ops.headq.dequantize_values_into(*vc, 2, 32,
                                                                                   o),
        "reconstruct_keys_into": lambda o: torch.ops.headq.reconstruct_keys_into(
            *kc, *zc, basis, 2, G, 8, 1.0, o),
    }
    dev = dict(device=device)
    cases = [
        (torch.zeros(B, H, T - 1, D, **dev), r"out must have shape \[1, 2, 64, 64\]"),
        (torch.zeros(B, H, T, D // 2, **dev), r"out must have shape"),
        (torch.zeros(H, T, D, **dev), r"out must have 4 dims"),
        (torch.zeros(B, H, T, D, dtype=torch.int32, **dev), r"out must have dtype float32"),
        (torch.zeros(B, H, T, D, dtype=torch.float64, **dev), r"out must have dtype float32"),
        (torch.zeros(B, 1, T, D, **dev).expand(B, H, T, D), r"out must not have elements"),
    ]
    if device != "cpu":
        cases.append((torch.zeros(B, H, T, D), r"out must be on the same device"))
    for op, call in calls.items():
        for out, match in cases:
            before = out.clone()
            with pytest.raises(RuntimeError, match=f"{op}: {match}"):
                call(out)
            assert torch.equal(out, before)
    # out sharing memory with an input: the side code's scale viewed as float16 keys
    zs = torch.zeros(B, H, T * D, dtype=torch.float16, **dev)
    out = zs.view(B, H, T, D)
    with pytest.raises(RuntimeError, match="reconstruct_keys_into: out must not share memory "
                                           "with z_scale"):
        torch.ops.headq.reconstruct_keys_into(*kc, zc[0], zs[:, :, :T], basis, 2, G, 8, 1.0, out)
    codes = torch.zeros(B, H, T, D, **dev)
    with pytest.raises(RuntimeError, match="dequantize_values_into: out must not share memory "
                                           "with codes"):
        torch.ops.headq.dequantize_values_into(codes.view(torch.uint8)[..., :16], *vc[1:], 2, 32,
                                               codes)


# ----------------------------------------------------------------------------- logits


def _logits_case(device, dtype, D=64, H=2, n_rep=3, T=64, L=3, rank=8, seed=0):
    k = make((2, H, T, D), device, seed=seed)
    q = make((2, H * n_rep, L, D), device, dtype, seed=seed + 1)
    basis = orthonormal_basis(H, D, rank, device, seed)
    kc = ops.quantize_keys(k, 2, 32)
    zc = ops.side_code(k, *kc, basis, 2, 32, 8, False)
    return q, kc, zc, basis


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_corrected_logits(device, dtype, head_dim, sign):
    q, kc, zc, basis = _logits_case(device, dtype, D=head_dim)
    scale = 1 / math.sqrt(head_dim)
    got = ops.corrected_logits(q, *kc, *zc, basis, 2, 32, 8, sign, scale)
    cpu = [t.cpu() for t in (q, *kc, *zc, basis)]
    want32 = ref.corrected_logits(*cpu[:4], cpu[4], cpu[5], cpu[6], 2, 32, 8, sign, scale)
    # float64 twin: same dequantised operands, float64 arithmetic.
    khat = ref.dequantize_keys(*cpu[1:4], 2, 32).double()
    zhat = ref.dequantize_side(cpu[4], cpu[5], 8).double()
    n_rep = q.shape[1] // khat.shape[1]
    q64 = cpu[0].double()
    s64 = q64 @ ref.expand_kv(khat, n_rep).transpose(-1, -2)
    qu = q64 @ ref.expand_kv(cpu[6].double().unsqueeze(0), n_rep)
    s64 = (s64 + sign * qu @ ref.expand_kv(zhat, n_rep).transpose(-1, -2)) * scale
    assert got.dtype == torch.float32 and got.shape == want32.shape
    assert_close_to_fp64(got, want32, s64)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_corrected_logits_without_side_code(device):
    q, kc, _, _ = _logits_case(device, torch.float32)
    got = ops.corrected_logits(q, *kc, None, None, None, 2, 32, 8, 1.0, 0.125)
    khat = ops.dequantize_keys(*kc, 2, 32)
    want = q @ ref.expand_kv(khat, 3).transpose(-1, -2) * 0.125
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_side_code_reduces_logit_error_on_query_subspace():
    """Queries that live in span(U): HeadQ logits are far closer to the true ones."""
    torch.manual_seed(0)
    H, D, r, T = 2, 64, 8, 128
    basis = orthonormal_basis(H, D, r, "cpu", seed=4)
    k = torch.randn(1, H, T, D)
    q = torch.einsum("hdr,bhlr->bhld", basis, torch.randn(1, H, 5, r))
    kc = ops.quantize_keys(k, 2, 64)
    zc = ops.side_code(k, *kc, basis, 2, 64, 8, False)
    true = q @ k.transpose(-1, -2)
    base = ops.corrected_logits(q, *kc, None, None, None, 2, 64, 8, 1.0, 1.0)
    hq = ops.corrected_logits(q, *kc, *zc, basis, 2, 64, 8, 1.0, 1.0)
    wrong = ops.corrected_logits(q, *kc, *zc, basis, 2, 64, 8, -1.0, 1.0)
    e_base = (base - true).pow(2).mean()
    assert (hq - true).pow(2).mean() < 0.01 * e_base
    assert (wrong - true).pow(2).mean() > 3 * e_base


# ----------------------------------------------------------------------------- decode


def _decode_case(device, dtype, *, B=3, H=2, n_rep=4, D=64, Tq=128, W=5, rank=8, G=32, Gv=32,
                 key_bits=2, value_bits=2, dense_values=False, heavy=0, side=True,
                 side_bits=8, kv_start=False, seed=0):
    k = make((B, H, Tq, D), device, seed=seed)
    v = make((B, H, Tq, D), device, seed=seed + 1)
    q = make((B, H * n_rep, D), device, dtype, seed=seed + 2)
    kw = make((B, H, W, D), device, dtype, seed=seed + 3)
    vw = make((B, H, W, D), device, dtype, seed=seed + 4)
    kc = ops.quantize_keys(k, key_bits, G)
    basis = orthonormal_basis(H, D, rank, device, seed) if side else None
    zc = ops.side_code(k, *kc, basis, key_bits, G, side_bits, False) if side else (None, None)
    if dense_values:
        vc, vd = (None, None, None), v.to(dtype)
    else:
        vc, vd = ops.quantize_values(v, value_bits, Gv), None
    hd = hi = None
    if heavy:
        g = torch.Generator().manual_seed(seed + 5)
        hi = torch.randint(0, Tq, (B, H, heavy), generator=g, dtype=torch.int32)
        hi[:, :, -1] = -1
        hi[:, :, ::7] = -1  # empty slots among the kept ones (a padded keep set)
        hd = (torch.randn(B, H, heavy, D, generator=g) * 0.1).to(dtype)
        hi, hd = hi.to(device), hd.to(device)
    n_quant = torch.tensor([Tq, Tq - G, G // 2][:B], dtype=torch.int32, device=device)
    n_window = torch.tensor([W, 0, max(W - 1, 0)][:B], dtype=torch.int32, device=device)
    start = torch.tensor([0, 3, 40][:B], dtype=torch.int32, device=device) if kv_start else None
    args = (q, *kc, *zc, basis, *vc, vd, hd, hi, kw, vw, n_quant, n_window, start,
            key_bits, G, side_bits, value_bits, Gv, 1.0, 1 / math.sqrt(D))
    return args


def _set_env(monkeypatch, name, value):
    """Set the environment variable ``name`` for the test (a launch switch the op reads at
    every call); None unsets it (the op's default)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


# _decode_case formats of the non-finite decode tests: the default (2-bit keys and values, side
# code), 4-bit keys, 4-bit values, no side code (the lean tensor-core kernel).
_NONFINITE_FMTS = {"k2_side": {}, "k4_side": {"key_bits": 4}, "v4": {"value_bits": 4},
                   "k2_noside": {"side": False}}


def _start_at_last_window_token(args):
    """kv_start (args[17]) of a _decode_case's 3 sequences: sequence 0's first visible token is
    its window's last one; the others start at 3 and 0."""
    nq, nw = args[15].cpu(), args[16].cpu()
    args[17] = torch.tensor([int(nq[0] + nw[0]) - 1, 3, 0], dtype=torch.int32,
                            device=args[15].device)


def _upcast(args, dtype):
    """Move to the CPU; cast q, windows, dense values, deltas and the basis to ``dtype``.
    Scales and zeros (float16 storage) stay as they are: the reference reads them exactly."""
    out = []
    for i, t in enumerate(args):
        if isinstance(t, torch.Tensor):
            t = t.cpu()
            if t.is_floating_point() and i not in _STORED_F16:
                t = t.to(dtype)
        out.append(t)
    return out


# Positions of float16 storage tensors in decode_attention's argument list.
_STORED_F16 = {2, 3, 5, 8, 9}


def _decode_fp64(args):
    """float64 twin of the reference decode (exact dequantisation, float64 attention)."""
    return ref.decode_attention(*_upcast(args, torch.float64))


# Output tolerance per query dtype against the float64 reference (16-bit: the output's own
# rounding dominates) and between two kernel results.
_TOL_OUT = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _assert_decode_matches_reference(out, lse, args, dtype, query_tokens: int = 1):
    """``decode_attention(*args, query_tokens=...)``'s ``out`` / ``lse`` against the reference:
    float32 output within twice the float32 reference's error vs float64 (plus a floor), 16-bit
    output within its rounding of the float64 result; lse within 1e-5 / 1e-4 of float64."""
    want64, lse64 = ref.decode_attention(*_upcast(args, torch.float64),
                                         query_tokens=query_tokens)
    if dtype == torch.float32:
        want32, _ = ref.decode_attention(*_upcast(args, torch.float32), query_tokens=query_tokens)
        assert_close_to_fp64(out, want32, want64, floor=1e-5)
    else:
        tol = _TOL_OUT[dtype]
        torch.testing.assert_close(out.cpu().float(), want64.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu().double(), lse64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(key_bits=4, value_bits=4),
        dict(key_bits=3, value_bits=8, G=64, Gv=64),
        dict(dense_values=True),
        dict(heavy=6),
        # CUDA: several heavy splits of 32 slots (few blocks: plan_heavy's short chunks); slots
        # past n_quant, before kv_start and -1 among them
        dict(heavy=200, Tq=1024, kv_start=True),
        # more than 32 chunks of 32: splits of 64 slots
        dict(heavy=1100, Tq=2048, G=64, Gv=64, kv_start=True),
        # more than 32 chunks of 64: splits of 128 slots; tokens kept twice
        dict(heavy=2100, Tq=1024, G=64, Gv=64),
        # the heavy kernel's key-code paths (2 and 4 bits compiled apart, 3 and 8 generic) and
        # its query-head groups of 1 and 8
        dict(heavy=40, key_bits=4, value_bits=4, kv_start=True),
        dict(heavy=40, key_bits=3, value_bits=8, G=64, Gv=64),
        dict(heavy=40, key_bits=8, value_bits=2, rank=16),
        # side-code rows of 5 bytes (no word alignment) and of 4 (4-bit codes)
        dict(heavy=40, rank=5),
        dict(heavy=40, rank=8, side_bits=4),
        dict(heavy=40, n_rep=1, B=2),
        dict(heavy=40, n_rep=8),
        dict(kv_start=True),
        dict(side=False, W=0),
        dict(n_rep=1, B=2),
    ],
    ids=["2bit", "4bit", "3k8v", "dense_v", "heavy", "heavy_splits", "heavy_chunks_64",
         "heavy_chunks_128",
         "heavy_4bit", "heavy_3k8v", "heavy_8k_r16", "heavy_r5", "heavy_side4", "heavy_mha",
         "heavy_ratio8",
         "kv_start", "no_side_no_window", "mha"],
)
def test_decode_attention(device, dtype, head_dim, case):
    args = _decode_case(device, dtype, D=head_dim, **case)
    out, lse = ops.decode_attention(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert lse.dtype == torch.float32 and lse.shape == args[0].shape[:2]
    _assert_decode_matches_reference(out, lse, args, dtype)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize(
    "case",
    [dict(heavy=12), dict(heavy=40, kv_start=True), dict(heavy=300, Tq=1024, n_rep=4),
     dict(heavy=12, key_bits=4, value_bits=4), dict(heavy=40, n_rep=1, B=2),
     dict(heavy=40, n_rep=8), dict(heavy=12, side=False), dict(heavy=12, D=128)],
    ids=["heavy", "kv_start", "chunks", "4bit", "mha", "ratio8", "no_side", "d128"],
)
def test_decode_attention_heavy_logits(device, dtype, case):
    """With heavy_logits, the op also writes each kept slot's logit for every query head: the
    reference's (float64) where the token is visible, -inf for empty slots and tokens before
    kv_start or past n_quant; the output and lse are the same as without it."""
    args = _decode_case(device, dtype, **case)
    B, Hq = args[0].shape[:2]
    K = args[12].shape[-1]
    hl = torch.full((B, Hq, K), 7.0, device=device)  # every element must be written
    out, lse = ops.decode_attention(*args, heavy_logits=hl)
    out0, lse0 = ops.decode_attention(*args)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    want = torch.empty(B, Hq, K, dtype=torch.float64)
    ref.decode_attention(*_upcast(args, torch.float64), heavy_logits=want)
    hl = hl.cpu().double()
    fin = torch.isfinite(want)
    assert fin.any() and (~fin).any()
    assert torch.equal(torch.isfinite(hl), fin)
    assert (hl[~fin] == float("-inf")).all()
    torch.testing.assert_close(hl[fin], want[fin], rtol=1e-5, atol=1e-4)
    # the A² step's kept-token weights: exp(logit - lse) is the token's attention probability
    # (a sequence that sees nothing has lse -inf: nan_to_num, as the library does)
    a = torch.exp(hl - lse.cpu().double().unsqueeze(-1)).nan_to_num(0.0)
    assert ((a >= 0) & (a <= 1 + 1e-6)).all()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_decode_attention_heavy_logits_bad_input(device):
    args = _decode_case(device, torch.float32, heavy=12)
    B, Hq = args[0].shape[:2]
    with pytest.raises(RuntimeError, match=r"heavy_logits must have shape \[3, 8, 12\]"):
        ops.decode_attention(*args, heavy_logits=torch.empty(B, Hq, 11, device=device))
    with pytest.raises(RuntimeError, match="heavy_logits must have dtype float32"):
        ops.decode_attention(*args, heavy_logits=torch.empty(B, Hq, 12, device=device).half())
    with pytest.raises(RuntimeError, match="heavy_logits must be contiguous"):
        ops.decode_attention(*args, heavy_logits=torch.empty(B, 12, Hq, device=device).mT)
    no_heavy = list(_decode_case(device, torch.float32))
    with pytest.raises(RuntimeError, match="heavy_logits .* needs heavy_idx"):
        ops.decode_attention(*no_heavy, heavy_logits=torch.empty(B, Hq, 12, device=device))


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("L,n_rep", [(2, 4), (4, 4), (3, 6), (8, 8)], ids=lambda x: str(x))
@pytest.mark.parametrize(
    "case",
    [dict(), dict(heavy=40, kv_start=True), dict(D=128, W=40), dict(late_start=True),
     dict(dense_values=True)],
    ids=["plain", "heavy_kv_start", "d128", "late_start", "dense_v"],
)
def test_decode_attention_query_tokens(device, dtype, L, n_rep, case):
    """query_tokens=L (a few-token call in one op call): query head j is token j % L of the
    window's last L tokens and sees the window up to its own token. Against the float64
    reference with the same query_tokens, and against L decode steps (query_tokens=1), step i
    taking the heads of token i over the window up to that token. late_start: sequence 0's
    first visible token is its window's last one, so its rows for the earlier tokens see
    nothing (zeros, lse -inf)."""
    case = dict(case)
    late = case.pop("late_start", False)
    W = case.pop("W", 20)
    args = list(_decode_case(device, dtype, n_rep=n_rep, W=W, **case))
    if late:
        _start_at_last_window_token(args)
    out, lse = ops.decode_attention(*args, query_tokens=L)
    _assert_decode_matches_reference(out, lse, args, dtype, query_tokens=L)
    if late:  # heads of the earlier tokens (j % L < L - 1) see nothing
        blind = torch.arange(out.shape[1], device=device) % L != L - 1
        assert torch.all(out[0, blind] == 0) and torch.all(torch.isneginf(lse[0, blind]))
        assert torch.isfinite(lse[0, ~blind]).all()
    tol = _TOL_OUT[dtype]
    for i in range(L):
        step = list(args)
        step[0] = args[0][:, i::L].contiguous()
        step[16] = (args[16] - (L - 1 - i)).clamp_min(0)
        o_i, l_i = ops.decode_attention(*step)
        torch.testing.assert_close(out[:, i::L].cpu().float(), o_i.cpu().float(), rtol=tol,
                                   atol=tol)
        torch.testing.assert_close(lse[:, i::L].cpu(), l_i.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_query_tokens_bad_input(device):
    args = _decode_case(device, torch.float32)  # 8 query heads
    with pytest.raises(RuntimeError, match=r"decode_attention: query_tokens must be >= 1, got 0"):
        ops.decode_attention(*args, query_tokens=0)
    with pytest.raises(RuntimeError, match=r"decode_attention: query_heads \(8\) must be a "
                                           r"multiple of query_tokens \(3\)"):
        ops.decode_attention(*args, query_tokens=3)
    q, kw = args[0], args[13]
    B, Hq = q.shape[:2]
    lse = torch.zeros(B, Hq, device=device)
    w = torch.zeros(B, kw.shape[1], kw.shape[2], device=device)
    for L, match in ((0, r"a2_step_weights: query_tokens must be >= 1, got 0"),
                     (3, r"a2_step_weights: query_heads \(8\) must be a multiple of "
                         r"query_tokens \(3\)")):
        with pytest.raises(RuntimeError, match=match):
            ops.a2_step_weights(q, kw, lse, args[15], args[16], None, 1.0, w, query_tokens=L)
    assert torch.all(w == 0)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("Tq", [1024, 8192, 32768])
def test_decode_attention_float32_error_does_not_grow_with_context(device, Tq):
    """float32 sums over tokens. CPU: per block of 64 in float, across blocks in double (with
    float running sums its error grew with the context: 1.1e-5 at 4k tokens, 50x the float32
    PyTorch path's). CUDA (float32 queries run the SIMT kernel): per split in float, tree sums
    within a tile. Both stay within 2x of the float32 PyTorch path plus a 1e-6 floor."""
    if device == "cpu" and Tq > 8192:
        pytest.skip("the CPU kernel's sums are checked up to 8k (16k in bench_cpu_accuracy)")
    args = _decode_case(device, torch.float32, D=128, Tq=Tq, G=64, Gv=64, heavy=300,
                        kv_start=True)
    out, _ = ops.decode_attention(*args)
    want32, _ = ref.decode_attention(*_upcast(args, torch.float32))
    want64, _ = _decode_fp64(args)
    assert_close_to_fp64(out.cpu(), want32, want64, floor=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the heavy-slot kernel's stage is CUDA's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_dt_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "case",
    [dict(heavy=200, Tq=1024, kv_start=True), dict(heavy=1100, Tq=2048, G=64, Gv=64),
     dict(heavy=2100, Tq=1024, G=64, Gv=64), dict(heavy=300, key_bits=3, value_bits=8, G=64,
                                                  Gv=64, rank=5),
     dict(heavy=130, rank=8, side_bits=4, n_rep=8), dict(heavy=90, side=False, n_rep=1, B=2)],
    ids=["chunks_32", "chunks_64", "chunks_128", "3k8v_r5", "side4_ratio8", "no_side_mha"])
def test_decode_heavy_stage_sizes_agree_exactly(monkeypatch, dtype, head_dim, case):
    """The heavy-slot kernel stages 64 or 32 slots' rows at a time (HEADQ_HEAVY_STAGE forces
    one; unset, the launch picks by residency). Each slot's logit and each row group's delta
    sum keep their order whatever the stage size, so the outputs are bit-identical, and they
    match the reference."""
    args = _decode_case("cuda", dtype, D=head_dim, **case)
    outs = {}
    for stage in ("32", "64", None):
        _set_env(monkeypatch, "HEADQ_HEAVY_STAGE", stage)
        outs[stage] = ops.decode_attention(*args)
    for stage in ("64", None):
        assert torch.equal(outs[stage][0], outs["32"][0]), stage
        assert torch.equal(outs[stage][1], outs["32"][1]), stage
    _assert_decode_matches_reference(*outs["32"], args, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the split plan is the CUDA launch's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=_dt_id)
@pytest.mark.parametrize(
    "case",
    [dict(B=1, Tq=4096, G=64, Gv=64, W=0), dict(B=2, Tq=3000 // 64 * 64, G=64, Gv=64, W=70),
     dict(B=1, Tq=2048, heavy=100, kv_start=True)],
    ids=["batch1_4k", "batch2_window", "batch1_heavy"])
def test_decode_split_min_tiles_keeps_the_answer(monkeypatch, dtype, case):
    """The split plan (the default, or HEADQ_SPLIT_MIN_TILES: at least that many tiles per
    split; benchmarks/bench_decode_batch.py times them) changes how a sequence is cut over
    blocks, never what the op returns: every setting matches the reference, whichever kernel
    (tensor-core or SIMT) runs."""
    args = _decode_case("cuda", dtype, D=128, **case)
    # 100000: one split; "0", "x": not a count, the default plan
    for m in (None, "1", "2", "4", "16", "100000", "0", "x"):
        _set_env(monkeypatch, "HEADQ_SPLIT_MIN_TILES", m)
        out, lse = ops.decode_attention(*args)
        _assert_decode_matches_reference(out, lse, args, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel is CUDA's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "case",
    [dict(Tq=1024, W=30, kv_start=True), dict(Tq=1024, W=5), dict(Tq=2048, W=20, heavy=40),
     dict(Tq=1024, W=20, query_tokens=4), dict(Tq=1024, W=9, late_start=True),
     dict(Tq=1024, W=37), dict(Tq=1024, W=30, side=False), dict(Tq=1024, W=9, n_rep=8)],
    ids=["w30_kv_start", "w5", "w20_heavy", "few_tokens", "late_start", "w37_window_splits",
         "no_side_lean", "ratio8_two_tiles"])
def test_decode_window_in_tensor_core_splits(monkeypatch, dtype, head_dim, case):
    """On the tensor-core path with the default format, a window of at most 8 tokens per split
    is attended by the splits themselves (each its slice, merged with its quantised tokens;
    HEADQ_MMA_WINDOW=0: by window splits of the SIMT kernel). Both match the reference and each
    other, with kv_start, heavy slots, few-token calls, a sequence whose first visible token is
    its window's last; more window tokens than that (w37), other formats (no side code: the
    lean kernel) and 8 query heads per KV head (two head tiles) keep the window splits."""
    case = dict(case)
    L = case.pop("query_tokens", 1)
    late = case.pop("late_start", False)
    args = list(_decode_case("cuda", dtype, D=head_dim, G=64, Gv=64, **case))
    if late:
        _start_at_last_window_token(args)
    outs = {}
    for env in ("0", None):
        _set_env(monkeypatch, "HEADQ_MMA_WINDOW", env)
        outs[env] = ops.decode_attention(*args, query_tokens=L)
        _assert_decode_matches_reference(*outs[env], args, dtype, query_tokens=L)
    tol = _TOL_OUT[dtype]
    torch.testing.assert_close(outs[None][0].float(), outs["0"][0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(outs[None][1], outs["0"][1], rtol=1e-5, atol=1e-4)
    if late:  # sequence 0 sees only its window's last token
        assert torch.isfinite(outs[None][1][0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel is CUDA's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt_id)
@pytest.mark.parametrize("window", [0, 5], ids=["no_window", "window"])
def test_decode_fixed_kernel_per_group_scales(monkeypatch, dtype, window):
    """The default format's tensor-core kernel folds each 64-token key group's scales into the
    query (Q') once per group and warp, over splits of one tile (256 tokens) up to one split per
    sequence, a partial last tile, kv_start inside a warp's sub-tile of the first tile. Each key
    group here has its scales and zeros multiplied by its own power of two (2^-2 .. 2^2), so
    that a Q' of the wrong group cannot pass: every split plan matches the reference. (A module
    that built the next tile's Q' early, from the wrong group's scales, failed all four cases:
    session 29, on an H100.)"""
    D, G, Tq = 128, 64, 1344  # 5 whole tiles and a quarter
    args = list(_decode_case("cuda", dtype, D=D, G=G, Gv=64, Tq=Tq, W=window, kv_start=True))
    ngroups = Tq // G
    f = torch.tensor([2.0 ** (g % 5 - 2) for g in range(ngroups)], device="cuda")
    for i in (2, 3):  # key scales, zeros: [B, H, groups, D] (float16)
        assert args[i].shape[2] == ngroups
        args[i] = (args[i].float() * f[None, None, :, None]).to(args[i].dtype)
    # lengths ending inside a tile (1000: a partial last tile) and in a group's middle; kv_start
    # in warp 1's sub-tile of the first tile, at 0, in a later group
    args[15] = torch.tensor([Tq, 1000, 300], dtype=torch.int32, device="cuda")
    args[17] = torch.tensor([100, 0, 70], dtype=torch.int32, device="cuda")
    for m in (None, "1", "2", "3", "100000"):
        _set_env(monkeypatch, "HEADQ_SPLIT_MIN_TILES", m)
        out, lse = ops.decode_attention(*args)
        _assert_decode_matches_reference(out, lse, args, dtype)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("path", ["default", "window_splits"])
def test_decode_nan_window_row_gives_nan_rows(monkeypatch, device, which, path):
    """A NaN in one dense-window key makes the rows of its (sequence, KV head) NaN, output and
    lse; a NaN in a value row makes that channel of those rows NaN. Everything else stays
    finite, as dense attention would give. On CUDA with the default format the tensor-core
    splits attend the window, each split a slice (here of one token, so the NaN token is its
    slice's only one); HEADQ_MMA_WINDOW=0 gives the window to window splits instead."""
    if device == "cpu" and path != "default":
        pytest.skip("HEADQ_MMA_WINDOW selects between CUDA kernels")
    args = list(_decode_case(device, torch.float16, D=128, G=64, Gv=64, Tq=1024, W=3))
    i = 13 if which == "key" else 14  # k_window / v_window [B, H, W, D]
    win = args[i].clone()
    win[0, 1, 2, 7] = float("nan")
    args[i] = win
    _set_env(monkeypatch, "HEADQ_MMA_WINDOW", None if path == "default" else "0")
    out, lse = ops.decode_attention(*args)
    bad = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    if which == "key":
        bad[0, 4:8] = True  # query heads 4..7 read KV head 1
        assert lse[0, 4:8].isnan().all()
        assert torch.isfinite(lse[~bad[..., 0]]).all()
    else:
        bad[0, 4:8, 7] = True
        assert torch.isfinite(lse).all()
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("fmt", ["k2_side", "k4_side", "k2_noside"])
@pytest.mark.parametrize("split", ["auto", "one_tile"])
@pytest.mark.parametrize("group", [0, 1, 5])
def test_decode_nan_key_group_gives_nan_rows(monkeypatch, device, fmt, split, group):
    """A NaN key scale of one (sequence, KV head, 64-token group, channel) makes every logit of
    that group NaN: the rows of that (sequence, KV head) are NaN, output and lse, everything
    else finite. With one-tile splits on CUDA the group is one warp's whole 64-token sub-tile
    (group 1 of tile 0; group 5 of tile 1), whose only visible logits are then NaN: its running
    max stays -inf (the max ignores NaN) and the end-of-split merge must not drop it as empty.
    Formats: the default (2-bit keys, side code), 4-bit keys, no side code (the lean kernel)."""
    if device == "cpu" and split != "auto":
        pytest.skip("HEADQ_SPLIT_MIN_TILES selects CUDA launch plans")
    args = list(_decode_case(device, torch.float16, D=128, G=64, Gv=64, Tq=1024, W=3,
                             **_NONFINITE_FMTS[fmt]))
    scale = args[2].clone()  # key scale [B, H, Tq / G, D]
    scale[0, 1, group, 7] = float("nan")
    args[2] = scale
    _set_env(monkeypatch, "HEADQ_SPLIT_MIN_TILES", None if split == "auto" else "1")
    out, lse = ops.decode_attention(*args)
    bad = torch.zeros(lse.shape, dtype=torch.bool, device=lse.device)
    bad[0, 4:8] = True  # query heads 4..7 read KV head 1
    assert lse[bad].isnan().all() and torch.isfinite(lse[~bad]).all()
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("path", ["default", "window_splits"])
def test_decode_nan_window_value_hidden_from_earlier_rows(monkeypatch, device, path):
    """A few-token call (query_tokens = 4): a NaN in the value row of the call's last token
    reaches only the rows that see that token (the last query token's heads); the earlier rows
    leave it out instead of weighting it by 0 (0 * NaN = NaN). The reference, the CPU op and the
    tensor-core window slice do; the SIMT window splits (HEADQ_MMA_WINDOW=0 on CUDA) still
    weight it by 0 (docs/BAD_INPUT.md, known differences): xfail there when exactly that
    happens (every head of the KV head NaN in that channel), a failure otherwise."""
    if device == "cpu" and path != "default":
        pytest.skip("HEADQ_MMA_WINDOW selects between CUDA kernels")
    _set_env(monkeypatch, "HEADQ_MMA_WINDOW", None if path == "default" else "0")
    L = 4
    args = list(_decode_case(device, torch.float16, D=128, G=64, Gv=64, Tq=1024, W=6))
    vw = args[14].clone()  # v_window [B, H, W, D]; sequence 0 has n_window = W
    vw[0, 1, 5, 7] = float("nan")
    args[14] = vw
    want, want_lse = ref.decode_attention(*_upcast(args, torch.float64), query_tokens=L)
    out, lse = ops.decode_attention(*args, query_tokens=L)
    bad = torch.zeros(out.shape, dtype=torch.bool)
    bad[0, 7, 7] = True  # KV head 1's query heads 4..7 are tokens 0..3; only token 3 sees w = 5
    assert want[bad].isnan().all() and torch.isfinite(want[~bad]).all()
    assert torch.isfinite(want_lse).all() and torch.isfinite(lse).all()
    got = out.cpu()
    if path == "window_splits":
        known = torch.zeros_like(bad)
        known[0, 4:8, 7] = True  # every head of KV head 1, channel 7: 0 * NaN for heads 4..6
        if torch.equal(~torch.isfinite(got), known):
            pytest.xfail("SIMT window splits weight a hidden NaN value row by 0 (known difference)")
    assert got[bad].isnan().all() and torch.isfinite(got[~bad]).all()
    torch.testing.assert_close(got[~bad].double(), want[~bad], rtol=_TOL_OUT[torch.float16],
                               atol=_TOL_OUT[torch.float16])


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt_id)
@pytest.mark.parametrize("fmt", ["k2_side", "k2_noside", "v4"])
def test_decode_inf_value_scale_confined_to_its_group(device, dtype, fmt):
    """An infinite value scale (what quantize_values stores for a value group that overflows
    fp16) of one (token, channel group): the output channels of that group, for the query heads
    of its KV head, are non-finite; every other channel and every lse stays finite. The
    tensor-core kernel picks its P' power of two from the sub-tile's largest value scale, so an
    Inf there made every channel of those rows non-finite."""
    args = list(_decode_case(device, dtype, D=128, G=64, Gv=64, Tq=1024, W=3,
                             **_NONFINITE_FMTS[fmt]))
    vs = args[8].clone()  # value scale [B, H, Tq, D / Gv]
    vs[0, 1, 70, 0] = float("inf")
    args[8] = vs
    out, lse = ops.decode_attention(*args)
    bad = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    bad[0, 4:8, :64] = True  # query heads 4..7 read KV head 1; channels 0..63 are group 0
    assert torch.isfinite(lse).all()
    assert (~torch.isfinite(out[bad])).all() and torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_decode_attention_empty_sequence_gives_zeros(device):
    args = list(_decode_case(device, torch.float32, kv_start=False))
    args[15] = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)  # n_quant
    args[16] = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)  # n_window
    out, lse = ops.decode_attention(*args)
    assert torch.all(out == 0)
    assert torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_decode_attention_matches_dense_softmax_at_8_bits(device):
    """End to end against plain attention over the original float keys and values."""
    B, H, n_rep, D, T = 2, 2, 2, 64, 256
    k = make((B, H, T, D), device, seed=1)
    v = make((B, H, T, D), device, seed=2)
    q = make((B, H * n_rep, D), device, seed=3)
    kc = ops.quantize_keys(k, 8, 64)
    vc = ops.quantize_values(v, 8, 64)
    empty = k.new_zeros(B, H, 0, D)
    n = torch.full((B,), T, dtype=torch.int32, device=device)
    z = torch.zeros(B, dtype=torch.int32, device=device)
    out, _ = ops.decode_attention(q, *kc, None, None, None, *vc, None, None, None, empty, empty,
                                  n, z, None, 8, 64, 8, 8, 64, 1.0, D ** -0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), ref.expand_kv(k, n_rep), ref.expand_kv(v, n_rep))[:, :, 0]
    assert (out - dense).abs().max() < 2e-2


# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    k = make((1, 2, 64, 64), device, seed=1)
    kc = ops.quantize_keys(k, 2, 32)
    basis = orthonormal_basis(2, 64, 8, device)
    zc = ops.side_code(k, *kc, basis, 2, 32, 8, True)
    vc = ops.quantize_values(k, 2, 32)
    q = make((1, 4, 3, 64), device, seed=2)
    dec = _decode_case(device, torch.float32, heavy=3, kv_start=True)
    return {
        "quantize_keys": (k, 2, 32),
        "dequantize_keys": (*kc, 2, 32, torch.float32),
        "quantize_values": (k, 2, 32),
        "dequantize_values": (*vc, 2, 32, torch.float16),
        "side_code": (k, *kc, basis, 2, 32, 8, True),
        "dequantize_side": (*zc, 8),
        "reconstruct_keys": (*kc, *zc, basis, 2, 32, 8, -1.0, torch.bfloat16),
        "dequantize_keys_into": (*kc, 2, 32, torch.empty(1, 2, 64, 64, device=device)),
        "dequantize_values_into": (*vc, 2, 32, torch.empty(1, 2, 70, 64, device=device,
                                                           dtype=torch.float16)[:, :, 3:67]),
        "reconstruct_keys_into": (*kc, *zc, basis, 2, 32, 8, -1.0,
                                  torch.empty(1, 64, 2, 64, device=device,
                                              dtype=torch.bfloat16).transpose(1, 2)),
        "corrected_logits": (q, *kc, *zc, basis, 2, 32, 8, 1.0, 0.125),
        "decode_attention": dec,
        "decode_attention:heavy_logits": (*dec, torch.empty(3, 8, 3, device=device)),
        "a2_weights": (q, k, None, 0.125),
        "a2_weights:mask": (q, k, torch.ones(1, 3, 64, dtype=torch.bool, device=device).tril(61),
                            0.125),
        "a2_weights:lse": (q, k, None, 0.125, torch.zeros(q.shape[:3], device=device)),
        "a2_step_weights": _a2_step_case(device),
    }


def _a2_step_case(device):
    B, Hq, H, W, D, K = 2, 4, 2, 16, 64, 3
    g = torch.Generator().manual_seed(9)
    dev = dict(device=device)
    return (torch.randn(B, Hq, D, generator=g).to(**dev),
            torch.randn(B, H, W, D, generator=g).to(**dev),
            torch.full((B, Hq), 4.0, **dev), torch.tensor([5, 0], dtype=torch.int32, **dev),
            torch.tensor([16, 9], dtype=torch.int32, **dev),
            torch.tensor([0, 3], dtype=torch.int32, **dev), 0.125,
            torch.zeros(B, H, W, **dev), torch.randn(B, Hq, K, generator=g).to(**dev),
            torch.zeros(B, H, K, **dev))


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("name", list(_opcheck_cases("cpu").keys()))
def test_opcheck(device, name):
    args = _opcheck_cases(device)[name]
    torch.library.opcheck(getattr(torch.ops.headq, name.split(":")[0]).default, args)


# ----------------------------------------------------------------------------- bad input


def _k(shape=(1, 2, 64, 64), dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.quantize_keys(_k((2, 64, 64)), 2, 32), "k"),
        (lambda: ops.quantize_keys(_k(), 5, 32), "bits"),
        (lambda: ops.quantize_keys(_k(), 2, 48), "group_size"),
        (lambda: ops.quantize_keys(_k((1, 2, 70, 64)), 2, 32), "group_size"),
        (lambda: ops.quantize_keys(_k((1, 2, 64, 60)), 2, 32), "head_dim"),
        (lambda: ops.quantize_keys(_k(dtype=torch.float64), 2, 32), "dtype"),
        (lambda: ops.quantize_keys(torch.randint(0, 3, (1, 2, 64, 64)), 2, 32), "dtype"),
        (lambda: ops.quantize_keys(_k((1, 2, 0, 64)), 2, 32), "empty|tokens"),
        (lambda: ops.quantize_values(_k((1, 2, 5, 96)), 2, 64), "group_size"),
        (lambda: ops.quantize_values(_k(), 1, 32), "bits"),
        (lambda: ops.dequantize_keys(*ops.quantize_keys(_k(), 2, 32)[:2],
                                     torch.zeros(1, 2, 1, 64, dtype=torch.float16), 2, 32,
                                     torch.float32), "zero"),
        (lambda: ops.dequantize_keys(ops.quantize_keys(_k(), 2, 32)[0].float(),
                                     *ops.quantize_keys(_k(), 2, 32)[1:], 2, 32,
                                     torch.float32), "codes"),
    ],
    ids=["rank", "bits", "group", "tokens", "head_dim", "float64", "int", "empty", "vgroup",
         "vbits", "zero_shape", "codes_dtype"],
)
def test_bad_input_quantize(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def test_bad_input_side_code_and_logits():
    k = _k()
    kc = ops.quantize_keys(k, 2, 32)
    with pytest.raises(RuntimeError, match="basis"):
        ops.side_code(k, *kc, torch.randn(2, 32, 8), 2, 32, 8, False)  # head_dim mismatch
    with pytest.raises(RuntimeError, match="basis"):
        ops.side_code(k, *kc, torch.randn(3, 64, 8), 2, 32, 8, False)  # heads mismatch
    with pytest.raises(RuntimeError, match="basis"):
        ops.side_code(k, *kc, torch.randn(2, 64, 8, dtype=torch.float64), 2, 32, 8, False)
    with pytest.raises(RuntimeError, match="side_bits"):
        ops.side_code(k, *kc, torch.randn(2, 64, 8), 2, 32, 6, False)
    with pytest.raises(RuntimeError, match="rank|r \\*|side_bits"):
        ops.side_code(k, *kc, torch.randn(2, 64, 3), 2, 32, 4, False)  # 3*4 bits not bytes
    q = torch.randn(1, 3, 1, 64)  # 3 query heads cannot share 2 KV heads
    with pytest.raises(RuntimeError, match="heads"):
        ops.corrected_logits(q, *kc, None, None, None, 2, 32, 8, 1.0, 1.0)


def test_bad_input_decode():
    args = list(_decode_case("cpu", torch.float32, heavy=3))
    bad = list(args)
    bad[15] = torch.tensor([10_000, 0, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="n_quant"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[16] = torch.tensor([0, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="n_window"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[15] = args[15].long()
    with pytest.raises(RuntimeError, match="n_quant"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[10] = torch.zeros(3, 2, 128, 64)  # v_dense together with v_codes
    with pytest.raises(RuntimeError, match="v_dense|v_codes"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[12] = None  # heavy_delta without heavy_idx
    with pytest.raises(RuntimeError, match="heavy"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[0] = torch.randn(3, 8, 32)  # head dim of q differs from the cache's
    with pytest.raises(RuntimeError, match="head_dim|q"):
        ops.decode_attention(*bad)
    bad = list(args)
    bad[13] = args[13].half()  # window dtype differs from q's
    with pytest.raises(RuntimeError, match="k_window"):
        ops.decode_attention(*bad)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
def test_nonfinite_input_is_confined_to_its_group(device):
    """Documented policy: NaN/Inf are not rejected; they poison exactly their own group."""
    k = make((1, 1, 64, 64), device, seed=9)
    k[0, 0, 3, 7] = float("nan")
    k[0, 0, 40, 9] = float("inf")
    codes, scale, zero = ops.quantize_keys(k, 2, 32)
    khat = ops.dequantize_keys(codes, scale, zero, 2, 32)
    bad = ~torch.isfinite(khat)
    assert bad[0, 0, :32, 7].all() and bad[0, 0, 32:, 9].all()
    bad[0, 0, :32, 7] = False
    bad[0, 0, 32:, 9] = False
    assert not bad.any()


# ----------------------------------------------------------------------------- storage


def test_storage_report_counts_everything():
    rep = headq_torch.storage_report(head_dim=128, context_len=32768, key_bits=2, value_bits=2,
                                     group_size=64, value_group_size=64, rank=8, side_bits=8)
    # keys: 2 bits * 128 + 32 bits * 128 / 64 (scale+zero) + 8 * 8 + 16 (side code + scale)
    # values: 2 bits * 128 + 2 groups * 32 bits; basis 128*8*32 bits over 32768 tokens.
    k_tok = 256 + 64 + 64 + 16 + 128 * 8 * 32 / 32768
    v_tok = 256 + 64
    assert rep.key_bits_per_token == pytest.approx(k_tok)
    assert rep.value_bits_per_token == pytest.approx(v_tok)
    assert rep.bits_per_element == pytest.approx((k_tok + v_tok) / 256)
    assert rep.bits_per_element <= 3.0
    assert rep.compression_vs_fp16 >= 5.3
    dense = headq_torch.storage_report(head_dim=64, context_len=100, key_bits=16, value_bits=16)
    assert dense.bits_per_element == 16
    with pytest.raises(ValueError, match="context_len"):
        headq_torch.storage_report(head_dim=64, context_len=0)


@pytest.mark.parametrize("device", DEVICES, ids=_dev_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt_id)
def test_decode_attention_nan_query_propagates(device, dtype):
    """A NaN query poisons exactly its own head (output and lse NaN), never a silent zero."""
    args = list(_decode_case(device, dtype))
    q = args[0].clone()
    q[1, 2, 5] = float("nan")
    args[0] = q
    out, lse = ops.decode_attention(*args)
    assert out[1, 2].isnan().all() and lse[1, 2].isnan()
    keep = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    keep[1, 2] = False
    assert torch.isfinite(out[keep]).all() and torch.isfinite(lse[keep]).all()
