"""Perplexity "as decoding sees it", the metrics experiment, and the ``headq eval`` command.

One-pass simulation of a decoding HeadQ cache
---------------------------------------------
A decoding :class:`headq_torch.cache.HeadQCache` appends token ``t``, lets query ``t`` attend,
then quantises the oldest complete group while its window holds ``>= R + G`` tokens (``G`` key
group size, ``R`` residual length). So query ``t`` reads ``n_q(t) = G * floor((t - R) / G)``
quantised tokens (0 if negative), the oldest ones, and ``t + 1 - n_q(t)`` dense ones, its own
key included. (In the notation "the cache holds ``n = t + 1`` tokens with
``n_q(n) = G*floor((n - R')/G)`` quantised" this is ``R' = R + 1``.) A token's codes depend only
on its own group, so one forward pass over a whole window reproduces every decode step: the
attention function registered here (``"headq_sim"``) computes, per layer, the dense logits and
the HeadQ logits of every complete group (the ``headq`` ops quantise: ``quantize_keys``,
``side_code``; the corrected logits ``(q·k̂ + sign·(qU)·ẑ)·scale`` are evaluated over the
dequantised codes) and picks for each (query ``t``, key ``j``) the quantised logit when
``j < n_q(t)`` and the dense one otherwise; causal mask, softmax; then values likewise
(quantised when ``j < n_q(t)`` in full-KV mode). The hidden state of token ``t`` at every layer
depends only on what query ``t`` read, so this is token-by-token decode;
``tests/test_evaluation.py`` checks it against a step-by-step decode (float64, to 1e-9) and
against :class:`headq_torch.cache.HeadQCache` with the fused decode op (float32).

The A² value policy (full KV) is simulated from the one-pass attention matrix: per KV head,
``w_j = Σ_{query heads} Σ_{t' < t} a_{t', j}²`` over the queries that ran before the group event
at query ``t`` (``n_q`` grows between queries ``t - 1`` and ``t``). At each event the keep budget
is ``K = floor(keep_frac * n_q)``, the candidates are the current keep set ∪ the new group, the
top ``K`` by ``w`` are kept; a dropped token loses its full-precision value for good. Query
``t`` reads ``o_t = Σ_j a_tj v̂_j + Σ_{j kept at t} a_tj (v_j - v̂_j)``.

Rows, budgets and the table
---------------------------
Every row is an :class:`EvalRow`; budgets come from :func:`headq_torch.storage.storage_report`
at the evaluation window's context length (bases amortised over it; ``bits_per_element_32k``
gives the same at 32k tokens). ``bits_per_element`` is over the quantised side(s) of the row's
mode: keys only in K-only mode (values stay dense in every K-only row), keys + values in
full-KV mode. ``excess_removed_frac = 1 - excess / excess_ref`` with the reference the base
2-bit quantiser of the same mode (keys 2-bit G=64; in full KV also 2-bit values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from . import metrics as M
from . import ops
from .storage import storage_report

__all__ = [
    "EvalRow",
    "n_quantised",
    "quantised_counts",
    "segments",
    "a2_keep_mask",
    "simulate_layer",
    "simulated_attention",
    "decode_attention_step",
    "window_nll",
    "decode_nll",
    "default_rows",
    "learn_row_bases",
    "evaluate_rows",
    "metrics_experiment",
    "metric_configs",
    "format_table",
    "plot_rows",
    "add_eval_parser",
    "run_eval",
    "cmd_eval",
    "main_job",
    "main",
]

SIM_IMPL = "headq_sim"
DECODE_IMPL = "headq_decode_sim"
MODES = ("k_only", "full_kv")
BASES = ("pca", "fisher", "residual", "random", "key_pca")


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalRow:
    """One configuration of the table.

    ``key_bits``/``value_bits`` 16 mean dense. ``rank`` 0 means no side code. ``basis`` names the
    calibration method of ``U`` (``'pca'``, ``'fisher'``, ``'residual'``, ``'random'``,
    ``'key_pca'``).
    ``key_perturb``: ``'shift'`` adds a fixed per-channel constant ``1μᵀ`` to every key (the
    null-space control; ``μ ~ perturb_scale * N(0, I)``, seeded per layer), ``'noise'`` adds
    i.i.d. ``perturb_scale * N(0, 1)`` noise (same expected key MSE as the shift, different
    visible error). ``family`` groups rows in the plot.
    """

    method: str
    mode: str = "k_only"
    key_bits: int = 16
    group_size: int = 64
    rank: int = 0
    basis: str = "pca"
    side_bits: int = 8
    center: bool = False
    sign: float = 1.0
    value_bits: int = 16
    value_group_size: int = 64
    value_policy: str = "uniform"
    value_keep_frac: float = 0.0
    residual_length: int = 0
    key_perturb: str = ""
    perturb_scale: float = 0.0
    family: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.key_bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"key_bits must be 2, 3, 4, 8 or 16, got {self.key_bits}")
        if self.value_bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"value_bits must be 2, 3, 4, 8 or 16, got {self.value_bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")
        if self.rank and self.key_bits == 16:
            raise ValueError("a side code (rank > 0) needs quantised keys (key_bits < 16)")
        if self.rank and self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.value_policy not in ("uniform", "a2"):
            raise ValueError(f"value_policy must be 'uniform' or 'a2', got {self.value_policy!r}")
        if self.value_policy == "a2" and self.value_bits == 16:
            raise ValueError("the A² policy needs quantised values (value_bits < 16)")
        if self.key_perturb not in ("", "shift", "noise"):
            raise ValueError(f"key_perturb must be '', 'shift' or 'noise', got "
                             f"{self.key_perturb!r}")
        if self.mode == "k_only" and self.value_bits != 16:
            raise ValueError("mode='k_only' keeps values dense (value_bits=16)")

    @property
    def sim_key(self) -> tuple:
        """Fields that change the simulation (rows differing only in labels share a run)."""
        d = asdict(self)
        for k in ("method", "mode", "family"):
            d.pop(k)
        if not d["rank"]:
            d["basis"], d["side_bits"], d["center"], d["sign"] = "", 0, False, 1.0
        return tuple(sorted(d.items()))

    def storage(self, head_dim: int, context_len: int, **kw):
        return storage_report(
            head_dim=head_dim, context_len=context_len, key_bits=self.key_bits,
            value_bits=self.value_bits, group_size=self.group_size,
            value_group_size=self.value_group_size, rank=self.rank, side_bits=self.side_bits,
            residual_length=self.residual_length,
            value_keep_frac=self.value_keep_frac if self.value_policy == "a2" else 0.0, **kw)

    def bits_per_element(self, head_dim: int, context_len: int) -> float:
        rep = self.storage(head_dim, context_len)
        if self.mode == "k_only":
            return rep.key_bits_per_element
        return rep.bits_per_element


def n_quantised(n: int, group_size: int, residual_length: int = 0) -> int:
    """Tokens quantised in a cache that has finished processing ``n`` tokens:
    ``G * floor((n - R) / G)`` (0 while ``n < R + G``)."""
    return max(0, group_size * ((n - residual_length) // group_size))


def quantised_counts(T: int, group_size: int, residual_length: int = 0) -> torch.Tensor:
    """``[T]`` int64: quantised tokens query ``t`` reads, ``n_q(t)`` (the cache quantises a
    complete group after attention has read its newest token)."""
    n = torch.arange(T)
    nq = group_size * torch.div(n - residual_length, group_size, rounding_mode="floor")
    return nq.clamp_min(0)


def _keep_budget(frac: float, nq: int) -> int:
    return int(math.floor(frac * nq + 1e-9))


def _select_keep(w: torch.Tensor, cand: torch.Tensor, budget: int) -> torch.Tensor:
    """Top-``budget`` candidates by ``w`` (``[..., n]``; ties: lower index first) -> bool mask."""
    score = torch.where(cand, w.to(torch.float64), torch.full((), float("-inf"),
                                                               dtype=torch.float64))
    keep = torch.zeros_like(cand)
    if budget <= 0:
        return keep
    order = torch.argsort(-score, dim=-1, stable=True)[..., :budget]
    sel = torch.gather(cand, -1, order)  # never keep a non-candidate (budget > #candidates)
    keep.scatter_(-1, order, sel)
    return keep


def segments(T: int, group_size: int, residual_length: int = 0) -> list[tuple[int, int, int]]:
    """Stretches of queries that read the same number of quantised tokens:
    ``[(t0, t1, n_q)]`` with ``n_q(t) = n_q`` for ``t0 <= t < t1``. A group event (a group
    is quantised) happens at the first query of every stretch but the first."""
    nq = quantised_counts(T, group_size, residual_length).tolist()
    out = []
    t0 = 0
    for t in range(1, T + 1):
        if t == T or nq[t] != nq[t0]:
            out.append((t0, t, int(nq[t0])))
            t0 = t
    return out


class _A2Policy:
    """The A² keep set, advanced stretch by stretch over a one-pass attention matrix.

    ``w_j`` accumulates ``Σ_{query heads of the KV head} a_{t,j}²`` over the queries already
    processed; at each group event the keep set becomes the top ``floor(f * n_q)`` of (keep set
    ∪ the new group) by ``w``; the stretch's queries then read the kept tokens exactly."""

    def __init__(self, B: int, H: int, n_cols: int, keep_frac: float):
        self.w = torch.zeros(B, H, n_cols, dtype=torch.float64)
        self.keep = torch.zeros(B, H, n_cols, dtype=torch.bool)
        self.keep_frac = keep_frac
        self.nq = 0

    def event(self, nq: int) -> torch.Tensor:
        if nq > self.nq:
            cand = self.keep.clone()
            cand[..., self.nq:nq] = True
            self.keep = _select_keep(self.w, cand, _keep_budget(self.keep_frac, nq))
            self.nq = nq
        return self.keep

    def absorb(self, probs_rows: torch.Tensor) -> None:
        """Add the attention of a stretch of queries, ``[B, H, rep, L, T]``."""
        n = self.w.shape[-1]
        a = probs_rows[..., :n]
        self.w += (a * a).sum(dim=(2, 3)).to(torch.float64)


