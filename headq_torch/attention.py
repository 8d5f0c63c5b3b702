"""The ``"headq"`` attention function, registered through transformers' attention interface.

:func:`enable` switches a model to it, :func:`disable` switches back. For a layer of a
:class:`~headq_torch.cache.HeadQCache` (recognised by the tag ``key._headq_layer`` that
``HeadQLayer.update`` puts on the key tensor it returns, see :mod:`headq_torch.cache`):

* one query token: :func:`headq_torch.ops.decode_attention` over the packed cache (keys, side
  code, values, kept A² tokens, dense window), ``kv_start`` taken from the attention mask (left
  padding); A² weights of the window and kept tokens from ``exp(logit − lse)``;
* several query tokens (prefill or a chunk): the new tokens attend densely to themselves
  (causal) and to the dense window (KIVI-style: prefill reads this call's tokens at full
  precision), and to the quantised tokens as attention reads them: the corrected logits
  (``q·k̂ + sign·(qU)·ẑ``, i.e. ``q`` dotted with the dequantised key ``k̂ + sign·U ẑ``) and the
  dequantised values. A first prompt is SDPA (on CUDA with A², the fused attention's
  log-sum-exp and the a2_weights op). A call of a few tokens over quantised tokens (an
  assisted-decoding verification) goes through the decode op, the tokens' query rows as its
  query heads, causal over the tokens' own window slots (``query_tokens``,
  :func:`_prefill_decode_rows`). A longer call over quantised tokens dequantises them once and
  runs PyTorch's flash kernel (CUDA, causal from the last key; the CPU's, in two parts merged
  by their log-sum-exps) or masked SDPA (:func:`_prefill_dequantised`); with A² the a2_weights
  op's key pass over the kept tokens and the window, given the flash kernel's row log-sum-exp.
  An A² cache's first prompt on the CPU, or any A² call on CUDA with a head dim the a2_weights
  kernels lack, materialises the logits in blocks of rows (:func:`_prefill_rows`), one softmax
  giving the output and the A² weights.

Everything else (non-HeadQ layers such as Gemma 3 sliding layers, ``DynamicCache``, no cache,
calibration runs) goes to transformers' ``sdpa`` function unchanged. The mask function registered
under ``"headq"`` is transformers' ``sdpa_mask`` (boolean masks, or None for a plain causal one).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import ops
from . import value_policy as vp

__all__ = ["ATTN_IMPL", "headq_attention_forward", "register", "enable", "disable"]

ATTN_IMPL = "headq"
_PREVIOUS_ATTR = "_headq_previous_attn_implementation"


def _visible_mask(attention_mask: Optional[torch.Tensor], L: int, T: int,
                  device) -> Optional[torch.Tensor]:
    """Boolean ``[B or 1, 1, L, T]`` (True = visible) from the mask transformers built, or a
    causal mask (queries are the last ``L`` of ``T`` tokens) when it is None."""
    if attention_mask is None:
        return torch.ones(L, T, dtype=torch.bool, device=device).tril(T - L).view(1, 1, L, T)
    m = attention_mask[..., -L:, :T]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m


def _kv_start(attention_mask: Optional[torch.Tensor], B: int, T: int, device,
              check_holes: bool = True):
    """First visible token per sequence (left padding), int32 ``[B]``, or None. With
    ``check_holes`` a mask that hides a token after a visible one (right or middle padding)
    raises: the decode op masks only the tokens before ``kv_start``, so it would attend to them.
    The check reads the mask on the host (a sync), so :func:`_kv_start_shared` makes it once per
    run of decode steps."""
    if attention_mask is None:
        return None
    vis = _visible_mask(attention_mask, 1, T, device)[:, 0, 0]  # [B or 1, T]
    vis = vis.expand(B, T)
    if check_holes and T > 1 and bool((vis[:, 1:] < vis[:, :-1]).any()):
        raise ValueError("headq attention: attention_mask hides tokens that follow visible ones "
                         "(right or middle padding); HeadQ decoding supports left padding only. "
                         "Pad on the left (tokenizer.padding_side = 'left'); if the prompt holds "
                         "the pad token id, pass generate() an explicit attention_mask (without "
                         "one, transformers hides those tokens)")
    # No `if vis.all(): return None` shortcut: that would sync the GPU once per layer and step.
    # The kernels skip whole tiles before kv_start, so an all-zero kv_start costs nothing.
    first = torch.where(vis.any(-1), vis.int().argmax(-1), torch.full((B,), T, device=device))
    return first.to(torch.int32)


# Bytes of float32 logits one prefill chunk may materialise (query rows are processed in chunks
# so that a long prompt never needs [B, Hq, L, T] logits at once).
_PREFILL_LOGIT_BYTES = 1 << 30


def _kv_start_shared(layer, attention_mask, B: int, T: int, device):
    """:func:`_kv_start` computed once per decode step: transformers passes the same mask object
    to every layer of a forward, so the cache keeps the last result (and a reference to its
    mask, so an identity match can never be a recycled object) instead of redoing the same
    handful of small kernels in every layer. The mask is checked for holes at the first decode
    step after a prefill (``_mask_checked``, cleared by :func:`_prefill`): during decoding,
    transformers extends the prompt's mask with visible tokens, so later steps add no hole and
    need no host sync."""
    owner = layer._owner
    memo = getattr(owner, "_kv_start_memo", None)
    if memo is not None and memo[0] is attention_mask and memo[1] == (B, T):
        return memo[2]
    out = _kv_start(attention_mask, B, T, device,
                    check_holes=not getattr(owner, "_mask_checked", False))
    owner._mask_checked = attention_mask is not None
    owner._kv_start_memo = (attention_mask, (B, T), out)
    return out


def _lengths_shared(layer, B: int, nq: int, nw: int, device):
    """The decode op's per-sequence lengths (int32 ``[B]`` tensors of ``nq`` and ``nw``), made
    once per decode step instead of once per layer: every layer of a step has the same lengths,
    so the cache keeps the pairs (read-only inputs of the op) and the other layers reuse them
    (two fill kernels fewer per layer). A few-token call split into several op calls needs one
    pair per op call, so up to ``_LENGTHS_MEMO_SIZE`` pairs are kept, then the memo starts
    afresh."""
    owner = layer._owner
    key = (B, nq, nw, device)
    memo = getattr(owner, "_lengths_memo", None)
    if memo is None or (len(memo) >= _LENGTHS_MEMO_SIZE and key not in memo):
        memo = owner._lengths_memo = {}
    if key not in memo:
        memo[key] = (torch.full((B,), nq, dtype=torch.int32, device=device),
                     torch.full((B,), nw, dtype=torch.int32, device=device))
    return memo[key]


# Length pairs _lengths_shared keeps (a few-token call of 64 tokens with 8 query heads per KV
# head makes 8 op calls).
_LENGTHS_MEMO_SIZE = 16


def _prefill(layer, module, query: torch.Tensor, attention_mask, scale: float) -> torch.Tensor:
    """Attention of ``L`` query tokens over the packed region + the dense window."""
    layer._owner._mask_checked = False  # the next decode step checks its mask for holes
    B, Hq, L, D = query.shape
    nq, nw = layer.n_quant, layer.n_window
    T = nq + nw
    if nq == 0 and (not layer.a2 or _fused_a2_weights(query)):
        # Nothing quantised yet (a first prompt): plain dense attention over the window, which
        # holds exactly the tokens of this call and those before them.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kw = layer.buf["k_window"][:, :, :nw]
        vw = layer.buf["v_window"][:, :, :nw]
        # with A² the fused kernels' output and row lse (the op then runs its key pass)
        fused = _padded_attention_with_lse(layer, module, query, kw, vw, attention_mask,
                                           scale) if layer.a2 else None
        if fused is not None:
            out, lse = fused
        else:
            out, _ = sdpa_attention_forward(module, query, kw, vw, attention_mask,
                                            scaling=scale)
            out, lse = out.transpose(1, 2), None
        if layer.a2:
            # The A² weights of the same attention by the a2_weights op: streaming passes over
            # q k^T, no [B, Hq, L, T] logits or probabilities in memory; with the fused
            # kernel's row log-sum-exp only the per-key pass.
            layer.add_weights(None, _a2_prompt_weights(layer, query, kw, attention_mask, scale,
                                                       lse))
        return out
    if _decode_rows(layer, query):
        out = _prefill_decode_rows(layer, query, attention_mask, scale)
        if out is not None:
            return out
    if _dense_prefill(layer, query):
        return _prefill_dequantised(layer, module, query, attention_mask, scale)
    rows = max(1, _PREFILL_LOGIT_BYTES // max(1, 4 * B * Hq * T))
    # Read once per call, not once per block of rows: the keys and values as attention reads
    # them (the quantised region dequantised, then the window), float32 and per KV head (the
    # query heads of a KV head share them: no repeat_interleave copy, see _grouped).
    keys, values = layer.dense_kv(torch.float32)
    if L > rows:
        parts = []
        for s0 in range(0, L, rows):
            m = None
            if attention_mask is not None:
                m = attention_mask[..., s0:s0 + rows, :] if attention_mask.shape[-2] > 1 \
                    else attention_mask
            parts.append(_prefill_rows(layer, query[:, :, s0:s0 + rows], m, scale,
                                       L - min(s0 + rows, L), values, keys))
        return torch.cat(parts, dim=2)
    return _prefill_rows(layer, query, attention_mask, scale, 0, values, keys)


# Calls of a few query tokens over quantised tokens go through the decode op
# (:func:`_prefill_decode_rows`): it reads the packed cache once per 4 (CUDA: 8) query rows of a
# KV head, where dequantising reads it once but writes and reads a dense copy. Most query tokens
# per device type, from benchmarks/bench_chunk_prefill.py and bench_few_rows_ab.py (one call
# over the prefilled context; gpu_few_rows.json, cpu_few_rows.json): CUDA, Llama-3-8B shape (4
# layers, batch 8, 32k, bf16; H100): 5.6 / 11.8 / 15.6 / 35.4 ms at 2 / 16 / 21 / 64 tokens
# against 69-75 ms dequantised (A²: 5.8-48.5 against 79-88 ms), 1.4× / 1.3× at 96 tokens and
# 1.3× / 1.0× at 128 (uniform / A²); CPU, SmolLM2-135M over 2,048 tokens: ahead of the other
# paths at 2 and 4 tokens, about even at 8 and behind at 16. Session 19 made the dequantised path
# faster (reconstruct_keys, faster dequantise kernels): at 64 tokens it is now ahead (28-29 vs
# 35-36 ms, A² 40-42 vs 48-49), at 48 level or behind (gpu_dequantised_path.json, session19), so
# the CUDA limit went from 64 to 48. Session 20 (out= writes, leaner reconstruct_keys kernel)
# moved it again: dequantised 16.9 vs 20.4 ms at 32 tokens (A² 21.7 vs 24.5), 17.3 vs 28.9 at 48;
# at 24 the decode op still leads (15.5 vs 18.3, A² level 20.5 vs 20.8): limit 24
# (gpu_dequantised_path.json, session20).
DECODE_ROWS_MAX_TOKENS = {"cuda": 24, "cpu": 4}
# Query rows of a KV head (its query heads × tokens) per decode-op call: a longer call goes in
# several op calls. The CUDA a2_step_weights kernel keeps a call's rows in 48 KB of shared memory.
_DECODE_ROWS_PER_KV_HEAD = 64


def _decode_rows(layer, query: torch.Tensor) -> bool:
    """Whether a call of several query tokens over quantised tokens (an assisted-decoding
    verification, a short chunk or turn) goes through the decode op
    (:func:`_prefill_decode_rows`): keys quantised, a fused decode kernel for the head dim, at
    most :data:`DECODE_ROWS_MAX_TOKENS` tokens."""
    L = query.shape[2]
    return (layer.n_quant > 0 and layer.quantise_keys and layer._owner._static_step is None
            and 1 < L <= DECODE_ROWS_MAX_TOKENS.get(query.device.type, 0)
            and (query.device.type != "cuda" or query.shape[-1] in FUSED_CUDA_HEAD_DIMS))


def _prefill_decode_rows(layer, query: torch.Tensor, attention_mask,
                         scale: float) -> Optional[torch.Tensor]:
    """``L`` query tokens over the packed cache through the decode op, ``[B, Hq, L, D]``, or
    None when the mask is not causal attention with left padding (the caller dequantises).

    The ``L`` tokens are the last ``L`` of the window (``update`` appended them), so every
    quantised token and every earlier window token precedes all of them. The op takes the
    query rows as its query heads (row ``h·L' + i`` of query head ``h``, so the rows of a KV
    head stay together and share one read of the packed cache) with ``query_tokens=L'``: row
    ``i`` sees the quantised tokens, the kept tokens and the window up to its own token
    (causal among the call's tokens, inside the op). ``L'`` tokens per op call, at most
    ``_DECODE_ROWS_PER_KV_HEAD`` rows of a KV head; a call of more tokens goes in several op
    calls, each over the window up to its last token. With A², ``ops.a2_step_weights`` adds
    the window and kept tokens' weights with the same ``query_tokens``."""
    B, Hq, L, D = query.shape
    nq, nw = layer.n_quant, layer.n_window
    device = query.device
    kv_start = None
    if attention_mask is not None:
        starts = _padding_starts(layer, attention_mask, B, L, nq + nw, device)
        if starts is None:
            return None
        if any(starts):
            kv_start = _starts_tensor(layer, starts, device)
    step = max(1, _DECODE_ROWS_PER_KV_HEAD // (Hq // layer.H))
    outs = []
    for i0 in range(0, L, step):
        Lc = min(step, L - i0)
        # the window up to this op call's last token
        nq_t, nw_t = _lengths_shared(layer, B, nq, nw - L + i0 + Lc, device)
        q = query[:, :, i0:i0 + Lc].reshape(B, Hq * Lc, D)
        out, lse, hl = _decode_op(layer, q, nq_t, nw_t, kv_start, scale, query_tokens=Lc)
        if layer.a2:
            _a2_step_weights(layer, q, lse, hl, nq_t, nw_t, kv_start, scale, query_tokens=Lc)
        outs.append(out.view(B, Hq, Lc, D))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _starts_tensor(layer, starts: list, device) -> torch.Tensor:
    """``starts`` (the list :func:`_padding_starts` keeps per mask object) as an int32 tensor on
    ``device``: one host-to-device copy per list, i.e. per forward, not one per layer."""
    owner = layer._owner
    memo = getattr(owner, "_starts_tensor_memo", None)
    if memo is None or memo[0] is not starts:
        memo = (starts, torch.tensor(starts, dtype=torch.int32, device=device))
        owner._starts_tensor_memo = memo
    return memo[1]


def _dense_prefill(layer, query: torch.Tensor) -> bool:
    """Whether a call over already quantised tokens (a chunked prefill, a second turn) goes
    through :func:`_prefill_dequantised` (SDPA; with A² the a2_weights op) rather than the row
    blocks of :func:`_prefill_rows` (logits materialised over the dequantised keys; one softmax
    gives the output and the A² weights). Uniform caches: SDPA everywhere. A² caches: the
    flash kernel + the op's key pass over the kept tokens and the window
    (:func:`_a2_kept_window_weights`), on the CPU (whose op takes any head dim) and on CUDA
    where its kernels apply. Until session 21 the op's pass covered every key, so the CPU took
    the row blocks, where the op would compute the attention a second time (SmolLM2-135M, a
    256-token call over 2,048 tokens, 2 threads: A² 1.52 s in row blocks against 3.06 s with
    the op; benchmarks/bench_chunk_prefill.py, cpu_chunk_prefill.json). A first prompt that
    reaches here (A² on the CPU) stays in row blocks: every one of its keys needs a weight.
    Under a mask other than causal with left padding (no row log-sum-exp) the op's full pass
    remains, which on the CPU is slower than the row blocks would be (rare: transformers passes
    causal masks)."""
    if layer.n_quant == 0:  # a first prompt _prefill did not take to SDPA: A² on the CPU
        return False
    return not layer.a2 or query.device.type == "cpu" or _fused_a2_weights(query)


def _prefill_dequantised(layer, module, query: torch.Tensor, attention_mask,
                         scale: float) -> torch.Tensor:
    """``L`` query tokens over ``n_quant`` quantised tokens and the dense window: the quantised
    region is dequantised once (:meth:`HeadQLayer.dense_kv`, straight into the tensors), in the
    query's dtype, into the keys attention reads
    (``k̂ + sign·U ẑ``, so ``q·`` of them is the corrected logit) and values (``v̂`` plus the
    kept tokens' deltas), and attention runs over them and the window: the cost of the dense
    cache's chunk plus one read of the packed cache, instead of float32 logits in row blocks.
    On CUDA (float16/bfloat16) PyTorch's flash kernel, causal from the last key, with no mask
    and the query heads of a KV head reading the same keys (per sequence for a left-padded
    batch, :func:`_padded_attention_with_lse`); elsewhere, or under another mask, masked SDPA
    (:func:`_masked_sdpa`). With A² the weights come from the a2_weights op over the same keys
    (with the flash kernel's row log-sum-exp, only its key pass). ``[B, Hq, L, D]``."""
    nq = layer.n_quant
    keys, values = layer.dense_kv(query.dtype)
    fused = _padded_attention_with_lse(layer, module, query, keys, values, attention_mask, scale)
    if fused is not None:
        out, lse = fused
    else:
        out, lse = _masked_sdpa(module, query, keys, values, attention_mask, scale), None
    if layer.a2:
        kept_window = None if lse is None else \
            _a2_kept_window_weights(layer, query, keys, attention_mask, scale, lse)
        if kept_window is not None:
            layer.add_weights(None, kept_window[1], w_heavy=kept_window[0])
        else:
            w = _a2_prompt_weights(layer, query, keys, attention_mask, scale, lse)
            layer.add_weights(w[..., :nq], w[..., nq:])
    return out


def _a2_kept_window_weights(layer, query: torch.Tensor, keys: torch.Tensor, attention_mask,
                            scale: float, lse: torch.Tensor):
    """The A² weights of a call over quantised tokens for the tokens whose weights the cache
    uses: the kept tokens' slots (``layer.heavy_idx``; ``[B, H, K]``, None without kept
    tokens) and the window's (``[B, H, n_window]``). A quantised token that is not kept can
    never be kept later (its value's residual is gone), so its weight is not needed, and the
    a2_weights op's key pass runs over ``K + n_window`` keys (the kept tokens' keys gathered
    in front of the window's) instead of all ``T``: every query row sees a kept token (it
    precedes the window), and the rows stay the last of the keys, so the op's causal rule
    (row ``i`` sees ``t <= T - L + i``) still holds. The weights equal the full pass's to
    float rounding (each key's sum over the rows is the same; the op's tiling of the rows may
    differ). Needs the rows' ``lse`` over all ``T`` keys (the op's own row pass would see only
    these keys); a mask that is not causal with left padding returns None (the caller then
    runs the full pass). A left-padded sequence runs over its visible keys: a kept slot before
    its first visible token gets 0, as does an empty slot (``heavy_idx`` -1)."""
    B, Hq, L, D = query.shape
    H, T = keys.shape[1], keys.shape[2]
    nq, nw = layer.n_quant, layer.n_window
    starts = [0] * B
    if attention_mask is not None:
        starts = _padding_starts(layer, attention_mask, B, L, T, query.device)
        if starts is None:
            return None
    idx = layer.heavy_idx
    K = 0 if idx is None else idx.shape[-1]
    kept = None
    if K:
        kept = torch.gather(keys[:, :, :nq], 2,
                            idx.clamp_min(0).long().unsqueeze(-1).expand(B, H, K, D))
    # one op call for the whole batch, or one per sequence of a left-padded batch
    parts = [(slice(None), 0, 0)] if not any(starts) else \
        [(slice(b, b + 1), p, r0) for b, p, r0 in _visible_sequences(starts, L, T)]
    w_kept = keys.new_zeros((B, H, K), dtype=torch.float32) if K else None
    w_window = keys.new_zeros((B, H, nw), dtype=torch.float32)
    for bs, p, r0 in parts:
        s = max(nq, p)  # the first visible window token
        ck = keys[bs, :, s:]
        if K:
            ck = torch.cat([kept[bs], ck], 2)
        w = ops.a2_weights(query[bs, :, r0:], ck, None, scale, lse=lse[bs, :, r0:])[0]
        if K:
            w_kept[bs] = torch.where(idx[bs] >= p, w[..., :K], 0.0)
        w_window[bs, :, s - nq:] = w[..., K:]
    return w_kept, w_window


def _masked_sdpa(module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 attention_mask, scale: float) -> torch.Tensor:
    """SDPA of ``L`` query tokens, the last ``L`` of the ``T`` keys, under ``attention_mask``
    (None: causal), ``[B, Hq, L, D]``: where no fused kernel applies (the CPU, float32, another
    mask). Transformers' ``sdpa`` function, which, given a mask, repeats the keys and values
    for every query head (``repeat_kv``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    L, T = query.shape[2], keys.shape[2]
    # No mask means causal with the queries the last L of the T tokens; SDPA's is_causal aligns
    # them with the first L instead, so the mask is spelled out.
    mask = attention_mask if attention_mask is not None else \
        _visible_mask(None, L, T, query.device)
    out, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=scale)
    return out.transpose(1, 2)


# Rows of the expected mask built at once when a mask is compared with left-padded causal
# attention (bounds the comparison's memory: [B, rows, T] booleans).
_MASK_CHECK_ROWS = 1024


def _left_padding_starts(attention_mask: torch.Tensor, B: int, L: int, T: int, device):
    """If ``attention_mask`` is causal attention (queries the last ``L`` of ``T`` tokens) with
    left padding only, each sequence's first visible token (a list of ``B`` ints, ``T`` where
    none is visible); else None. Compares the whole mask with that pattern on the device, in
    blocks of rows; two host syncs."""
    vis = _visible_mask(attention_mask, L, T, device)[:, 0]  # [B or 1, L, T]
    last = vis[:, -1]  # the last row sees every visible token
    first = torch.where(last.any(-1), last.int().argmax(-1),
                        torch.full((last.shape[0],), T, device=device))
    t = torch.arange(T, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for r0 in range(0, L, _MASK_CHECK_ROWS):
        rows = torch.arange(r0, min(L, r0 + _MASK_CHECK_ROWS), device=device) + (T - L)
        want = (t >= first.view(-1, 1, 1)) & (t <= rows.view(1, -1, 1))
        bad |= (vis[:, r0:r0 + _MASK_CHECK_ROWS] != want).any()
    if bool(bad):
        return None
    return first.expand(B).tolist()


def _padding_starts(layer, attention_mask: torch.Tensor, B: int, L: int, T: int, device):
    """:func:`_left_padding_starts` once per mask object: every layer of a forward gets the same
    mask, so the cache keeps the last answer. The mask is held by a weak reference: a prompt's
    mask is ``[B, 1, L, T]`` booleans (8.6 GB at batch 8 × 32k), which must not outlive the
    forward that made it."""
    owner = layer._owner
    memo = getattr(owner, "_padding_memo", None)
    if memo is not None and memo[0]() is attention_mask and memo[1] == (B, L, T):
        return memo[2]
    starts = _left_padding_starts(attention_mask, B, L, T, device)
    owner._padding_memo = (weakref.ref(attention_mask), (B, L, T), starts)
    return starts


def _visible_sequences(starts: list, L: int, T: int):
    """The sequences of a left-padded batch that see a token, as ``(b, p, r0)``: ``p`` its first
    visible key (``starts[b]``, < ``T``) and ``r0`` its first query row that sees one (the ``L``
    queries are the last of the ``T`` keys; the rows before ``r0`` are padding and see nothing).
    Row ``r0 + i`` is then the last of keys ``p .. T - L + r0 + i``: causal over ``[p, T)``."""
    for b, p in enumerate(starts):
        if p < T:
            yield b, p, max(0, p - (T - L))


def _padded_attention_with_lse(layer, module, query, key, value, attention_mask, scale):
    """:func:`_attention_with_lse` for queries (the last ``L`` of the ``T`` keys) whose mask is
    causal attention with left padding (a padded batch): one fused call per sequence over its
    visible keys, ``(out, lse)`` with the rows before a sequence's first token (padding) output
    0 and lse -inf (they see nothing), or None where the mask is another one or the fused
    kernels do not apply (the caller then runs masked SDPA). No mask (``None``): one call for
    the whole batch."""
    if attention_mask is None:
        return _attention_with_lse(module, query, key, value, None, scale)
    B, Hq, L, D = query.shape
    T = key.shape[2]
    starts = _padding_starts(layer, attention_mask, B, L, T, query.device)
    if starts is None:
        return None
    if not any(starts):
        return _attention_with_lse(module, query, key, value, None, scale)
    out = query.new_zeros((B, Hq, L, D))
    lse = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=query.device)
    for b, p, r0 in _visible_sequences(starts, L, T):
        res = _attention_with_lse(module, query[b:b + 1, :, r0:], key[b:b + 1, :, p:],
                                  value[b:b + 1, :, p:], None, scale)
        if res is None:
            return None
        out[b:b + 1, :, r0:] = res[0]
        lse[b:b + 1, :, r0:] = res[1]
    return out, lse


def _a2_prompt_weights(layer, query: torch.Tensor, keys: torch.Tensor, attention_mask,
                       scale: float, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A² weights ``[B, H, T]`` float32 of ``L`` query rows (the last ``L`` of the ``T`` keys)
    by the a2_weights op. A mask that is causal attention with left padding (a padded batch)
    becomes one unmasked causal call per sequence over its visible tokens: the op's unmasked
    kernels skip the per-logit mask reads (3.3× faster at 32k tokens, bench_a2_prefill.py); the
    rows before a sequence's first token see nothing and add nothing. Any other mask goes to the
    op as it is. The mask's shape is read on the host once per mask object
    (:func:`_padding_starts`)."""
    B, Hq, L, _ = query.shape
    T = keys.shape[2]
    if attention_mask is None:
        return ops.a2_weights(query, keys, None, scale, lse=lse)[0]
    starts = _padding_starts(layer, attention_mask, B, L, T, query.device)
    if starts is None:
        return ops.a2_weights(query, keys, _visible_mask(attention_mask, L, T, query.device),
                              scale, lse=lse)[0]
    if not any(starts):
        return ops.a2_weights(query, keys, None, scale, lse=lse)[0]
    w = query.new_zeros((B, keys.shape[1], T), dtype=torch.float32)
    for b, p, r0 in _visible_sequences(starts, L, T):
        w[b:b + 1, :, p:] = ops.a2_weights(
            query[b:b + 1, :, r0:], keys[b:b + 1, :, p:], None, scale,
            lse=None if lse is None else lse[b:b + 1, :, r0:])[0]
    return w


LSE_KERNELS = ("cudnn", "flash")


def _attention_with_lse(module, query, key, value, attention_mask, scale,
                        kernels=LSE_KERNELS):
    """Causal attention of ``L`` query tokens, the last ``L`` of the ``T`` keys (a first prompt:
    ``L == T``; a call over earlier tokens: ``L < T``), by a fused kernel of PyTorch that also
    returns each row's log-sum-exp, so the a2_weights op can skip its own row pass: ``(out [B,
    Hq, L, D], lse [B, Hq, L] float32)``, or None where none applies (a mask, a non-causal
    module, on CUDA not float16/bfloat16 on sm80+ or a head dim over 256, more queries than
    keys) and the caller keeps SDPA (+ the op's row pass). On the CPU PyTorch's CPU flash
    kernel (:func:`_cpu_attention_with_lse`). On CUDA ``kernels`` in order of preference:
    ``"cudnn"`` (what SDPA itself picks on an H100: 112 ms against flash's 208 ms for batch 8 ×
    32k, 32/8 heads, D 128; only for ``L == T``) then ``"flash"`` (whose causal mask is aligned
    with the last key, the lower-right causal mask, also for ``L < T``); each only where its
    SDPA backend is enabled (``torch.backends.cuda.enable_cudnn_sdp`` / ``enable_flash_sdp``).
    Both read the ``Hq / H`` query heads of a KV head from the same keys (no repeated copy)."""
    L, T = query.shape[2], key.shape[2]
    if attention_mask is not None or not getattr(module, "is_causal", True) or L > T or L == 0:
        return None
    if query.device.type == "cpu":
        return _cpu_attention_with_lse(query, key, value, scale)
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16) or \
            query.shape[-1] > 256 or query.shape[-1] % 8 or \
            torch.cuda.get_device_capability(query.device) < (8, 0):
        return None
    for name in kernels:
        # a kernel this build or card lacks raises (RuntimeError; TypeError where a torch
        # version changed the private op's schema): try the next, else SDPA + the row pass
        try:
            if name == "cudnn" and L == T and torch.backends.cuda.cudnn_sdp_enabled():
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    query, key, value, None, True, 0.0, True, False, scale=scale)
                return res[0], res[1].reshape(res[1].shape[:3])  # lse [B, Hq, L, 1]
            if name == "flash" and torch.backends.cuda.flash_sdp_enabled():
                res = torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, 0.0, True, False, scale=scale)
                return res[0], res[1]
        except (RuntimeError, TypeError):
            continue
    return None


