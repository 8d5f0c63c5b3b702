"""``HeadQCache``: a transformers cache that stores keys (and optionally values) packed.

Use it wherever ``transformers.DynamicCache`` goes::

    cache = HeadQCache(model.config, calibration, key_bits=2)
    headq_torch.attention.enable(model)          # attention reads the packed cache directly
    model.generate(**inputs, past_key_values=cache)

Per quantised layer (:class:`HeadQLayer`) it stores packed key codes with per-channel fp16
scales/zeros (groups of ``group_size`` tokens), the side code on the layer's query basis, the
values (packed per token, or dense when ``value_bits=16``), the A² keep set
(``heavy_delta``/``heavy_idx``) and a dense recent window. Buffers grow by doubling (amortised
O(1) per token, no ``torch.cat`` per step). Quantisation rule: after new tokens are appended and
attention has read them, while the window holds ``>= residual_length + group_size`` tokens its
oldest ``group_size`` tokens are quantised (with ``residual_length=0`` a group is quantised as
soon as it is complete).

How the attention function reaches the cache layer
----------------------------------------------------
``HeadQCache`` keeps a reference to the model config it was built from. When that config's
attention implementation is ``"headq"`` (:func:`headq_torch.attention.enable`), ``update()``
returns views of the layer's *dense window only* and tags the key view with the layer
(``key._headq_layer = layer``: a plain Python attribute on the tensor object the modelling code
passes unchanged from ``cache.update`` to the attention function). The attention function reads
the tag, computes attention over the packed region + the window through the ops, then calls
``layer.after_attention(...)`` (A² weights, then quantisation of complete groups).

With any other attention implementation (``sdpa``, ``eager``, ...), ``update()`` returns the full
dense reconstruction, keys ``k̂ + sign·U ẑ`` (which gives exactly the corrected logits) and values
``v̂ + delta``, and quantises at once: the cache stays correct, only slower and without A²
weights (the keep set is then chosen among equal weights).

Layer types: for configs with ``layer_types`` (Gemma 3), only ``full_attention`` layers are
quantised; ``sliding_attention`` layers use transformers' ``DynamicSlidingWindowLayer`` (dense,
at most ``sliding_window`` tokens) and any other type a ``DynamicLayer``.

Tensor parallelism: under transformers' TP (``from_pretrained(..., tp_plan="auto")``) each rank's
attention sees its block of KV heads only. ``HeadQCache(..., shard="auto")`` (the default) finds
this process's ``(tp_rank, tp_size)`` from ``config.distributed_config`` and ``torch.distributed``
(:func:`headq_torch.tp.tp_shard`), holds ``num_kv_heads // tp_size`` heads and slices a full
calibration to them; see ``docs/TP.md``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from . import ops
from .attention import ATTN_IMPL
from . import value_policy as vp
from .calibration import Calibration, CalibrationError
from .config import (HeadQSettings, config_fingerprint, layer_kinds, model_geometry, model_name,
                     text_config)
from .tp import resolve_shard
from .storage import storage_report

__all__ = ["HeadQCache", "HeadQLayer"]



def _grow(buf: Optional[torch.Tensor], needed: int, shape_tail: tuple, batch_heads: tuple,
          dtype, device, multiple: int = 1, fill=0, exact: bool = False) -> torch.Tensor:
    """Capacity ``>= needed`` along dim 2 (doubling, or ``needed`` itself with ``exact``; a
    multiple of ``multiple``)."""
    cap = 0 if buf is None else buf.shape[2]
    if buf is not None and cap >= needed:
        return buf
    new_cap = max(needed, multiple) if exact else max(needed, 2 * cap, multiple)
    new_cap = -(-new_cap // multiple) * multiple
    out = torch.full((*batch_heads, new_cap, *shape_tail), fill, dtype=dtype, device=device)
    if buf is not None and cap:
        out[:, :, :cap] = buf
    return out


class HeadQLayer(CacheLayerMixin):
    """One quantised layer of a :class:`HeadQCache` (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    # crop() restores the keys and values exactly while it cuts only the dense window (at least
    # residual_length tokens after every flush); a crop into the quantised region brings the
    # cut group's surviving tokens back dequantised and warns once per cache (crop()). True, so
    # that transformers' assisted (speculative) decoding, which rolls back rejected drafts with
    # crop(), accepts the cache.
    is_croppable = True

    def __init__(self, settings: HeadQSettings, basis: Optional[torch.Tensor], layer_idx: int,
                 owner: "HeadQCache"):
        super().__init__()
        self.s = settings
        self.basis_cpu = basis
        self.layer_idx = layer_idx
        self._owner = owner
        self._clear()

    # -- state -------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.n_quant = 0
        self.n_window = 0
        self.buf: dict[str, Optional[torch.Tensor]] = {}
        self.heavy_idx = self.heavy_w = self.heavy_delta = None
        # Reserved (graph-decode) mode of the A² keep set: fixed-capacity (idx, w, delta)
        # tensors; heavy_idx/heavy_w/heavy_delta are then views of their first K slots (the
        # eager keep set), the slots after K hold idx -1, w -inf, delta 0. None: exact mode
        # (the keep set tensors are exactly K slots, replaced at every flush).
        self.keep_store: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.basis = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states=None) -> None:
        self.B, self.H, _, self.D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.basis_cpu is not None:
            self.basis = self.basis_cpu.to(device=self.device, dtype=torch.float32).contiguous()
        self.is_initialized = True

    @property
    def quantise_keys(self) -> bool:
        return self.s.key_bits < 16

    @property
    def quantise_values(self) -> bool:
        return self.s.value_bits < 16

    @property
    def a2(self) -> bool:
        return self.s.value_policy == "a2"

    def _bh(self):
        return (self.B, self.H)

    def _ensure_quant(self, needed: int, exact: bool = False) -> None:
        s, G, D, bh, dev = self.s, self.s.group_size, self.D, self._bh(), self.device
        b = self.buf
        # The leading buffer (key codes or dense keys) sets the capacity; every other buffer is
        # sized exactly to it (the op checks that their token dims agree).
        if self.quantise_keys:
            b["k_codes"] = _grow(b.get("k_codes"), needed, (D * s.key_bits // 8,), bh,
                                 torch.uint8, dev, G, exact=exact)
            cap = b["k_codes"].shape[2]
            b["k_scale"] = _grow(b.get("k_scale"), cap // G, (D,), bh, torch.float16, dev,
                                exact=True)
            b["k_zero"] = _grow(b.get("k_zero"), cap // G, (D,), bh, torch.float16, dev,
                                exact=True)
            if self.basis is not None:
                r = self.basis.shape[-1]
                b["z_codes"] = _grow(b.get("z_codes"), cap, (r * s.side_bits // 8,), bh,
                                     torch.uint8, dev, exact=True)
                b["z_scale"] = _grow(b.get("z_scale"), cap, (), bh, torch.float16, dev, exact=True)
        else:
            b["k_dense"] = _grow(b.get("k_dense"), needed, (D,), bh, self.dtype, dev, G,
                                 exact=exact)
            cap = b["k_dense"].shape[2]
        if self.quantise_values:
            ng = D // s.value_group_size
            b["v_codes"] = _grow(b.get("v_codes"), cap, (D * s.value_bits // 8,), bh,
                                 torch.uint8, dev, exact=True)
            b["v_scale"] = _grow(b.get("v_scale"), cap, (ng,), bh, torch.float16, dev, exact=True)
            b["v_zero"] = _grow(b.get("v_zero"), cap, (ng,), bh, torch.float16, dev, exact=True)
        else:
            b["v_dense"] = _grow(b.get("v_dense"), cap, (D,), bh, self.dtype, dev, exact=True)

    def _quant_capacity(self) -> int:
        lead = self.buf.get("k_codes") if self.quantise_keys else self.buf.get("k_dense")
        return 0 if lead is None else lead.shape[2]

    def reserve_keep_set(self) -> None:
        """A² only: hold the keep set in fixed-capacity tensors (``keep_store``) of
        ``keep_budget(value_keep_frac, quantised capacity)`` slots, updated in place from now on
        (graph decode reads them through fixed pointers). The keep set itself is unchanged:
        ``heavy_idx``/``heavy_w``/``heavy_delta`` become views of the store's first ``K`` slots,
        holding what they held. The store grows (new tensors) with the quantised region."""
        if not (self.is_initialized and self.a2 and self.quantise_values):
            return
        K = 0 if self.heavy_idx is None else self.heavy_idx.shape[-1]
        cap = max(vp.keep_budget(self.s.value_keep_frac, self._quant_capacity()), K)
        store = self.keep_store
        if store is not None and store[0].shape[-1] >= cap:
            return
        B, H, D, dev = self.B, self.H, self.D, self.device
        self.keep_store = (torch.full((B, H, cap), -1, dtype=torch.int32, device=dev),
                           torch.full((B, H, cap), float("-inf"), dtype=torch.float32, device=dev),
                           torch.zeros(B, H, cap, D, dtype=self.dtype, device=dev))
        if self.heavy_idx is not None:
            self._set_keep(self.heavy_idx, self.heavy_w, self.heavy_delta)

    def _set_keep(self, idx: Optional[torch.Tensor], w: Optional[torch.Tensor],
                  delta: Optional[torch.Tensor]) -> None:
        """Make ``(idx, w, delta)`` (``[B, H, K]``, fresh tensors) the keep set. Exact mode:
        these tensors (``w`` made contiguous: a decode step adds to it in place through
        ``ops.a2_step_weights``, and a crop passes a slice of its sorted weights). Reserved
        mode: copied into the front of the store, the rest padded, and the attributes are views
        of the first ``K`` slots."""
        store = self.keep_store
        self.heavy_idx, self.heavy_w, self.heavy_delta = idx, w, delta
        if store is None:
            if w is not None:
                self.heavy_w = w.contiguous()
            return
        K = 0 if idx is None else idx.shape[-1]
        if K > store[0].shape[-1]:  # not reached through flush (the store follows the region)
            self.keep_store = None
            self.reserve_keep_set()
            return
        si, sw, sd = store
        si[..., K:] = -1
        sw[..., K:] = float("-inf")
        sd[..., K:, :] = 0
        if idx is None:
            return
        si[..., :K] = idx
        sw[..., :K] = w.detach()  # no autograd history in the fixed buffers
        sd[..., :K, :] = delta.detach()
        self.heavy_idx, self.heavy_w, self.heavy_delta = si[..., :K], sw[..., :K], sd[..., :K, :]

    def _ensure_window(self, needed: int) -> None:
        b, bh, D = self.buf, self._bh(), self.D
        b["k_window"] = _grow(b.get("k_window"), needed, (D,), bh, self.dtype, self.device)
        b["v_window"] = _grow(b.get("v_window"), needed, (D,), bh, self.dtype, self.device)
        if self.a2:
            b["w_window"] = _grow(b.get("w_window"), needed, (), bh, torch.float32, self.device)

    # -- transformers layer API --------------------------------------------------------------

    def _check_states(self, key_states, value_states) -> None:
        """Clear errors for states this layer cannot hold (instead of a failed copy deep inside,
        or, worse, a cache that silently holds another geometry than its config says)."""
        where = f"HeadQCache layer {self.layer_idx}"
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{where}: {name} must be [batch, kv_heads, tokens, head_dim], "
                                 f"got shape {list(t.shape)}")
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{where}: {name} must be float32, float16 or bfloat16, got "
                                f"{t.dtype}")
        if key_states.shape != value_states.shape:
            raise ValueError(f"{where}: key_states {list(key_states.shape)} and value_states "
                             f"{list(value_states.shape)} must have the same shape")
        H, D = self._owner.num_kv_heads, self._owner.head_dim
        if key_states.shape[1] != H or key_states.shape[3] != D:
            got = (f"got states [batch, {key_states.shape[1]}, tokens, {key_states.shape[3]}]")
            rank, world = self._owner.shard
            if world > 1:
                raise ValueError(
                    f"{where}: the cache was built for a config with "
                    f"{self._owner.total_kv_heads} KV heads of head_dim {D} sharded over {world} "
                    f"tensor-parallel ranks ({H} KV heads on rank {rank}), {got}: is the model "
                    f"tensor-parallel with {world} ranks (else pass shard=None)?")
            hint = ""
            if key_states.shape[3] == D and key_states.shape[1] and H % key_states.shape[1] == 0:
                hint = (" (a tensor-parallel model? build the cache after "
                        "torch.distributed is initialised from the model's own config, or pass "
                        "shard=(rank, world_size))")
            raise ValueError(f"{where}: the cache was built for a config with {H} KV heads of "
                             f"head_dim {D}, {got}: is it the config of another model?{hint}")
        if key_states.device != value_states.device:
            raise ValueError(f"{where}: key_states on {key_states.device}, value_states on "
                             f"{value_states.device}")
        if self.is_initialized:
            if key_states.shape[0] != self.B:
                raise ValueError(f"{where}: batch size {key_states.shape[0]} differs from the "
                                 f"cache's {self.B} (use reorder_cache / batch_select_indices / "
                                 f"batch_repeat_interleave, or reset())")
            if key_states.device != self.device:
                raise ValueError(f"{where}: states on {key_states.device}, the cache is on "
                                 f"{self.device}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check_states(key_states, value_states)
        step = self._owner._static_step
        if step is not None:
            return self._update_static(step, key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # tokens left by a forward whose attention did not consume them
        self.flush()
        L = key_states.shape[2]
        nw = self.n_window
        self._ensure_window(nw + L)
        self.buf["k_window"][:, :, nw:nw + L] = key_states
        self.buf["v_window"][:, :, nw:nw + L] = value_states
        if self.a2:
            self.buf["w_window"][:, :, nw:nw + L] = 0
        self.n_window = nw + L
        kw = self.buf["k_window"][:, :, :self.n_window]
        vw = self.buf["v_window"][:, :, :self.n_window]
        self.keys, self.values = kw, vw
        if self._owner.attention_active():
            kw = kw.view(kw.shape)  # a fresh tensor object to carry the tag
            kw._headq_layer = self
            return kw, vw
        k_all, v_all = self.dense_kv()
        self.flush()
        return k_all, v_all

    def _update_static(self, step, key_states, value_states):
        """``update`` of a graph-decode step (:mod:`headq_torch.graph`): the new token goes to
        the window slot held in a device tensor and the host counters are left alone (the
        decoder advances them after the step), so the same kernels serve every step."""
        if key_states.shape[2] != 1 or key_states.shape[0] != self.B or not self.is_initialized:
            raise ValueError(f"HeadQCache layer {self.layer_idx}: a graph-decode step takes one "
                             f"token per sequence of an initialised (prefilled) cache, got key "
                             f"states of shape {tuple(key_states.shape)}")
        self.buf["k_window"].index_copy_(2, step.slot, key_states)
        self.buf["v_window"].index_copy_(2, step.slot, value_states)
        if self.a2:  # the new token's A² weight starts at 0, as in update()
            self.buf["w_window"].index_fill_(2, step.slot, 0)
        kw = self.buf["k_window"].view(self.buf["k_window"].shape)  # tagged, see the module doc
        kw._headq_layer = self
        return kw, self.buf["v_window"]

    def reserve(self, tokens: int) -> None:
        """Allocate the buffers for ``tokens`` tokens at once (exactly, no doubling), so that
        appending up to that length never reallocates: a captured CUDA graph keeps working and
        no step pays a doubling copy. With the A² policy the keep set moves into fixed slots
        too (:meth:`reserve_keep_set`)."""
        if not self.is_initialized:
            raise ValueError(f"HeadQCache layer {self.layer_idx}: reserve() needs an "
                             f"initialised cache (run the prompt through the model first)")
        G = self.s.group_size
        self._ensure_quant(-(-max(tokens, 1) // G) * G, exact=True)
        self._ensure_window(self.s.residual_length + G)
        self.reserve_keep_set()

    def get_seq_length(self) -> int:
        return self.n_quant + self.n_window

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # transformers >= 5.2x passes the query length; earlier 5.x pass cache_position
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # name in earlier transformers 5.x
        return -1

    def reset(self) -> None:
        self._clear()

    def _index_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for k, t in list(self.buf.items()):
            if t is not None:
                self.buf[k] = fn(t)
        if self.keep_store is not None:  # the store, and views of it as before
            K = None if self.heavy_idx is None else self.heavy_idx.shape[-1]
            si, sw, sd = self.keep_store = tuple(fn(t) for t in self.keep_store)
            if K is not None:
                self.heavy_idx, self.heavy_w, self.heavy_delta = (si[..., :K], sw[..., :K],
                                                                  sd[..., :K, :])
        else:
            for name in ("heavy_idx", "heavy_w", "heavy_delta"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, fn(t))
        self.B = next((t.shape[0] for t in self.buf.values() if t is not None), self.B)
        self._refresh_views()

    def _refresh_views(self) -> None:
        if "k_window" in self.buf and self.buf["k_window"] is not None:
            self.keys = self.buf["k_window"][:, :, :self.n_window]
            self.values = self.buf["v_window"][:, :, :self.n_window]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"HeadQCache: batch_repeat_interleave(repeats={repeats!r}): "
                             "expected an integer >= 1")
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor)
                                      else indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many tokens; positive: keep that many (earlier 5.x). Cropping
        into the quantised region brings the surviving tokens of the cut group back to the window
        dequantised (lossy)."""
        if isinstance(tokens_to_remove, torch.Tensor) and tokens_to_remove.dim() == 0 and \
                not tokens_to_remove.dtype.is_floating_point and \
                not tokens_to_remove.dtype.is_complex and tokens_to_remove.dtype != torch.bool:
            tokens_to_remove = int(tokens_to_remove)  # assisted decoding passes a 0-d tensor
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"HeadQCache: crop({tokens_to_remove!r}): expected an integer")
        n = self.get_seq_length()
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_len = n + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, n)
        new_len = max(new_len, 0)
        if new_len >= self.n_quant:
            self.n_window = new_len - self.n_quant
            self._refresh_views()
            return
        self._owner._warn_lossy_crop(self.n_quant - new_len)
        G = self.s.group_size
        keep_q = (new_len // G) * G
        k_all, v_all = self.dense_kv()
        back_k = k_all[:, :, keep_q:new_len]
        back_v = v_all[:, :, keep_q:new_len]
        w_back = None
        if self.a2 and self.heavy_idx is not None:
            w_back = torch.zeros(self.B, self.H, new_len - keep_q, device=self.device)
            for j in range(keep_q, new_len):
                hit = (self.heavy_idx == j)
                w_back[..., j - keep_q] = (self.heavy_w.clamp_min(0) * hit).sum(-1)
            valid = (self.heavy_idx >= 0) & (self.heavy_idx < keep_q)
            self._set_keep(
                torch.where(valid, self.heavy_idx, torch.full_like(self.heavy_idx, -1)),
                self.heavy_w.masked_fill(~valid, float("-inf")),
                self.heavy_delta * valid.unsqueeze(-1).to(self.heavy_delta.dtype))
            self._shrink_keep_set(keep_q)
        self.n_quant = keep_q
        m = back_k.shape[2]
        self.n_window = 0
        self._ensure_window(m)
        self.buf["k_window"][:, :, :m] = back_k
        self.buf["v_window"][:, :, :m] = back_v
        if self.a2:
            self.buf["w_window"][:, :, :m] = 0 if w_back is None else w_back
        self.n_window = m
        self._refresh_views()

    def _shrink_keep_set(self, n_quant: int) -> None:
        budget = vp.keep_budget(self.s.value_keep_frac, n_quant)
        if self.heavy_idx is None or self.heavy_idx.shape[-1] <= budget:
            return
        w, order = torch.sort(self.heavy_w, dim=-1, descending=True)
        order = order[..., :budget]
        self._set_keep(torch.gather(self.heavy_idx, -1, order), w[..., :budget],
                       torch.gather(self.heavy_delta, -2,
                                    order.unsqueeze(-1).expand(-1, -1, -1, self.D)))

    # -- quantisation ------------------------------------------------------------------------

    def flush(self) -> None:
        """Quantise the oldest complete groups of the window while it holds
        ``>= residual_length + group_size`` tokens."""
        if not self.is_initialized:
            return
        s, G = self.s, self.s.group_size
        m = (self.n_window - s.residual_length) // G
        if m <= 0:
            return
        n = m * G
        nq, nw = self.n_quant, self.n_window
        self._ensure_quant(nq + n)
        if self.keep_store is not None:  # reserved keep set: grows with the quantised region
            self.reserve_keep_set()
        b = self.buf
        k = b["k_window"][:, :, :n].contiguous()
        v = b["v_window"][:, :, :n].contiguous()
        if self.quantise_keys and self.quantise_values and self.basis is not None:
            # one op for keys, side code and values (one kernel for a CUDA append)
            codes, scale, zero, zc, zs, vc, vs, vz = ops.quantize_kv(
                k, v, self.basis, s.key_bits, G, s.side_bits, s.center, s.value_bits,
                s.value_group_size)
        else:
            if self.quantise_keys:
                codes, scale, zero = ops.quantize_keys(k, s.key_bits, G)
                if self.basis is not None:
                    zc, zs = ops.side_code(k, codes, scale, zero, self.basis, s.key_bits, G,
                                           s.side_bits, s.center)
            if self.quantise_values:
                vc, vs, vz = ops.quantize_values(v, s.value_bits, s.value_group_size)
        if self.quantise_keys:
            b["k_codes"][:, :, nq:nq + n] = codes
            b["k_scale"][:, :, nq // G:nq // G + m] = scale
            b["k_zero"][:, :, nq // G:nq // G + m] = zero
            if self.basis is not None:
                b["z_codes"][:, :, nq:nq + n] = zc
                b["z_scale"][:, :, nq:nq + n] = zs
        else:
            b["k_dense"][:, :, nq:nq + n] = k
        if self.quantise_values:
            b["v_codes"][:, :, nq:nq + n] = vc
            b["v_scale"][:, :, nq:nq + n] = vs
            b["v_zero"][:, :, nq:nq + n] = vz
            if self.a2:
                vhat = ops.dequantize_values(vc, vs, vz, s.value_bits, s.value_group_size,
                                             torch.float32)
                delta = (v.float() - vhat).to(self.dtype)
                self._set_keep(*vp.update_keep_set(
                    self.heavy_idx, self.heavy_w, self.heavy_delta, nq,
                    b["w_window"][:, :, :n], delta, vp.keep_budget(s.value_keep_frac, nq + n)))
        else:
            b["v_dense"][:, :, nq:nq + n] = v
        rest = nw - n
        if rest:
            b["k_window"][:, :, :rest] = b["k_window"][:, :, n:nw].clone()
            b["v_window"][:, :, :rest] = b["v_window"][:, :, n:nw].clone()
            if self.a2:
                b["w_window"][:, :, :rest] = b["w_window"][:, :, n:nw].clone()
        self.n_quant = nq + n
        self.n_window = rest
        self._shrink_window(s.residual_length + G)
        self._refresh_views()

    def _shrink_window(self, steady: int) -> None:
        """Give back window capacity a long prompt grew: after a flush the window holds fewer
        than ``residual_length + group_size`` tokens, so capacity beyond twice that is waste
        (a 32k-token prompt would otherwise keep 32k dense rows per layer allocated)."""
        b = self.buf
        cap = b["k_window"].shape[2]
        if cap <= 2 * steady:
            return
        for name in ("k_window", "v_window", "w_window"):
            t = b.get(name)
            if t is not None:
                b[name] = t[:, :, :steady].clone()

    # -- reading -----------------------------------------------------------------------------

    def _token_range(self, name: str, start: int, end: Optional[int]) -> int:
        """``end`` (default ``n_quant``) of a token range ``[start, end)`` of the quantised
        region, checked: a ValueError naming ``name`` unless ``0 <= start <= end <= n_quant``."""
        nq = self.n_quant
        end = nq if end is None else end
        if not 0 <= start <= end <= nq:
            raise ValueError(f"{name}: need 0 <= start <= end <= n_quant ({nq}), got "
                             f"start={start}, end={end}")
        return end

    def quantised_keys(self, out_dtype=torch.float32, start: int = 0,
                       end: Optional[int] = None, *,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keys of the quantised region as attention reads them: ``k̂ + sign·U ẑ``
        ``[B, H, end - start, D]`` (``q·`` of it equals the corrected logit), for the tokens
        ``[start, end)`` (default all ``n_quant``; ``start`` a multiple of the key group size).
        Computed in float32 (``ops.reconstruct_keys``), rounded once to ``out_dtype``; with
        ``out`` (a ``[B, H, end - start, D]`` tensor of any strides, e.g. a token slice of the
        tensor attention reads) written into it, in its dtype, and returned."""
        s, b = self.s, self.buf
        end = self._token_range("quantised_keys", start, end)
        dt = out_dtype if out is None else out.dtype
        if start == end:
            return out if out is not None else torch.zeros(self.B, self.H, 0, self.D, dtype=dt,
                                                            device=self.device)
        if not self.quantise_keys:
            src = b["k_dense"][:, :, start:end]
            return out.copy_(src) if out is not None else src.to(dt)
        G = s.group_size
        if start % G:
            raise ValueError(f"quantised_keys: start ({start}) must be a multiple of the key "
                             f"group size ({G})")
        # token slices of the buffers: the CUDA kernels read them in place
        codes = (b["k_codes"][:, :, start:end], b["k_scale"][:, :, start // G:end // G],
                 b["k_zero"][:, :, start // G:end // G])
        if self.basis is None:
            return ops.dequantize_keys(*codes, s.key_bits, G, dt, out=out)
        # one pass: k̂ + sign·ẑUᵀ in float32 per element, rounded once to the output dtype
        return ops.reconstruct_keys(*codes, b["z_codes"][:, :, start:end],
                                    b["z_scale"][:, :, start:end], self.basis,
                                    s.key_bits, G, s.side_bits, s.sign, dt, out=out)

    def quantised_values(self, out_dtype=torch.float32, start: int = 0,
                         end: Optional[int] = None, *,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Values of the quantised region as attention reads them (``v̂``, plus the delta of
        kept tokens) ``[B, H, end - start, D]``, for the tokens ``[start, end)`` (default all
        ``n_quant``): per element computed in float32 and rounded once to ``out_dtype``; with
        ``out`` written into it, as in :meth:`quantised_keys`."""
        s, b = self.s, self.buf
        end = self._token_range("quantised_values", start, end)
        dt = out_dtype if out is None else out.dtype
        if start == end:
            return out if out is not None else torch.zeros(self.B, self.H, 0, self.D, dtype=dt,
                                                            device=self.device)
        if not self.quantise_values:
            src = b["v_dense"][:, :, start:end]
            return out.copy_(src) if out is not None else src.to(dt)
        codes = (b["v_codes"][:, :, start:end], b["v_scale"][:, :, start:end],
                 b["v_zero"][:, :, start:end])
        # straight to the output dtype (the kernel rounds its float32 result once, as a cast
        # would); then the kept tokens' rows are rewritten
        v = ops.dequantize_values(*codes, s.value_bits, s.value_group_size, dt, out=out)
        if self.heavy_idx is not None and self.heavy_idx.shape[-1]:
            self._write_kept_rows(v, codes, start, end)
        return v

    def _write_kept_rows(self, v: torch.Tensor, codes, start: int, end: int) -> None:
        """Rewrite the rows of ``v`` (values ``[start, end)`` in its dtype, from ``codes``)
        that hold kept tokens with ``v̂ + delta``, added in float32 and rounded once. A slot
        outside the range (an empty one, ``-1``, or another range's token) repeats its row's
        first slot inside it, so that every write to a row is the same bits whatever their
        order; a (b, h) row with none rewrites token ``start`` with its own value."""
        s = self.s
        idx = self.heavy_idx.long() - start  # [B, H, K]
        K = idx.shape[-1]
        valid = (idx >= 0) & (idx < end - start)
        first = valid.to(torch.uint8).argmax(-1, keepdim=True)  # first in-range slot, else 0
        has = torch.gather(valid, -1, first)  # [B, H, 1]
        slot = torch.where(valid, torch.arange(K, device=idx.device), first)
        pos = torch.where(has, torch.gather(idx, -1, slot), 0)  # [B, H, K]
        rows = [torch.gather(c, 2, pos.unsqueeze(-1).expand(-1, -1, -1, c.shape[-1]))
                for c in codes]
        vhat = ops.dequantize_values(*rows, s.value_bits, s.value_group_size, torch.float32)
        delta = torch.gather(self.heavy_delta, 2, slot.unsqueeze(-1).expand(-1, -1, -1, self.D))
        pos_d = pos.unsqueeze(-1).expand(-1, -1, -1, self.D)
        new = torch.where(has.unsqueeze(-1), (vhat + delta.float()).to(v.dtype),
                          torch.gather(v, 2, pos_d))
        v.scatter_(2, pos_d, new)

    def dense_kv(self, out_dtype: Optional[torch.dtype] = None):
        """Full dense reconstruction ``(keys, values)`` ``[B, H, n_quant + n_window, D]`` as
        attention reads them (:meth:`quantised_keys` / :meth:`quantised_values`, written into
        their token slices, then the window), in ``out_dtype`` (default the cache dtype)."""
        dt = self.dtype if out_dtype is None else out_dtype
        nq, nw = self.n_quant, self.n_window
        k = torch.empty(self.B, self.H, nq + nw, self.D, dtype=dt, device=self.device)
        v = torch.empty_like(k)
        k[:, :, nq:] = self.buf["k_window"][:, :, :nw]
        v[:, :, nq:] = self.buf["v_window"][:, :, :nw]
        self.quantised_keys(out=k[:, :, :nq])
        self.quantised_values(out=v[:, :, :nq])
        return k, v

    # -- after attention ---------------------------------------------------------------------

    def add_weights(self, w_quant: Optional[torch.Tensor], w_window: torch.Tensor,
                    w_heavy: Optional[torch.Tensor] = None) -> None:
        """Accumulate a prefill's A² weights (float32, summed over query heads per KV head):
        ``w_quant`` ``[B, H, n_quant]`` (only the kept tokens' entries are used) or, instead,
        ``w_heavy`` ``[B, H, K]``, the kept slots' own (``heavy_idx`` order), and ``w_window``
        ``[B, H, n_window]``. A decode step adds its own through ``ops.a2_step_weights``
        (attention._a2_step_weights)."""
        if not self.a2:
            return
        k = 0 if self.heavy_idx is None else self.heavy_idx.shape[-1]
        for name, t, n in (("w_window", w_window, self.n_window),
                           ("w_quant", w_quant, self.n_quant), ("w_heavy", w_heavy, k)):
            if t is not None and tuple(t.shape) != (self.B, self.H, n):
                raise ValueError(f"add_weights: {name} must have shape [B, H, n] = "
                                 f"{[self.B, self.H, n]}, got {list(t.shape)}")
        self.buf["w_window"][:, :, :self.n_window] += w_window
        if k == 0:
            return
        if w_heavy is None and w_quant is not None and w_quant.shape[-1]:
            w_heavy = torch.gather(w_quant, -1, self.heavy_idx.clamp_min(0).long())
        if w_heavy is not None:
            valid = self.heavy_idx >= 0
            w_heavy = w_heavy.detach()
            # in place: heavy_w may be a view of the reserved keep set
            self.heavy_w.add_(torch.where(valid, w_heavy, torch.zeros_like(w_heavy)))

    def after_attention(self) -> None:
        if self._owner._static_step is None:  # a graph-decode step: the decoder flushes
            self.flush()

    # -- accounting --------------------------------------------------------------------------

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of every stored tensor at the current length (used rows, not spare capacity)."""
        out: dict[str, int] = {}
        if not self.is_initialized:
            return out
        nq, nw, G = self.n_quant, self.n_window, self.s.group_size
        rows = {"k_codes": nq, "k_scale": nq // G, "k_zero": nq // G, "z_codes": nq,
                "z_scale": nq, "k_dense": nq, "v_codes": nq, "v_scale": nq, "v_zero": nq,
                "v_dense": nq, "k_window": nw, "v_window": nw, "w_window": nw}
        for k, t in self.buf.items():
            if t is None:
                continue
            per_row = t[:, :, :1].numel() * t.element_size() if t.shape[2] else 0
            out[k] = rows[k] * per_row
        for name in ("heavy_idx", "heavy_w", "heavy_delta"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.numel() * t.element_size()
        if self.basis is not None and nq:
            out["basis"] = self.basis.numel() * self.basis.element_size()
        return out

    def allocated_bytes(self) -> int:
        tensors = [t for t in self.buf.values() if t is not None]
        keep = self.keep_store or (self.heavy_idx, self.heavy_w, self.heavy_delta)
        tensors += [t for t in (*keep, self.basis) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class HeadQCache(Cache):
    """A drop-in for ``transformers.DynamicCache`` that stores the cache packed (HeadQ).

    Args:
        config: the model's config (pass ``model.config`` itself: the cache reads its attention
            implementation to know whether the ``"headq"`` attention function is in use).
        calibration: a :class:`~headq_torch.calibration.Calibration` of this model (query bases
            for the side code), or None for the plain base code.
        key_bits: 2, 3, 4, 8, or 16 (dense keys).
        value_bits: 2, 3, 4, 8, or 16 (dense values, the default).
        group_size: key group (tokens): 32, 64 or 128.
        value_group_size: value group (channels): 32, 64 or 128, dividing the head dim.
        residual_length: extra dense recent tokens kept beyond the incomplete group.
        side_bits: 8 or 4.
        center: centre the key residual per group before projecting (shift-invariance).
        sign: +1.0 (HeadQ) or -1.0 (the wrong-sign control).
        value_policy: 'uniform' or 'a2' (A²-weighted keep set, needs value_bits < 16).
        value_keep_frac: fraction of quantised tokens whose values stay at full precision.
        rank: expected side-code rank; must equal the calibration's rank if both are given.
        shard: tensor parallelism. ``"auto"`` (default): when ``config`` is the config of a model
            transformers loaded with ``tp_plan`` (``config.distributed_config.tp_size > 1``) and
            ``torch.distributed`` is initialised, this process's ``(tp_rank, tp_size)``; else the
            whole model. ``(rank, world_size)``: that shard explicitly. ``None``: no sharding.
            With a shard of ``world_size > 1`` the cache holds the KV heads
            ``[rank·H/w, (rank+1)·H/w)`` only (the heads this rank's attention sees), and a
            full ``calibration`` is sliced to them (a calibration that is already this shard,
            ``Calibration.load(..., shard=...)``, is used as is).
    """

    def __init__(self, config, calibration: Optional[Calibration] = None, key_bits: int = 2,
                 value_bits: int = 16, group_size: int = 64, value_group_size: int = 64,
                 residual_length: int = 0, side_bits: int = 8, center: bool = False,
                 sign: float = 1.0, value_policy: str = "uniform", value_keep_frac: float = 0.0,
                 rank: Optional[int] = None, shard="auto"):
        if not hasattr(text_config(config), "num_hidden_layers"):
            hint = " (pass model.config, not the model)" if hasattr(config, "config") else ""
            raise TypeError(f"HeadQCache: config must be the model's transformers config"
                            f"{hint}, got {type(config).__name__}")
        n_layers, _, n_kv, head_dim = model_geometry(config)
        shard = resolve_shard(shard, config, n_kv, "HeadQCache: shard")
        if not isinstance(center, (bool, int)) or center not in (0, 1):
            raise ValueError(f"HeadQCache: center={center!r} is not supported; expected a bool")
        settings = HeadQSettings(key_bits=key_bits, value_bits=value_bits, group_size=group_size,
                                 value_group_size=value_group_size,
                                 residual_length=residual_length, side_bits=side_bits,
                                 center=bool(center), sign=float(sign),
                                 value_policy=value_policy,
                                 value_keep_frac=float(value_keep_frac))
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(f"HeadQCache: calibration must be a Calibration or None, got "
                            f"{type(calibration).__name__}")
        if calibration is None and rank is not None:
            raise ValueError(f"HeadQCache: rank={rank} was given without a calibration")
        if calibration is not None:
            if key_bits == 16:
                raise ValueError("HeadQCache: a calibration (side code) needs key_bits < 16, "
                                 "got key_bits=16")
            try:
                calibration.check_compatible(config, rank)
            except CalibrationError as e:
                raise CalibrationError(f"HeadQCache: calibration: {e}") from None
            rank = calibration.rank
            if calibration.shard_info != shard:
                if calibration.is_sharded:
                    raise CalibrationError(
                        f"HeadQCache: the calibration is the tensor-parallel shard "
                        f"{calibration.shard_info} (rank, world_size), the cache is for shard "
                        f"{shard}; pass the full calibration or the matching shard")
                calibration = calibration.shard(*shard)
        settings.validate(head_dim, rank)
        self.settings = settings
        self.calibration = calibration
        self.model_config = config
        self.head_dim = head_dim
        self.shard = shard                     # (tp rank, tp size); (0, 1) without TP
        self.total_kv_heads = n_kv             # the model's KV heads
        self.num_kv_heads = n_kv // shard[1]   # the KV heads this cache holds (this rank's)
        self.rank = rank or 0
        self.layer_kinds = layer_kinds(config)
        tc = text_config(config)
        self._text_config = tc  # attention_active reads it in every layer of every step
        layers = []
        for i, kind in enumerate(self.layer_kinds):
            if kind == "headq":
                basis = None if calibration is None else calibration.bases[i]
                if calibration is not None and basis is None:
                    raise CalibrationError(f"HeadQCache: calibration has no basis for layer {i}")
                layers.append(HeadQLayer(settings, basis, i, self))
            elif kind == "sliding":
                layers.append(DynamicSlidingWindowLayer(sliding_window=tc.sliding_window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)
        self._warned_fallback = False
        self._warned_lossy_crop = False
        self._checked_configs: set[int] = set()
        # The device-side state of a graph-decode step while one runs (headq_torch.graph).
        self._static_step = None

    def reserve(self, max_length: int) -> None:
        """Allocate every quantised layer's buffers for ``max_length`` tokens now (exact sizes,
        no doubling): no later append up to that length reallocates (the A² keep set included:
        fixed slots, updated in place). Needs a prefilled cache (the batch size, head count and
        dtype come from the first tokens)."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"HeadQCache.reserve: max_length must be a positive integer, got "
                             f"{max_length!r}")
        for layer in self.headq_layers:
            layer.reserve(max_length)

    def _warn_lossy_crop(self, n_cut: int) -> None:
        """Once per cache: a crop reached ``n_cut`` tokens into the quantised region."""
        if self._warned_lossy_crop:
            return
        self._warned_lossy_crop = True
        warnings.warn(f"HeadQCache.crop: the crop reaches {n_cut} token(s) into the quantised "
                      f"region; the rest of the cut group comes back dequantised (lossy). Crops "
                      f"of at most residual_length tokens (now {self.settings.residual_length}) "
                      f"stay in the dense window and are exact: for assisted decoding, "
                      f"residual_length >= the number of draft tokens.", stacklevel=3)

    def attention_active(self) -> bool:
        """Whether the model this cache was built for uses the ``"headq"`` attention function."""
        impl = getattr(self.model_config, "_attn_implementation", None)
        impl_text = getattr(self._text_config, "_attn_implementation", None)
        active = ATTN_IMPL in (impl, impl_text)
        if not active and not self._warned_fallback:
            self._warned_fallback = True
            if self.settings.value_policy == "a2":
                warnings.warn("HeadQCache: the model does not use the 'headq' attention function "
                              "(headq_torch.attention.enable(model)); the A² value policy sees "
                              "no attention weights in this mode", stacklevel=3)
        return active

    def check_model_config(self, config) -> None:
        """Raise ``ValueError`` when ``config`` (the config of the model whose attention reads
        this cache) is not the model the cache was built for (another shape fingerprint).
        Checked once per config object."""
        if config is self.model_config or id(config) in self._checked_configs:
            return
        mine, theirs = config_fingerprint(self.model_config), config_fingerprint(config)
        if mine != theirs:
            raise ValueError(f"HeadQCache: the cache was built for {model_name(self.model_config)!r} "
                             f"(fingerprint {mine}) but is used by {model_name(config)!r} "
                             f"(fingerprint {theirs}); build a HeadQCache from this model's config")
        self._checked_configs.add(id(config))

    @property
    def headq_layers(self) -> list[HeadQLayer]:
        return [layer for layer in self.layers if isinstance(layer, HeadQLayer)]

    def memory_bytes(self) -> int:
        """Real bytes of every stored tensor (used rows), all layers, dense layers included."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, HeadQLayer):
                total += sum(layer.memory_breakdown().values())
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def memory_breakdown(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.headq_layers:
            for k, v in layer.memory_breakdown().items():
                out[k] = out.get(k, 0) + v
        return out

    def storage_report(self):
        """:func:`headq_torch.storage.storage_report` of the quantised layers at the current
        length (per KV head and layer averages; ``bytes_per_token_all_layers`` over them)."""
        hq = self.headq_layers
        n = self.get_seq_length(self.layer_kinds.index("headq")) if hq else 0
        if n == 0:
            raise ValueError("storage_report: the cache is empty")
        s = self.settings
        layer = next(layer for layer in hq if layer.is_initialized)
        dense_bits = torch.finfo(layer.dtype).bits
        return storage_report(head_dim=self.head_dim, context_len=n, key_bits=s.key_bits,
                              value_bits=s.value_bits, group_size=s.group_size,
                              value_group_size=s.value_group_size, rank=self.rank,
                              side_bits=s.side_bits, residual_length=s.residual_length,
                              value_keep_frac=s.value_keep_frac if s.value_policy == "a2" else 0.0,
                              dense_bits=dense_bits, num_kv_heads=self.num_kv_heads,
                              num_layers=len(hq))
