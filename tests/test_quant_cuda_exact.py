"""CUDA quantisers bit for bit against the CPU kernels on adversarial inputs (GPU only).

The CUDA quantise kernels (csrc/cuda/quant_fast.cuh) take shortcuts that are exact only by
argument: a reciprocal instead of a division with an exact fallback near half-integers, a
one-instruction NaN-propagating min/max with an ordered re-reduction when the extremum is NaN or
+-0. These tests feed exactly the inputs those arguments are about (quotients on and next to
half-integers, -0.0 / +0.0 ties, NaN and inf, constant sets, subnormal and huge magnitudes) over
the shapes, strides and dtypes the launchers route differently, and compare codes, scales and
zeros with the CPU kernels (themselves bit-exact with the reference, tests/test_ops.py).
Skipped without CUDA; recorded runs: benchmarks/results/gpu_quant.json.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from headq_torch import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _adversarial(shape, dtype, seed, kind):
    """Random data with special values planted. kind picks the plant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    n = flat.numel()
    idx = lambda frac: torch.randperm(n, generator=g)[: max(1, int(n * frac))]  # noqa: E731
    if kind == "halfway":
        # values on a grid of (k + 1/2) * s + z and one ulp either side: quotients at and next to
        # half-integers, where only a correctly rounded division decides the code.
        s = 0.37
        k = torch.randint(0, 4, (n,), generator=g).float()
        base = (k + 0.5) * s - 1.0
        nudge = torch.randint(-1, 2, (n,), generator=g).float()
        flat.copy_(torch.nextafter(base, base + nudge))  # nudge 0: on the half-integer
        flat[idx(0.01)] = -1.0  # pin the minimum of most sets near z = -1
    elif kind == "zeros":
        flat[idx(0.3)] = 0.0
        flat[idx(0.3)] = -0.0
    elif kind == "nan":
        flat[idx(0.002)] = float("nan")
        flat[idx(0.002)] = float("inf")
        flat[idx(0.002)] = float("-inf")
    elif kind == "constant":
        x.fill_(1.5)
        flat[idx(0.01)] = -0.0
    elif kind == "tiny":
        x.mul_(1e-6)
        flat[idx(0.05)] = 6e-8  # fp16 subnormal range
    elif kind == "huge":
        x.mul_(3e4)
    return x.to(dtype)


KINDS = ["plain", "halfway", "zeros", "nan", "constant", "tiny", "huge"]


def _tokens(T, D, dtype, seed, kind, noncontig):
    """Adversarial [2, 3, T, D] input; noncontig: a [2, T, 3, D] tensor viewed as it (the layout
    transformers' projections give)."""
    if noncontig:
        return _adversarial((2, T, 3, D), dtype, seed, kind).transpose(1, 2)
    return _adversarial((2, 3, T, D), dtype, seed, kind)


