"""End-to-end decode speed and memory: DynamicCache, StaticCache, QuantizedCache, HeadQCache.

A randomly initialised Llama-3-8B-shaped model (32 layers, hidden 4096, 32 query / 8 KV heads,
head dim 128) in bf16 on one GPU. Each cache is prefilled with ``--context`` random tokens
(one prefill call by default), then ``--steps`` greedy decode steps are timed with CUDA events. Quality is
meaningless with random weights; this measures time and bytes only.

    python benchmarks/bench_e2e.py --context 32768 --steps 32 --out benchmarks/results/gpu_e2e.json

Bits: the QuantizedCache (quanto backend) and HeadQ both use 2-bit keys and values; HeadQ adds
its rank-8 side code (random orthonormal bases: speed does not depend on them).

``headq_2bit`` decodes eagerly (transformers' forward, one Python call per kernel);
``headq_2bit_graph`` is the same cache decoded by :class:`headq_torch.graph.GraphDecoder` (the
step captured once in a CUDA graph after the prefill, buffers reserved for the run's length,
replayed per token; the capture happens in the first warm-up step, outside the timing).
DynamicCache and QuantizedCache change their tensors' shapes every step and cannot be
captured: they are timed eagerly, as transformers runs them.

``headq_a2`` / ``headq_a2_graph`` are the same cache with the A² value policy (``value_policy="a2"``,
3% of the quantised tokens keep their value deltas): its prefill also computes ``Σ a²`` per
token (the a2_weights op; ``prefill_s`` records what that costs), and every decode step adds the
A² weights of the window and the kept tokens.

``--chunk N`` prefills in calls of N tokens: every call after the first attends to already
quantised tokens (what a chunked prefill or a second turn of a conversation does).

``static_graph`` is the dense bf16 cache under the same conditions as ``headq_2bit_graph``, so
that the graph's own gain (no per-kernel Python launch) is not credited to HeadQ: transformers'
``StaticCache`` (``max_cache_len`` = context + warm-up + timed steps + slack, rounded up to 64),
prefilled eagerly like the others (``--chunk`` respected: explicit positions per chunk), then one
decode step captured once with ``torch.cuda.graph`` (after two eager warm-up runs of that step on
a side stream, undone on the cache's device counters) and replayed per token: before each replay
the token is copied into a static ``input_ids`` and the static ``position_ids`` are incremented
in place. StaticCache writes at its own device-side counter (``cumulative_length``, advanced by
an in-place add inside ``update``, so inside the graph), and transformers builds the decode mask
on the device from that counter over the whole ``max_cache_len``: no host sync in the step.
Attention is transformers' ``sdpa`` with that boolean mask; for the single decode query the
query heads of each KV head are laid out as its query rows (as transformers 5.24's
``sdpa_attention_forward`` does), not ``repeat_kv``'s copy of the whole static buffer that
transformers 5.17 makes when a mask is given. With a mask SDPA cannot use its flash kernel (nor
its split-KV decode), so the dense row reads all ``max_cache_len`` slots through a masked kernel
(memory-efficient or cuDNN, PyTorch's choice): that is StaticCache's cost under ``sdpa``, and what
the row measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

WARMUP_STEPS = 3  # untimed decode steps before the timed ones (a graph is captured in the first)
STATIC_ATTN = "bench_static_sdpa"  # attention function of the static_graph row (see below)
A2_KEEP_FRAC = 0.03  # the A² rows keep 3% of the quantised tokens' values (bench_decode's A² rows)


def build_model(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    return model


def random_calibration(model, rank: int):
    from headq_torch.calibration import Calibration
    from headq_torch.config import config_fingerprint

    cfg = model.config
    g = torch.Generator().manual_seed(1)
    bases = []
    for _ in range(cfg.num_hidden_layers):
        q, _ = torch.linalg.qr(torch.randn(cfg.num_key_value_heads, cfg.head_dim, rank,
                                           generator=g))
        bases.append(q.to(model.device))
    return Calibration(bases, model_name="random-llama3-8b-shape",
                       fingerprint=config_fingerprint(cfg), num_layers=cfg.num_hidden_layers,
                       num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rank=rank,
                       method="random")


def static_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        **kwargs):
    """Attention of the ``static_graph`` row: transformers' ``sdpa``, except one query token
    with a mask and grouped KV heads, where the query heads of each KV head are laid out as its
    query rows (``[B, Hkv, n_rep, D]``) so that SDPA reads the static K/V once. transformers
    5.24's ``sdpa_attention_forward`` does exactly this (``pack_gqa``); 5.17 instead copies
    the whole ``max_cache_len`` buffer of every layer ``n_rep`` times (``repeat_kv``) each step,
    a cost of that version rather than of a dense cache. Same math, same mask, no host sync."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    B, Hq, L, D = query.shape
    if (L != 1 or n_rep == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, Hq // n_rep, n_rep, D), key, value, attn_mask=attention_mask,
        scale=scaling)
    return out.reshape(B, Hq, 1, out.shape[-1]).transpose(1, 2).contiguous(), None


