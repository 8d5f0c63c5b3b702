"""Property-based tests (hypothesis) of the packing, the quantisers, the side code and the cache.

* pack/unpack round trip for every bit width, in the reference and through the ops (codes that a
  quantiser must reproduce exactly survive ``quantize_* -> unpack``);
* the asymmetric quantiser's per-element bound for keys and values on arbitrary shapes, dtypes,
  strides and magnitudes (``1e-6`` to ``6e4``), constant channels exact;
* the ops' codes, scales and zeros bit-exact against the reference on random draws;
* the side code's bound ``|zhat - y| <= z_scale / 2`` (+ the fp16 rounding of the scale);
* a stateful test driving random append / crop / reorder / select / repeat / reset sequences on a
  :class:`HeadQCache` and on a dense reference, equal after dequantisation within the 8-bit bound.

The bound of the asymmetric quantiser, per element ``x`` of a set ``S`` (docs/LAYOUT.md):

    |x - xhat| <= s/2 + |z - min(S)| + qmax * |s_true - s| + eps

``s_true = (max - min) / qmax`` (float32), ``s = f16(s_true)`` and ``z = f16(min)`` the stored
scale and zero. The second term is the fp16 rounding of the zero point; the third the fp16
rounding of the scale, seen by the elements clamped at ``qmax`` (for a normal fp16 scale it is at
most ``qmax * 2^-11 * s``, i.e. <= 0.125 s at 8 bits, so it never exceeds the ``s/2`` of a rounded
element; it matters where the scale is fp16-subnormal or flushes to 0: ranges below ~1e-5 at 8 bits,
where the quantiser degrades to ``xhat = z``, an absolute error below the range itself); ``eps``
covers the float32 arithmetic of ``c * s + z``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,  # noqa: E402
                                 precondition, rule)

from headq_torch import ops  # noqa: E402
from headq_torch import reference as ref  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=12)

BITS = (2, 3, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)
# magnitudes: tiny (1e-6) to huge (6e4, inside the float16 range with its scale and zero)
magnitudes = st.sampled_from([1e-6, 1e-3, 1.0, 37.0, 1e3, 6e4])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, mag=1.0, dtype=torch.float32, noncontig=False, offset=0.0):
    """Uniform in ``offset + [-mag, mag]``, cast to ``dtype``; ``noncontig`` gives the
    ``[B, T, H, D]`` storage viewed as ``[B, H, T, D]`` (what transformers' projections give)."""
    g = _gen(seed)
    if noncontig:
        B, H, T, D = shape
        x = (torch.rand(B, T, H, D, generator=g) * 2 - 1) * mag + offset
        return x.to(dtype).transpose(1, 2)
    return ((torch.rand(*shape, generator=g) * 2 - 1) * mag + offset).to(dtype)


# --------------------------------------------------------------------------- packing


@SETTINGS
@given(bits=st.sampled_from(BITS), lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       n8=st.integers(1, 24), pattern=st.sampled_from(["random", "zeros", "max", "alternate"]),
       seed=seeds)
def test_pack_unpack_round_trip(bits, lead, n8, pattern, seed):
    n = 8 * n8  # n*bits is a multiple of 8 for every width
    qmax = 2**bits - 1
    shape = (*lead, n)
    if pattern == "random":
        codes = torch.randint(0, qmax + 1, shape, generator=_gen(seed))
    elif pattern == "zeros":
        codes = torch.zeros(shape, dtype=torch.int64)
    elif pattern == "max":
        codes = torch.full(shape, qmax, dtype=torch.int64)
    else:
        codes = (torch.arange(n) % 2 * qmax).expand(shape).clone()
    packed = ref.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, n * bits // 8)
    assert torch.equal(ref.unpack_bits(packed, bits, n), codes)
    if bits == 2 and pattern == "random":  # the documented byte layout: code 4j in bits 0..1
        c = codes.reshape(-1, n)[:, :4]
        first = (c[:, 0] | c[:, 1] << 2 | c[:, 2] << 4 | c[:, 3] << 6).to(torch.uint8)
        assert torch.equal(packed.reshape(-1, n * bits // 8)[:, 0], first)


@pytest.mark.parametrize("side_bits", [4, 8])
@FEW
@given(r8=st.integers(1, 4), T=st.integers(1, 9), seed=seeds)
def test_side_code_pack_round_trip(side_bits, r8, T, seed):
    """The side code's offset-binary codes survive the common packing (dequantize_side)."""
    r = 2 * r8  # r * side_bits a multiple of 8 for both widths
    qz = 2 ** (side_bits - 1) - 1
    q = torch.randint(-qz, qz + 1, (1, 2, T, r), generator=_gen(seed))
    packed = ref.pack_bits(q + 2 ** (side_bits - 1), side_bits)
    z_scale = torch.full((1, 2, T), 0.5, dtype=torch.float16)
    got = ops.dequantize_side(packed, z_scale, side_bits)
    assert torch.equal(got, q.float() * 0.5)


def _exact_codes(shape, bits, seed, along_tokens, G):
    """Codes whose every quantiser set holds 0 and qmax (so scale = 1 and zero = 0 in code
    units): the ops must reproduce them exactly."""
    qmax = 2**bits - 1
    c = torch.randint(0, qmax + 1, shape, generator=_gen(seed))
    if along_tokens:  # keys: sets are (group of G tokens, channel)
        c[:, :, 0::G, :] = 0
        c[:, :, 1::G, :] = qmax
    else:  # values: sets are (token, group of G channels)
        c[..., 0::G] = 0
        c[..., 1::G] = qmax
    return c


@SETTINGS
@given(bits=st.sampled_from(BITS), G=st.sampled_from([32, 64]), ng=st.integers(1, 2),
       B=st.integers(1, 2), H=st.integers(1, 3), D8=st.integers(1, 8),
       exp=st.integers(-8, 4), shift=st.integers(-64, 64), dtype=dtypes, seed=seeds)
def test_codes_survive_quantize_keys(bits, G, ng, B, H, D8, exp, shift, dtype, seed):
    """x = (c + shift) * 2^exp quantises back to c exactly (scale 2^exp, zero shift*2^exp)."""
    D, T = 8 * D8, G * ng
    c = _exact_codes((B, H, T, D), bits, seed, True, G)
    step = 2.0**exp
    x = ((c + shift).double() * step).to(dtype)
    assume(torch.equal(x.double(), (c + shift).double() * step))  # exact in dtype
    codes, scale, zero = ops.quantize_keys(x, bits, G)
    assert torch.equal(ref.unpack_bits(codes, bits, D), c)
    assert torch.all(scale.float() == step) and torch.all(zero.double() == shift * step)
    assert torch.equal(ops.dequantize_keys(codes, scale, zero, bits, G).double(),
                       x.double())


@SETTINGS
@given(bits=st.sampled_from(BITS), Gv=st.sampled_from([32, 64]), ngv=st.integers(1, 2),
       T=st.integers(1, 9), H=st.integers(1, 3), exp=st.integers(-8, 4),
       shift=st.integers(-64, 64), dtype=dtypes, seed=seeds)
def test_codes_survive_quantize_values(bits, Gv, ngv, T, H, exp, shift, dtype, seed):
    D = Gv * ngv
    c = _exact_codes((1, H, T, D), bits, seed, False, Gv)
    step = 2.0**exp
    x = ((c + shift).double() * step).to(dtype)
    assume(torch.equal(x.double(), (c + shift).double() * step))
    codes, scale, zero = ops.quantize_values(x, bits, Gv)
    assert torch.equal(ref.unpack_bits(codes, bits, D), c)
    assert torch.equal(ops.dequantize_values(codes, scale, zero, bits, Gv).double(),
                       x.double())


# --------------------------------------------------------------------------- quantiser bound


def _bound(x, xhat, mn, mx, scale, zero, bits):
    """Assert the per-element bound of the module docstring; all float64, broadcastable."""
    qmax = 2**bits - 1
    s = scale.double()
    z = zero.double()
    s_true = ((mx - mn).float() / qmax).double()  # the kernel's float32 division
    mag = torch.maximum(x.abs(), z.abs()) + qmax * s
    eps = 4 * 2.0**-24 * mag + 1e-30
    bound = s / 2 + (z - mn).abs() + qmax * (s_true - s).abs() + eps
    err = (x - xhat).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} elements beyond the bound; worst err {err[bad].max().item():.3e} "
        f"vs bound {bound[bad].min().item():.3e}")


@SETTINGS
@given(bits=st.sampled_from(BITS), G=st.sampled_from([32, 64, 128]), ng=st.integers(1, 2),
       B=st.integers(1, 2), H=st.integers(1, 2), D8=st.integers(1, 9), mag=magnitudes,
       offset=st.sampled_from([0.0, 0.5, -3.0]), dtype=dtypes, noncontig=st.booleans(),
       n_const=st.integers(0, 3), seed=seeds)
def test_key_quantiser_bound(bits, G, ng, B, H, D8, mag, offset, dtype, noncontig, n_const,
                             seed):
    assume((1 + abs(offset)) * mag <= 6e4)  # inside the float16 range of scale and zero
    D, T = 8 * D8, G * ng
    x = _rand((B, H, T, D), seed, mag, dtype, noncontig, offset * mag)
    for c in range(min(n_const, D)):
        x[..., c] = (offset + 0.25) * mag
    codes, scale, zero = ops.quantize_keys(x, bits, G)
    xhat = ops.dequantize_keys(codes, scale, zero, bits, G).double()
    xd = x.double()
    xg = xd.reshape(B, H, ng, G, D)
    mn, mx = xg.amin(3, keepdim=True), xg.amax(3, keepdim=True)
    _bound(xg, xhat.reshape(B, H, ng, G, D), mn, mx, scale.unsqueeze(3), zero.unsqueeze(3), bits)
    for c in range(min(n_const, D)):  # zero range: scale 0, xhat = f16(x): exact
        assert torch.all(scale[..., c] == 0)
        assert torch.all(xhat[..., c] == x[..., c].to(torch.float16).double())
        if dtype != torch.bfloat16 and mag >= 1e-3:  # fp16-representable constant
            assert torch.all(xhat[..., c] == xd[..., c])


@SETTINGS
@given(bits=st.sampled_from(BITS), Gv=st.sampled_from([32, 64, 128]), ngv=st.integers(1, 2),
       B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 12), mag=magnitudes,
       offset=st.sampled_from([0.0, 0.5, -3.0]), dtype=dtypes, noncontig=st.booleans(),
       n_const=st.integers(0, 2), seed=seeds)