def _basis(D, r, seed):
    """A float32 [3, D, r] orthonormal basis per head."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(3, D, r, generator=g, dtype=torch.float64))[0].float()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 10_000


def _same(got, want, what):
    for g, w, name in zip(got, want, ("codes", "scale", "zero")):
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {name} dtype/shape"
        if g.is_floating_point():  # compare bit patterns (-0.0 vs +0.0 matters) ...
            nan_g, nan_w = torch.isnan(g), torch.isnan(w)
            assert torch.equal(nan_g, nan_w), f"{what}: {name} NaN positions differ"
            # ... except a NaN's sign and payload: arithmetic on NaN/inf yields the hardware's
            # default NaN (x86: negative 0xFFC00000, CUDA: positive), so a poisoned group's
            # stored NaN may differ in those bits (docs/LAYOUT.md, NaN/Inf policy).
            g = g.view(torch.int16).masked_fill(nan_g, 0)
            w = w.view(torch.int16).masked_fill(nan_w, 0)
        assert torch.equal(g, w), f"{what}: {name} differs from the CPU kernel"


def _same_side_code(k, basis, kbits, G, side_bits, center, what):
    """side_code on CUDA against the CPU kernel, both from the CPU kernel's key codes."""
    kc = ops.quantize_keys(k, kbits, G)
    want = ops.side_code(k, *kc, basis, kbits, G, side_bits, center)
    got = ops.side_code(k.cuda(), *(t.cuda() for t in kc), basis.cuda(), kbits, G, side_bits,
                        center)
    _same(got, want, what)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_keys_cuda_exact(kind, dtype, bits):
    for G, D, T, noncontig in ((64, 128, 192, False), (32, 64, 96, True), (128, 128, 128, False)):
        k = _tokens(T, D, dtype, _seed(kind, bits, G, D), kind, noncontig)
        _same(ops.quantize_keys(k.cuda(), bits, G), ops.quantize_keys(k, bits, G),
              f"keys {kind} G{G} D{D}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_values_cuda_exact(kind, dtype, bits):
    for Gv, D, T, noncontig in ((64, 128, 77, False), (32, 64, 5, True), (128, 128, 33, False),
                                (32, 128, 1, False), (64, 64, 130, True)):
        v = _tokens(T, D, dtype, _seed(kind, bits, Gv, D, T), kind, noncontig)
        _same(ops.quantize_values(v.cuda(), bits, Gv), ops.quantize_values(v, bits, Gv),
              f"values {kind} Gv{Gv} D{D} T{T}")


@pytest.mark.parametrize("kind", ["plain", "halfway", "zeros", "nan", "constant", "tiny"])
@pytest.mark.parametrize("side_bits", [4, 8])
@pytest.mark.parametrize("center", [False, True])
def test_side_code_cuda_exact(kind, side_bits, center):
    for D, r, G, kbits in ((128, 8, 64, 2), (64, 4, 32, 3), (128, 16, 128, 4), (64, 12, 64, 2)):
        seed = _seed(kind, side_bits, D, r)
        k = _adversarial((2, 3, 2 * G, D), torch.float16, seed, kind)
        _same_side_code(k, _basis(D, r, seed), kbits, G, side_bits, center,
                        f"side code {kind} D{D} r{r}")


@pytest.mark.parametrize("impl", ["token", "group"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["plain", "halfway", "nan"])
def test_side_code_cuda_exact_layouts(impl, dtype, kind, monkeypatch):
    """Both side-code kernels (one thread per token, the default without centring; one block per
    key group, HEADQ_SIDE_IMPL=group) against the CPU kernel: every input dtype, strided keys,
    token counts that leave a partial 128-token block, 8-bit keys, r up to 16."""
    if impl == "group":
        monkeypatch.setenv("HEADQ_SIDE_IMPL", "group")
    for D, r, G, kbits, T, noncontig in ((128, 8, 64, 2, 192, False), (64, 16, 32, 8, 96, True),
                                         (128, 4, 32, 4, 160, True), (64, 8, 128, 3, 384, False)):
        seed = _seed(kind, D, r, G, T)
        k = _tokens(T, D, dtype, seed, kind, noncontig)
        basis = _basis(D, r, seed)
        for side_bits in (4, 8):
            if r * side_bits % 8:
                continue
            _same_side_code(k, basis, kbits, G, side_bits, False,
                            f"side code {impl} {kind} D{D} r{r} G{G} T{T}")


@pytest.mark.parametrize("impl", ["fused", "separate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["plain", "halfway", "zeros", "nan", "constant", "tiny", "huge"])
def test_quantize_kv_cuda_exact(impl, dtype, kind, monkeypatch):
    """quantize_kv on CUDA (HEADQ_KV_IMPL=fused: the fused kernel wherever its shape rules allow,
    fp32 and 512-thread shapes still take the three kernels; separate: the three kernels) against
    the CPU op (= the three CPU kernels): every bit width, strided inputs, centring, value groups
    of 1, 2 and 4 lanes."""
    monkeypatch.setenv("HEADQ_KV_IMPL", impl)
    cases = ((2, 2, 8, 64, 64, 128, 8, False, False), (3, 8, 4, 32, 32, 64, 8, True, True),
             (4, 3, 8, 64, 128, 128, 16, False, True), (8, 4, 8, 32, 64, 64, 12, False, False),
             (2, 4, 4, 32, 32, 64, 4, True, False), (2, 2, 8, 128, 64, 128, 8, False, False))
    for kb, vb, zb, G, Gv, D, r, center, noncontig in cases:
        seed = _seed(kind, kb, vb, G, D, r)
        k = _tokens(2 * G, D, dtype, seed, kind, noncontig)
        v = _tokens(2 * G, D, dtype, seed + 1, kind, noncontig)
        basis = _basis(D, r, seed)
        want = ops.quantize_kv(k, v, basis, kb, G, zb, center, vb, Gv)
        got = ops.quantize_kv(k.cuda(), v.cuda(), basis.cuda(), kb, G, zb, center, vb, Gv)
        what = f"quantize_kv {impl} {kind} kb{kb} vb{vb} G{G} Gv{Gv} D{D} r{r}"
        _same(got[:3], want[:3], what + " keys")
        _same(got[3:5], want[3:5], what + " side code")
        _same(got[5:], want[5:], what + " values")


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose storage starts one element past a 16-byte boundary (contiguous):
    the vectorised dequantise kernels decline it and the launcher takes the per-element one."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["plain", "nan", "huge"])
def test_dequantize_cuda_kernels_agree(bits, out_dtype, kind, monkeypatch):
    """dequantize_keys / dequantize_values: the 8-channels-per-thread kernels (the default)
    equal the per-element kernels (HEADQ_QUANT_IMPL=old) bit for bit, and both equal the CPU
    kernel, in every output dtype; scales at an address the vectorised key kernel declines
    (not 16-byte aligned) take the per-element kernel and give the same bits."""
    k = _adversarial((2, 3, 128, 72), torch.float16, 11 + bits, kind).cuda()
    v = _adversarial((2, 3, 40, 96), torch.float16, 17 + bits, kind).cuda()
    kq = ops.quantize_keys(k, bits, 32)
    vq = ops.quantize_values(v, bits, 32)

    def both():
        return (ops.dequantize_keys(*kq, bits, 32, out_dtype),
                ops.dequantize_values(*vq, bits, 32, out_dtype),
                ops.dequantize_keys(kq[0], _shifted(kq[1]), _shifted(kq[2]), bits, 32,
                                    out_dtype))

    fast = both()
    monkeypatch.setenv("HEADQ_QUANT_IMPL", "old")
    old = both()
    cpu_k = ops.dequantize_keys(*(t.cpu() for t in kq), bits, 32, out_dtype)
    cpu_v = ops.dequantize_values(*(t.cpu() for t in vq), bits, 32, out_dtype)
    ints = torch.int32 if out_dtype == torch.float32 else torch.int16
    for got, want, cpu in zip(fast, old, (cpu_k, cpu_v, cpu_k)):
        assert got.dtype == out_dtype and got.shape == want.shape
        assert torch.equal(got.view(ints), want.view(ints))  # bit patterns, NaNs included
        # the CPU's NaNs may carry another payload: equal values, NaN where NaN
        torch.testing.assert_close(got.cpu(), cpu, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("side_bits", [4, 8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["plain", "nan", "huge"])
@pytest.mark.parametrize("impl", ["smem", "l1"])
def test_reconstruct_keys_cuda_exact(bits, side_bits, out_dtype, kind, impl, monkeypatch):
    """reconstruct_keys: the CUDA kernels (the basis staged in shared memory, the default, and
    the L1 one, HEADQ_RECON_IMPL=l1) give the CPU kernel's values (NaN where NaN) for the same
    codes, on adversarial keys (head dim 72: 9 chunks per token, idle threads in the staged
    kernel's blocks; 300 tokens: a partial tile), every output dtype, both side-code widths."""
    if impl == "l1":
        monkeypatch.setenv("HEADQ_RECON_IMPL", "l1")
    k = _adversarial((2, 3, 320, 72), torch.float16, 5 + bits, kind).cuda()
    g = torch.Generator().manual_seed(bits)
    basis = torch.linalg.qr(torch.randn(3, 72, 8, generator=g, dtype=torch.float64))[0].float()
    kq = ops.quantize_keys(k, bits, 32)
    zq = ops.side_code(k, *kq, basis.cuda(), bits, 32, side_bits, False)
    got = ops.reconstruct_keys(*kq, *zq, basis.cuda(), bits, 32, side_bits, -1.0, out_dtype)
    cpu = ops.reconstruct_keys(*(t.cpu() for t in (*kq, *zq)), basis, bits, 32, side_bits,
                               -1.0, out_dtype)
    assert got.dtype == out_dtype and got.shape == cpu.shape
    torch.testing.assert_close(got.cpu(), cpu, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rank", [8, 104])
def test_reconstruct_keys_cuda_large_rank(rank):
    """A basis too large for the staged kernel's 48 KB (head dim 128, rank 104: 53 KB) takes the
    L1 kernel; both equal the CPU kernel bit for bit."""
    k = _adversarial((1, 2, 192, 128), torch.bfloat16, rank, "plain").cuda()
    g = torch.Generator().manual_seed(rank)
    basis = torch.linalg.qr(torch.randn(2, 128, rank, generator=g, dtype=torch.float64))[0]
    basis = basis.float()
    kq = ops.quantize_keys(k, 2, 64)
    zq = ops.side_code(k, *kq, basis.cuda(), 2, 64, 8, True)
    got = ops.reconstruct_keys(*kq, *zq, basis.cuda(), 2, 64, 8, 1.0, torch.bfloat16)
    cpu = ops.reconstruct_keys(*(t.cpu() for t in (*kq, *zq)), basis, 2, 64, 8, 1.0,
                               torch.bfloat16)
    assert torch.equal(got.cpu().view(torch.int16), cpu.view(torch.int16))
