"""Decode steps of a whole model over a :class:`~headq_torch.cache.HeadQCache` as CUDA-graph
replays.

Eager decode with transformers launches every kernel of every layer from Python, one token at a
time; with a packed cache the GPU work of a step is small enough that the host sets the pace
(docs/PERF.md). :class:`GraphDecoder` captures one decode step of the model (the projections,
the cache append and the fused decode attention of every layer) once, and replays it for each
token. What changes from step to step lives in device tensors the replay reads (the window slot
of the new token, the per-sequence lengths, the positions); what the host must decide (the
lengths it keeps, quantising the window's oldest group every ``group_size`` steps) runs between
replays, eagerly, exactly as the eager path does it after attention::

    out = model(prompt_ids, past_key_values=cache, use_cache=True)    # prefill (eager)
    dec = GraphDecoder(model, cache, max_length=prompt_len + new_tokens)
    tokens = dec.greedy(out.logits[:, -1:].argmax(-1), steps=new_tokens)

or all of it in one call, :func:`generate` (greedy, or sampled with transformers' temperature /
top-k / top-p warpers; stops at EOS like ``model.generate``)::

    sequences = generate(model, prompt_ids, cache, max_new_tokens=256, attention_mask=mask)

The replayed step computes what the eager step computes (same ops, same inputs): logits agree
to the last bit up to the order in which cuBLAS may reduce. ``graph=False`` runs the same
static-shape step without capturing it (any device, CPU included), which is how the CPU tests
check the step against the eager path.

The A² value policy is supported: the step computes the window's A² weights over the whole
window buffer (positions past the step's window length masked to 0) and the kept tokens' over
a fixed-capacity keep set (:meth:`~headq_torch.cache.HeadQLayer.reserve_keep_set`:
``keep_budget(value_keep_frac, quantised capacity)`` slots, the eager keep set at the front,
empty slots after it), all updated in place; the flush between replays chooses the keep set
exactly as the eager path does and copies it into the fixed slots.

Limits (each raises a ``ValueError`` naming it): every layer must be a HeadQ layer with
quantised keys (no sliding/dense layers), the ``"headq"`` attention function must be enabled,
and a prompt mask, if given, must be left padding only. Buffers that move (a ``max_length``
exceeded, so the cache grows; ``reorder_cache``; ``reset``) are detected before each replay and
the step is captured again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .attention import ATTN_IMPL, FUSED_CUDA_HEAD_DIMS
from .cache import HeadQCache, HeadQLayer

__all__ = ["GraphDecoder", "generate"]


@dataclass
class StepState:
    """Device tensors a graph-decode step reads (refilled before every replay)."""

    input_ids: torch.Tensor      # [B, 1] int64
    position_ids: torch.Tensor   # [B, 1] int64: the new token's position per sequence
    slot: torch.Tensor           # [1] int64: its window slot
    n_quant: torch.Tensor        # [B] int32
    n_window: torch.Tensor       # [B] int32, the new token included
    kv_start: Optional[torch.Tensor]  # [B] int32 first visible token (left padding), or None


def _cache_argument(model) -> str:
    """The forward keyword that takes the cache: ``cache`` (transformers >= 5.2x, which
    deprecates the old name) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def _left_padding_starts(mask: torch.Tensor, B: int, n: int) -> list[int]:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, n):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"GraphDecoder: attention_mask must be the [batch, cached tokens] = "
                         f"[{B}, {n}] mask of the prompt, got {got}")
    m = mask.detach().to("cpu", torch.bool)
    starts = []
    for b in range(B):
        row = m[b]
        k = int(row.int().argmax()) if bool(row.any()) else n
        if not bool(row[k:].all()) or bool(row[:k].any()):
            raise ValueError(f"GraphDecoder: attention_mask row {b} is not left padding (zeros "
                             f"then ones); only left-padded batches can be graph-decoded")
        starts.append(k)
    return starts


