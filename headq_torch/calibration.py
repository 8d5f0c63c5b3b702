"""Calibration: capture post-RoPE queries as attention sees them, learn a query basis per
(layer, KV head), and save / load it as a safetensors file.

Capture goes through transformers' attention interface: :func:`capture_qk` switches the model to
the attention function ``"headq_capture"``, which records ``query`` and ``key`` exactly as the
model hands them to attention (after RoPE, after any q/k norm, at the model's scaling) and then
runs ``sdpa``. RoPE is never re-implemented here.

Basis methods (``learn_bases``), per (layer, KV head), over the queries of every query head
that reads that KV head (grouped-query attention pools ``Hq / H`` heads):

* ``'pca'``: top-``r`` eigenvectors of the query second moment ``E[q qᵀ]`` (the default).
* ``'fisher'``: top-``r`` eigenvectors of the curvature-weighted moment
  ``Σ_t c_t q_t q_tᵀ / Σ_t c_t`` with ``c_t = tr(diag(a_t) − a_t a_tᵀ) = 1 − ‖a_t‖²``,
  ``a_t`` the attention of query ``t``. Reason: with independent zero-mean key errors ``e_j``
  the logit error is ``Δs_j = q·e_j`` and the expected Fisher-space error
  ``½ E[Δsᵀ (diag(a) − aaᵀ) Δs] = ½ Σ_j (a_j − a_j²) E[e_jᵀ q qᵀ e_j]``; for keys of equal error
  statistics the weight of ``q qᵀ`` is ``Σ_j (a_j − a_j²) = 1 − ‖a‖²``. A query whose attention
  is one-hot (``c = 0``) is insensitive to key error; a flat one (``c → 1``) is the most sensitive.
* ``'residual'``: the orthonormal ``U`` that minimises the logit error the side code leaves,
  ``E[(qᵀ (I − UUᵀ) e)²] = tr((I − P) Σ_q (I − P) Σ_e)`` with ``P = UUᵀ``, averaged over every
  (calibration query, calibration key) pair: ``Σ_q = E[q qᵀ]`` as for ``'pca'`` and ``Σ_e`` the
  covariance (over tokens) of the key residuals ``e = k − k̂`` that the base quantiser
  (``calibrate(key_bits=, group_size=)``, 2-bit in groups of 64 tokens by default) leaves on
  the calibration keys. Query PCA is its optimum when ``Σ_e`` is isotropic; the base code's
  residuals are not (a channel's error scales with its range in the group, which differs
  several-fold between channels), so this basis spends its rank where the queries' energy
  meets the keys' error. No closed form: Adam on the Stiefel manifold (QR retraction), started
  from the better of PCA and the top eigenvectors of ``Σ_q Σ_e + Σ_e Σ_q``, in float64,
  keeping the best iterate, so it never ends worse than PCA on the objective
  (``_residual_basis``).
* controls: ``'random'`` (a random orthonormal basis, seeded) and ``'key_pca'`` (top-``r``
  eigenvectors of the key second moment ``E[k kᵀ]``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import config_fingerprint, layer_kinds, model_geometry, model_name
from .tp import check_shard, head_slice, resolve_shard

__all__ = [
    "FORMAT_VERSION",
    "METHODS",
    "CalibrationError",
    "LayerSamples",
    "Moments",
    "capture_qk",
    "learn_bases",
    "bases_from_moments",
    "residual_objective",
    "calibrate",
    "Calibration",
]

FORMAT_VERSION = 1
FORMAT_NAME = "headq-calibration"
METHODS = ("pca", "fisher", "residual", "random", "key_pca")
CAPTURE_IMPL = "headq_capture"


class CalibrationError(ValueError):
    """A calibration file or object that does not fit: wrong model, rank, shape, version, or a
    file that is not a HeadQ calibration."""


# ---------------------------------------------------------------------------------------------
# Capture through the attention interface
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerSamples:
    """Post-RoPE samples of one layer, pooled per KV head.

    queries: float32 ``[H, N, D]`` (``N`` = tokens x query heads per KV head);
    keys: float32 ``[H, Nk, D]``; fisher_weights: float32 ``[H, N]`` (``1 − ‖a‖²`` of each query)
    or None when not requested.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    fisher_weights: Optional[torch.Tensor] = None