def a2_keep_mask(probs: torch.Tensor, n_kv: int, group_size: int, residual_length: int,
                 keep_frac: float, n_cols: int) -> torch.Tensor:
    """Kept-token mask of the A² policy, simulated from a one-pass attention matrix.

    probs: ``[B, Hq, T, T]`` causal attention of the window (``probs[., ., t, j]`` = what query
    ``t`` read). Returns bool ``[B, H, T, n_cols]``: token ``j`` holds its full-precision value
    when query ``t`` reads it (the rule is in the module docstring).
    """
    B, Hq, T, _ = probs.shape
    pv = probs.reshape(B, n_kv, Hq // n_kv, T, T)
    pol = _A2Policy(B, n_kv, n_cols, keep_frac)
    kept = torch.zeros(B, n_kv, T, n_cols, dtype=torch.bool)
    for t0, t1, c in segments(T, group_size, residual_length):
        kept[:, :, t0:t1] = pol.event(c).unsqueeze(2)
        pol.absorb(pv[:, :, :, t0:t1])
    return kept


def _perturbation(row: EvalRow, layer: int, shape, device) -> Optional[torch.Tensor]:
    """The key perturbation of a control row (``[H, 1, D]`` shift or ``[H, T, D]`` noise)."""
    if not row.key_perturb:
        return None
    H, T, D = shape
    g = torch.Generator().manual_seed(1000 + layer)
    if row.key_perturb == "shift":
        return (row.perturb_scale * torch.randn(H, 1, D, generator=g)).to(device)
    return (row.perturb_scale * torch.randn(H, T, D, generator=g)).to(device)


@dataclass
class LayerResult:
    """What :func:`simulate_layer` computed for one layer of one window."""

    out: torch.Tensor                     # [B, Hq, T, D] float32 attention output
    logits: Optional[torch.Tensor] = None  # [B, Hq, T, T] the logits decode reads (-inf masked)
    dense_logits: Optional[torch.Tensor] = None  # [B, Hq, T, T] unperturbed dense logits
    probs: Optional[torch.Tensor] = None   # [B, Hq, T, T]
    k_used: Optional[torch.Tensor] = None  # [B, H, T, D] keys: dequantised where quantised
    v_used: Optional[torch.Tensor] = None  # [B, H, T, D] values: dequantised where quantised


def _expand(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


@torch.no_grad()
def simulate_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                   row: EvalRow, basis: Optional[torch.Tensor] = None, layer: int = 0,
                   details: bool = False) -> LayerResult:
    """One layer of a window as a decoding HeadQ cache reads it (module docstring).

    q ``[B, Hq, T, D]``, k/v ``[B, H, T, D]`` (post-RoPE, as the attention function gets them);
    basis ``[H, D, r]`` when ``row.rank``. Returns the attention output ``[B, Hq, T, D]``
    (float32) and, with ``details``, the logits/probabilities/keys/values used.

    The ops quantise the complete groups (``quantize_keys``, ``side_code``,
    ``quantize_values``) and dequantise them; the corrected logits
    ``(q·k̂ + sign·(qU)·ẑ)·scale`` are then evaluated per stretch of queries with a BLAS matmul
    (the arithmetic of ``corrected_logits``, ~20x faster over a whole window than the op's CPU
    kernel, which is shaped for decode; ``tests/test_evaluation.py`` checks the two agree).
    """
    B, Hq, T, D = q.shape
    H = k.shape[1]
    rep = Hq // H
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32  # compute dtype
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    qv = qf.reshape(B, H, rep, T, D)
    pert = _perturbation(row, layer, (H, T, D), k.device)
    k_in = kf if pert is None else kf + pert.to(cd).unsqueeze(0)
    logits = (qf.reshape(B, H, rep * T, D) @ k_in.transpose(-1, -2)).mul_(scaling)
    logits = logits.reshape(B, H, rep, T, T)
    dense = None
    if details:
        dense = logits if pert is None else \
            (qf.reshape(B, H, rep * T, D) @ kf.transpose(-1, -2)).mul_(scaling).reshape(
                B, H, rep, T, T)
        dense = dense.clone()
    segs = segments(T, row.group_size, row.residual_length)
    nq_max = segs[-1][2] if (row.key_bits < 16 or row.value_bits < 16) else 0
    k_used = k_in
    if row.key_bits < 16 and nq_max > 0:
        kq = k_in[:, :, :nq_max].float().contiguous()  # the ops take float32/16/bf16
        codes, sc, zr = ops.quantize_keys(kq, row.key_bits, row.group_size)
        khat = ops.dequantize_keys(codes, sc, zr, row.key_bits, row.group_size).to(cd)
        khat_t = khat.unsqueeze(2).transpose(-1, -2)  # [B, H, 1, D, nq]
        zt = qu = None
        if row.rank:
            if basis is None:
                raise ValueError(f"row {row.method!r} has rank {row.rank} but no basis")
            u = basis.to(torch.float32).contiguous()
            zc, zs = ops.side_code(kq, codes, sc, zr, u, row.key_bits, row.group_size,
                                   row.side_bits, row.center)
            zhat = ops.dequantize_side(zc, zs, row.side_bits).to(cd)
            zt = zhat.unsqueeze(2).transpose(-1, -2)  # [B, H, 1, r, nq]
            qu = qv @ u.to(cd).reshape(1, H, 1, D, -1)  # [B, H, rep, T, r]
        for t0, t1, c in segs:
            if c == 0:
                continue
            s = qv[:, :, :, t0:t1] @ khat_t[..., :c]
            if zt is not None:
                s = s + row.sign * (qu[:, :, :, t0:t1] @ zt[..., :c])
            logits[:, :, :, t0:t1, :c] = s * scaling
        if details:
            k_used = torch.cat([khat, k_in[:, :, nq_max:]], dim=2)
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    logits.masked_fill_(~causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, H, rep, T, T]
    out = (probs.reshape(B, H, rep * T, T) @ vf).reshape(B, H, rep, T, D)
    v_used = vf
    if row.value_bits < 16 and nq_max > 0:
        vq = vf[:, :, :nq_max].contiguous()
        vc, vs, vz = ops.quantize_values(vq.float(), row.value_bits, row.value_group_size)
        vhat = ops.dequantize_values(vc, vs, vz, row.value_bits, row.value_group_size).to(cd)
        dv = vhat - vq  # [B, H, nq, D]
        pol = _A2Policy(B, H, nq_max, row.value_keep_frac) if row.value_policy == "a2" \
            else None
        for t0, t1, c in segs:
            if pol is not None:
                keep = pol.event(c)
            if c > 0:
                d = dv[:, :, :c]
                if pol is not None:
                    d = d * (~keep[..., :c]).unsqueeze(-1).to(d.dtype)
                out[:, :, :, t0:t1] += probs[:, :, :, t0:t1, :c] @ d.unsqueeze(2)
            if pol is not None:
                pol.absorb(probs[:, :, :, t0:t1])
        if details:
            v_used = torch.cat([vhat, vf[:, :, nq_max:]], dim=2)
    out = out.reshape(B, Hq, T, D)
    if not details:
        return LayerResult(out)
    dense.masked_fill_(~causal, float("-inf"))
    return LayerResult(out, logits.reshape(B, Hq, T, T), dense.reshape(B, Hq, T, T),
                       probs.reshape(B, Hq, T, T), k_used, v_used)


# ---------------------------------------------------------------------------------------------
# The attention functions registered with transformers
# ---------------------------------------------------------------------------------------------

class _SimRun:
    """State of one simulated forward pass: the row, its bases, optional q/k/v recording."""

    def __init__(self, row: EvalRow, bases: Optional[Sequence[torch.Tensor]] = None,
                 record: bool = False):
        self.row = row
        self.bases = bases
        self.record: Optional[dict] = {} if record else None


_SIM_STACK: list[_SimRun] = []


def _sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    run = _SIM_STACK[-1]
    layer = int(module.layer_idx)
    sc = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if query.shape[2] != key.shape[2]:
        raise ValueError("the headq_sim attention reads a whole window in one pass (no cache): "
                         f"got {query.shape[2]} queries for {key.shape[2]} keys")
    if run.record is not None:
        run.record[layer] = (query.detach().float().cpu(), key.detach().float().cpu(),
                             value.detach().float().cpu(), sc)
    basis = run.bases[layer] if (run.bases is not None and run.row.rank) else None
    res = simulate_layer(query, key, value, sc, run.row, basis, layer)
    return res.out.transpose(1, 2).contiguous().to(query.dtype), None


class DecodeSim:
    """Step-by-step decode of a HeadQ cache, the reference of the one-pass simulation:
    transformers' ``DynamicCache`` holds the dense keys/values; each step quantises the complete
    groups, updates the A² keep set with the sequential rule, and attends (see
    :func:`decode_attention_step`)."""

    def __init__(self, row: EvalRow, bases: Optional[Sequence[torch.Tensor]] = None,
                 use_op: bool = True):
        self.row = row
        self.bases = bases
        self.use_op = use_op
        self.state: dict[int, dict] = {}


_DECODE_STACK: list[DecodeSim] = []


def decode_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                          row: EvalRow, basis: Optional[torch.Tensor], layer: int,
                          state: dict, use_op: bool = True) -> torch.Tensor:
    """One decode step: query ``q`` ``[B, Hq, D]`` against the ``n`` cached tokens ``k, v``
    ``[B, H, n, D]`` (the newest is the query's own). The first ``n_q(n - 1)`` are read
    quantised; ``state`` carries the A² weights and keep set between steps.

    ``use_op`` (float32 inputs): attention through :func:`headq_torch.ops.decode_attention` over
    the packed tensors; otherwise (and always for float64 inputs) a dense computation over the
    dequantised tensors in the input precision. Returns ``[B, Hq, D]``."""
    B, Hq, D = q.shape
    H, n = k.shape[1], k.shape[2]
    rep = Hq // H
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    use_op = use_op and cd == torch.float32
    kf, vf, qf = k.to(cd), v.to(cd), q.to(cd).contiguous()
    pert = _perturbation(row, layer, (H, n, D), k.device)
    if pert is not None:
        kf = kf + pert.to(cd).unsqueeze(0)
    quant = row.key_bits < 16 or row.value_bits < 16
    nq = n_quantised(n - 1, row.group_size, row.residual_length) if quant else 0
    w = state.get("w", torch.zeros(B, H, 0, dtype=torch.float64))
    if w.shape[-1] < n:
        w = torch.cat([w, torch.zeros(B, H, n - w.shape[-1], dtype=torch.float64)], dim=-1)
    keep = state.get("keep", torch.zeros(B, H, 0, dtype=torch.bool))
    prev = state.get("nq", 0)
    if row.value_policy == "a2" and nq > prev:  # a group event: update the keep set
        cand = torch.zeros(B, H, nq, dtype=torch.bool)
        cand[..., :keep.shape[-1]] = keep
        cand[..., prev:nq] = True
        keep = _select_keep(w[..., :nq], cand, _keep_budget(row.value_keep_frac, nq))
    state["nq"], state["keep"] = nq, keep
    G = row.group_size
    kq, vq = kf[:, :, :nq], vf[:, :, :nq]
    # the packed region (the ops need at least one group; n_quant masks it when empty)
    kb = row.key_bits if row.key_bits < 16 else 8
    kq32 = kq.float().contiguous() if nq else torch.zeros(B, H, G, D)
    codes, sc, zr = ops.quantize_keys(kq32, kb, G)
    zc = zs = u = None
    if row.rank and nq:
        u = basis.to(torch.float32).contiguous()
        zc, zs = ops.side_code(kq32, codes, sc, zr, u, kb, G, row.side_bits, row.center)
    if row.key_bits < 16 and nq:
        khat = ops.dequantize_keys(codes, sc, zr, kb, G).to(cd)
        lq = qf.unsqueeze(2) @ _expand(khat, rep).transpose(-1, -2)
        if zc is not None:
            zhat = ops.dequantize_side(zc, zs, row.side_bits).to(cd)
            qu = qf.unsqueeze(2) @ _expand(u.to(cd).unsqueeze(0), rep)
            lq = lq + row.sign * (qu @ _expand(zhat, rep).transpose(-1, -2))
        lq = lq[:, :, 0] * scaling
    else:
        lq = torch.einsum("bhd,bhtd->bht", qf, _expand(kq, rep)) * scaling
    lw = torch.einsum("bhd,bhtd->bht", qf, _expand(kf[:, :, nq:], rep)) * scaling
    logits = torch.cat([lq, lw], dim=-1)  # [B, Hq, n]
    vhat = vq
    v_codes = v_scale = v_zero = None
    if row.value_bits < 16 and nq:
        v_codes, v_scale, v_zero = ops.quantize_values(vq.float().contiguous(), row.value_bits,
                                                       row.value_group_size)
        vhat = ops.dequantize_values(v_codes, v_scale, v_zero, row.value_bits,
                                     row.value_group_size).to(cd)
    kept = keep if (row.value_policy == "a2" and nq) else torch.zeros(B, H, nq, dtype=torch.bool)
    if use_op and row.key_bits < 16:
        hd = hi = None
        if kept.any():
            Kmax = int(kept.sum(-1).max())
            hi = torch.full((B, H, Kmax), -1, dtype=torch.int32)
            hd = torch.zeros(B, H, Kmax, D)
            for b in range(B):
                for h in range(H):
                    idx = torch.nonzero(kept[b, h]).flatten()
                    hi[b, h, :idx.numel()] = idx.to(torch.int32)
                    hd[b, h, :idx.numel()] = vq[b, h, idx] - vhat[b, h, idx]
        v_dense = None if v_codes is not None else (vq.contiguous() if nq else
                                                    torch.zeros(B, H, G, D))
        out, lse = ops.decode_attention(
            qf, codes, sc, zr, zc, zs, u, v_codes, v_scale, v_zero, v_dense, hd, hi,
            kf[:, :, nq:].contiguous(), vf[:, :, nq:].contiguous(),
            torch.full((B,), nq, dtype=torch.int32), torch.full((B,), n - nq, dtype=torch.int32),
            None, kb, G, row.side_bits, row.value_bits if row.value_bits < 16 else 8,
            row.value_group_size, row.sign, scaling)
        a = torch.exp(logits - lse.unsqueeze(-1))
    else:
        a = torch.softmax(logits, dim=-1)
        v_read = torch.where(kept.unsqueeze(-1), vq, vhat)
        vals = torch.cat([v_read, vf[:, :, nq:]], dim=2)
        out = torch.einsum("bht,bhtd->bhd", a, _expand(vals, rep))
    state["w"] = w + a.double().pow(2).reshape(B, H, rep, n).sum(2)
    return out.to(cd)


