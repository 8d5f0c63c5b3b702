"""The A² value policy: which quantised tokens keep a full-precision value.

With attention held fixed, ``Δo = Σ_j a_j Δv_j``, so for independent zero-mean value errors the
visible distortion is ``Σ_j a_j² ‖Δv_j‖²``. The policy tracks, per (batch, KV head),

    w_j = Σ over the query heads of that KV head, Σ over every query that attended to j, a_{t,j}²

and keeps the ``K = floor(value_keep_frac * n_quantised)`` tokens of largest ``w`` at full
precision: each kept token stores ``heavy_delta = v − vhat`` (the model's float dtype) and its
index ``heavy_idx`` (int32, ``-1`` = empty slot); attention reads ``vhat + delta`` for it.

Bookkeeping (done by :class:`headq_torch.cache.HeadQLayer`):

* ``w`` is accumulated for the tokens of the dense window and for the kept tokens only. A token
  that is quantised and not kept is never a candidate again, so its ``w`` is not stored.
* When a group of tokens is quantised, the candidates are the current keep set ∪ the new tokens;
  the new keep set is the top ``K`` by current ``w``. A dropped token loses its delta for good.
* Weights come from the materialised attention of prefill / chunk calls and, at decode, from
  ``exp(logit − lse)`` with ``lse`` from :func:`headq_torch.ops.decode_attention`, for the window
  and the kept tokens (the only ones whose ``w`` is tracked).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["keep_budget", "squared_weights", "update_keep_set"]


def keep_budget(value_keep_frac: float, n_quantised: int) -> int:
    """``K = floor(value_keep_frac * n_quantised)`` (with a tolerance for float rounding)."""
    return int(math.floor(value_keep_frac * n_quantised + 1e-9))


def squared_weights(a: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``Σ_{query heads of a KV head} Σ_{queries} a²``: ``[B, Hq, L, T]`` -> float32 ``[B, H, T]``."""
    B, Hq, L, T = a.shape
    a2 = (a.float() ** 2).sum(2)  # [B, Hq, T]
    return a2.reshape(B, n_kv, Hq // n_kv, T).sum(2)


def update_keep_set(heavy_idx: Optional[torch.Tensor], heavy_w: Optional[torch.Tensor],
                    heavy_delta: Optional[torch.Tensor], new_idx0: int, new_w: torch.Tensor,
                    new_delta: torch.Tensor, budget: int):
    """New keep set = top-``budget`` of (current keep set ∪ new tokens) by ``w``.

    Args:
        heavy_idx/heavy_w/heavy_delta: current set ``[B, H, K0]`` int32 / float32 /
            ``[B, H, K0, D]`` (None when empty); slots with ``idx == -1`` are empty.
        new_idx0: quantised-region index of the first new token.
        new_w: float32 ``[B, H, n]`` weights of the new tokens; new_delta ``[B, H, n, D]``.
        budget: ``K``.

    Returns ``(idx int32 [B, H, K], w float32 [B, H, K], delta [B, H, K, D])``; slots that no
    candidate fills (fewer than ``K`` candidates) hold ``idx = -1``, ``w = -inf``, zero delta.
    """
    B, H, n = new_w.shape
    D = new_delta.shape[-1]
    dev = new_w.device
    idx = torch.arange(new_idx0, new_idx0 + n, dtype=torch.int32, device=dev).expand(B, H, n)
    w = new_w.float()
    delta = new_delta
    if heavy_idx is not None and heavy_idx.shape[-1] > 0:
        valid = heavy_idx >= 0
        idx = torch.cat([heavy_idx, idx], dim=-1)
        w = torch.cat([heavy_w.float().masked_fill(~valid, float("-inf")), w], dim=-1)
        delta = torch.cat([heavy_delta.to(new_delta.dtype), delta], dim=-2)
    n_cand = idx.shape[-1]
    k = min(budget, n_cand)
    out_idx = torch.full((B, H, budget), -1, dtype=torch.int32, device=dev)
    out_w = torch.full((B, H, budget), float("-inf"), dtype=torch.float32, device=dev)
    out_delta = torch.zeros(B, H, budget, D, dtype=new_delta.dtype, device=dev)
    if k > 0:
        top_w, top = torch.topk(w, k, dim=-1)
        sel_idx = torch.gather(idx, -1, top)
        sel_idx = torch.where(torch.isfinite(top_w), sel_idx, torch.full_like(sel_idx, -1))
        out_idx[..., :k] = sel_idx
        out_w[..., :k] = top_w
        out_delta[..., :k, :] = torch.gather(delta, -2, top.unsqueeze(-1).expand(B, H, k, D))
        out_delta[..., :k, :] *= (sel_idx >= 0).unsqueeze(-1).to(out_delta.dtype)
    return out_idx, out_w, out_delta
