"""One decode attention step through transformers' QuantizedCache (quanto backend), per context.

    python benchmarks/bench_quanto_step.py --out benchmarks/results/gpu_quanto_step.json

The decode benchmark (bench_decode.py) times HeadQ's fused kernel against dense SDPA and against
"dequantise + SDPA" with HeadQ's own dequantisers. This script times what transformers itself
does for one layer at equal bits: ``QuantizedCache(backend="quanto", nbits=2, q_group_size=64,
residual_length=128)`` holding the context, then per step ``layer.update(k_new, v_new)`` (which
dequantises the whole quantised part and concatenates it with the residual window) followed by
SDPA with GQA. Every 128 steps the layer re-quantises everything, so the steps are timed in runs
of 128 consecutive steps (CUDA events around each step and its two parts, plus the host clock):
``mean_ms`` includes that amortised re-quantisation, ``median_ms`` is the typical step,
``update_median_ms`` / ``sdpa_median_ms`` its parts, ``host_median_ms`` the wall time.
``--sdpa-backends default|pinned`` leaves the SDPA backend to torch or pins flash / efficient /
math. Shapes as bench_decode.py: batch 8, 32 query / 8 KV heads, head dim 128, fp16. Needs
optimum-quanto (carry the wheel to the GPU machine).

Recorded in benchmarks/results/gpu_quanto_step.json (pinned backends; the default-backend run is
kept there too). With torch's default choice SDPA runs cuDNN attention for these shapes, and
cuDNN builds a new plan on the host every time the key length changes, i.e. every decode step
(~40 ms of CPU per call, ``--profile`` shows it), so ``pinned`` is the default here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def quanto_layer_cache(B, Hq, H, D):
    from transformers import LlamaConfig, QuantizedCache

    cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=H,
                      head_dim=D, num_hidden_layers=1, intermediate_size=4 * D, vocab_size=128)
    return QuantizedCache(backend="quanto", config=cfg, nbits=2, q_group_size=64,
                          residual_length=128)


def step_times(T, B, Hq, H, D, steps, device, dtype, backends="pinned", profile=False):
    g = torch.Generator(device=device).manual_seed(T)
    cache = quanto_layer_cache(B, Hq, H, D)
    k = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    cache.update(k, v, 0)  # prefill: the layer quantises all T tokens
    del k, v
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g)
    kn = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)
    vn = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)

    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The key length grows by one every step. With the default backend choice torch runs cuDNN
    # attention here, which re-plans on the host for every new key length (~40 ms per call on the
    # H200 machine: a flat per-step cost at every context). "pinned" restricts SDPA to flash /
    # efficient / math; those per-layer times agree with bench_e2e.py's QuantizedCache step
    # (157 ms for 32 layers at 32k), so the e2e run does not pay the re-planning.
    def sdpa_ctx():
        if backends == "default":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH])

    def one():
        ks, vs = cache.update(kn, vn, 0)
        with sdpa_ctx():
            return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)

    for _ in range(3):
        one()
    cuda = device == "cuda"
    profile_table = None
    if profile and cuda:
        # Which kernels (and how many launches) make up a step: a few steps under the profiler.
        from torch.profiler import ProfilerActivity, profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                one()
            torch.cuda.synchronize()
        profile_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        print(profile_table, flush=True)
    times, t_update, t_sdpa, t_host = [], [], [], []
    for _ in range(steps):
        h0 = time.perf_counter()
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            ks, vs = cache.update(kn, vn, 0)
            ev[1].record()
            with sdpa_ctx():
                F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)
            ev[2].record()
            ev[2].synchronize()
            t_update.append(ev[0].elapsed_time(ev[1]))
            t_sdpa.append(ev[1].elapsed_time(ev[2]))
            times.append(ev[0].elapsed_time(ev[2]))
            del ks, vs
        else:
            one()
            times.append(1e3 * (time.perf_counter() - h0))
        t_host.append(1e3 * (time.perf_counter() - h0))
    del cache
    if cuda:
        torch.cuda.empty_cache()
    med = statistics.median
    row = dict(context=T, steps=steps, sdpa_backends=backends, mean_ms=statistics.fmean(times),
               median_ms=med(times), max_ms=max(times), host_median_ms=med(t_host))
    if t_update:
        row.update(update_median_ms=med(t_update), sdpa_median_ms=med(t_sdpa))
    if profile_table is not None:
        row["profile_4_steps"] = profile_table.splitlines()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,32768,131072")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="timed steps (128 = one re-quantisation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sdpa-backends", default="pinned", choices=["pinned", "default"],
                    help="pinned: flash / efficient / math only; default: torch's choice")
    ap.add_argument("--profile", action="store_true",
                    help="also run 4 steps of the first context under torch.profiler and record "
                         "the kernel table")
    ap.add_argument("--out", default="benchmarks/results/gpu_quanto_step.json")
    args = ap.parse_args(argv)
    import optimum.quanto
    import transformers

    dtype = getattr(torch, args.dtype)
    res = dict(command=" ".join(["python", *sys.argv]), torch=torch.__version__,
               cuda=torch.version.cuda, transformers=transformers.__version__,
               optimum_quanto=optimum.quanto.__version__,
               device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               cache="QuantizedCache(backend='quanto', nbits=2, q_group_size=64, residual_length=128)",
               shape=dict(batch=args.batch, q_heads=args.hq, kv_heads=args.hkv, head_dim=args.dim,
                          dtype=args.dtype), rows=[])
    for i, T in enumerate(int(x) for x in args.contexts.split(",") if x):
        row = step_times(T, args.batch, args.hq, args.hkv, args.dim, args.steps, args.device, dtype,
                         args.sdpa_backends, profile=args.profile and i == 0)
        res["rows"].append(row)
        print(f"T={T:>7}  QuantizedCache(quanto 2-bit) step: mean {row['mean_ms']:.3f} ms  "
              f"median {row['median_ms']:.3f} ms  max {row['max_ms']:.3f} ms  (update "
              f"{row.get('update_median_ms', float('nan')):.3f}, sdpa "
              f"{row.get('sdpa_median_ms', float('nan')):.3f}, host {row['host_median_ms']:.3f})",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