def _decode_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    sim = _DECODE_STACK[-1]
    layer = int(module.layer_idx)
    sc = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    B, Hq, L, D = query.shape
    outs = []
    st = sim.state.setdefault(layer, {})
    basis = sim.bases[layer] if (sim.bases is not None and sim.row.rank) else None
    n0 = key.shape[2] - L
    for i in range(L):  # a multi-token call is decoded one token at a time
        n = n0 + i + 1
        outs.append(decode_attention_step(query[:, :, i], key[:, :, :n], value[:, :, :n], sc,
                                          sim.row, basis, layer, st, sim.use_op))
    out = torch.stack(outs, dim=2)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SIM_IMPL, _sim_attention)
    AttentionInterface.register(DECODE_IMPL, _decode_attention_fn)


def _set_attn(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, KeyError):
        model.config._attn_implementation = impl


@contextmanager
def simulated_attention(model, row: EvalRow, bases: Optional[Sequence[torch.Tensor]] = None,
                        record: bool = False):
    """Within the block, ``model(input_ids)`` runs as a decoding cache of ``row`` would read it
    (one pass over the window, no cache object). Yields the run state (``.record`` holds
    ``{layer: (q, k, v, scaling)}`` when ``record``)."""
    _register()
    run = _SimRun(row, bases, record)
    previous = model.config._attn_implementation
    _SIM_STACK.append(run)
    _set_attn(model, SIM_IMPL)
    try:
        yield run
    finally:
        _SIM_STACK.remove(run)
        _set_attn(model, previous)