class _Recorder:
    def __init__(self, fisher: bool):
        self.fisher = fisher
        self.records: dict[int, tuple] = {}


_ACTIVE: list[_Recorder] = []


def _pool_queries(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[H, B*(Hq/H)*L, D]``: query head ``h`` reads KV head ``h // (Hq/H)``."""
    B, Hq, L, D = query.shape
    n_rep = Hq // n_kv
    q = query.reshape(B, n_kv, n_rep, L, D).permute(1, 0, 2, 3, 4)
    return q.reshape(n_kv, B * n_rep * L, D)


def _fisher_weights(query, key, attention_mask, scaling) -> torch.Tensor:
    """``1 − ‖a_t‖²`` per query, ``[B, Hq, L]``, from the attention the model computes."""
    B, Hq, L, D = query.shape
    H = key.shape[1]
    k = key.float().repeat_interleave(Hq // H, dim=1)
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    T = k.shape[2]
    if attention_mask is None:
        causal = torch.ones(L, T, dtype=torch.bool, device=s.device).tril(T - L)
        s = s.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., :T], float("-inf"))
    else:
        s = s + attention_mask[..., :T].float()
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return 1.0 - (a * a).sum(-1)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function ``"headq_capture"``: record q/k as attention sees them, then sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE and getattr(module, "layer_idx", None) is not None:
        rec = _ACTIVE[-1]
        H = key.shape[1]
        q = _pool_queries(query.detach().float(), H)
        k = key.detach().float().permute(1, 0, 2, 3).reshape(H, -1, key.shape[-1])
        w = None
        if rec.fisher:
            sc = scaling if scaling is not None else query.shape[-1] ** -0.5
            fw = _fisher_weights(query.detach(), key.detach(), attention_mask, sc)
            w = _pool_queries(fw.unsqueeze(-1), H).squeeze(-1)
        rec.records[module.layer_idx] = (q, k, w)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, sdpa_mask)


def _set_attn(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, KeyError):
        model.config._attn_implementation = impl
    tc = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else None
    if tc is not None and tc is not model.config:
        tc._attn_implementation = impl


@torch.no_grad()
def capture_qk(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               fisher: bool = False) -> list[Optional[LayerSamples]]:
    """Run ``model`` on ``input_ids`` and return, per layer, the post-RoPE queries pooled per KV
    head ``[H, N, D]`` and the keys ``[H, Nk, D]`` (float32, CPU), as attention saw them.

    ``fisher=True`` also returns each query's curvature weight ``1 − ‖a‖²`` (see the module
    docstring). Layers the model did not run (none in practice) are ``None``. Padding positions
    of ``attention_mask`` are included in the samples; pass unpadded text for calibration.
    """
    _register_capture()
    previous = model.config._attn_implementation
    rec = _Recorder(fisher)
    _ACTIVE.append(rec)
    _set_attn(model, CAPTURE_IMPL)
    try:
        model(input_ids=input_ids.to(model.device), attention_mask=attention_mask,
              use_cache=False)
    finally:
        _ACTIVE.remove(rec)
        _set_attn(model, previous)
    n_layers = model_geometry(model.config)[0]
    out: list[Optional[LayerSamples]] = []
    for i in range(n_layers):
        r = rec.records.get(i)
        out.append(None if r is None else LayerSamples(r[0].cpu(), r[1].cpu(),
                                                       None if r[2] is None else r[2].cpu()))
    return out


# ---------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------