def test_value_quantiser_bound(bits, Gv, ngv, B, H, T, mag, offset, dtype, noncontig, n_const,
                               seed):
    assume((1 + abs(offset)) * mag <= 6e4)
    D = Gv * ngv
    x = _rand((B, H, T, D), seed, mag, dtype, noncontig, offset * mag)
    for t in range(min(n_const, T)):  # a constant token: every channel group has zero range
        x[:, :, t, :] = -0.75 * mag
    codes, scale, zero = ops.quantize_values(x, bits, Gv)
    xhat = ops.dequantize_values(codes, scale, zero, bits, Gv).double()
    xg = x.double().reshape(B, H, T, ngv, Gv)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    _bound(xg, xhat.reshape(B, H, T, ngv, Gv), mn, mx, scale.unsqueeze(-1),
           zero.unsqueeze(-1), bits)
    for t in range(min(n_const, T)):
        assert torch.all(scale[:, :, t] == 0)
        assert torch.all(xhat[:, :, t] == x[:, :, t].to(torch.float16).double())


# --------------------------------------------------------------------------- ops vs reference


@SETTINGS
@given(bits=st.sampled_from(BITS), G=st.sampled_from([32, 64]), ng=st.integers(1, 2),
       Gv=st.sampled_from([32, 64]), B=st.integers(1, 2), H=st.integers(1, 3),
       mag=magnitudes, dtype=dtypes, noncontig=st.booleans(), seed=seeds)