def _cpu_attention_with_lse(query, key, value, scale):
    """:func:`_attention_with_lse` on the CPU: PyTorch's CPU flash kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, GQA keys not repeated), which returns
    each row's log-sum-exp. Its causal mask is aligned with the first key, so for ``L < T`` the
    keys go in two calls merged by their log-sum-exps: the ``T - L`` earlier keys, which every
    row sees, and the call's own ``L`` (a square: causal either way). None where the kernel
    raises (a dtype or build without it)."""
    L, T = query.shape[2], key.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:
        if L == T:
            out, lse = flash(query, key, value, 0.0, True, scale=scale)[:2]
            return out, lse
        o1, l1 = flash(query, key[:, :, :T - L], value[:, :, :T - L], 0.0, False,
                       scale=scale)[:2]
        o2, l2 = flash(query, key[:, :, T - L:], value[:, :, T - L:], 0.0, True,
                       scale=scale)[:2]
    except (RuntimeError, TypeError):
        return None
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * (l1 - lse).exp().unsqueeze(-1) + o2.float() * (l2 - lse).exp().unsqueeze(-1)
    return out.to(query.dtype), lse


def _fused_a2_weights(query: torch.Tensor) -> bool:
    """Whether a first prompt's A² weights come from SDPA + the a2_weights op (CUDA, the head
    dims its kernels are built for) rather than :func:`_prefill_rows`. On the CPU the row
    blocks stay: they take the output and the weights from one softmax, where the op would
    compute the attention a second time (benchmarks/bench_a2_prefill.py, --device cpu)."""
    return query.device.type == "cuda" and query.shape[-1] in FUSED_CUDA_HEAD_DIMS