@dataclass
class Moments:
    """Streaming second moments of one layer (float64 ``[H, D, D]`` each): queries ``qq``,
    curvature-weighted queries ``fq``, keys ``kk``, and the base quantiser's key residuals
    ``rr`` (with their sum ``r_sum`` ``[H, D]``, to centre them; None until
    :meth:`add_residuals` adds the first)."""

    qq: torch.Tensor
    fq: torch.Tensor
    kk: torch.Tensor
    n_q: int = 0
    n_k: int = 0
    fisher_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    rr: Optional[torch.Tensor] = None
    r_sum: Optional[torch.Tensor] = None
    n_r: int = 0

    @classmethod
    def zeros(cls, n_kv: int, head_dim: int) -> "Moments":
        z = lambda: torch.zeros(n_kv, head_dim, head_dim, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), 0, 0, torch.zeros(n_kv, dtype=torch.float64))

    def head_slice(self, sl: slice) -> "Moments":
        """The moments of KV heads ``sl`` (a tensor-parallel shard)."""
        cut = lambda t: None if t is None else t[sl]  # noqa: E731
        return Moments(self.qq[sl], self.fq[sl], self.kk[sl], self.n_q, self.n_k,
                       self.fisher_sum[sl], cut(self.rr), cut(self.r_sum), self.n_r)

    def residual_covariance(self) -> torch.Tensor:
        """``Σ_e`` ``[H, D, D]``: the covariance over tokens of the key residuals."""
        if not self.n_r:
            raise ValueError("method='residual' needs the base quantiser's key residuals, "
                             "which calibrate() collects (Moments.add_residuals); these "
                             "moments have none")
        m = self.r_sum / self.n_r
        return self.rr / self.n_r - m.unsqueeze(-1) * m.unsqueeze(-2)

    def add(self, s: LayerSamples) -> None:
        q = s.queries.double()
        k = s.keys.double()
        self.qq += q.transpose(1, 2) @ q
        self.kk += k.transpose(1, 2) @ k
        self.n_q += q.shape[1]
        self.n_k += k.shape[1]
        if s.fisher_weights is not None:
            w = s.fisher_weights.double()
            self.fq += (q * w.unsqueeze(-1)).transpose(1, 2) @ q
            self.fisher_sum = self.fisher_sum + w.sum(1)

    def add_residuals(self, keys: torch.Tensor, key_bits: int, group_size: int) -> None:
        """Add the residuals ``k − k̂`` of one sequence's keys ``[H, T, D]`` (tokens in order)
        under the base quantiser (``ops.quantize_keys`` / ``dequantize_keys``, as the cache
        stores them): its complete groups of ``group_size`` tokens; the incomplete tail stays
        dense in the cache, so it has no residual. A head dim the quantiser does not take (not
        a multiple of 8) adds nothing (``'residual'`` then raises; the other methods work)."""
        from . import ops

        H, D = self.qq.shape[0], self.qq.shape[-1]
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or \
                tuple(keys.shape[::2]) != (H, D):
            got = list(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"add_residuals: keys must be [H={H}, T, D={D}], got {got}")
        if key_bits not in (2, 3, 4, 8):
            raise ValueError(f"add_residuals: key_bits must be 2, 3, 4 or 8, got {key_bits}")
        if group_size not in (32, 64, 128):
            raise ValueError(f"add_residuals: group_size must be 32, 64 or 128, got "
                             f"{group_size}")
        n = keys.shape[1] // group_size * group_size
        if n == 0 or keys.shape[-1] % 8:
            return
        k = keys[:, :n].float().unsqueeze(0).contiguous()
        codes, scale, zero = ops.quantize_keys(k, key_bits, group_size)
        e = (k - ops.dequantize_keys(codes, scale, zero, key_bits, group_size,
                                     torch.float32))[0].double().cpu()
        if self.rr is None:  # the first residuals
            self.rr = torch.zeros(e.shape[0], e.shape[2], e.shape[2], dtype=torch.float64)
            self.r_sum = torch.zeros(e.shape[0], e.shape[2], dtype=torch.float64)
        self.rr += e.transpose(1, 2) @ e
        self.r_sum += e.sum(1)
        self.n_r += n