def test_ops_bit_exact_vs_reference(bits, G, ng, Gv, B, H, mag, dtype, noncontig, seed):
    D, T = 64, G * ng
    x = _rand((B, H, T, D), seed, mag, dtype, noncontig)
    for got, want in ((ops.quantize_keys(x, bits, G), ref.quantize_keys(x, bits, G)),
                      (ops.quantize_values(x, bits, Gv), ref.quantize_values(x, bits, Gv))):
        for g, w, name in zip(got, want, ("codes", "scale", "zero")):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.equal(g, w), name
    kc = ops.quantize_keys(x, bits, G)
    for out_dtype in (torch.float32, torch.float16):
        torch.testing.assert_close(ops.dequantize_keys(*kc, bits, G, out_dtype),
                                   ref.dequantize_keys(*kc, bits, G, out_dtype), rtol=0, atol=0)


def _basis(H, D, r, seed):
    q, _ = torch.linalg.qr(torch.randn(H, D, r, generator=_gen(seed), dtype=torch.float64))
    return q.float().contiguous()


@SETTINGS
@given(key_bits=st.sampled_from(BITS), side_bits=st.sampled_from([4, 8]),
       r2=st.integers(1, 8), G=st.sampled_from([32, 64]), B=st.integers(1, 2),
       H=st.integers(1, 2), D8=st.sampled_from([4, 8]), mag=magnitudes, center=st.booleans(),
       dtype=dtypes, noncontig=st.booleans(), seed=seeds)
