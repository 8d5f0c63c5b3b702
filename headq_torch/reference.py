"""Pure-PyTorch reference of every ``headq`` op.

This module is the executable form of ``docs/LAYOUT.md``: the C++ and CUDA kernels are tested
against it (codes, scales and zeros bit-exact; floating results within a tolerance judged
against a float64 computation). It is slow and simple on purpose: it favours a fixed order of
float32 operations over speed wherever that order is part of the contract.

Shapes use ``B`` batch, ``H`` KV heads, ``Hq`` query heads, ``T`` tokens, ``D`` head dim,
``G`` key group size (tokens), ``Gv`` value group size (channels), ``r`` side-code rank.
"""

from __future__ import annotations

import torch

__all__ = [
    "pack_bits",
    "unpack_bits",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
    "side_code",
    "dequantize_side",
    "reconstruct_keys",
    "corrected_logits",
    "decode_attention",
    "a2_weights",
    "a2_step_weights",
    "expand_kv",
]


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest float16 (ties to even) and back to float32."""
    return x.to(torch.float16).to(torch.float32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (values < 2**bits) into uint8 ``[..., n*bits/8]``.

    Code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian bit stream.
    """
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"pack_bits: n*bits must be a multiple of 8, got n={n}, bits={bits}")
    c = codes.to(torch.int64)
    shifts = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*c.shape[:-1], n * bits)
    stream = stream.reshape(*c.shape[:-1], n * bits // 8, 8)
    weights = (1 << torch.arange(8, device=c.device)).to(torch.int64)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., n*bits/8]`` -> int64 codes ``[..., n]``."""
    p = packed.to(torch.int64)
    shifts = torch.arange(8, device=p.device)
    stream = ((p.unsqueeze(-1) >> shifts) & 1).reshape(*p.shape[:-1], p.shape[-1] * 8)
    stream = stream[..., : n * bits].reshape(*p.shape[:-1], n, bits)
    weights = (1 << torch.arange(bits, device=p.device)).to(torch.int64)
    return (stream * weights).sum(-1)


def _asym_params(mn: torch.Tensor, mx: torch.Tensor, bits: int):
    qmax = float(2**bits - 1)
    scale = (mx - mn) / qmax
    return scale.to(torch.float16), mn.to(torch.float16)


def _asym_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of float32 ``x`` with float32 scale/zero broadcast to it."""
    qmax = float(2**bits - 1)
    q = torch.round((x - z) / s)  # torch.round rounds half to even, like rintf
    q = torch.nan_to_num(q, nan=0.0).clamp(0.0, qmax)
    q = torch.where(s == 0, torch.zeros_like(q), q)
    return q.to(torch.int64)


