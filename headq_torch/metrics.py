"""Model-visible cache-error metrics (see ../shared/DESIGN.md, "Metrics").

Attention reads keys only through logits ``s_j = q·k_j * scale`` and is blind to a constant
shift of all logits; it reads values only through ``o = Σ_j a_j v_j``. The metrics here measure
cache error in those coordinates, next to the storage-space key MSE they are compared with.

Every function is batched: leading dimensions are kept, the token axis is the last one of the
logits. ``mask`` (bool, ``True`` = visible, broadcastable to the logits) restricts every sum,
mean and softmax to the visible keys, so a causal window is handled per query. Logit-space
metrics are computed in float64 by default: the attention KL of a good 4-bit cache is ~1e-6,
below what float32 log-softmax differences resolve reliably.

Grouped-query attention: logits and attention weights are ``[..., Hq, L, n]``; keys and values
``[..., H, n, d]`` with query head ``h`` reading KV head ``h // (Hq / H)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "key_mse",
    "score_error",
    "fisher_error",
    "attention_kl",
    "value_distortion",
    "output_error",
    "per_kv_head",
    "rankdata",
    "spearman",
]


def _prep(s: Tensor, s_hat: Tensor, mask: Optional[Tensor], dtype):
    if s.shape != s_hat.shape:
        raise ValueError(f"s and s_hat must have the same shape, got {tuple(s.shape)} and "
                         f"{tuple(s_hat.shape)}")
    s = s.to(dtype)
    s_hat = s_hat.to(dtype)
    if mask is None:
        mask = torch.ones((), dtype=torch.bool, device=s.device)
    elif mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = visible), got {mask.dtype}")
    mask = torch.broadcast_to(mask, s.shape)
    return s, s_hat, mask


def key_mse(k: Tensor, k_hat: Tensor) -> Tensor:
    """Raw key MSE ``‖K - K̂‖² / (n d)`` over the last two dims ``[..., n, d]`` -> ``[...]``."""
    if k.shape != k_hat.shape:
        raise ValueError(f"k and k_hat must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(k_hat.shape)}")
    d = (k.to(torch.float64) - k_hat.to(torch.float64))
    return d.pow(2).mean(dim=(-2, -1))


def score_error(s: Tensor, s_hat: Tensor, mask: Optional[Tensor] = None,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """Score-space error modulo a constant shift, ``‖P (s' - s)‖²`` with ``P = I - 11ᵀ/n``.

    ``s``, ``s_hat``: logits ``[..., n]``; ``n`` counts the visible keys of each row.
    Returns ``[...]`` (0 for a row with no visible key).
    """
    s, s_hat, mask = _prep(s, s_hat, mask, dtype)
    m = mask.to(dtype)
    delta = torch.where(mask, s_hat - s, torch.zeros((), dtype=dtype, device=s.device))
    n = m.sum(-1, keepdim=True).clamp_min(1.0)
    centred = (delta - delta.sum(-1, keepdim=True) / n) * m
    return centred.pow(2).sum(-1)


def _masked_softmax(s: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax, log-softmax) over visible entries; invisible entries get weight 0."""
    neg = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    x = torch.where(mask, s, neg)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = x - lse
    p = torch.where(mask, logp.exp(), torch.zeros((), dtype=s.dtype, device=s.device))
    return p, torch.where(mask, logp, torch.zeros_like(logp))


def fisher_error(s: Tensor, s_hat: Tensor, mask: Optional[Tensor] = None,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """Fisher-space error ``½ Δsᵀ (diag(a) - a aᵀ) Δs`` with ``a = softmax(s)``, ``Δs = s' - s``.

    Computed as ``½ Σ_j a_j (Δs_j - Σ_i a_i Δs_i)²`` (the same quadratic form, never negative
    by rounding). It is the second-order expansion of ``KL(a ‖ a')`` and shift-invariant.
    Returns ``[...]``.
    """
    s, s_hat, mask = _prep(s, s_hat, mask, dtype)
    a, _ = _masked_softmax(s, mask)
    delta = torch.where(mask, s_hat - s, torch.zeros((), dtype=dtype, device=s.device))
    mean = (a * delta).sum(-1, keepdim=True)
    return 0.5 * (a * (delta - mean).pow(2)).sum(-1)


def attention_kl(s: Tensor, s_hat: Tensor, mask: Optional[Tensor] = None,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """``KL(a ‖ a')`` with ``a = softmax(s)``, ``a' = softmax(s')`` over the visible keys.

    Returns ``[...]`` (0 for a row with no visible key).
    """
    s, s_hat, mask = _prep(s, s_hat, mask, dtype)
    a, loga = _masked_softmax(s, mask)
    _, logb = _masked_softmax(s_hat, mask)
    return (a * (loga - logb)).sum(-1)


def _gqa_view(a: Tensor, n_kv: int) -> Tensor:
    """``[..., Hq, L, n]`` -> ``[..., H, (Hq/H)*L, n]`` (query heads of one KV head stacked)."""
    *lead, Hq, L, n = a.shape
    if Hq % n_kv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({n_kv})")
    return a.reshape(*lead, n_kv, (Hq // n_kv) * L, n)


def value_distortion(a: Tensor, v: Tensor, v_hat: Tensor) -> Tensor:
    """A²-weighted value distortion ``D_V = Σ_j a_j² ‖v_j - v̂_j‖² / d``.

    a: attention weights ``[..., Hq, L, n]``; v, v_hat: ``[..., H, n, d]``.
    Returns ``[..., Hq, L]``: with attention held fixed and independent zero-mean value errors,
    ``E‖Δo‖²/d`` for each query.
    """
    if v.shape != v_hat.shape:
        raise ValueError(f"v and v_hat must have the same shape, got {tuple(v.shape)} and "
                         f"{tuple(v_hat.shape)}")
    *lead, Hq, L, n = a.shape
    H, d = v.shape[-3], v.shape[-1]
    dv2 = (v.to(torch.float64) - v_hat.to(torch.float64)).pow(2).sum(-1)  # [..., H, n]
    a2 = _gqa_view(a.to(torch.float64).pow(2), H)  # [..., H, rep*L, n]
    out = (a2 @ dv2.unsqueeze(-1)).squeeze(-1) / d  # [..., H, rep*L]
    return out.reshape(*lead, Hq, L)


def output_error(a: Tensor, v: Tensor, a_hat: Tensor, v_hat: Tensor) -> Tensor:
    """Attention output error ``‖Σ_j a'_j v̂_j - Σ_j a_j v_j‖² / d`` per query ``[..., Hq, L]``
    (the quantity ``D_V`` predicts when ``a' = a``)."""
    H, d = v.shape[-3], v.shape[-1]
    *lead, Hq, L, n = a.shape
    o = _gqa_view(a.to(torch.float64), H) @ v.to(torch.float64)
    o_hat = _gqa_view(a_hat.to(torch.float64), H) @ v_hat.to(torch.float64)
    return ((o_hat - o).pow(2).sum(-1) / d).reshape(*lead, Hq, L)


def per_kv_head(x: Tensor, n_kv: int, weights: Optional[Tensor] = None) -> Tensor:
    """Mean of a per-query metric ``[..., Hq, L]`` over the query heads of each KV head and the
    queries (optionally weighted, e.g. by a 0/1 mask of scored queries): ``[..., H]``."""
    *lead, Hq, L = x.shape
    xv = x.reshape(*lead, n_kv, (Hq // n_kv) * L)
    if weights is None:
        return xv.mean(-1)
    w = torch.broadcast_to(weights.to(x.dtype), x.shape).reshape(*lead, n_kv, (Hq // n_kv) * L)
    return (xv * w).sum(-1) / w.sum(-1).clamp_min(1e-30)


def rankdata(x: Sequence[float] | Tensor) -> Tensor:
    """Ranks 1..n of a 1-D sequence, ties get their average rank (as ``scipy.stats.rankdata``)."""
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = t.numel()
    order = torch.argsort(t, stable=True)
    sorted_t = t[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_t[j + 1] == sorted_t[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks). NaN if either
    sequence is constant or shorter than 2."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.numel() != ry.numel():
        raise ValueError(f"x and y must have the same length, got {rx.numel()} and {ry.numel()}")
    if rx.numel() < 2:
        return float("nan")
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else float("nan")