def _grouped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` per query head, ``x`` ``[B, Hq, L, M]``, ``y`` ``[B, H, M, N]`` shared by the
    ``Hq / H`` query heads of each KV head (query head ``h·n_rep + r`` reads KV head ``h``), as
    one batched matmul over ``[B, H, n_rep·L, M]``: -> ``[B, Hq, L, N]``."""
    B, Hq, L, M = x.shape
    H = y.shape[1]
    out = x.reshape(B, H, (Hq // H) * L, M) @ y
    return out.view(B, Hq, L, y.shape[-1])


def _prefill_rows(layer, query: torch.Tensor, attention_mask, scale: float, rows_after: int,
                  values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``_prefill`` for a block of query rows; ``rows_after`` query tokens of this call follow
    the block; ``values`` and ``keys`` float32 ``[B, H, n_quant + n_window, D]`` from
    :func:`_prefill` (read once per call; the quantised keys are ``k̂ + sign·U ẑ``, so the
    logits are the corrected logits). When transformers passed no mask (plain causal attention),
    the block attends to the first ``T - rows_after`` tokens only, so the columns after them are
    never computed."""
    B, Hq, L, D = query.shape
    nq, nw = layer.n_quant, layer.n_window
    T = nq + nw
    Tv = T - rows_after if attention_mask is None else T  # columns this block may see
    logits = _grouped(query.float(), keys[:, :, :Tv].transpose(-1, -2)) * scale
    vis = _visible_mask(attention_mask, L, Tv, query.device)
    logits.masked_fill_(~vis, float("-inf"))
    a = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # fully masked rows (padding) -> 0
    del logits
    out = _grouped(a, values[:, :, :Tv])  # [B, Hq, L, D]
    if layer.a2:
        w = vp.squared_weights(a, layer.H)
        if Tv < T:  # tokens after the block: never visible to it, weight 0
            w = torch.nn.functional.pad(w, (0, T - Tv))
        layer.add_weights(w[..., :nq], w[..., nq:])
    return out.to(query.dtype)


def _decode(layer, query: torch.Tensor, attention_mask, scale: float) -> torch.Tensor:
    """One query token per sequence through the fused decode op."""
    B, Hq, _, D = query.shape
    nq, nw = layer.n_quant, layer.n_window
    q = query[:, :, 0].contiguous()
    step = layer._owner._static_step
    if step is not None:  # a graph-decode step: lengths and kv_start in the step's tensors
        kv_start, nq_t, nw_t = step.kv_start, step.n_quant, step.n_window
    else:
        kv_start = _kv_start_shared(layer, attention_mask, B, nq + nw, query.device)
        nq_t, nw_t = _lengths_shared(layer, B, nq, nw, query.device)
    out, lse, hl = _decode_op(layer, q, nq_t, nw_t, kv_start, scale)
    if layer.a2:
        _a2_step_weights(layer, q, lse, hl, nq_t, nw_t, kv_start, scale)
    return out.unsqueeze(2)


def _decode_op(layer, q: torch.Tensor, nq_t: torch.Tensor, nw_t: torch.Tensor,
               kv_start: Optional[torch.Tensor], scale: float, query_tokens: int = 1):
    """``ops.decode_attention`` of ``q`` ``[B, Hq', D]`` over the layer's packed cache and the
    first ``nw_t`` window tokens (with ``query_tokens`` > 1 the rows of a few-token call, causal
    over its own tokens): ``(out, lse, heavy_logits)``, the last the kept tokens' logits an A²
    cache needs (None otherwise)."""
    s, b = layer.s, layer.buf
    B, Hq = q.shape[:2]
    has_side = layer.basis is not None
    heavy_idx, heavy_delta = layer.heavy_idx, layer.heavy_delta
    if layer.keep_store is not None:
        # a reserved keep set (graph decode, or reserve()): the fixed-capacity store, of which
        # heavy_idx / heavy_delta are views of the first K slots (the other slots -1, which the
        # op skips)
        heavy_idx, _, heavy_delta = layer.keep_store
    heavy = heavy_idx is not None and heavy_idx.shape[-1] > 0
    # The A² step needs the kept tokens' logits: the op computes them anyway and writes them here.
    hl = q.new_empty((B, Hq, heavy_idx.shape[-1]), dtype=torch.float32) \
        if layer.a2 and heavy else None
    out, lse = ops.decode_attention(
        q, b["k_codes"], b["k_scale"], b["k_zero"],
        b["z_codes"] if has_side else None, b["z_scale"] if has_side else None,
        layer.basis if has_side else None,
        b.get("v_codes") if layer.quantise_values else None,
        b.get("v_scale") if layer.quantise_values else None,
        b.get("v_zero") if layer.quantise_values else None,
        None if layer.quantise_values else b["v_dense"],
        heavy_delta.contiguous() if heavy else None,
        heavy_idx.contiguous() if heavy else None,
        b["k_window"], b["v_window"], nq_t, nw_t, kv_start,
        s.key_bits, s.group_size, s.side_bits, s.value_bits, s.value_group_size, s.sign, scale,
        heavy_logits=hl, query_tokens=query_tokens)
    return out, lse, hl


FUSED_CUDA_HEAD_DIMS = (64, 128)  # the head dims the CUDA decode kernels are built for


def _fused_decode(layer, query: torch.Tensor) -> bool:
    """Whether a decode step can use the decode op: on the CPU always, on CUDA for the head
    dims its kernels are built for. Otherwise the step goes through :func:`_prefill` with its one
    query (the quantised region dequantised every step: correct, but what QuantizedCache costs),
    and the cache warns once."""
    if query.device.type != "cuda" or query.shape[-1] in FUSED_CUDA_HEAD_DIMS:
        return True
    owner = layer._owner
    if not getattr(owner, "_warned_unfused_decode", False):
        owner._warned_unfused_decode = True
        import warnings

        warnings.warn(f"HeadQCache: head dim {query.shape[-1]} has no fused CUDA decode kernel "
                      f"(built for {FUSED_CUDA_HEAD_DIMS}); each decode step dequantises the "
                      f"cache instead (correct, but slow)", RuntimeWarning, stacklevel=3)
    return False


def _a2_step_weights(layer, q: torch.Tensor, lse: torch.Tensor,
                     heavy_logits: Optional[torch.Tensor], nq_t: torch.Tensor,
                     nw_t: torch.Tensor, kv_start: Optional[torch.Tensor], scale: float,
                     query_tokens: int = 1) -> None:
    """A² weights of a decode step (graph or eager), added in place by one op
    (``ops.a2_step_weights``; one kernel on CUDA instead of ~30 small PyTorch ones): the window
    tokens' over the window buffer's whole capacity, positions past the step's ``n_window`` (or
    before ``kv_start``) adding nothing; the kept tokens' over every slot of the keep set the
    decode op read (the reserved store, or the exact-size set), from the slots' logits
    ``decode_attention`` wrote (``heavy_logits``, None without kept tokens; -inf for empty
    slots: they add 0)."""
    sw = None
    if heavy_logits is not None:
        sw = layer.keep_store[1] if layer.keep_store is not None else layer.heavy_w
    ops.a2_step_weights(q, layer.buf["k_window"], lse, nq_t, nw_t, kv_start, scale,
                        layer.buf["w_window"], heavy_logits, sw, query_tokens=query_tokens)


def headq_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, **kwargs):
    """transformers attention function ``"headq"``: returns ``(out [B, L, Hq, D], None)``."""
    layer = getattr(key, "_headq_layer", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cfg = getattr(module, "config", None)
    if cfg is not None:
        layer._owner.check_model_config(cfg)  # a cache built for another model: a clear error
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("headq attention: logit soft-capping is not supported")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("headq attention: a HeadQ layer cannot be a sliding layer")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    L = query.shape[2]
    if L == 1 and layer.quantise_keys and (layer.n_quant > 0
                                           or layer._owner._static_step is not None) \
            and _fused_decode(layer, query):
        out = _decode(layer, query, attention_mask, scale)
    else:
        out = _prefill(layer, module, query, attention_mask, scale)
    layer.after_attention()
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"headq"`` in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, headq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


def _set(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, KeyError):
        model.config._attn_implementation = impl
    get = getattr(model.config, "get_text_config", None)
    if get is not None:
        tc = get(decoder=True)
        if tc is not model.config:
            tc._attn_implementation = impl


def enable(model):
    """Use the ``"headq"`` attention function in ``model`` (returns the model)."""
    register()
    current = model.config._attn_implementation
    if current != ATTN_IMPL:
        setattr(model, _PREVIOUS_ATTR, current)
    _set(model, ATTN_IMPL)
    return model


def disable(model):
    """Restore the attention implementation the model had before :func:`enable` (``sdpa`` if
    unknown); returns the model."""
    previous = getattr(model, _PREVIOUS_ATTR, None) or "sdpa"
    _set(model, previous)
    if hasattr(model, _PREVIOUS_ATTR):
        delattr(model, _PREVIOUS_ATTR)
    return model


register()