def _top_eigvecs(m: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors ``[H, D, r]`` of symmetric ``[H, D, D]``, largest first, with a
    deterministic sign (the largest-magnitude entry of each column is positive)."""
    m = 0.5 * (m + m.transpose(1, 2))
    _, vecs = torch.linalg.eigh(m)  # ascending
    return _signed(vecs.flip(-1)[..., :rank])


def _signed(u: torch.Tensor) -> torch.Tensor:
    """``u`` ``[H, D, r]`` with each column's largest-magnitude entry positive, float32."""
    idx = u.abs().argmax(dim=1, keepdim=True)
    sgn = torch.sign(torch.gather(u, 1, idx))
    sgn[sgn == 0] = 1
    return (u * sgn).to(torch.float32).contiguous()


def _random_basis(n_kv: int, head_dim: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_kv, head_dim, rank, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q.to(torch.float32).contiguous()


def bases_from_moments(m: Moments, rank: int, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """Basis ``[H, D, r]`` (orthonormal columns, float32) from accumulated moments."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    H, D, _ = m.qq.shape
    if not 1 <= rank <= D:
        raise ValueError(f"rank must be in [1, head_dim={D}], got {rank}")
    if method == "pca":
        return _top_eigvecs(m.qq / max(m.n_q, 1), rank)
    if method == "fisher":
        if not bool((m.fisher_sum > 0).any()):
            raise ValueError("method='fisher' needs samples captured with fisher=True")
        return _top_eigvecs(m.fq / m.fisher_sum.clamp_min(1e-30).view(H, 1, 1), rank)
    if method == "key_pca":
        return _top_eigvecs(m.kk / max(m.n_k, 1), rank)
    if method == "residual":
        return _residual_basis(m.qq / max(m.n_q, 1), m.residual_covariance(), rank)
    return _random_basis(H, D, rank, seed)


def residual_objective(basis: torch.Tensor, sq: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
    """``tr((I − P) Σ_q (I − P) Σ_e)`` per head, ``P = UUᵀ``: the mean squared logit error
    ``(qᵀ (I − P) e)²`` over (query, residual) pairs that a side code on ``basis`` ``[H, D, r]``
    leaves (``Σ_q``, ``Σ_e`` ``[H, D, D]``). Without a side code (``r = 0``) it is
    ``tr(Σ_q Σ_e)``."""
    if basis.dim() != 3 or sq.dim() != 3 or se.dim() != 3:
        raise ValueError(f"residual_objective: basis must be [H, D, r] and sq, se [H, D, D], "
                         f"got {list(basis.shape)}, {list(sq.shape)}, {list(se.shape)}")
    H, D = basis.shape[0], basis.shape[1]
    for name, t in (("sq", sq), ("se", se)):
        if tuple(t.shape) != (H, D, D):
            raise ValueError(f"residual_objective: {name} must be [H={H}, D={D}, D={D}] like "
                             f"basis [H, D, r], got {list(t.shape)}")
    dt = torch.promote_types(basis.dtype, sq.dtype)
    u = basis.to(dt)
    m = torch.eye(u.shape[-2], dtype=dt) - u @ u.transpose(-1, -2)
    return torch.einsum("hij,hjk,hkl,hli->h", m, sq.to(dt), m, se.to(dt))


def _residual_basis(sq: torch.Tensor, se: torch.Tensor, rank: int, iters: int = 600,
                    lr: float = 1e-2) -> torch.Tensor:
    """The ``'residual'`` basis ``[H, D, r]`` (see the module doc): minimises
    :func:`residual_objective` by Adam over ``W`` with ``U = qr(W)``, float64, a fixed number
    of steps (deterministic), from the better of two closed-form starts; the best iterate per
    head is kept, so the result is never worse than PCA on the objective."""
    sq, se = sq.double(), se.double()
    tot = torch.einsum("hij,hji->h", sq, se).clamp_min(1e-300)
    sq = sq / tot.view(-1, 1, 1)  # objective as a fraction of tr(Σ_q Σ_e): scale-free steps
    # Start from the better of query PCA and the top eigenvectors of (Σ_q Σ_e + Σ_e Σ_q) / 2,
    # the optimum where Σ_q and Σ_e share eigenvectors (and where PCA is a stationary point
    # that gradient steps would not leave).
    best = _top_eigvecs(sq, rank).double()
    best_f = residual_objective(best, sq, se)
    prod = _top_eigvecs(sq @ se + se @ sq, rank).double()
    prod_f = residual_objective(prod, sq, se)
    take = prod_f < best_f
    best = torch.where(take.view(-1, 1, 1), prod, best)
    best_f = torch.where(take, prod_f, best_f)
    w = best.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            u = torch.linalg.qr(w)[0]
            f = residual_objective(u, sq, se)
            with torch.no_grad():
                better = f < best_f
                best = torch.where(better.view(-1, 1, 1), u, best)
                best_f = torch.where(better, f, best_f)
            opt.zero_grad()
            f.sum().backward()
            opt.step()
    return _signed(best.detach())


def learn_bases(samples, rank: int, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """Learn one layer's basis ``[H, D, r]`` (float32, orthonormal columns).

    Args:
        samples: a :class:`LayerSamples` (from :func:`capture_qk`), or a query tensor
            ``[H, N, D]`` (enough for ``'pca'`` and ``'random'``).
        rank: ``r``.
        method: ``'pca'``, ``'fisher'`` (needs ``fisher_weights``), ``'random'`` or ``'key_pca'``
            (``'residual'`` needs the key residuals that :func:`calibrate` collects).
        seed: seed of the ``'random'`` control.
    """
    if isinstance(samples, torch.Tensor):
        samples = LayerSamples(samples.float(), samples.float()[:, :0])
        if method in ("fisher", "key_pca"):
            raise ValueError(f"method={method!r} needs LayerSamples (keys / fisher weights), "
                             "not a bare query tensor")
    if method == "residual":
        raise ValueError("method='residual' needs the base quantiser's key residuals of whole "
                         "sequences: use calibrate() (or Moments.add_residuals and "
                         "bases_from_moments)")
    H, _, D = samples.queries.shape
    m = Moments.zeros(H, D)
    m.add(samples)
    return bases_from_moments(m, rank, method, seed)


# ---------------------------------------------------------------------------------------------
# The calibration object and its file
# ---------------------------------------------------------------------------------------------

class Calibration:
    """Per-layer query bases of one model.

    ``bases[i]`` is float32 ``[H, D, r]`` for a quantised layer and ``None`` for a layer the
    HeadQ cache keeps dense (sliding-window layers). Metadata: ``model_name``, ``fingerprint``
    (see :func:`headq_torch.config.config_fingerprint`), ``num_layers``, ``num_kv_heads``,
    ``head_dim``, ``rank``, ``method``, ``format_version``, ``n_tokens`` and free-form ``extra``.

    Tensor parallelism: ``shard=(rank, world_size)`` marks the bases of one tensor-parallel
    rank's KV heads only (``[num_kv_heads // world_size, D, r]``, heads
    ``[rank·H/w, (rank+1)·H/w)``); ``num_kv_heads`` stays the model's total. Build one with
    :meth:`shard` or ``Calibration.load(path, ..., shard=...)``; ``(0, 1)`` is the whole model.
    """

    def __init__(self, bases: list[Optional[torch.Tensor]], *, model_name: str, fingerprint: str,
                 num_layers: int, num_kv_heads: int, head_dim: int, rank: int, method: str,
                 n_tokens: int = 0, format_version: int = FORMAT_VERSION,
                 extra: Optional[dict] = None, moments: Optional[list] = None,
                 shard: tuple[int, int] = (0, 1)):
        if len(bases) != num_layers:
            raise CalibrationError(f"{len(bases)} bases for num_layers={num_layers}")
        try:
            shard = check_shard(shard, num_kv_heads)
        except ValueError as e:
            raise CalibrationError(f"Calibration: {e}") from None
        local = num_kv_heads // shard[1]
        for i, b in enumerate(bases):
            if b is None:
                continue
            if tuple(b.shape) != (local, head_dim, rank):
                tp = "" if shard[1] == 1 else f" // world_size={shard[1]}"
                raise CalibrationError(
                    f"basis of layer {i} has shape {tuple(b.shape)}, expected "
                    f"[num_kv_heads={num_kv_heads}{tp}, head_dim={head_dim}, rank={rank}]")
        self.bases = [None if b is None else b.to(torch.float32).contiguous() for b in bases]
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rank = rank
        self.method = method
        self.n_tokens = n_tokens
        self.format_version = format_version
        self.extra = dict(extra or {})
        self._moments = moments  # kept in memory only, to build control bases cheaply
        self.shard_info = shard  # (rank, world_size); (0, 1) = all heads

    def __repr__(self) -> str:
        n = sum(b is not None for b in self.bases)
        tp = "" if self.shard_info[1] == 1 else f", shard={self.shard_info}"
        return (f"Calibration(model={self.model_name!r}, method={self.method!r}, "
                f"rank={self.rank}, layers={n}/{self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, tokens={self.n_tokens}{tp})")

    @property
    def is_sharded(self) -> bool:
        return self.shard_info[1] > 1

    @property
    def local_kv_heads(self) -> int:
        """KV heads whose bases this object holds (``num_kv_heads // world_size``)."""
        return self.num_kv_heads // self.shard_info[1]

    # -- tensor parallelism ------------------------------------------------------------------

    def shard(self, rank: int, world_size: int) -> "Calibration":
        """The bases of tensor-parallel rank ``rank`` of ``world_size``: heads
        ``[rank·H/w, (rank+1)·H/w)`` of every layer, as transformers' column-wise ``k_proj``
        sharding gives that rank. ``shard(0, 1)`` is ``self``; sharding a shard again is an
        error (unless it asks for the same shard). Raises :class:`CalibrationError` when
        ``world_size`` does not divide the KV heads or ``rank`` is outside ``[0, world_size)``."""
        try:
            want = check_shard((rank, world_size), self.num_kv_heads, "shard")
        except ValueError as e:
            raise CalibrationError(f"Calibration.shard: {e}") from None
        if want == self.shard_info:
            return self
        if self.is_sharded:
            raise CalibrationError(f"Calibration.shard{want}: this calibration is already the "
                                   f"shard {self.shard_info}; shard the full calibration")
        sl = head_slice(want, self.num_kv_heads)
        bases = [None if b is None else b[sl].clone() for b in self.bases]
        moments = None
        if self._moments is not None:
            moments = [None if m is None else m.head_slice(sl) for m in self._moments]
        return Calibration(bases, model_name=self.model_name, fingerprint=self.fingerprint,
                           num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, rank=self.rank, method=self.method,
                           n_tokens=self.n_tokens, format_version=self.format_version,
                           extra=self.extra, moments=moments, shard=want)

    # -- checks ------------------------------------------------------------------------------

    def check_compatible(self, config, rank: Optional[int] = None) -> None:
        """Raise :class:`CalibrationError` unless this calibration fits ``config`` (layers, KV
        heads, head dim, fingerprint) and, if given, ``rank``."""
        n_layers, _, n_kv, head_dim = model_geometry(config)
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        if got != (n_layers, n_kv, head_dim):
            raise CalibrationError(
                f"calibration is for another model: {self.model_name!r} with layers/kv_heads/"
                f"head_dim {got}, the model has {(n_layers, n_kv, head_dim)}")
        fp = config_fingerprint(config)
        if fp != self.fingerprint:
            raise CalibrationError(
                f"calibration is for another model: fingerprint {self.fingerprint} "
                f"({self.model_name!r}), the model's config has {fp} ({model_name(config)!r})")
        if rank is not None and rank != self.rank:
            raise CalibrationError(f"rank={rank} does not match the calibration's rank "
                                   f"{self.rank}")

    # -- controls ----------------------------------------------------------------------------

    def with_bases(self, method: str, rank: Optional[int] = None, seed: int = 0) -> "Calibration":
        """A calibration of the same model with bases from another method (``'random'``,
        ``'key_pca'``, ``'pca'``, ``'fisher'``, ``'residual'``) or rank. ``'random'`` needs
        nothing more; the others need the moments of :func:`calibrate` (kept on the object in
        memory)."""
        rank = self.rank if rank is None else rank
        if method != "random" and self._moments is None:
            raise CalibrationError(
                f"with_bases(method={method!r}) needs the calibration moments, which are not "
                "saved to file; call calibrate() again (only 'random' works on a loaded file)")
        bases = []
        for i, b in enumerate(self.bases):
            if b is None:
                bases.append(None)
            elif method == "random":
                # all heads, then this shard's: every rank gets the bases of the full model
                full = _random_basis(self.num_kv_heads, self.head_dim, rank, seed + i)
                bases.append(full[head_slice(self.shard_info, self.num_kv_heads)].contiguous())
            else:
                bases.append(bases_from_moments(self._moments[i], rank, method, seed))
        return Calibration(bases, model_name=self.model_name, fingerprint=self.fingerprint,
                           num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, rank=rank, method=method,
                           n_tokens=self.n_tokens, extra=self.extra, moments=self._moments,
                           shard=self.shard_info)

    # -- file --------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "num_layers": str(self.num_layers),
            "num_kv_heads": str(self.num_kv_heads),
            "head_dim": str(self.head_dim),
            "rank": str(self.rank),
            "method": self.method,
            "n_tokens": str(self.n_tokens),
            "layers": json.dumps([i for i, b in enumerate(self.bases) if b is not None]),
            "extra": json.dumps(self.extra, default=str),
        }

    def save(self, path) -> None:
        """Write ``path`` (safetensors): tensors ``layer.{i}.basis`` and the metadata above.
        Only a full calibration is saved (shard it on load)."""
        from safetensors.torch import save_file

        if self.is_sharded:
            raise CalibrationError(f"Calibration.save: this is the tensor-parallel shard "
                                   f"{self.shard_info}; save the full calibration and shard it "
                                   "on load (Calibration.load(..., shard=...))")

        tensors = {f"layer.{i}.basis": b for i, b in enumerate(self.bases) if b is not None}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=self.metadata())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, expected_config=None, expected_rank: Optional[int] = None,
             shard=None) -> "Calibration":
        """Read a calibration file. Never executes code (safetensors only).

        ``shard``: None (all KV heads), ``(rank, world_size)`` (the heads of that tensor-parallel
        rank, see :meth:`shard`), or ``"auto"``: the shard of this process when
        ``expected_config`` belongs to a model transformers loaded with ``tp_plan`` and
        ``torch.distributed`` is initialised (see :func:`headq_torch.tp.tp_shard`), else all heads.

        Raises :class:`CalibrationError` for a missing, truncated, corrupt or non-safetensors
        file, another format or version, inconsistent shapes, a shard that does not fit the
        heads, and, when ``expected_config`` / ``expected_rank`` are given, another model or
        rank."""
        if isinstance(shard, str) and shard == "auto" and expected_config is None:
            raise CalibrationError("Calibration.load(shard='auto') needs expected_config (the "
                                   "config of the tensor-parallel model)")
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                head = f.read(8)
            if len(head) < 8:
                raise CalibrationError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CalibrationError(
                    f"{path}: not a safetensors file, or truncated (header of {n} bytes in a "
                    f"file of {size} bytes)")
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                tensors = {k: f.get_tensor(k) for k in names}
        except CalibrationError:
            raise
        except Exception as e:  # safetensors raises several types for a damaged file
            raise CalibrationError(f"{path}: not a readable safetensors file "
                                   f"(truncated or corrupt): {e}") from e
        if meta.get("format") != FORMAT_NAME:
            raise CalibrationError(f"{path}: not a HeadQ calibration file "
                                   f"(format={meta.get('format')!r})")
        try:
            version = int(meta["format_version"])
        except (KeyError, ValueError) as e:
            raise CalibrationError(f"{path}: missing or bad format_version") from e
        if version != FORMAT_VERSION:
            raise CalibrationError(f"{path}: calibration format version {version}, this "
                                   f"headq_torch reads version {FORMAT_VERSION}")
        try:
            num_layers = int(meta["num_layers"])
            n_kv = int(meta["num_kv_heads"])
            head_dim = int(meta["head_dim"])
            rank = int(meta["rank"])
            layers = json.loads(meta["layers"])
            extra = json.loads(meta.get("extra", "{}"))
        except (KeyError, ValueError) as e:
            raise CalibrationError(f"{path}: missing or bad metadata field: {e}") from e
        expected_names = {f"layer.{i}.basis" for i in layers}
        if set(names) != expected_names:
            raise CalibrationError(f"{path}: tensors {sorted(names)} do not match the "
                                   f"metadata's layers {layers}")
        bases: list[Optional[torch.Tensor]] = [None] * num_layers
        for i in layers:
            if not 0 <= i < num_layers:
                raise CalibrationError(f"{path}: layer index {i} outside num_layers={num_layers}")
            t = tensors[f"layer.{i}.basis"]
            if t.dtype != torch.float32:
                raise CalibrationError(f"{path}: basis of layer {i} is {t.dtype}, expected "
                                       "float32")
            if not torch.isfinite(t).all():
                raise CalibrationError(f"{path}: basis of layer {i} has non-finite values")
            bases[i] = t
        cal = cls(bases, model_name=meta.get("model_name", ""),
                  fingerprint=meta.get("fingerprint", ""), num_layers=num_layers,
                  num_kv_heads=n_kv, head_dim=head_dim, rank=rank,
                  method=meta.get("method", ""), n_tokens=int(meta.get("n_tokens", 0)),
                  format_version=version, extra=extra)
        if expected_config is not None:
            cal.check_compatible(expected_config, expected_rank)
        elif expected_rank is not None and expected_rank != rank:
            raise CalibrationError(f"rank={expected_rank} does not match the calibration's "
                                   f"rank {rank}")
        if shard is not None:
            try:
                want = resolve_shard(shard, expected_config, n_kv, "shard")
            except ValueError as e:
                raise CalibrationError(f"{path}: {e}") from None
            cal = cal.shard(*want)
        return cal