def use_static_attention(model):
    """Switch ``model`` to :func:`static_sdpa_forward`; its mask is transformers' ``sdpa_mask``
    (:func:`make_cache` switches back to ``sdpa`` for the next kind)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(STATIC_ATTN, static_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(STATIC_ATTN, sdpa_mask)
    model.set_attn_implementation(STATIC_ATTN)
    return model


class StaticGraphStep:
    """One decode step of ``model`` over a prefilled transformers ``StaticCache``:
    ``step(ids [B, 1])`` -> logits ``[B, 1, vocab]``.

    ``graph=True`` captures the step once in a CUDA graph (in the first call) and replays it;
    its logits are the graph's output buffer, overwritten by the next step. ``graph=False``
    runs the same static-shape step eagerly (any device; the CPU check compares it with
    DynamicCache). What changes between steps lives in device tensors the step reads: the
    token (static ``input_ids``, copied in), the position (static ``position_ids``, +1 in place)
    and the cache's own write index. There is no ``cache_position`` tensor: neither
    transformers 5.17 nor 5.24 takes one in the forward; each ``StaticLayer`` keeps its write
    index in ``cumulative_length`` (a 0-d device tensor moved to the device at its first
    update), which ``update`` reads for ``index_copy_`` and advances with an in-place
    ``add_``, so the captured step advances it on every replay. transformers builds the
    decode mask from the same counter on the device (``get_query_offset`` returns the tensor;
    a compileable cache with one query token never takes the ``is_causal`` shortcut, whose
    test would read tensors on the host), over the whole ``max_cache_len``. Nothing in the
    step reads a device value on the host, so it can be captured as transformers runs it;
    no precomputed mask is needed.
    """

    def __init__(self, model, cache, graph: bool = True):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        from headq_torch.graph import _cache_argument

        if not isinstance(cache, StaticCache):
            raise TypeError(f"StaticGraphStep: cache must be a StaticCache, got "
                            f"{type(cache).__name__}")
        self.layers = list(cache.layers)
        if not self.layers or any(type(layer) is not StaticLayer or not layer.is_initialized
                                  for layer in self.layers):
            raise ValueError("StaticGraphStep: every layer must be a prefilled full-attention "
                             "StaticLayer (sliding layers keep a host-side length)")
        first = self.layers[0]
        # the cached length, read once here (a host sync outside the step)
        lengths = {int(layer.cumulative_length) for layer in self.layers}
        if len(lengths) != 1:
            raise ValueError(f"StaticGraphStep: the layers hold different lengths {lengths}")
        self.length = lengths.pop()
        self.max_cache_len = first.max_cache_len
        self.B, self.device = first.keys.shape[0], first.keys.device
        if graph and self.device.type != "cuda":
            raise ValueError(f"StaticGraphStep: graph=True needs a CUDA cache, got {self.device}")
        self.model, self.cache, self.graph = model, cache, bool(graph)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(self.B, 1, **i64)
        # the position of the token fed last; each step adds 1 before it runs
        self.position_ids = torch.full((self.B, 1), self.length - 1, **i64)
        self._kw = {_cache_argument(model): cache, "use_cache": True}
        self._graph = self._logits = None
        self.captures = 0

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.input_ids, position_ids=self.position_ids,
                          **self._kw).logits

    def _rewind(self) -> None:
        """Undo one step's advance of the write index (device-side); the K/V it wrote sit past
        the index, masked, and are overwritten by the next step."""
        for layer in self.layers:
            layer.cumulative_length.sub_(1)

    def _capture(self) -> None:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up runs of this very step (lazy inits, workspaces)
            for _ in range(2):
                self._forward()
                self._rewind()  # so that the replay below is this step, not the third after it
        current.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # recorded, not run: the counters do not move here
            self._logits = self._forward()
        self._graph = g
        self.captures += 1

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.length >= self.max_cache_len:
            raise ValueError(f"StaticGraphStep: the cache is full ({self.max_cache_len} tokens)")
        self.input_ids.copy_(input_ids)
        self.position_ids.add_(1)
        if not self.graph:
            logits = self._forward()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits
        self.length += 1  # host-side bookkeeping only (the full-cache check above)
        return logits


def static_cache_length(context: int, steps: int) -> int:
    """``max_cache_len`` of the static_graph row: the prompt, the warm-up and timed steps, 8
    slots of slack, rounded up to 64 (an aligned mask row for SDPA's kernels)."""
    return -(-(context + WARMUP_STEPS + steps + 8) // 64) * 64


def make_cache(kind: str, model, rank: int, max_cache_len: int = 0):
    from transformers import DynamicCache, QuantizedCache, StaticCache

    import headq_torch.attention as hattn
    from headq_torch.cache import HeadQCache

    hattn.disable(model)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static_graph":
        use_static_attention(model)
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if kind == "quantized_quanto_2bit":
        return QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=64,
                              residual_length=128)
    if kind in ("headq_2bit", "headq_2bit_graph"):
        hattn.enable(model)
        return HeadQCache(model.config, random_calibration(model, rank), key_bits=2,
                          value_bits=2, group_size=64, value_group_size=64)
    if kind in ("headq_a2", "headq_a2_graph"):
        hattn.enable(model)
        return HeadQCache(model.config, random_calibration(model, rank), key_bits=2,
                          value_bits=2, group_size=64, value_group_size=64,
                          value_policy="a2", value_keep_frac=A2_KEEP_FRAC)
    raise ValueError(kind)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, kw: dict, chunk: int, explicit_positions: bool = False):
    """Run the prompt ``ids`` through ``model`` in chunks of ``chunk`` tokens (0: one call);
    returns the last call's output (logits of its last token). ``explicit_positions``: pass each
    chunk's ``position_ids`` (the static_graph row; the StaticCache itself writes at its own
    device-side counter, there is no ``cache_position`` argument in transformers 5.17/5.24)."""
    B, n = ids.shape
    chunk = chunk or n
    out = None
    for s in range(0, n, chunk):
        x = ids[:, s:s + chunk]
        pos = {}
        if explicit_positions:
            pos["position_ids"] = torch.arange(s, s + x.shape[1], device=ids.device).expand(B, -1)
        out = model(x, logits_to_keep=1, **kw, **pos)
    return out