def test_side_code_bit_exact_and_bound(key_bits, side_bits, r2, G, B, H, D8, mag, center, dtype,
                                       noncontig, seed):
    D, T, r = 8 * D8, G, 2 * r2
    x = _rand((B, H, T, D), seed, mag, dtype, noncontig)
    U = _basis(H, D, r, seed + 1)
    kc = ops.quantize_keys(x, key_bits, G)
    zc, zs = ops.side_code(x, *kc, U, key_bits, G, side_bits, center)
    wzc, wzs = ref.side_code(x, *kc, U, key_bits, G, side_bits, center)
    assert torch.equal(zs, wzs) and torch.equal(zc, wzc)
    # |zhat - y| <= z_scale/2 + qz * |s_true - s| (fp16 rounding of the scale) + float32 slack
    e = x.double() - ops.dequantize_keys(*kc, key_bits, G).double()
    if center:
        eg = e.reshape(B, H, T // G, G, D)
        e = (eg - eg.mean(3, keepdim=True)).reshape(B, H, T, D)
    y = torch.einsum("bhtd,hdr->bhtr", e, U.double())
    zhat = ops.dequantize_side(zc, zs, side_bits).double()
    qz = 2 ** (side_bits - 1) - 1
    s = zs.double().unsqueeze(-1)
    s_true = y.abs().amax(-1, keepdim=True) / qz
    slack = 1e-5 * torch.einsum("bhtd,hdr->bhtr", e.abs(), U.double().abs()) + 1e-30
    bound = s / 2 + qz * (s_true - s).abs() + 3 * slack
    assert ((zhat - y).abs() <= bound).all()


# --------------------------------------------------------------------------- stateful cache


def _tiny_config():
    from conftest import make_tiny

    return make_tiny("llama").config  # 2 layers, 2 KV heads, head dim 32


_CFG = None


def _config():
    global _CFG
    if _CFG is None:
        _CFG = _tiny_config()
    return _CFG


def _calibration(cfg, rank=8, seed=0):
    from headq_torch.calibration import Calibration
    from headq_torch.config import config_fingerprint, model_geometry

    n_layers, _, H, D = model_geometry(cfg)
    bases = [_basis(H, D, rank, seed + i) for i in range(n_layers)]
    return Calibration(bases, model_name="tiny-llama", fingerprint=config_fingerprint(cfg),
                       num_layers=n_layers, num_kv_heads=H, head_dim=D, rank=rank,
                       method="random")


G_CACHE = 32
AMP = 1.0  # data uniform in [-AMP, AMP]
# One 8-bit quantisation of a set whose values lie in [-1.1, 1.1] (re-quantised tokens carry the
# error of earlier rounds): s/2 + fp16 zero rounding + fp16 scale rounding + float32 slack.
_S8 = 2.2 / 255
B8 = _S8 / 2 + 1.1 * 2.0**-11 + 255 * _S8 * 2.0**-11 + 1e-6


class CacheMachine(RuleBasedStateMachine):
    """Random sequences of cache operations on a HeadQCache and a dense reference.

    The reference holds the original float keys/values ``[B, H, T, D]`` per layer. ``rounds[t]``
    counts how many times token ``t`` has been quantised (a crop into the quantised region brings
    tokens back to the dense window dequantised, and they are quantised again later), so the
    allowed error of a token is ``rounds * bound``: per element ``B8`` for values, per token in
    L2 ``sqrt(D) * B8 * 1.01`` for the corrected keys ``khat + U zhat`` (the side code replaces
    the component of the residual in span(U) by its 8-bit code; the projection onto span(U)'s
    complement does not increase the L2 norm of the base residual), and, with a side code, in
    span(U) only the side code's own rounding ``sqrt(r D) * B8 / 254`` per round.
    """

    def __init__(self):
        super().__init__()
        self.cache = None

    @initialize(headq_attention=st.booleans(), side=st.booleans(),
                residual=st.sampled_from([0, 8]), B=st.integers(1, 3))
    def setup(self, headq_attention, side, residual, B):
        from headq_torch.cache import HeadQCache

        cfg = copy.deepcopy(_config())
        # "headq": update() returns the dense window and the caller (the attention function)
        # flushes after reading; otherwise update() returns the dense reconstruction
        cfg._attn_implementation = "headq" if headq_attention else "sdpa"
        self.headq_attention = headq_attention
        self.cache = HeadQCache(cfg, _calibration(cfg) if side else None, key_bits=8,
                                value_bits=8, group_size=G_CACHE, value_group_size=32,
                                residual_length=residual)
        self.residual = residual
        self.n_layers = len(self.cache.layers)
        self.H, self.D = self.cache.num_kv_heads, self.cache.head_dim
        self.B = B
        self.ref_k = [None] * self.n_layers
        self.ref_v = [None] * self.n_layers
        self.rounds = torch.zeros(0, dtype=torch.int64)
        self.seed = 0

    # -- helpers --------------------------------------------------------------------------

    @property
    def T(self) -> int:
        return 0 if self.ref_k[0] is None else self.ref_k[0].shape[2]

    def _layer_nq(self):
        return self.cache.layers[0].n_quant

    def _mark_quantised(self, nq_before: int) -> None:
        nq = self._layer_nq()
        for layer in self.cache.layers:
            assert layer.n_quant == nq  # every layer quantises in step
        if nq > nq_before:
            self.rounds[nq_before:nq] += 1

    # -- rules ----------------------------------------------------------------------------

    @rule(L=st.integers(1, 70), noncontig=st.booleans(), data=st.data())
    def append(self, L, noncontig, data):
        if self.ref_k[0] is None and data.draw(st.booleans(), label="new batch size"):
            self.B = data.draw(st.integers(1, 3), label="B")
        self.seed += 1
        nq_before = self._layer_nq() if self.T else 0
        for i, layer in enumerate(self.cache.layers):
            shape = (self.B, self.H, L, self.D)
            k = _rand(shape, self.seed * 97 + i, AMP, noncontig=noncontig)
            v = _rand(shape, self.seed * 89 + i + 7, AMP, noncontig=noncontig)
            ko, vo = self.cache.update(k, v, i)
            self.ref_k[i] = k.clone() if self.ref_k[i] is None else torch.cat([self.ref_k[i], k], 2)
            self.ref_v[i] = v.clone() if self.ref_v[i] is None else torch.cat([self.ref_v[i], v], 2)
            if self.headq_attention:
                assert getattr(ko, "_headq_layer", None) is layer
                # the window holds the new tokens at full precision
                assert torch.equal(ko[:, :, -L:], k) and torch.equal(vo[:, :, -L:], v)
                layer.after_attention()
            else:
                # the dense reconstruction of everything, new tokens included
                assert ko.shape == (self.B, self.H, self.T, self.D)
                self._check_dense(ko, vo, i, self.rounds_for(self.T))
        self.rounds = torch.cat([self.rounds, torch.zeros(L, dtype=torch.int64)])
        self._mark_quantised(nq_before)
        for layer in self.cache.layers:
            assert layer.n_quant % G_CACHE == 0
            assert layer.n_window < self.residual + G_CACHE

    def rounds_for(self, T):
        r = torch.zeros(T, dtype=torch.int64)
        r[: self.rounds.shape[0]] = self.rounds
        return r

    @precondition(lambda self: self.cache is not None and self.T > 0)
    @rule(data=st.data())
    def crop(self, data):
        T = self.T
        m = data.draw(st.integers(-T - 3, -1) | st.integers(0, T + 3), label="crop arg")
        nq_before = self._layer_nq()
        self.cache.crop(m)
        new_len = T if m == 0 else (max(T + m, 0) if m < 0 else min(m, T))
        for i in range(self.n_layers):
            self.ref_k[i] = self.ref_k[i][:, :, :new_len]
            self.ref_v[i] = self.ref_v[i][:, :, :new_len]
        self.rounds = self.rounds[:new_len]
        assert self._layer_nq() <= nq_before

    @precondition(lambda self: self.cache is not None and self.T > 0)
    @rule(data=st.data())
    def reorder(self, data):
        perm = data.draw(st.permutations(list(range(self.B))), label="beam_idx")
        if perm == sorted(perm) and self.B > 1:  # never the identity when there is a choice
            perm = perm[1:] + perm[:1]
        idx = torch.tensor(perm, dtype=torch.long)
        self.cache.reorder_cache(idx)
        self._index(lambda t: t.index_select(0, idx))

    @precondition(lambda self: self.cache is not None and self.T > 0)
    @rule(data=st.data())
    def select(self, data):
        idx = data.draw(st.lists(st.integers(0, self.B - 1), min_size=1, max_size=3),
                        label="indices")
        t = torch.tensor(idx, dtype=torch.long)
        self.cache.batch_select_indices(t)
        self._index(lambda x: x[t])
        self.B = len(idx)

    @precondition(lambda self: self.cache is not None and self.T > 0 and self.B <= 2)
    @rule(repeats=st.integers(1, 2))
    def repeat(self, repeats):
        self.cache.batch_repeat_interleave(repeats)
        self._index(lambda x: x.repeat_interleave(repeats, dim=0))
        self.B *= repeats

    @precondition(lambda self: self.cache is not None and self.T > 0)
    @rule()
    def reset(self):
        self.cache.reset()
        self.ref_k = [None] * self.n_layers
        self.ref_v = [None] * self.n_layers
        self.rounds = torch.zeros(0, dtype=torch.int64)
        assert self.cache.memory_bytes() == 0

    def _index(self, fn):
        for i in range(self.n_layers):
            self.ref_k[i] = fn(self.ref_k[i])
            self.ref_v[i] = fn(self.ref_v[i])

    # -- the check ------------------------------------------------------------------------

    def _check_dense(self, k, v, i, rounds):
        """``k``/``v`` ``[B, H, T, D]`` against the reference of layer ``i``."""
        rk, rv = self.ref_k[i], self.ref_v[i]
        assert k.shape == rk.shape and v.shape == rv.shape
        tol_v = (rounds.double() * B8).view(1, 1, -1, 1) + 1e-7
        err_v = (v.double() - rv.double()).abs()
        assert (err_v <= tol_v).all(), f"layer {i}: value error {err_v.max():.3e}"
        tol_k = (rounds.double() * B8 * math.sqrt(self.D) * 1.01).view(1, 1, -1) + 1e-6
        err_k = (k.double() - rk.double()).norm(dim=-1)
        assert (err_k <= tol_k).all(), f"layer {i}: key error {err_k.max():.3e}"
        layer = self.cache.layers[i]
        if layer.basis is not None:
            # in span(U) the corrected keys are exact up to the 8-bit side code: per round
            # ||zhat - y|| <= sqrt(r) * z_scale/2 with z_scale <= ||e|| / 127 <= sqrt(D) B8 / 127
            U = layer.basis.double()
            r = U.shape[-1]
            proj = torch.einsum("bhtd,hdr->bhtr", k.double() - rk.double(), U).norm(dim=-1)
            tol_u = (rounds.double() * math.sqrt(r * self.D) * B8 / 254 * 1.02).view(1, 1, -1)
            assert (proj <= tol_u + 1e-6).all(), f"layer {i}: side-code error {proj.max():.3e}"
        # tokens never quantised are exact
        exact = rounds == 0
        assert torch.equal(k[:, :, exact].float(), rk[:, :, exact].float())

    @invariant()
    def equivalent(self):
        if self.cache is None:
            return
        assert self.cache.get_seq_length() == self.T
        for i, layer in enumerate(self.cache.layers):
            assert layer.get_seq_length() == self.T
            if self.T == 0:
                continue
            assert layer.B == self.B
            assert layer.n_quant + layer.n_window == self.T
            kq = layer.quantised_keys(torch.float32)
            vq = layer.quantised_values(torch.float32)
            kw = layer.buf["k_window"][:, :, :layer.n_window].float()
            vw = layer.buf["v_window"][:, :, :layer.n_window].float()
            assert torch.equal(layer.keys.float(), kw) and torch.equal(layer.values.float(), vw)
            self._check_dense(torch.cat([kq, kw], 2), torch.cat([vq, vw], 2), i, self.rounds)
            # what the cache stores is what the storage report counts
            assert sum(layer.memory_breakdown().values()) > 0


TestCacheStateful = CacheMachine.TestCase
TestCacheStateful.settings = settings(max_examples=25, stateful_step_count=12, deadline=None,
                                      derandomize=True, database=None,
                                      suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.data_too_large,
                                                             HealthCheck.filter_too_much])