@contextmanager
def decode_simulation(model, row: EvalRow, bases: Optional[Sequence[torch.Tensor]] = None,
                      use_op: bool = True):
    """Within the block, the model's attention decodes step by step over a packed cache of
    ``row`` (keys/values held dense by a ``DynamicCache``, quantised at every step)."""
    _register()
    sim = DecodeSim(row, bases, use_op)
    previous = model.config._attn_implementation
    _DECODE_STACK.append(sim)
    _set_attn(model, DECODE_IMPL)
    try:
        yield sim
    finally:
        _DECODE_STACK.remove(sim)
        _set_attn(model, previous)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------

def _token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of ``ids[t+1]`` under ``logits[t]``: ``[T-1]`` float64."""
    lp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return -lp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, row: EvalRow,
               bases: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Per-token NLL ``[T-1]`` (float64) of one window ``ids`` ``[1, T]`` with the cache of
    ``row`` as decoding reads it (one-pass simulation)."""
    with simulated_attention(model, row, bases):
        out = model(input_ids=ids, use_cache=False)
    return _token_nll(out.logits, ids)


@torch.no_grad()
def decode_nll(model, ids: torch.Tensor, row: EvalRow,
               bases: Optional[Sequence[torch.Tensor]] = None,
               use_op: bool = True) -> torch.Tensor:
    """Per-token NLL ``[T-1]`` computed by feeding ``ids`` one token at a time (the reference
    the one-pass simulation is tested against)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = []
    with decode_simulation(model, row, bases, use_op):
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1:])
    return _token_nll(torch.cat(logits, dim=1), ids)


# ---------------------------------------------------------------------------------------------
# Calibration bases of the rows
# ---------------------------------------------------------------------------------------------

def learn_row_bases(model, tokenizer, calib_text: str, rows: Iterable[EvalRow],
                    n_tokens: int = 4096, progress: bool = True) -> dict:
    """``{(basis, rank): [per-layer [H, D, r]]}`` for every (basis, rank) the rows use, from one
    calibration pass (:func:`headq_torch.calibration.calibrate` keeps the moments of every
    method, :meth:`~headq_torch.calibration.Calibration.with_bases` derives the rest). The
    ``'residual'`` bases are fitted to the base code of the first ``'residual'`` row (its
    ``key_bits`` and ``group_size``)."""
    from .calibration import calibrate

    rows = list(rows)
    need = sorted({(r.basis, r.rank) for r in rows if r.rank})
    if not need:
        return {}
    res = next((r for r in rows if r.rank and r.basis == "residual"), None)
    fit = {} if res is None else dict(key_bits=res.key_bits, group_size=res.group_size)
    cal = calibrate(model, tokenizer, calib_text, rank=need[0][1], n_tokens=n_tokens,
                    method="pca", progress=progress, **fit)
    out = {}
    for basis, rank in need:
        out[(basis, rank)] = cal.with_bases(basis, rank).bases
    out["_n_tokens"] = cal.n_tokens
    return out


# ---------------------------------------------------------------------------------------------
# The rows of the table
# ---------------------------------------------------------------------------------------------

def value_keep_frac_for(head_dim: int, value_bits: int, target_value_bits: int,
                        value_group_size: int = 64,
                        target_value_group_size: Optional[int] = None) -> float:
    """Keep fraction ``f`` at which ``value_bits`` + A² (full-precision kept tokens) costs the
    same value bits per token as uniform ``target_value_bits`` (storage_report's accounting)."""
    tg = target_value_group_size or value_group_size
    per_tok = lambda b, g: head_dim * b + (head_dim // g) * 32  # noqa: E731
    kept = head_dim * 16 + 32
    return (per_tok(target_value_bits, tg) - per_tok(value_bits, value_group_size)) / kept


def default_rows(ranks: Sequence[int] = (4, 8, 16), group_size: int = 64, head_dim: int = 64,
                 residual_length: int = 0, controls_rank: int = 8, full_kv: bool = True,
                 quick: bool = False) -> list[EvalRow]:
    """The table: K-only rows (dense values) and full-KV rows. ``quick`` keeps the essentials
    (the main job's budget)."""
    G, R = group_size, residual_length
    base = dict(group_size=G, residual_length=R)
    rows = [
        EvalRow("dense", family="dense"),
        EvalRow("base 2-bit", key_bits=2, family="base", **base),
        EvalRow("2-bit G=32", key_bits=2, group_size=32, residual_length=R, family="baseline"),
        EvalRow("3-bit G=128", key_bits=3, group_size=128, residual_length=R, family="baseline"),
        EvalRow("3-bit G=32", key_bits=3, group_size=32, residual_length=R, family="baseline"),
        EvalRow("4-bit G=128", key_bits=4, group_size=128, residual_length=R, family="baseline"),
    ]
    for basis in ("pca", "fisher", "residual"):
        for r in ranks:
            if quick and basis != "pca" and r != controls_rank:
                continue
            rows.append(EvalRow(f"HeadQ {basis} r={r}", key_bits=2, rank=r, basis=basis,
                                family="headq", **base))
    rc = controls_rank
    rows += [
        EvalRow(f"HeadQ pca r={rc} bz=4", key_bits=2, rank=rc, side_bits=4, family="headq",
                **base),
        EvalRow(f"HeadQ pca r={2 * rc} bz=4", key_bits=2, rank=2 * rc, side_bits=4,
                family="headq", **base),
        EvalRow(f"ctrl wrong-sign r={rc}", key_bits=2, rank=rc, sign=-1.0, family="control",
                **base),
        EvalRow(f"ctrl random basis r={rc}", key_bits=2, rank=rc, basis="random",
                family="control", **base),
        EvalRow(f"ctrl key-PCA basis r={rc}", key_bits=2, rank=rc, basis="key_pca",
                family="control", **base),
        EvalRow("ctrl null-space shift", key_perturb="shift", perturb_scale=2.0,
                family="control"),
    ]
    if not quick:
        rows += [
            EvalRow("ctrl equal-MSE noise", key_perturb="noise", perturb_scale=2.0,
                    family="control"),
            EvalRow(f"HeadQ G=128 r={rc}", key_bits=2, group_size=128, rank=rc,
                    residual_length=R, family="headq"),
            EvalRow(f"HeadQ 3-bit G=128 r={rc} bz=4", key_bits=3, group_size=128, rank=rc,
                    side_bits=4, residual_length=R, family="headq"),
        ]
    if not full_kv:
        return rows
    kv = dict(mode="full_kv", **base)
    hq = dict(key_bits=2, rank=rc, basis="pca")
    f3 = value_keep_frac_for(head_dim, 2, 3)
    f32 = value_keep_frac_for(head_dim, 2, 2, target_value_group_size=32)
    rows += [
        EvalRow("dense", mode="full_kv", family="dense"),
        EvalRow("base 2-bit K+V", key_bits=2, value_bits=2, family="base", **kv),
        EvalRow(f"HeadQ r={rc} + 2-bit V", value_bits=2, family="uniform", **hq, **kv),
        EvalRow(f"HeadQ r={rc} + 2-bit V Gv=32", value_bits=2, value_group_size=32,
                family="uniform", **hq, **kv),
        EvalRow(f"HeadQ r={rc} + 2-bit V + A² f={f32:.3f}", value_bits=2, value_policy="a2",
                value_keep_frac=f32, family="a2", **hq, **kv),
        EvalRow(f"HeadQ r={rc} + 3-bit V", value_bits=3, family="uniform", **hq, **kv),
        EvalRow(f"HeadQ r={rc} + 2-bit V + A² f={f3:.3f}", value_bits=2, value_policy="a2",
                value_keep_frac=f3, family="a2", **hq, **kv),
    ]
    if not quick:
        f4 = value_keep_frac_for(head_dim, 3, 4)
        rows += [
            EvalRow(f"HeadQ r={rc} + 4-bit V", value_bits=4, family="uniform", **hq, **kv),
            EvalRow(f"HeadQ r={rc} + 3-bit V + A² f={f4:.3f}", value_bits=3, value_policy="a2",
                    value_keep_frac=f4, family="a2", **hq, **kv),
            EvalRow("4-bit K+V", key_bits=4, value_bits=4, group_size=128, family="baseline",
                    residual_length=R, mode="full_kv"),
        ]
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def eval_windows(tokenizer, text: str, window: int, n_windows: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping ``[1, window]`` token windows of ``text``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(n_windows, ids.numel() // window)
    if n < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of {window}")
    return [ids[i * window:(i + 1) * window].unsqueeze(0) for i in range(n)]


def _geometry(model) -> tuple[int, int, int, int]:
    from .config import model_geometry
    return model_geometry(model.config)


def _run_id(row: EvalRow, ids: torch.Tensor) -> str:
    import hashlib
    h = hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:12]
    return f"{row.sim_key}|{ids.shape[1]}|{h}"


@torch.no_grad()
def evaluate_rows(model, windows: Sequence[torch.Tensor], rows: Sequence[EvalRow],
                  bases: Optional[dict] = None, progress: bool = True,
                  resume: Optional[str] = None, reverse: bool = False) -> list[dict]:
    """Perplexity of every row over ``windows``; returns one dict per row (see module doc).

    ``resume``: a file of finished (row, window) NLLs; runs found there are not repeated and
    every finished run is added to it (so a long benchmark can be stopped and restarted). It
    must belong to the same model and calibration (the caller's responsibility). Several
    processes may share it (``reverse`` runs the rows in the opposite order, for a second
    worker)."""
    from tqdm.auto import tqdm

    n_layers, _, n_kv, D = _geometry(model)
    window = windows[0].shape[1]
    unique: dict[tuple, EvalRow] = {}
    for r in rows:
        unique.setdefault(r.sim_key, r)
    done: dict[str, torch.Tensor] = {}

    def merge_file() -> None:  # several processes may share one resume file
        if resume and os.path.exists(resume):
            try:
                done.update(torch.load(resume))
            except Exception:  # a file being replaced: read it next time
                pass

    merge_file()
    nll: dict[tuple, list] = {k: [] for k in unique}
    order = list(unique.items())
    if reverse:
        order.reverse()
    bar = tqdm(total=len(unique) * len(windows), desc="eval", unit="run", disable=not progress)
    for key, row in order:
        b = bases.get((row.basis, row.rank)) if (bases and row.rank) else None
        if row.rank and b is None:
            raise ValueError(f"no bases for {row.basis!r} rank {row.rank} (row {row.method!r})")
        bar.set_postfix_str(row.method[:28])
        for ids in windows:
            rid = _run_id(row, ids)
            if rid not in done:
                merge_file()
            if rid not in done:
                result = window_nll(model, ids, row, b)
                merge_file()
                done[rid] = result
                if resume:
                    tmp = f"{resume}.{os.getpid()}.tmp"
                    torch.save(done, tmp)
                    os.replace(tmp, resume)
            nll[key].append(done[rid])
            bar.update(1)
    bar.close()
    out = []
    for row in rows:
        x = torch.cat(nll[row.sim_key])
        rep = row.storage(D, window)
        rep32 = row.storage(D, 32768)
        out.append({
            "method": row.method,
            "mode": row.mode,
            "family": row.family,
            "key_bits": row.key_bits,
            "value_bits": row.value_bits,
            "rank": row.rank,
            "basis": row.basis if row.rank else "",
            "group_size": row.group_size,
            "side_bits": row.side_bits if row.rank else 0,
            "center": row.center,
            "sign": row.sign,
            "value_group_size": row.value_group_size,
            "value_policy": row.value_policy,
            "value_keep_frac": row.value_keep_frac,
            "residual_length": row.residual_length,
            "key_perturb": row.key_perturb,
            "bits_per_element": row.bits_per_element(D, window),
            "bits_per_element_32k": (rep32.key_bits_per_element if row.mode == "k_only"
                                     else rep32.bits_per_element),
            "key_bits_per_element": rep.key_bits_per_element,
            "value_bits_per_element": rep.value_bits_per_element,
            "kv_bits_per_element": rep.bits_per_element,
            "nll": float(x.mean()),
            "ppl": float(torch.exp(x.mean())),
            "n_tokens": int(x.numel()),
        })
    _add_excess(out)
    return out


def _add_excess(out: list[dict]) -> None:
    dense = {r["mode"]: r["ppl"] for r in out if r["family"] == "dense"}
    ref = {r["mode"]: r["ppl"] for r in out if r["family"] == "base"}
    for r in out:
        d = dense.get(r["mode"], dense.get("k_only"))
        r["excess_ppl"] = r["ppl"] - d if d is not None else float("nan")
        b = ref.get(r["mode"])
        if d is not None and b is not None and b > d:
            r["excess_removed_frac"] = 1.0 - (r["ppl"] - d) / (b - d)
        else:
            r["excess_removed_frac"] = float("nan")


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of :func:`evaluate_rows`' output."""
    head = (f"{'mode':8} {'method':34} {'K':>3} {'V':>3} {'r':>3} {'bits/el':>8} "
            f"{'bits@32k':>8} {'ppl':>9} {'excess':>8} {'removed':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rem = r["excess_removed_frac"]
        lines.append(
            f"{r['mode']:8} {r['method'][:34]:34} {r['key_bits']:>3} {r['value_bits']:>3} "
            f"{r['rank']:>3} {r['bits_per_element']:>8.3f} {r['bits_per_element_32k']:>8.3f} "
            f"{r['ppl']:>9.4f} {r['excess_ppl']:>+8.4f} "
            f"{('%7.1f%%' % (100 * rem)) if math.isfinite(rem) else '      -':>8}")
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict], path) -> None:
    """Perplexity against bits per element, one panel per mode (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    style = {"dense": ("k", "*"), "base": ("tab:red", "s"), "baseline": ("tab:orange", "o"),
             "headq": ("tab:blue", "D"), "control": ("tab:gray", "x"),
             "uniform": ("tab:orange", "o"), "a2": ("tab:green", "^")}
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        dense = [r for r in sub if r["family"] == "dense"]
        main = [r for r in sub if r["family"] not in ("dense", "control")]
        # axis limits from the quantisers; controls outside them are listed, not drawn
        ys = [r["ppl"] for r in main + dense]
        lo, hi = min(ys), max(ys)
        pad = 0.08 * (hi - lo or 1.0)
        xmax = max([r["bits_per_element"] for r in main] + [3.0]) + 0.5
        hidden = []
        for fam, (c, mk) in style.items():
            pts = [r for r in sub if r["family"] == fam and r["family"] != "dense"]
            inside = [r for r in pts if lo - pad <= r["ppl"] <= hi + pad
                      and r["bits_per_element"] <= xmax]
            hidden += [r for r in pts if r not in inside]
            if not inside:
                continue
            ax.scatter([r["bits_per_element"] for r in inside], [r["ppl"] for r in inside],
                       c=c, marker=mk, label=fam, zorder=3)
            for r in inside:
                ax.annotate(r["method"], (r["bits_per_element"], r["ppl"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        if dense:
            ax.axhline(dense[0]["ppl"], color="k", ls="--", lw=1, label="dense (fp16 cache)")
        ax.set_xlim(right=xmax)
        ax.set_ylim(lo - pad, hi + pad)
        if hidden:
            ax.text(0.99, 0.98, "off the axes:\n" + "\n".join(
                f"{r['method']}: ppl {r['ppl']:.2f} @ {r['bits_per_element']:.2f}"
                for r in hidden), transform=ax.transAxes, ha="right", va="top", fontsize=6,
                bbox=dict(fc="white", ec="0.7"))
        ax.set_xlabel("bits per element (" + ("keys" if mode == "k_only" else "keys+values")
                      + ", all scales/side code/bases counted)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The metrics experiment
# ---------------------------------------------------------------------------------------------

def metric_configs(rank: int = 8, group_size: int = 64) -> list[EvalRow]:
    """Key and value configurations of the metrics experiment."""
    G = group_size
    keys = [
        EvalRow("2-bit G=64", key_bits=2, group_size=G),
        EvalRow("2-bit G=32", key_bits=2, group_size=32),
        EvalRow("2-bit G=128", key_bits=2, group_size=128),
        EvalRow("3-bit G=64", key_bits=3, group_size=G),
        EvalRow("4-bit G=64", key_bits=4, group_size=G),
        EvalRow("HeadQ r=4", key_bits=2, group_size=G, rank=4),
        EvalRow(f"HeadQ r={rank}", key_bits=2, group_size=G, rank=rank),
        EvalRow("HeadQ r=16", key_bits=2, group_size=G, rank=16),
        EvalRow(f"wrong-sign r={rank}", key_bits=2, group_size=G, rank=rank, sign=-1.0),
        EvalRow(f"random basis r={rank}", key_bits=2, group_size=G, rank=rank, basis="random"),
        EvalRow(f"key-PCA basis r={rank}", key_bits=2, group_size=G, rank=rank,
                basis="key_pca"),
        EvalRow("null-space shift 0.5", key_perturb="shift", perturb_scale=0.5),
        EvalRow("null-space shift 2", key_perturb="shift", perturb_scale=2.0),
        EvalRow("noise 0.5 (equal MSE)", key_perturb="noise", perturb_scale=0.5),
        EvalRow("noise 0.1", key_perturb="noise", perturb_scale=0.1),
    ]
    values = [
        EvalRow("V 2-bit", mode="full_kv", value_bits=2, key_bits=16, group_size=G),
        EvalRow("V 3-bit", mode="full_kv", value_bits=3, key_bits=16, group_size=G),
        EvalRow("V 4-bit", mode="full_kv", value_bits=4, key_bits=16, group_size=G),
        EvalRow("V 2-bit Gv=32", mode="full_kv", value_bits=2, value_group_size=32,
                key_bits=16, group_size=G),
    ]
    return keys + values


@torch.no_grad()
def metrics_experiment(model, ids: torch.Tensor, configs: Sequence[EvalRow],
                       bases: Optional[dict] = None, layers: Optional[Sequence[int]] = None,
                       progress: bool = True) -> dict:
    """Per layer × KV head × configuration: the five metrics and the attention KL / output
    error they should predict, on one window ``ids`` ``[1, T]`` captured densely.

    Key metrics (key MSE, score-space error, Fisher-space error) are averaged over the queries
    that read at least one quantised key, as decode reads the cache (``j < n_q(t)``); the
    value distortion ``D_V`` over the queries of value configurations (keys dense, so attention
    is fixed) and compared with the attention-output error ``‖Δo‖²/d``.
    Returns ``{"points": [...], "correlations": {...}}``.
    """
    from tqdm.auto import tqdm

    with simulated_attention(model, EvalRow("dense"), record=True) as run:
        model(input_ids=ids, use_cache=False)
    rec = run.record
    layers = list(range(len(rec))) if layers is None else list(layers)
    points = []
    bar = tqdm(total=len(layers) * len(configs), desc="metrics", disable=not progress)
    for layer in layers:
        q, k, v, sc = rec[layer]
        B, Hq, T, D = q.shape
        H = k.shape[1]
        for cfg in configs:
            basis = bases[(cfg.basis, cfg.rank)][layer] if cfg.rank else None
            res = simulate_layer(q, k, v, sc, cfg, basis, layer, details=True)
            nq = quantised_counts(T, cfg.group_size, cfg.residual_length)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            if cfg.key_perturb:
                scored = torch.ones(T, dtype=torch.bool)
                n_keys = T
            else:
                scored = nq > 0
                n_keys = int(nq[-1])
            wq = scored.to(torch.float64).expand(B, Hq, T)
            s, s_hat = res.dense_logits, res.logits
            kl = M.per_kv_head(M.attention_kl(s, s_hat, causal), H, wq)
            sce = M.per_kv_head(M.score_error(s, s_hat, causal), H, wq)
            fe = M.per_kv_head(M.fisher_error(s, s_hat, causal), H, wq)
            kmse = M.key_mse(k[:, :, :n_keys], res.k_used[:, :, :n_keys]) if n_keys else \
                torch.zeros(B, H, dtype=torch.float64)
            a = torch.softmax(s, -1)
            dv = M.per_kv_head(M.value_distortion(a, v, res.v_used), H, wq)
            oe = M.per_kv_head(M.output_error(a, v, res.probs, res.v_used), H, wq)
            vmse = M.key_mse(v[:, :, :n_keys], res.v_used[:, :, :n_keys]) if n_keys else \
                torch.zeros(B, H, dtype=torch.float64)
            for h in range(H):
                points.append({
                    "layer": layer, "kv_head": h, "config": cfg.method,
                    "kind": "value" if cfg.value_bits < 16 else "key",
                    "key_mse": float(kmse[0, h]), "score_error": float(sce[0, h]),
                    "fisher_error": float(fe[0, h]), "attention_kl": float(kl[0, h]),
                    "value_distortion": float(dv[0, h]), "value_mse": float(vmse[0, h]),
                    "output_error": float(oe[0, h]),
                })
            bar.update(1)
    bar.close()
    return {"points": points, "correlations": correlations(points), "n_tokens": int(ids.shape[1])}


def correlations(points: Sequence[dict]) -> dict:
    """Spearman rank correlations: key metrics vs attention KL over the key configurations
    (layer × KV head × configuration), value metrics vs the attention-output error over the
    value configurations. Each entry has ``rho`` and ``n`` (points)."""
    kp = [p for p in points if p["kind"] == "key"]
    vp = [p for p in points if p["kind"] == "value"]
    out = {}
    for m in ("key_mse", "score_error", "fisher_error"):
        out[f"{m}_vs_attention_kl"] = {"rho": M.spearman([p[m] for p in kp],
                                                         [p["attention_kl"] for p in kp]),
                                       "n": len(kp)}
    ko = [p for p in kp if p["config"].startswith(("2-bit", "3-bit", "4-bit", "HeadQ",
                                                    "wrong", "random", "key-PCA"))]
    for m in ("key_mse", "score_error", "fisher_error"):
        out[f"{m}_vs_attention_kl_quantisers_only"] = {
            "rho": M.spearman([p[m] for p in ko], [p["attention_kl"] for p in ko]),
            "n": len(ko)}
    for m in ("value_distortion", "value_mse"):
        out[f"{m}_vs_output_error"] = {"rho": M.spearman([p[m] for p in vp],
                                                         [p["output_error"] for p in vp]),
                                       "n": len(vp)}
    return out


def plot_metrics(points: Sequence[dict], path) -> None:
    """Scatter plots (log-log) of each key metric against attention KL, and of the value
    metrics against the output error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kp = [p for p in points if p["kind"] == "key"]
    vp = [p for p in points if p["kind"] == "value"]
    panels = [("key_mse", "attention_kl", kp), ("score_error", "attention_kl", kp),
              ("fisher_error", "attention_kl", kp), ("value_mse", "output_error", vp),
              ("value_distortion", "output_error", vp)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    configs = sorted({p["config"] for p in points})
    cmap = plt.get_cmap("tab20")
    for ax, (xm, ym, pts) in zip(axes, panels):
        for i, c in enumerate(configs):
            sel = [p for p in pts if p["config"] == c]
            if sel:
                ax.scatter([max(p[xm], 1e-12) for p in sel], [max(p[ym], 1e-12) for p in sel],
                           s=6, color=cmap(i % 20), label=c)
        rho = M.spearman([p[xm] for p in pts], [p[ym] for p in pts])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xm)
        ax.set_ylabel(ym)
        ax.set_title(f"Spearman ρ = {rho:.3f} (n={len(pts)})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=5, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DEFAULTS = dict(window=1024, eval_tokens=2048, calib_tokens=4096, n_calib_docs=100)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``headq`` sub-command parser (``headq eval --help``)."""
    p = subparsers.add_parser(
        "eval", help="perplexity table: dense, base 2-bit, same-budget baselines, HeadQ, "
                     "controls, HeadQ + A² values",
        description="Calibrate on one part of a text, evaluate perplexity on another part with "
                    "the quantised cache as decoding reads it, print the table, write JSON and "
                    "a plot (perplexity vs bits per element).")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    """The ``headq eval`` entry point (exit status 0)."""
    run_eval(args)
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a transformers model path/name (default: the packaged SmolLM2-135M)")
    p.add_argument("--text", default=None,
                   help="a text file; the first --calib-frac of it calibrates, the rest "
                        "evaluates (default: the packaged news text, split by article)")
    p.add_argument("--calib-frac", type=float, default=0.3)
    p.add_argument("--window", type=int, default=DEFAULTS["window"],
                   help="tokens per evaluation window (each starts an empty cache)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULTS["eval_tokens"],
                   help="evaluation tokens (rounded down to whole windows)")
    p.add_argument("--calib-tokens", type=int, default=DEFAULTS["calib_tokens"])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=0)
    p.add_argument("--no-full-kv", action="store_true", help="K-only rows only")
    p.add_argument("--quick", action="store_true", help="the essential rows only")
    p.add_argument("--full", action="store_true",
                   help="every row (the default for `headq eval`; --default implies --quick "
                        "unless --full is given)")
    p.add_argument("--metrics", action="store_true",
                   help="also run the metrics experiment (metrics vs attention KL)")
    p.add_argument("--metrics-tokens", type=int, default=512)
    p.add_argument("--out", default="headq_eval",
                   help="output prefix: writes PREFIX.json and PREFIX.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    from . import data
    if args.model is None:
        model, tok = data.load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.text is None:
        calib, ev = data.calibration_eval_split(DEFAULTS["n_calib_docs"])
        source = f"{data.packaged_text_path()} (articles 0-99 calibrate, 100- evaluate)"
    else:
        txt = Path(args.text).read_text(encoding="utf-8")
        cut = int(len(txt) * args.calib_frac)
        calib, ev = txt[:cut], txt[cut:]
        source = f"{args.text} (first {args.calib_frac:.0%} calibrates, the rest evaluates)"
    return model, tok, calib, ev, source


def run_eval(args) -> dict:
    """``headq eval``: prints the table, writes ``<out>.json`` and ``<out>.png``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    progress = not args.no_progress
    model, tok, calib, ev, source = _load(args)
    n_layers, n_heads, n_kv, D = _geometry(model)
    rows = default_rows(ranks=args.ranks, group_size=args.group_size, head_dim=D,
                        residual_length=args.residual_length, full_kv=not args.no_full_kv,
                        quick=args.quick)
    bases = learn_row_bases(model, tok, calib, rows, n_tokens=args.calib_tokens,
                            progress=progress)
    windows = eval_windows(tok, ev, args.window, max(1, args.eval_tokens // args.window))
    results = evaluate_rows(model, windows, rows, bases, progress=progress)
    print(format_table(results))
    out = {
        "command": " ".join(sys.argv),
        "model": getattr(model.config, "name_or_path", ""),
        "text": source,
        "window": args.window,
        "eval_tokens": sum(w.shape[1] for w in windows),
        "scored_tokens": results[0]["n_tokens"],
        "calib_tokens": bases.get("_n_tokens", 0),
        "residual_length": args.residual_length,
        "notes": ("bits_per_element: keys only for k_only rows (values dense), keys+values for "
                  "full_kv rows; storage_report at the window length (bases amortised over "
                  "it); bits_per_element_32k at 32768 tokens. excess_removed_frac is relative "
                  "to the base 2-bit quantiser of the same mode."),
        "rows": results,
    }
    if args.metrics:
        ids = windows[0][:, :args.metrics_tokens]
        mb = bases if bases else {}
        cfgs = [c for c in metric_configs(group_size=args.group_size)
                if not c.rank or (c.basis, c.rank) in mb]
        mx = metrics_experiment(model, ids, cfgs, mb, progress=progress)
        out["metrics_correlation"] = mx["correlations"]
        for name, c in mx["correlations"].items():
            print(f"spearman {name:45} rho={c['rho']:+.3f} n={c['n']}")
    out["seconds"] = round(time.time() - t0, 1)
    prefix = Path(args.out)
    if prefix.parent and not prefix.parent.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.json", "w") as f:
        json.dump(out, f, indent=1)
    plot_rows(results, f"{prefix}.png")
    print(f"wrote {prefix}.json and {prefix}.png ({out['seconds']} s)")
    return out


def main_job(argv: Optional[Sequence[str]] = None) -> dict:
    """The README's first command on the embedded default: packaged SmolLM2, calibrate on the
    first 100 packaged articles (4096 tokens), evaluate on the rest (2 windows of 1024 tokens)
    with the essential rows (``--quick``; ``--full`` for all), print the table, write
    ``headq_eval.json``/``.png``. About 4-6 minutes on 2 idle CPU cores."""
    p = argparse.ArgumentParser(prog="python -m headq_torch.evaluation --default")
    _add_eval_args(p)
    args = p.parse_args(list(argv or []))
    if not args.full:
        args.quick = True
    return run_eval(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--default" in argv:
        argv.remove("--default")
        main_job(argv)
        return
    p = argparse.ArgumentParser(prog="python -m headq_torch.evaluation")
    _add_eval_args(p)
    run_eval(p.parse_args(argv))


if __name__ == "__main__":
    main()