@torch.no_grad()
def run_one(kind: str, model, context: int, steps: int, chunk: int, rank: int, batch: int):
    from headq_torch.graph import _cache_argument

    device = model.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    static = kind == "static_graph"
    max_cache_len = static_cache_length(context, steps) if static else 0
    cache = make_cache(kind, model, rank, max_cache_len)
    kw = {_cache_argument(model): cache, "use_cache": True}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    t0 = time.perf_counter()
    out = prefill(model, ids, kw, chunk, explicit_positions=static)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    cache_bytes = torch.cuda.memory_allocated() - base_mem
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    dec = None
    if static:
        dec = step = StaticGraphStep(model, cache, graph=True)
    elif kind.endswith("_graph"):
        from headq_torch.graph import GraphDecoder

        dec = GraphDecoder(model, cache, max_length=context + steps + 8)
        step = dec.step
    else:
        def step(ids):
            return model(ids, **kw).logits
    t0 = time.perf_counter()
    for _ in range(WARMUP_STEPS):  # warm-up decode steps (the graph capture in the first)
        nxt = step(nxt)[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(steps):
        nxt = step(nxt)[:, -1:].argmax(-1)
    host_s = time.perf_counter() - t0  # time the host took to issue the steps
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    row = dict(cache=kind, context=context, batch=batch, decode_ms_per_step=ms,
               tokens_per_s=batch * 1000.0 / ms, prefill_s=prefill_s, warmup_s=warmup_s,
               host_issue_ms_per_step=host_s * 1000.0 / steps,
               cache_and_state_bytes_after_prefill=cache_bytes,
               peak_memory_bytes=torch.cuda.max_memory_allocated())
    if hasattr(cache, "memory_bytes"):
        row["headq_cache_bytes"] = cache.memory_bytes()
    if static:
        row["max_cache_len"] = max_cache_len
        row["static_cache_bytes"] = sum(layer.keys.nbytes + layer.values.nbytes
                                        for layer in cache.layers)
        row["attention"] = f"{STATIC_ATTN}: sdpa, boolean mask over max_cache_len, GQA packed"
    if dec is not None:
        row["graph_captures"] = dec.captures
    kw.clear()  # its reference to the cache
    del cache, dec, step
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=0,
                    help="prefill chunk length (0: the whole context in one call)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--caches",
                    default="dynamic,static_graph,headq_2bit,headq_2bit_graph,"
                            "quantized_quanto_2bit")
    ap.add_argument("--out", default="benchmarks/results/gpu_e2e.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA device")
    import transformers

    import headq_torch  # noqa: F401

    model = build_model(args.layers, "cuda")
    rows = []
    for kind in args.caches.split(","):
        try:
            row = run_one(kind, model, args.context, args.steps, args.chunk, args.rank,
                          args.batch)
        except Exception as e:  # a backend that fails is recorded, not hidden
            row = dict(cache=kind, context=args.context, error=f"{type(e).__name__}: {e}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {r["cache"]: r for r in rows if "tokens_per_s" in r}
    summary = {}
    for mine in ("headq_2bit", "headq_2bit_graph", "headq_a2", "headq_a2_graph"):
        for other in ("dynamic", "quantized_quanto_2bit"):
            if mine in by and other in by:
                tag = mine.replace("_2bit", "")
                summary[f"{tag}_speedup_vs_{other}"] = (by[mine]["tokens_per_s"]
                                                        / by[other]["tokens_per_s"])
    # the graph against the graph: HeadQ vs the dense cache both replayed from CUDA graphs
    if "headq_2bit_graph" in by and "static_graph" in by:
        summary["headq_graph_speedup_vs_static_graph"] = (by["headq_2bit_graph"]["tokens_per_s"]
                                                          / by["static_graph"]["tokens_per_s"])
    # what the graph alone does for the dense cache
    if "static_graph" in by and "dynamic" in by:
        summary["static_graph_speedup_vs_dynamic"] = (by["static_graph"]["tokens_per_s"]
                                                      / by["dynamic"]["tokens_per_s"])
    result = dict(
        command=" ".join([sys.executable.split("/")[-1]] + sys.argv),
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        cuda=torch.version.cuda, transformers=transformers.__version__,
        python=platform.python_version(),
        model="random LlamaForCausalLM, Llama-3-8B shape, bf16",
        rows=rows, summary=summary,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