class GraphDecoder:
    """Greedy or step-by-step decoding of ``model`` over a prefilled ``cache`` with one
    CUDA-graph replay per step (see the module docstring).

    Args:
        model: the transformers model the cache was filled by, with the ``"headq"`` attention
            function enabled (:func:`headq_torch.attention.enable`).
        cache: its :class:`HeadQCache`, prefilled (the prompt has been run).
        max_length: reserve buffers for this many tokens in all (prompt + new) now, so that the
            captured step never has to be captured again; None: grow as needed (each growth,
            every doubling of the quantised region, captures the step again).
        attention_mask: the prompt's ``[batch, prompt tokens]`` mask when the batch is left
            padded (the positions and the first visible token of each sequence follow it);
            None: no padding.
        graph: capture and replay a CUDA graph (default: when the cache is on a CUDA device);
            False runs the same static step eagerly.
    """

    def __init__(self, model, cache: HeadQCache, max_length: Optional[int] = None,
                 attention_mask: Optional[torch.Tensor] = None, graph: Optional[bool] = None):
        if not isinstance(cache, HeadQCache):
            raise TypeError(f"GraphDecoder: cache must be a HeadQCache, got "
                            f"{type(cache).__name__}")
        cache.check_model_config(model.config)
        if not cache.attention_active():
            raise ValueError(f"GraphDecoder: the model does not use the {ATTN_IMPL!r} attention "
                             f"function; call headq_torch.attention.enable(model) first")
        layers = list(cache.layers)
        bad = [i for i, layer in enumerate(layers) if not isinstance(layer, HeadQLayer)]
        if bad:
            raise ValueError(f"GraphDecoder: layers {bad} are not HeadQ layers (sliding or "
                             f"dense); graph decode needs every layer quantised")
        if not all(layer.is_initialized for layer in layers):
            raise ValueError("GraphDecoder: the cache is empty; run the prompt through the "
                             "model with this cache first")
        s = cache.settings
        if s.key_bits == 16:
            raise ValueError("GraphDecoder: key_bits=16 (dense keys) has no fused decode step; "
                             "graph decode needs key_bits < 16")
        counts = {(layer.n_quant, layer.n_window, layer.B) for layer in layers}
        if len(counts) != 1:
            raise ValueError(f"GraphDecoder: the layers hold different lengths {sorted(counts)}; "
                             f"expected one prefilled length for all")
        first = layers[0]
        if first.device.type == "cuda" and first.D not in FUSED_CUDA_HEAD_DIMS:
            raise ValueError(f"GraphDecoder: head dim {first.D} has no fused CUDA decode kernel "
                             f"(built for {FUSED_CUDA_HEAD_DIMS}); decode this model eagerly "
                             f"(model.generate with the cache)")
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) \
                    or max_length < first.n_quant + first.n_window + 1:
                raise ValueError(f"GraphDecoder: max_length must be an integer > the cached "
                                 f"length {first.n_quant + first.n_window}, got {max_length!r}")
            cache.reserve(max_length)  # the A² keep set included
        else:
            for layer in layers:  # the window's steady capacity, so the window never moves
                layer._ensure_window(s.residual_length + s.group_size)
                layer.reserve_keep_set()  # A²: fixed keep-set slots (grow with the region)
        dev = first.device
        if graph is None:
            graph = dev.type == "cuda"
        if graph and dev.type != "cuda":
            raise ValueError(f"GraphDecoder: graph=True needs a CUDA cache, the cache is on {dev}")
        self.model, self.cache, self.layers, self.graph = model, cache, layers, bool(graph)
        B, n = first.B, first.n_quant + first.n_window
        self.B, self.device = B, dev
        starts = None
        if attention_mask is not None:
            starts = _left_padding_starts(attention_mask, B, n)
        self._starts = torch.tensor(starts or [0] * B, dtype=torch.int64, device=dev)
        self._neg_starts = (-self._starts).view(B, 1)  # position = cached tokens - start
        i64 = dict(dtype=torch.int64, device=dev)
        self.state = StepState(
            input_ids=torch.zeros(B, 1, **i64), position_ids=torch.zeros(B, 1, **i64),
            slot=torch.zeros(1, **i64),
            n_quant=torch.zeros(B, dtype=torch.int32, device=dev),
            n_window=torch.zeros(B, dtype=torch.int32, device=dev),
            kv_start=None if starts is None else self._starts.to(torch.int32))
        self._cache_kw = _cache_argument(model)
        self._graph = None
        self._logits = None
        self._signature = None
        self.captures = 0  # how many times the step was captured (growth recaptures)

    # -- the step ------------------------------------------------------------------------------

    def _forward(self) -> torch.Tensor:
        st = self.state
        kw = {self._cache_kw: self.cache, "use_cache": True, "position_ids": st.position_ids}
        self.cache._static_step = st
        try:
            return self.model(input_ids=st.input_ids, **kw).logits
        finally:
            self.cache._static_step = None

    def _buffers(self) -> tuple:
        """The tensors a captured step reads or writes; a capture is valid while these are the
        same objects (the caches' buffers are replaced, never resized in place)."""
        out = []
        for layer in self.layers:
            out.extend(layer.buf.values())
            out.append(layer.basis)
            if layer.keep_store is not None:  # A²: the fixed-capacity keep set
                out.extend(layer.keep_store)
        return tuple(out)

    def _accumulators(self) -> list:
        """What a step adds to rather than overwrites: the A² weights (the window's and the kept
        tokens'). Its other writes (the new token's window slot) are idempotent."""
        out = []
        for layer in self.layers:
            if layer.a2:
                out.append(layer.buf["w_window"])
                if layer.keep_store is not None:
                    out.append(layer.keep_store[1])
        return out

    def _warm_up(self, runs: int = 2) -> None:
        """Run the step ``runs`` times and undo what those runs added to the A² weights, so
        that the step that follows (the captured graph's first replay) counts its weights
        once."""
        acc = self._accumulators()
        saved = [t.clone() for t in acc]
        for _ in range(runs):
            self._forward()
        for t, before in zip(acc, saved):
            t.copy_(before)

    def _capture(self) -> None:
        self._graph = self._logits = None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up runs (cuBLAS workspaces, lazy inits)
            self._warm_up()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._logits = self._forward()
        self._graph = g
        self._signature = self._buffers()
        self.captures += 1

    def _check_ready(self) -> None:
        first = self.layers[0]
        if not first.is_initialized or first.B != self.B:
            raise ValueError("GraphDecoder: the cache was reset or its batch changed; make a new "
                             "GraphDecoder for the new contents")
        for layer in self.layers:
            if (layer.n_quant, layer.n_window) != (first.n_quant, first.n_window):
                raise ValueError("GraphDecoder: the layers' lengths diverged (the cache was used "
                                 "outside the decoder); make a new GraphDecoder")

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``input_ids`` ``[B, 1]`` (int64) in, logits ``[B, 1, vocab]`` out.

        With graphs the logits are the graph's output buffer, overwritten by the next step:
        ``clone()`` them to keep them."""
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (self.B, 1) \
                or input_ids.dtype not in (torch.int64, torch.int32):
            got = (tuple(input_ids.shape), input_ids.dtype) if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"GraphDecoder.step: input_ids must be an integer tensor of shape "
                             f"[{self.B}, 1], got {got}")
        self._check_ready()
        first, st = self.layers[0], self.state
        nq, nw = first.n_quant, first.n_window
        n = nq + nw
        st.input_ids.copy_(input_ids)
        torch.add(self._neg_starts, n, out=st.position_ids)
        st.slot.fill_(nw)
        st.n_quant.fill_(nq)
        st.n_window.fill_(nw + 1)
        if not self.graph:
            logits = self._forward()
        else:
            now = self._buffers()
            if self._graph is None or len(now) != len(self._signature) or any(
                    a is not b for a, b in zip(self._signature, now)):
                self._capture()
            self._graph.replay()
            logits = self._logits
        self._advance()
        return logits

    def _advance(self) -> None:
        """The host side of the step: one more window token per layer, and the window's oldest
        complete group quantised once the window is full (as ``after_attention`` does)."""
        s = self.cache.settings
        for layer in self.layers:
            layer.n_window += 1
            layer._refresh_views()
        if self.layers[0].n_window >= s.residual_length + s.group_size:
            for layer in self.layers:
                layer.flush()

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` greedy steps from ``input_ids`` ``[B, 1]``; returns the ``[B, steps]``
        tokens chosen (the last one not yet fed to the model). No host sync inside the loop."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"GraphDecoder.greedy: steps must be an integer >= 0, got {steps!r}")
        out = torch.empty(self.B, steps, dtype=torch.int64, device=self.device)
        ids = input_ids
        for i in range(steps):
            logits = self.step(ids)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out[:, i:i + 1] = ids
        return out


def _check_sampling(do_sample, temperature, top_k, top_p, check_every) -> None:
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate: do_sample must be a bool, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"generate: temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"generate: check_every must be an integer >= 1, got {check_every!r}")


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float,
                 top_k: Optional[int], top_p: Optional[float],
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token ``[B, 1]`` from the last position's logits, on the device, no host sync.
    Greedy: argmax. Sampling: transformers' logits warpers in its order (temperature, top-k,
    top-p keeping at least one token), softmax, ``torch.multinomial`` on float32 scores."""
    scores = logits[:, -1].float()
    if not do_sample:
        return scores.argmax(-1, keepdim=True)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _token_id(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"generate: {what} must be an integer token id, got {x!r}")
    return int(x)