def _dequant(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * s + z


def quantize_keys(k: torch.Tensor, bits: int, group_size: int):
    """Per-channel keys, grouped along tokens.

    k: float ``[B, H, T, D]`` with ``T % group_size == 0``.
    Returns codes uint8 ``[B, H, T, D*bits/8]``, scale and zero float16 ``[B, H, T/G, D]``.
    """
    B, H, T, D = k.shape
    G = group_size
    x = k.to(torch.float32).reshape(B, H, T // G, G, D)
    scale, zero = _asym_params(x.amin(dim=3), x.amax(dim=3), bits)
    s = scale.to(torch.float32).unsqueeze(3)
    z = zero.to(torch.float32).unsqueeze(3)
    codes = _asym_codes(x, s, z, bits).reshape(B, H, T, D)
    return pack_bits(codes, bits), scale, zero


def dequantize_keys(codes, scale, zero, bits: int, group_size: int, out_dtype=torch.float32):
    """Inverse of :func:`quantize_keys` (up to the quantisation error): ``[B, H, T, D]``."""
    B, H, T, nb = codes.shape
    D = nb * 8 // bits
    G = group_size
    c = unpack_bits(codes, bits, D).reshape(B, H, T // G, G, D)
    s = scale.to(torch.float32).unsqueeze(3)
    z = zero.to(torch.float32).unsqueeze(3)
    return _dequant(c, s, z).reshape(B, H, T, D).to(out_dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """Per-token values, grouped along the head dim.

    v: float ``[B, H, T, D]`` with ``D % group_size == 0``.
    Returns codes uint8 ``[B, H, T, D*bits/8]``, scale and zero float16 ``[B, H, T, D/Gv]``.
    """
    B, H, T, D = v.shape
    Gv = group_size
    x = v.to(torch.float32).reshape(B, H, T, D // Gv, Gv)
    scale, zero = _asym_params(x.amin(dim=-1), x.amax(dim=-1), bits)
    s = scale.to(torch.float32).unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    codes = _asym_codes(x, s, z, bits).reshape(B, H, T, D)
    return pack_bits(codes, bits), scale, zero


def dequantize_values(codes, scale, zero, bits: int, group_size: int, out_dtype=torch.float32):
    """Inverse of :func:`quantize_values` (up to the quantisation error): ``[B, H, T, D]``."""
    B, H, T, nb = codes.shape
    D = nb * 8 // bits
    Gv = group_size
    c = unpack_bits(codes, bits, D).reshape(B, H, T, D // Gv, Gv)
    s = scale.to(torch.float32).unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    return _dequant(c, s, z).reshape(B, H, T, D).to(out_dtype)


def _project_sequential(e: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``y[..., t, j] = sum_c e[..., t, c] * basis[h, c, j]`` in ascending ``c``, float32,
    product rounded before the add (the order the kernels use).

    e: ``[B, H, T, D]``; basis: ``[H, D, r]`` -> ``[B, H, T, r]``.
    """
    B, H, T, D = e.shape
    r = basis.shape[-1]
    u = basis.to(torch.float32)
    acc = torch.zeros(B, H, T, r, dtype=torch.float32, device=e.device)
    for c in range(D):
        prod = e[..., c : c + 1] * u[:, c, :].reshape(1, H, 1, r)
        acc = acc + prod
    return acc


def side_code(k, k_codes, k_scale, k_zero, basis, key_bits: int, group_size: int,
              side_bits: int, center: bool):
    """Side code of the key residual on the query basis.

    k: float ``[B, H, T, D]``; key codes/scale/zero from :func:`quantize_keys`;
    basis: float32 ``[H, D, r]``. Returns z_codes uint8 ``[B, H, T, r*side_bits/8]`` and
    z_scale float16 ``[B, H, T]``.
    """
    B, H, T, D = k.shape
    G = group_size
    khat = dequantize_keys(k_codes, k_scale, k_zero, key_bits, group_size)
    e = k.to(torch.float32) - khat
    if center:
        eg = e.reshape(B, H, T // G, G, D)
        total = torch.zeros(B, H, T // G, D, dtype=torch.float32, device=e.device)
        for t in range(G):
            total = total + eg[:, :, :, t, :]
        mu = total / float(G)
        e = (eg - mu.unsqueeze(3)).reshape(B, H, T, D)
    y = _project_sequential(e, basis)
    qz = float(2 ** (side_bits - 1) - 1)
    z_scale = (y.abs().amax(dim=-1) / qz).to(torch.float16)
    s = z_scale.to(torch.float32).unsqueeze(-1)
    q = torch.round(y / s)
    q = torch.nan_to_num(q, nan=0.0).clamp(-qz, qz)
    q = torch.where(s == 0, torch.zeros_like(q), q)
    codes = q.to(torch.int64) + 2 ** (side_bits - 1)
    return pack_bits(codes, side_bits), z_scale


def dequantize_side(z_codes, z_scale, side_bits: int) -> torch.Tensor:
    """float32 ``[B, H, T, r]`` from :func:`side_code`'s output."""
    r = z_codes.shape[-1] * 8 // side_bits
    c = unpack_bits(z_codes, side_bits, r) - 2 ** (side_bits - 1)
    return c.to(torch.float32) * z_scale.to(torch.float32).unsqueeze(-1)


def reconstruct_keys(k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits: int,
                     group_size: int, side_bits: int, sign: float, out_dtype=torch.float32):
    """``khat + sign * zhat Uᵀ`` ``[B, H, T, D]``: the keys whose dot product with ``q`` is
    :func:`corrected_logits`'s logit. Per element the correction is summed over the rank in
    ascending order with every product and sum rounded to float32 (the kernels' order), then
    added to ``khat`` and rounded once to ``out_dtype``."""
    khat = dequantize_keys(k_codes, k_scale, k_zero, key_bits, group_size)
    zhat = dequantize_side(z_codes, z_scale, side_bits)  # [B, H, T, r]
    u = basis.to(torch.float32)  # [H, D, r]
    corr = torch.zeros_like(khat)
    for j in range(u.shape[-1]):
        corr = corr + zhat[..., j:j + 1] * u[:, :, j].unsqueeze(0).unsqueeze(2)
    return (khat + float(sign) * corr).to(out_dtype)


def _work_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H, ...]`` -> ``[B, H*n_rep, ...]``: query head ``h`` reads KV head ``h // n_rep``."""
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def corrected_logits(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis, key_bits: int,
                     group_size: int, side_bits: int, sign: float, scale: float):
    """``(q . khat_t + sign * (q U) . zhat_t) * scale`` as float32 ``[B, Hq, L, T]``.

    q: float ``[B, Hq, L, D]``; key tensors ``[B, H, ...]``; side code optional (None).
    A float64 ``q`` makes the whole computation (after the exact dequantisation) float64 and
    returns float64: the tests' high-precision twin.
    """
    Hq = q.shape[1]
    H = k_codes.shape[1]
    n_rep = Hq // H
    wd = _work_dtype(q)
    qf = q.to(wd)
    khat = dequantize_keys(k_codes, k_scale, k_zero, key_bits, group_size).to(wd)
    khat = expand_kv(khat, n_rep)
    s = qf @ khat.transpose(-1, -2)
    if z_codes is not None:
        zhat = expand_kv(dequantize_side(z_codes, z_scale, side_bits).to(wd), n_rep)
        u = expand_kv(basis.to(wd).unsqueeze(0), n_rep)  # [1, Hq, D, r]
        qu = qf @ u  # [B, Hq, L, r]
        s = s + sign * (qu @ zhat.transpose(-1, -2))
    return s * scale


def decode_attention(q, k_codes, k_scale, k_zero, z_codes, z_scale, basis, v_codes, v_scale,
                     v_zero, v_dense, heavy_delta, heavy_idx, k_window, v_window, n_quant,
                     n_window, kv_start, key_bits: int, group_size: int, side_bits: int,
                     value_bits: int, value_group_size: int, sign: float, scale: float,
                     heavy_logits=None, query_tokens: int = 1):
    """One decode step over the packed cache (see docs/LAYOUT.md). Returns ``out``
    ``[B, Hq, D]`` in ``q``'s dtype and ``lse`` float32 ``[B, Hq]`` (log-sum-exp of the
    visible logits, ``-inf`` where none is visible). Computed densely in float32. A given
    ``heavy_logits`` ``[B, Hq, K]`` is filled with the kept slots' logits (``-inf`` for an
    empty slot or an invisible token). With ``query_tokens`` ``L > 1`` query head ``j`` is
    token ``j % L`` of the last ``L`` window tokens and sees the window tokens
    ``t < n_window[b] - (L - 1 - j % L)`` (causal among them)."""
    B, Hq, D = q.shape
    H = k_codes.shape[1]
    n_rep = Hq // H
    logits_q = corrected_logits(q.unsqueeze(2), k_codes, k_scale, k_zero, z_codes, z_scale,
                                basis, key_bits, group_size, side_bits, sign, scale)[:, :, 0]
    wd = _work_dtype(q)
    if v_codes is not None:
        vq = dequantize_values(v_codes, v_scale, v_zero, value_bits, value_group_size).to(wd)
    else:
        vq = v_dense.to(wd)
    vq = expand_kv(vq, n_rep)
    kw = expand_kv(k_window.to(wd), n_rep)
    vw = expand_kv(v_window.to(wd), n_rep)
    qf = q.to(wd)
    out = torch.zeros(B, Hq, D, dtype=wd, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=wd, device=q.device)
    if heavy_logits is not None:
        heavy_logits.fill_(float("-inf"))
    for b in range(B):
        nq = int(n_quant[b])
        nw = int(n_window[b])
        start = int(kv_start[b]) if kv_start is not None else 0
        if heavy_logits is not None and logits_q.shape[-1] > 0:
            hi = expand_kv(heavy_idx[b : b + 1], n_rep)[0].long()  # [Hq, K]
            vis = (hi >= max(start, 0)) & (hi < nq)
            got = torch.gather(logits_q[b], 1, hi.clamp(0, max(logits_q.shape[-1] - 1, 0)))
            heavy_logits[b] = torch.where(vis, got, torch.full_like(got, float("-inf"))).to(
                heavy_logits.dtype)
        lw = torch.einsum("hd,htd->ht", qf[b], kw[b, :, :nw]) * scale
        # hidden: tokens a head does not see (before kv_start; a few-token call's later tokens)
        hidden = torch.zeros(Hq, nq + nw, dtype=torch.bool, device=q.device)
        if query_tokens > 1:
            ends = _window_ends(n_window[b:b + 1], Hq, query_tokens).view(-1, 1).to(q.device)
            hidden[:, nq:] = torch.arange(nw, device=q.device) >= ends
        if start > 0:
            hidden[:, : min(start, nq + nw)] = True
        logits = torch.cat([logits_q[b, :, :nq], lw], dim=-1).masked_fill(hidden, float("-inf"))
        # A hidden token is left out of the value sum, not weighted by 0: 0 * NaN would be NaN.
        vals = torch.cat([vq[b, :, :nq], vw[b, :, :nw]], dim=1).masked_fill(hidden.unsqueeze(-1), 0.0)
        if nq + nw - start <= 0 or nq + nw == 0:
            continue
        lse[b] = torch.logsumexp(logits, dim=-1)
        a = torch.softmax(logits, dim=-1)
        # a head that sees nothing (query_tokens > 1 with kv_start): zeros, not NaN
        a = a.masked_fill(torch.isneginf(lse[b]).unsqueeze(-1), 0.0)
        o = torch.einsum("ht,htd->hd", a, vals)
        if heavy_idx is not None:
            hd = expand_kv(heavy_delta[b : b + 1].to(wd), n_rep)[0]
            hi = expand_kv(heavy_idx[b : b + 1], n_rep)[0]
            for h in range(Hq):
                for i in range(hi.shape[-1]):
                    idx = int(hi[h, i])
                    if max(start, 0) <= idx < nq:  # (a kept token before kv_start is hidden)
                        o[h] = o[h] + a[h, idx] * hd[h, i]
        out[b] = o
    return out.to(q.dtype), lse.to(torch.float32 if wd == torch.float32 else wd)


def _window_ends(n_window, Hq: int, L: int) -> torch.Tensor:
    """``[B, Hq]``: query head ``j`` (token ``j % L`` of the window's last ``L``, ``L`` the
    ops' ``query_tokens``) sees the window tokens ``t < n_window[b] - (L - 1 - j % L)``."""
    j = torch.arange(Hq, device=n_window.device)
    return n_window.view(-1, 1).long() - (L - 1 - j % L)


def a2_weights(q, k, mask, scale: float, lse=None):
    """Reference of ``ops.a2_weights``: the full attention matrix, float32 (float64 for a
    float64 ``q``). Returns ``w`` ``[B, H, T]`` and ``lse`` ``[B, Hq, L]``; with a given
    ``lse`` the weights use it (a row whose given lse is not finite adds nothing)."""
    B, Hq, L, D = q.shape
    H, T = k.shape[1], k.shape[2]
    n_rep = Hq // H
    wd = _work_dtype(q)
    s = (q.to(wd) @ expand_kv(k.to(wd), n_rep).transpose(-1, -2)) * scale  # [B, Hq, L, T]
    if mask is None:
        vis = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(T - L)
    else:
        vis = (mask[:, 0] if mask.dim() == 4 else mask).unsqueeze(1)  # [B or 1, 1, L, T]
    s = s.masked_fill(~vis, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
        a = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    else:
        lse = lse.clone()
        lw = lse.to(wd).unsqueeze(-1)
        a = torch.exp(s - lw).nan_to_num(0.0).masked_fill(~lw.isfinite(), 0.0)
    w = (a * a).sum(2).reshape(B, H, n_rep, T).sum(2)
    return w, lse


def a2_step_weights(q, k_window, lse, n_quant, n_window, kv_start, scale: float, w_window,
                    heavy_logits=None, heavy_w=None, query_tokens: int = 1):
    """Reference of ``ops.a2_step_weights``, out of place: returns the updated ``(w_window,
    heavy_w)`` (``heavy_w`` None when not given). Logits in float32 (float64 for a float64
    ``q``); an ``a`` that is not finite adds 0. ``query_tokens``: as in
    :func:`decode_attention` (query head ``j`` sees window tokens
    ``t < n_window[b] - (L - 1 - j % L)``)."""
    B, Hq, D = q.shape
    H, W = k_window.shape[1], k_window.shape[2]
    n_rep = Hq // H
    wd = _work_dtype(q)
    s = torch.einsum("bhd,bhtd->bht", q.to(wd), expand_kv(k_window.to(wd), n_rep)) * scale
    t = torch.arange(W, device=q.device).view(1, -1)
    # [B, Hq, W]: the window tokens each query head sees
    vis = t.view(1, 1, -1) < _window_ends(n_window, Hq, query_tokens).to(q.device).unsqueeze(-1)
    if kv_start is not None:
        vis = vis & (n_quant.view(-1, 1, 1).long() + t >= kv_start.view(-1, 1, 1).long())
    a = torch.exp(s - lse.to(wd).unsqueeze(-1))
    a = torch.where(vis & torch.isfinite(a), a, 0.0)
    w = w_window + (a * a).reshape(B, H, n_rep, W).sum(2).to(w_window.dtype)
    if heavy_logits is None:
        return w, None
    ah = torch.exp(heavy_logits.to(wd) - lse.to(wd).unsqueeze(-1))
    ah = torch.where(torch.isfinite(ah), ah, 0.0)
    K = heavy_logits.shape[-1]
    return w, heavy_w + (ah * ah).reshape(B, H, n_rep, K).sum(2).to(heavy_w.dtype)
