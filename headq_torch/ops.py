"""Typed wrappers and fake (meta) kernels of the ``headq`` torch ops.

The kernels live in the C++/CUDA extension ``headq_torch._C`` (schemas in
``csrc/torch_bindings.cpp``); their pure-PyTorch twins are in :mod:`headq_torch.reference`.
Layouts and the exact arithmetic are specified in ``docs/LAYOUT.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.headq.*)

Tensor = torch.Tensor
_ops = torch.ops.headq

__all__ = [
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
    "side_code",
    "quantize_kv",
    "dequantize_side",
    "reconstruct_keys",
    "corrected_logits",
    "decode_attention",
    "a2_weights",
    "a2_step_weights",
]


def _same_device(op: str, **tensors) -> None:
    """Every tensor argument on one device. The kernels' own checks miss a meta (or other
    foreign-device) tensor mixed with CPU tensors: the CPU kernel then reads memory that is not
    there. Checking here costs no device sync."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}; "
                               "every tensor argument must be on the same device")


def quantize_keys(k: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise keys per channel in groups of ``group_size`` tokens.

    Args:
        k: float32/float16/bfloat16 ``[B, H, T, D]``, ``T % group_size == 0``, ``D % 8 == 0``.
        bits: 2, 3, 4 or 8.
        group_size: 32, 64 or 128 tokens.

    Returns:
        ``codes`` uint8 ``[B, H, T, D*bits/8]`` (bit-packed), ``scale`` and ``zero`` float16
        ``[B, H, T/group_size, D]``.
    """
    return _ops.quantize_keys(k, bits, group_size)


def _result_or_into(op: str, out: Optional[Tensor], out_dtype: Optional[torch.dtype],
                    *args) -> Tensor:
    """A dequantising op's result: ``torch.ops.headq.<op>(*args, out_dtype)`` (default
    float32), or with ``out`` ``<op>_into(*args, out)`` and ``out`` (whose dtype is the
    result's; ``out_dtype``, if also given, must agree)."""
    if out is None:
        return getattr(_ops, op)(*args, torch.float32 if out_dtype is None else out_dtype)
    if out_dtype is not None and out_dtype != out.dtype:
        raise ValueError(f"{op}: out_dtype ({out_dtype}) and out.dtype ({out.dtype}) differ; "
                         "give one of them")
    getattr(_ops, op + "_into")(*args, out)
    return out


def dequantize_keys(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                    out_dtype: Optional[torch.dtype] = None, *,
                    out: Optional[Tensor] = None) -> Tensor:
    """Unpack and dequantise keys: ``code * scale + zero`` as ``out_dtype`` ``[B, H, T, D]``
    (default float32).

    ``out``: write the result into this ``[B, H, T, D]`` float tensor (any strides, e.g. a
    token slice ``k[:, :, t0:t1]`` of a longer tensor; its dtype is the result's) and return
    it: the same values as the functional form, without a temporary and a copy."""
    _same_device("dequantize_keys", codes=codes, scale=scale, zero=zero, out=out)
    return _result_or_into("dequantize_keys", out, out_dtype, codes, scale, zero, bits,
                           group_size)


def quantize_values(v: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise values per token in groups of ``group_size`` channels.

    Args:
        v: float ``[B, H, T, D]``, ``D % group_size == 0``.
        bits: 2, 3, 4 or 8.
        group_size: 32, 64 or 128 channels.

    Returns:
        ``codes`` uint8 ``[B, H, T, D*bits/8]``, ``scale`` and ``zero`` float16
        ``[B, H, T, D/group_size]``.
    """
    return _ops.quantize_values(v, bits, group_size)


def dequantize_values(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                      out_dtype: Optional[torch.dtype] = None, *,
                      out: Optional[Tensor] = None) -> Tensor:
    """Unpack and dequantise values as ``out_dtype`` ``[B, H, T, D]`` (default float32).
    ``out``: as in :func:`dequantize_keys`."""
    _same_device("dequantize_values", codes=codes, scale=scale, zero=zero, out=out)
    return _result_or_into("dequantize_values", out, out_dtype, codes, scale, zero, bits,
                           group_size)


def side_code(k: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, basis: Tensor,
              key_bits: int, group_size: int, side_bits: int = 8,
              center: bool = False) -> tuple[Tensor, Tensor]:
    """Side code ``Z = Q_z((K - Khat) U)`` of the key residual on the per-head query basis.

    Args:
        k: the float keys ``[B, H, T, D]`` that produced ``k_codes/k_scale/k_zero``.
        basis: float32 ``[H, D, r]`` (orthonormal columns per KV head).
        side_bits: 8 or 4 (``r * side_bits % 8 == 0``).
        center: subtract each key group's mean residual per channel before projecting.

    Returns:
        ``z_codes`` uint8 ``[B, H, T, r*side_bits/8]``, ``z_scale`` float16 ``[B, H, T]``.
    """
    _same_device("side_code", k=k, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, basis=basis)
    return _ops.side_code(k, k_codes, k_scale, k_zero, basis, key_bits, group_size, side_bits,
                          center)


def quantize_kv(k: Tensor, v: Tensor, basis: Tensor, key_bits: int, group_size: int,
                side_bits: int = 8, center: bool = False, value_bits: int = 2,
                value_group_size: int = 64) -> tuple[Tensor, ...]:
    """:func:`quantize_keys` + :func:`side_code` + :func:`quantize_values` in one call.

    The results are those of the three ops, bit for bit. On CUDA, when all its blocks fit on the
    GPU at once (a decode append, a short prompt; fp16/bf16 inputs of the usual shapes), one
    kernel computes them, reading ``k`` once: one launch instead of three. Larger inputs run the
    three kernels, which are faster there (the work is bound by instruction issue, not memory;
    ``HEADQ_KV_IMPL=fused|separate`` forces either). ``v`` has ``k``'s shape, dtype and device.

    Returns:
        ``(k_codes, k_scale, k_zero, z_codes, z_scale, v_codes, v_scale, v_zero)``.
    """
    _same_device("quantize_kv", k=k, v=v, basis=basis)
    return _ops.quantize_kv(k, v, basis, key_bits, group_size, side_bits, center, value_bits,
                            value_group_size)


def dequantize_side(z_codes: Tensor, z_scale: Tensor, side_bits: int = 8) -> Tensor:
    """float32 ``[B, H, T, r]`` side code values."""
    _same_device("dequantize_side", z_codes=z_codes, z_scale=z_scale)
    return _ops.dequantize_side(z_codes, z_scale, side_bits)


def reconstruct_keys(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, z_codes: Tensor,
                     z_scale: Tensor, basis: Tensor, key_bits: int, group_size: int,
                     side_bits: int = 8, sign: float = 1.0,
                     out_dtype: Optional[torch.dtype] = None, *,
                     out: Optional[Tensor] = None) -> Tensor:
    """Keys as attention reads them, ``khat + sign * zhat Uᵀ`` ``[B, H, T, D]`` in
    ``out_dtype``: ``q ·`` a row equals :func:`corrected_logits`'s logit (before ``scale``).

    One pass over the packed keys and side code, computed in float32 (per element the side
    correction summed over the rank in ascending order, every product and sum rounded once;
    the CPU and CUDA kernels give the same bits) and rounded once to ``out_dtype``. What a
    dense attention kernel needs from the packed cache, without a float32 ``[B, H, T, D]``
    intermediate.

    Args:
        k_codes, k_scale, k_zero: packed keys ``[B, H, T, ...]`` from :func:`quantize_keys`.
        z_codes, z_scale, basis: the side code ``[B, H, T, r*side_bits/8]``, ``[B, H, T]``
            from :func:`side_code` and its basis ``[H, D, r]`` float32.
        sign: ``+1`` (HeadQ) or ``-1`` (the wrong-sign control).
        out_dtype: float32 (default), float16 or bfloat16.
        out: write the result into this ``[B, H, T, D]`` float tensor (any strides, e.g. a
            token slice of the tensor attention reads; its dtype is the result's) and return
            it: the same bits as the functional form, without a temporary and a copy.
    """
    _same_device("reconstruct_keys", k_codes=k_codes, k_scale=k_scale, k_zero=k_zero,
                 z_codes=z_codes, z_scale=z_scale, basis=basis, out=out)
    return _result_or_into("reconstruct_keys", out, out_dtype, k_codes, k_scale, k_zero,
                           z_codes, z_scale, basis, key_bits, group_size, side_bits, float(sign))


def corrected_logits(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                     z_codes: Optional[Tensor], z_scale: Optional[Tensor],
                     basis: Optional[Tensor], key_bits: int, group_size: int,
                     side_bits: int = 8, sign: float = 1.0,
                     scale: float = 1.0) -> Tensor:
    """HeadQ logits ``(q . khat + sign * (q U) . zhat) * scale``.

    Args:
        q: float ``[B, Hq, L, D]``, ``Hq % H == 0`` (grouped-query attention).
        k_codes, k_scale, k_zero: packed keys ``[B, H, T, ...]`` from :func:`quantize_keys`.
        z_codes, z_scale, basis: side code and basis, or all ``None`` for the base logits.
        sign: ``+1`` (HeadQ) or ``-1`` (the wrong-sign control).

    Returns:
        float32 ``[B, Hq, L, T]``.
    """
    _same_device("corrected_logits", q=q, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero,
                 z_codes=z_codes, z_scale=z_scale, basis=basis)
    return _ops.corrected_logits(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis,
                                 key_bits, group_size, side_bits, float(sign), float(scale))


def decode_attention(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                     z_codes: Optional[Tensor], z_scale: Optional[Tensor],
                     basis: Optional[Tensor], v_codes: Optional[Tensor],
                     v_scale: Optional[Tensor], v_zero: Optional[Tensor],
                     v_dense: Optional[Tensor], heavy_delta: Optional[Tensor],
                     heavy_idx: Optional[Tensor], k_window: Tensor, v_window: Tensor,
                     n_quant: Tensor, n_window: Tensor, kv_start: Optional[Tensor],
                     key_bits: int, group_size: int, side_bits: int, value_bits: int,
                     value_group_size: int, sign: float = 1.0,
                     scale: float = 1.0,
                     heavy_logits: Optional[Tensor] = None,
                     query_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """One decode step of attention over the packed cache, without a dense copy of K or V.

    Args:
        q: ``[B, Hq, D]`` (one query token per sequence).
        k_codes/k_scale/k_zero: ``[B, H, Tq, D*b/8]``, ``[B, H, Tq/G, D]`` x2.
        z_codes/z_scale/basis: ``[B, H, Tq, r*bz/8]``, ``[B, H, Tq]``, ``[H, D, r]`` or None.
        v_codes/v_scale/v_zero: ``[B, H, Tq, D*bv/8]``, ``[B, H, Tq, D/Gv]`` x2, or None
            when ``v_dense`` ``[B, H, Tq, D]`` holds the values of the quantised region.
        heavy_delta/heavy_idx: ``[B, H, K, D]`` and int32 ``[B, H, K]`` (-1 = empty): tokens
            of the quantised region that read ``vhat + delta`` (the A² value policy), or None.
        k_window/v_window: dense recent tokens ``[B, H, W, D]``.
        n_quant/n_window: int32 ``[B]`` valid tokens per sequence in each region.
        kv_start: int32 ``[B]`` first visible logical token (left padding), or None.
        heavy_logits: optional float32 ``[B, Hq, K]`` output (contiguous), written in place:
            each kept slot's logit (as in ``lse``: scaled, side code included) for every query
            head, ``-inf`` for an empty slot or a token that is not visible. The A² step's
            kept-token weights are ``exp(heavy_logits - lse)``: the op computes these logits
            anyway, so they cost no second pass over the kept rows.
        query_tokens: ``L >= 1`` (``Hq % L == 0``). With ``L > 1`` the query heads are the
            rows of a call of ``L`` tokens whose keys and values are the window's last ``L``
            tokens (``update`` appended them): query head ``j`` is token ``j % L`` of them and
            sees the window tokens ``t < n_window[b] - (L - 1 - j % L)``, every quantised token
            and every kept token (causal attention of a few-token call in one op call; the
            caller lays out query head ``h`` token ``i`` as row ``h·L + i``). 1: a decode step.

    Returns:
        ``out`` ``[B, Hq, D]`` in ``q``'s dtype and ``lse`` float32 ``[B, Hq]``, the
        log-sum-exp of the visible logits (``-inf`` where none is visible).
    """
    _same_device("decode_attention", q=q, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero,
                 z_codes=z_codes, z_scale=z_scale, basis=basis, v_codes=v_codes,
                 v_scale=v_scale, v_zero=v_zero, v_dense=v_dense, heavy_delta=heavy_delta,
                 heavy_idx=heavy_idx, k_window=k_window, v_window=v_window, n_quant=n_quant,
                 n_window=n_window, kv_start=kv_start, heavy_logits=heavy_logits)
    return _ops.decode_attention(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis,
                                 v_codes, v_scale, v_zero, v_dense, heavy_delta, heavy_idx,
                                 k_window, v_window, n_quant, n_window, kv_start, key_bits,
                                 group_size, side_bits, value_bits, value_group_size,
                                 float(sign), float(scale), heavy_logits, int(query_tokens))


def a2_weights(q: Tensor, k: Tensor, mask: Optional[Tensor] = None,
               scale: float = 1.0, lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """A² weights of dense attention: ``w[b, h, t] = Σ_(query heads of KV head h) Σ_i a²``,
    ``a = softmax(scale · q k^T)`` over the keys each query row sees, without materialising
    the attention matrix on CUDA (two streaming passes: row log-sum-exp, then column sums).

    Args:
        q: ``[B, Hq, L, D]`` float32/float16/bfloat16, the last ``L`` of the ``T`` tokens.
        k: ``[B, H, T, D]``, ``q``'s dtype, ``Hq % H == 0`` (query head ``h·n_rep + r`` reads
            KV head ``h``).
        mask: bool ``[B or 1, L, T]`` (True = visible), or None for causal attention (row ``i``
            sees ``t <= T - L + i``). A ``[B or 1, 1, L, T]`` mask (transformers' layout) is
            accepted too.
        scale: logit scale.
        lse: optional float32 ``[B, Hq, L]``, the rows' log-sum-exp (natural log of the scaled
            logits) when the caller already has it, e.g. from the flash attention that
            produced the output (``aten._scaled_dot_product_flash_attention`` returns it). The
            op then skips its row pass (on CUDA one of its two passes over ``q k^T``) and
            trusts the given values; a row whose given lse is not finite adds nothing.

    Returns:
        ``w`` float32 ``[B, H, T]`` and ``lse`` float32 ``[B, Hq, L]``, each row's
        log-sum-exp (``-inf`` for a row that sees no key, which adds nothing to ``w``; a copy
        of the given ``lse``).
    """
    _same_device("a2_weights", q=q, k=k, mask=mask, lse=lse)
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    return _ops.a2_weights(q, k, mask, float(scale), lse)


def a2_step_weights(q: Tensor, k_window: Tensor, lse: Tensor, n_quant: Tensor,
                    n_window: Tensor, kv_start: Optional[Tensor], scale: float,
                    w_window: Tensor, heavy_logits: Optional[Tensor] = None,
                    heavy_w: Optional[Tensor] = None, query_tokens: int = 1) -> None:
    """Add one decode step's A² weights in place (one kernel on CUDA; an A² cache's graph step).

    For the window tokens ``t < n_window[b]`` (and ``n_quant[b] + t >= kv_start[b]``):
    ``w_window[b, h, t] += Σ_r a²``, ``a = exp(scale · q[b, h·n_rep + r] · k_window[b, h, t] -
    lse[b, h·n_rep + r])`` over the KV head's query heads ``r``; for the kept-token slots:
    ``heavy_w[b, h, k] += Σ_r exp(heavy_logits[b, h·n_rep + r, k] - lse[...])²``. An ``a`` that
    is not finite (a NaN query, an ``lse`` of -inf) adds 0; an empty slot's logit is -inf
    (``decode_attention``'s ``heavy_logits``) and adds 0.

    Args:
        q: ``[B, Hq, D]`` the step's queries (float32/float16/bfloat16).
        k_window: ``[B, H, W, D]`` in ``q``'s dtype, the dense window buffer (its capacity).
        lse: float32 ``[B, Hq]``, the step's log-sum-exp from ``decode_attention``.
        n_quant, n_window: int32 ``[B]``; kv_start: int32 ``[B]`` or None.
        scale: logit scale.
        w_window: float32 ``[B, H, W]``, contiguous, added to in place.
        heavy_logits: float32 ``[B, Hq, K]`` (``decode_attention``'s output) or None;
        heavy_w: float32 ``[B, H, K]``, contiguous, added to in place (with ``heavy_logits``).
        query_tokens: as in :func:`decode_attention`: query head ``j`` adds to the window
            tokens ``t < n_window[b] - (L - 1 - j % L)`` only.
    """
    _same_device("a2_step_weights", q=q, k_window=k_window, lse=lse, n_quant=n_quant,
                 n_window=n_window, kv_start=kv_start, w_window=w_window,
                 heavy_logits=heavy_logits, heavy_w=heavy_w)
    _ops.a2_step_weights(q, k_window, lse, n_quant, n_window, kv_start, float(scale), w_window,
                         heavy_logits, heavy_w, int(query_tokens))


# ---------------------------------------------------------------------------------------------
# Fake kernels: the shape rules, for torch.compile / FakeTensor / meta tensors.
# ---------------------------------------------------------------------------------------------

def _check(cond, msg: str) -> None:
    torch._check(cond, lambda: msg)


def _check_bits(name: str, bits: int, allowed=(2, 3, 4, 8)) -> None:
    _check(bits in allowed, f"{name} must be one of {allowed}, got {bits}")


def _check_group(name: str, g: int) -> None:
    _check(g in (32, 64, 128), f"{name} must be one of (32, 64, 128), got {g}")


@torch.library.register_fake("headq::quantize_keys")
def _quantize_keys_fake(k, bits, group_size):
    _check(k.dim() == 4, f"quantize_keys: k must be [B, H, T, D], got {k.dim()} dims")
    _check_bits("bits", bits)
    _check_group("group_size", group_size)
    B, H, T, D = k.shape
    _check(T % group_size == 0, f"tokens ({T}) must be a multiple of group_size ({group_size})")
    codes = k.new_empty((B, H, T, D * bits // 8), dtype=torch.uint8)
    scale = k.new_empty((B, H, T // group_size, D), dtype=torch.float16)
    return codes, scale, torch.empty_like(scale)


@torch.library.register_fake("headq::dequantize_keys")
def _dequantize_keys_fake(codes, scale, zero, bits, group_size, out_dtype):
    _check_bits("bits", bits)
    B, H, T, nb = codes.shape
    return codes.new_empty((B, H, T, nb * 8 // bits), dtype=out_dtype)


@torch.library.register_fake("headq::quantize_values")
def _quantize_values_fake(v, bits, group_size):
    _check(v.dim() == 4, f"quantize_values: v must be [B, H, T, D], got {v.dim()} dims")
    _check_bits("bits", bits)
    _check_group("group_size", group_size)
    B, H, T, D = v.shape
    _check(D % group_size == 0, f"head_dim ({D}) must be a multiple of group_size ({group_size})")
    codes = v.new_empty((B, H, T, D * bits // 8), dtype=torch.uint8)
    scale = v.new_empty((B, H, T, D // group_size), dtype=torch.float16)
    return codes, scale, torch.empty_like(scale)


@torch.library.register_fake("headq::dequantize_values")
def _dequantize_values_fake(codes, scale, zero, bits, group_size, out_dtype):
    _check_bits("bits", bits)
    B, H, T, nb = codes.shape
    return codes.new_empty((B, H, T, nb * 8 // bits), dtype=out_dtype)


@torch.library.register_fake("headq::side_code")
def _side_code_fake(k, k_codes, k_scale, k_zero, basis, key_bits, group_size, side_bits, center):
    _check_bits("side_bits", side_bits, (4, 8))
    _check(basis.dim() == 3, f"basis must be [H, D, r], got {basis.dim()} dims")
    B, H, T, D = k.shape
    r = basis.shape[-1]
    z_codes = k.new_empty((B, H, T, r * side_bits // 8), dtype=torch.uint8)
    z_scale = k.new_empty((B, H, T), dtype=torch.float16)
    return z_codes, z_scale


@torch.library.register_fake("headq::quantize_kv")
def _quantize_kv_fake(k, v, basis, key_bits, group_size, side_bits, center, value_bits,
                      value_group_size):
    _check(tuple(v.shape) == tuple(k.shape),
           f"quantize_kv: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    kc, ks, kz = _quantize_keys_fake(k, key_bits, group_size)
    zc, zs = _side_code_fake(k, kc, ks, kz, basis, key_bits, group_size, side_bits, center)
    vc, vs, vz = _quantize_values_fake(v, value_bits, value_group_size)
    return kc, ks, kz, zc, zs, vc, vs, vz


@torch.library.register_fake("headq::dequantize_side")
def _dequantize_side_fake(z_codes, z_scale, side_bits):
    _check_bits("side_bits", side_bits, (4, 8))
    B, H, T, nb = z_codes.shape
    return z_codes.new_empty((B, H, T, nb * 8 // side_bits), dtype=torch.float32)


@torch.library.register_fake("headq::reconstruct_keys")
def _reconstruct_keys_fake(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                           group_size, side_bits, sign, out_dtype):
    _check_bits("key_bits", key_bits)
    _check_bits("side_bits", side_bits, (4, 8))
    B, H, T, nb = k_codes.shape
    return k_codes.new_empty((B, H, T, nb * 8 // key_bits), dtype=out_dtype)


def _into_fake(op: str, codes, bits: int, out) -> None:
    _check(out.dim() == 4, f"{op}: out must be [B, H, T, D], got {out.dim()} dims")
    B, H, T, nb = codes.shape
    want = (B, H, T, nb * 8 // bits)
    _check(tuple(out.shape) == want, f"{op}: out must have shape {want}, got {tuple(out.shape)}")


@torch.library.register_fake("headq::dequantize_keys_into")
def _dequantize_keys_into_fake(codes, scale, zero, bits, group_size, out):
    _check_bits("bits", bits)
    _into_fake("dequantize_keys_into", codes, bits, out)


@torch.library.register_fake("headq::dequantize_values_into")
def _dequantize_values_into_fake(codes, scale, zero, bits, group_size, out):
    _check_bits("bits", bits)
    _into_fake("dequantize_values_into", codes, bits, out)


@torch.library.register_fake("headq::reconstruct_keys_into")
def _reconstruct_keys_into_fake(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                                group_size, side_bits, sign, out):
    _check_bits("key_bits", key_bits)
    _check_bits("side_bits", side_bits, (4, 8))
    _into_fake("reconstruct_keys_into", k_codes, key_bits, out)


@torch.library.register_fake("headq::corrected_logits")
def _corrected_logits_fake(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits,
                           group_size, side_bits, sign, scale):
    _check(q.dim() == 4, f"corrected_logits: q must be [B, Hq, L, D], got {q.dim()} dims")
    B, Hq, L, D = q.shape
    T = k_codes.shape[2]
    return q.new_empty((B, Hq, L, T), dtype=torch.float32)


@torch.library.register_fake("headq::decode_attention")
def _decode_attention_fake(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis, v_codes,
                           v_scale, v_zero, v_dense, heavy_delta, heavy_idx, k_window, v_window,
                           n_quant, n_window, kv_start, key_bits, group_size, side_bits,
                           value_bits, value_group_size, sign, scale, heavy_logits=None,
                           query_tokens=1):
    _check(q.dim() == 3, f"decode_attention: q must be [B, Hq, D], got {q.dim()} dims")
    _check(query_tokens >= 1 and q.shape[1] % query_tokens == 0,
           f"decode_attention: query_tokens must be >= 1 and divide query_heads ({q.shape[1]}), "
           f"got {query_tokens}")
    _check((v_codes is None) != (v_dense is None),
           "decode_attention: exactly one of v_codes and v_dense must be given")
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("headq::a2_step_weights")
def _a2_step_weights_fake(q, k_window, lse, n_quant, n_window, kv_start, scale, w_window,
                          heavy_logits=None, heavy_w=None, query_tokens=1):
    _check(q.dim() == 3, f"a2_step_weights: q must be [B, Hq, D], got {q.dim()} dims")
    _check(query_tokens >= 1 and q.shape[1] % query_tokens == 0,
           f"a2_step_weights: query_tokens must be >= 1 and divide query_heads ({q.shape[1]}), "
           f"got {query_tokens}")
    _check(w_window.dim() == 3, "a2_step_weights: w_window must be [B, H, W]")
    return None


@torch.library.register_fake("headq::a2_weights")
def _a2_weights_fake(q, k, mask, scale, lse=None):
    _check(q.dim() == 4, f"a2_weights: q must be [B, Hq, L, D], got {q.dim()} dims")
    _check(k.dim() == 4, f"a2_weights: k must be [B, H, T, D], got {k.dim()} dims")
    B, Hq, L, D = q.shape
    H, T = k.shape[1], k.shape[2]
    return (q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, Hq, L), dtype=torch.float32))