def _eos_and_pad(model, eos_token_id, pad_token_id):
    """The EOS ids (a list, empty: no EOS) and the pad id, with ``model.generate``'s defaults
    from the model's generation config."""
    gc = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, (list, tuple)):
        eos = [_token_id(e, "eos_token_id") for e in eos_token_id]
    else:
        eos = [_token_id(eos_token_id, "eos_token_id (an id or a list of ids)")]
    if pad_token_id is None:
        pad_token_id = getattr(gc, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, _token_id(pad_token_id, "pad_token_id")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, cache: HeadQCache, max_new_tokens: int,
             attention_mask: Optional[torch.Tensor] = None,
             eos_token_id: Union[int, Sequence[int], None] = None,
             pad_token_id: Optional[int] = None, graph: Optional[bool] = None,
             do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             check_every: int = 16) -> torch.Tensor:
    """Generation with graph decode: the prompt is prefilled eagerly into ``cache`` (an empty
    :class:`HeadQCache`; positions from ``attention_mask`` as transformers' ``generate`` makes
    them for left padding), then up to ``max_new_tokens - 1`` steps run as graph replays.

    Returns ``[B, prompt + new]`` tokens like ``model.generate``: greedy by default; with
    ``do_sample=True`` sampled after transformers' warpers (``temperature``, then ``top_k``,
    then ``top_p``; unlike ``model.generate`` no top-k of 50 is implied), from ``generator``
    or torch's default generator, so that with the same seed and warpers the tokens are those of
    ``model.generate(..., do_sample=True)`` on the same device.

    EOS as ``model.generate`` handles it: ``eos_token_id`` (an id or a list of ids; ``None``, the
    default, takes ``model.generation_config.eos_token_id``; an empty list never stops) ends a
    sequence, the tokens after its first EOS are ``pad_token_id`` (``None``: the generation
    config's pad token, else the first EOS id, else 0), and generation stops once every sequence
    has finished: the loop never waits for the GPU except every ``check_every`` steps, when it
    reads whether all sequences are done (so up to ``check_every - 1`` steps may run past the
    end; the result is cut where ``model.generate`` stops)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be a [batch, prompt tokens] tensor, got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    _check_sampling(do_sample, temperature, top_k, top_p, check_every)
    if not isinstance(cache, HeadQCache):
        raise TypeError(f"generate: cache must be a HeadQCache, got {type(cache).__name__}")
    if cache.get_seq_length() != 0:
        raise ValueError("generate: the cache must be empty (it is prefilled with the prompt)")
    eos, pad_token_id = _eos_and_pad(model, eos_token_id, pad_token_id)
    B, n = input_ids.shape
    kw = {_cache_argument(model): cache, "use_cache": True}
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, n):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) \
                else type(attention_mask).__name__
            raise ValueError(f"generate: attention_mask must have the shape of input_ids "
                             f"({B}, {n}), got {got}")
        kw["attention_mask"] = attention_mask
        kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    pick = lambda lg: _next_tokens(lg, do_sample, temperature, top_k, top_p, generator)  # noqa: E731
    ids = pick(model(input_ids=input_ids, logits_to_keep=1, **kw).logits)
    dec = GraphDecoder(model, cache, max_length=n + max_new_tokens,
                       attention_mask=attention_mask, graph=graph)
    new = torch.empty(B, max_new_tokens, dtype=torch.int64, device=ids.device)
    new[:, :1] = ids
    eos = None if not eos else torch.tensor(eos, dtype=ids.dtype, device=ids.device)
    done = None if eos is None else torch.isin(ids[:, 0], eos)
    steps = 1
    while steps < max_new_tokens:
        if done is not None and steps % check_every == 0 and bool(done.all()):
            break  # the one host sync: every check_every steps
        ids = pick(dec.step(ids))
        new[:, steps:steps + 1] = ids
        if done is not None:
            done = done | torch.isin(ids[:, 0], eos)
        steps += 1
    new = new[:, :steps]
    if eos is not None:
        hit = torch.isin(new, eos).long()
        after = hit.cumsum(-1) - hit  # EOS tokens seen before this position
        new = new.masked_fill(after > 0, pad_token_id)
        if bool(done.all()):  # model.generate stops at the step the last sequence finished
            new = new[:, :int((after == 0).sum(-1).max())]
    return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