# ---------------------------------------------------------------------------------------------
# calibrate()
# ---------------------------------------------------------------------------------------------

def _token_ids(tokenizer, text) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if not isinstance(text, str):
        text = "\n".join(text)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids.reshape(-1)


@torch.no_grad()
def calibrate(model, tokenizer, text, rank: int = 8, n_tokens: int = 8192, method: str = "pca",
              chunk_len: int = 512, progress: bool = True, seed: int = 0, key_bits: int = 2,
              group_size: int = 64) -> Calibration:
    """Learn the query bases of ``model`` on ``text``.

    Args:
        model: a transformers causal LM (any attention implementation; it is restored).
        tokenizer: its tokenizer (``text`` may also be a 1-D tensor of token ids).
        text: a string (or a list of strings, joined by newlines).
        rank: basis rank ``r``.
        n_tokens: tokens of ``text`` to use (fewer if the text is shorter).
        method: ``'pca'`` (default), ``'fisher'``, ``'residual'``, ``'random'`` or
            ``'key_pca'``.
        chunk_len: tokens per forward pass; every chunk starts a fresh context.
        progress: show a tqdm bar.
        key_bits, group_size: the base quantiser whose key residuals ``'residual'`` is fitted
            to (the cache's ``key_bits`` / ``group_size``); recorded in ``extra``.

    The moments of all methods are accumulated in one pass, so
    :meth:`Calibration.with_bases` builds the others without running the model again.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if key_bits not in (2, 3, 4, 8):
        raise ValueError(f"key_bits must be 2, 3, 4 or 8, got {key_bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2, got {chunk_len}")
    n_layers, _, n_kv, head_dim = model_geometry(model.config)
    if not 1 <= rank <= head_dim:
        raise ValueError(f"rank must be in [1, head_dim={head_dim}], got {rank}")
    ids = _token_ids(tokenizer, text)[:n_tokens]
    if ids.numel() < 2:
        raise ValueError("the calibration text has fewer than 2 tokens")
    kinds = layer_kinds(model.config)
    moments = [Moments.zeros(n_kv, head_dim) if k == "headq" else None for k in kinds]
    chunks = [ids[i:i + chunk_len] for i in range(0, ids.numel(), chunk_len)]
    chunks = [c for c in chunks if c.numel() >= 2]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(c.numel() for c in chunks), unit="tok", desc="calibrate")
    try:
        for c in chunks:
            samples = capture_qk(model, c.unsqueeze(0), fisher=True)
            for i, s in enumerate(samples):
                if moments[i] is not None and s is not None:
                    moments[i].add(s)
                    moments[i].add_residuals(s.keys, key_bits, group_size)  # batch of one
            if bar is not None:
                bar.update(c.numel())
    finally:
        if bar is not None:
            bar.close()
    bases = [None if m is None else bases_from_moments(m, rank, method, seed + i)
             for i, m in enumerate(moments)]
    return Calibration(bases, model_name=model_name(model.config),
                       fingerprint=config_fingerprint(model.config), num_layers=n_layers,
                       num_kv_heads=n_kv, head_dim=head_dim, rank=rank, method=method,
                       n_tokens=int(sum(c.numel() for c in chunks)),
                       extra={"chunk_len": chunk_len, "seed": seed,
                              "residual_key_bits": key_bits, "residual_group_size": group_size},
                       moments=moments)
