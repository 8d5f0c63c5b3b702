"""End-to-end decode speed and memory: DynamicCache vs transformers' QuantizedCache vs HeadQCache.

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


def make_cache(kind: str, model, rank: int):
    from transformers import DynamicCache, QuantizedCache

    import headq_torch.attention as hattn
    from headq_torch.cache import HeadQCache

    hattn.disable(model)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "quantized_quanto_2bit":
        return QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=64,
                              residual_length=128)
    if kind in ("headq_2bit", "headq_2bit_graph"):
        hattn.enable(model)
        return HeadQCache(model.config, random_calibration(model, rank), key_bits=2,
                          value_bits=2, group_size=64, value_group_size=64)
    raise ValueError(kind)


@torch.no_grad()
def run_one(kind: str, model, context: int, steps: int, chunk: int, rank: int, batch: int):
    device = model.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    cache = make_cache(kind, model, rank)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    t0 = time.perf_counter()
    out = None
    chunk = chunk or context
    for s in range(0, context, chunk):
        out = model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    cache_bytes = torch.cuda.memory_allocated() - base_mem
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    dec = None
    if kind.endswith("_graph"):
        from headq_torch.graph import GraphDecoder

        dec = GraphDecoder(model, cache, max_length=context + steps + 8)
        step = dec.step
    else:
        def step(ids):
            return model(ids, past_key_values=cache, use_cache=True).logits
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up decode steps (the graph capture in the first)
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
    if dec is not None:
        row["graph_captures"] = dec.captures
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
                    default="dynamic,headq_2bit,headq_2bit_graph,quantized_quanto_2bit")
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
    for mine in ("headq_2bit", "headq_2bit_graph"):
        for other in ("dynamic", "quantized_quanto_2bit"):
            if mine in by and other in by:
                tag = "headq" if mine == "headq_2bit" else "headq_graph"
                summary[f"{tag}_speedup_vs_{other}"] = (by[mine]["tokens_per_s"]
                                                        / by[other]["tokens_per_s"])
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
