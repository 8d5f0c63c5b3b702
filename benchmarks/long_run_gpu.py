"""Synthetic long append through a HeadQ cache layer: device memory stays on the storage report.

Appends ``--tokens`` (default 1,048,576) random keys/values ``[1, H=8, chunk, D=128]`` fp16 in
chunks of ``--chunk`` (default 4096) tokens through ``HeadQLayer.update()`` followed by
``after_attention()`` (the flush the ``"headq"`` attention function does after reading the
cache: complete groups of the dense window are quantised into the packed buffers). The cache is
built for a synthetic one-layer Llama config (32 query heads, 8 KV heads, head dim 128) with a
random orthonormal rank-``r`` basis per KV head as its calibration, and its config is marked as
using the ``"headq"`` attention function so that ``update()`` returns the window only (no dense
reconstruction).

After every ``--every`` tokens (and at the end) it records:

  report_bytes      storage_report(...).bytes_per_token_all_layers x tokens (bits per element x
                    elements; scales, zeros, side code, window and basis counted)
  used_bytes        cache.memory_bytes(): the rows in use of every stored tensor
  allocated_bytes   layer.allocated_bytes(): the capacity of the cache's buffers (doubling growth)
  device_bytes      torch.cuda.memory_allocated() - the value before the cache existed (CUDA), or
                    the process RSS growth (CPU, noisier)
  peak_bytes        torch.cuda.max_memory_allocated() - baseline (CUDA): includes the moment a
                    buffer is doubled (old + new copy alive) and the transient chunk tensors

Checks (every checkpoint): used == report (within 0.2 %); allocated <= 2 x report + fixed
(window buffers, basis, one group of rounding); device_bytes - allocated_bytes <= --slack-mb
(CUDA: nothing outside the cache's buffers stays allocated; the transient chunk and the
quantiser outputs are freed before the check). At the end, one decode step
(``ops.decode_attention``) over the full cache is timed, as a smoke test that the packed 1M-token
cache is readable.

  python benchmarks/long_run_gpu.py --out benchmarks/results/long_run_gpu.json         # CUDA, 1M
  python benchmarks/long_run_gpu.py --device cpu --tokens 20000 --out /tmp/long_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from _common import add_cache_args, cache_kwargs, capacity_terms, cpu_model, finish  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--every", type=int, default=None,
                   help="checkpoint interval in tokens (default: tokens/16, a multiple of chunk)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    add_cache_args(p)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--slack-mb", type=float, default=64.0,
                   help="allowed device memory beyond the cache's own buffers (CUDA)")
    p.add_argument("--rss-slack-mb", type=float, default=256.0,
                   help="allowed RSS growth beyond the cache's buffers (CPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "long_run_gpu.json"))
    a = p.parse_args()

    import psutil
    import torch
    from transformers import LlamaConfig

    from headq_torch import ops
    from headq_torch.cache import HeadQCache
    from headq_torch.calibration import Calibration
    from headq_torch.config import config_fingerprint

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (use --device cpu)")
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.chunk < 1 or a.tokens < 1:
        p.error("--tokens and --chunk must be >= 1")
    every = a.every or max(a.chunk, (a.tokens // 16) // a.chunk * a.chunk)
    H, D, r = a.kv_heads, a.head_dim, a.rank
    proc = psutil.Process()

    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=a.q_heads,
                      num_key_value_heads=H, head_dim=D, hidden_size=a.q_heads * D,
                      intermediate_size=4 * a.q_heads * D, vocab_size=32,
                      max_position_embeddings=a.tokens + a.chunk)
    cfg.name_or_path = "synthetic-llama-1layer"
    cfg._attn_implementation = "headq"  # update() returns the window; we flush ourselves
    g = torch.Generator().manual_seed(a.seed)
    basis = torch.linalg.qr(torch.randn(H, D, r, generator=g, dtype=torch.float64))[0].float()
    cal = Calibration([basis], model_name=cfg.name_or_path, fingerprint=config_fingerprint(cfg),
                      num_layers=1, num_kv_heads=H, head_dim=D, rank=r, method="random")

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        torch.cuda.set_device(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = proc.memory_info().rss
    cache = HeadQCache(cfg, cal, **cache_kwargs(a))
    layer = cache.headq_layers[0]
    assert cache.attention_active()

    result = {
        "what": "synthetic append through HeadQLayer.update()/after_attention(); device memory "
                "vs storage report",
        "command": " ".join([sys.executable] + sys.argv),
        "machine": {"host": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(dev) if cuda else None,
                    "platform": platform.platform()},
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "settings": {**cache.settings.as_dict(), "rank": r, "batch": 1, "kv_heads": H,
                     "q_heads": a.q_heads, "head_dim": D, "dtype": a.dtype,
                     "tokens": a.tokens, "chunk": a.chunk, "device": str(dev)},
        "rows": [],
        "failures": [],
    }

    def write():
        d = os.path.dirname(os.path.abspath(a.out))
        os.makedirs(d, exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)

    first = {}

    def checkpoint(append_s: float, dn: int):
        sync()
        n = cache.get_seq_length()
        rep = cache.storage_report()
        report = rep.bytes_per_token_all_layers * n
        used = cache.memory_bytes()
        allocated = layer.allocated_bytes()
        fixed, per_group = capacity_terms(layer, a.group_size)
        limit = 2 * report + fixed + per_group
        if cuda:
            device_bytes = torch.cuda.memory_allocated(dev) - base
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            device_bytes = proc.memory_info().rss - base
            peak = None
        if not first:
            first.update(device=device_bytes, allocated=allocated)
        row = {"tokens": n, "report_bytes": report, "used_bytes": used,
               "allocated_bytes": allocated, "limit_bytes": limit, "fixed_bytes": fixed,
               "device_bytes": device_bytes, "peak_bytes": peak,
               "used_over_report": used / report, "allocated_over_report": allocated / report,
               "device_over_report": device_bytes / report,
               "bits_per_element": rep.bits_per_element,
               "append_tokens_per_s": dn / append_s if append_s > 0 else None}
        fails = []
        if abs(used - report) > 0.002 * report:
            fails.append(f"used {used} vs report {report:.0f}")
        if allocated > limit:
            fails.append(f"allocated {allocated} > 2 x report + fixed = {limit:.0f}")
        if cuda and device_bytes - allocated > a.slack_mb * 2**20:
            fails.append(f"device memory {device_bytes} exceeds the cache's buffers "
                         f"{allocated} by more than {a.slack_mb} MB")
        if not cuda and (device_bytes - first["device"]) > (allocated - first["allocated"]) \
                + a.rss_slack_mb * 2**20:
            fails.append(f"RSS grew {(device_bytes - first['device']) / 2**20:.1f} MB, cache "
                         f"buffers {(allocated - first['allocated']) / 2**20:.1f} MB")
        row["ok"] = not fails
        result["rows"].append(row)
        result["failures"] += [f"at {n} tokens: {m}" for m in fails]
        write()
        print(f"{n:>9} tok  report {report / 2**20:9.1f} MiB  used {used / 2**20:9.1f}  "
              f"alloc {allocated / 2**20:9.1f}  device {device_bytes / 2**20:9.1f}  "
              f"{row['append_tokens_per_s'] or 0:10.0f} tok/s  {'ok' if row['ok'] else 'FAIL'}",
              flush=True)

    t_start = time.time()
    done, since, t_int = 0, 0, 0.0
    try:
        with torch.no_grad():
            while done < a.tokens:
                L = min(a.chunk, a.tokens - done)
                k = torch.randn(1, L, H, D, device=dev, dtype=dtype).transpose(1, 2)
                v = torch.randn(1, L, H, D, device=dev, dtype=dtype).transpose(1, 2)
                sync()
                t0 = time.time()
                kw, vw = layer.update(k, v)
                assert getattr(kw, "_headq_layer", None) is layer
                layer.after_attention()
                sync()
                t_int += time.time() - t0
                del k, v, kw, vw
                done += L
                since += L
                if since >= every or done == a.tokens:
                    checkpoint(t_int, since)
                    since, t_int = 0, 0.0
            # one decode step over the whole cache
            s, b = layer.s, layer.buf
            q = torch.randn(1, a.q_heads, D, device=dev, dtype=dtype)
            nq = torch.tensor([layer.n_quant], dtype=torch.int32, device=dev)
            nw = torch.tensor([layer.n_window], dtype=torch.int32, device=dev)
            args = (q, b["k_codes"], b["k_scale"], b["k_zero"], b["z_codes"], b["z_scale"],
                    layer.basis, b.get("v_codes"), b.get("v_scale"), b.get("v_zero"),
                    b.get("v_dense"), None, None, b["k_window"], b["v_window"], nq, nw, None,
                    s.key_bits, s.group_size, s.side_bits, s.value_bits, s.value_group_size,
                    1.0, D ** -0.5)
            out, lse = ops.decode_attention(*args)  # warm-up
            sync()
            t0 = time.time()
            reps = 5
            for _ in range(reps):
                out, lse = ops.decode_attention(*args)
            sync()
            result["decode_step_ms"] = (time.time() - t0) / reps * 1e3
            result["decode_finite"] = bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
            if not result["decode_finite"]:
                result["failures"].append("decode over the full cache gave non-finite output")
    except BaseException as e:
        result["status"] = "failed"
        result["failures"].append(f"exception: {e!r}")
        write()
        raise
    rows = result["rows"]
    result["wall_s"] = round(time.time() - t_start, 1)
    result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["status"] = "failed" if result["failures"] else "done"
    result["summary"] = {
        "tokens": rows[-1]["tokens"],
        "report_MiB": rows[-1]["report_bytes"] / 2**20,
        "used_MiB": rows[-1]["used_bytes"] / 2**20,
        "allocated_MiB": rows[-1]["allocated_bytes"] / 2**20,
        "device_MiB": rows[-1]["device_bytes"] / 2**20,
        "peak_MiB": None if rows[-1]["peak_bytes"] is None else rows[-1]["peak_bytes"] / 2**20,
        "bits_per_element": rows[-1]["bits_per_element"],
        "fp16_dense_MiB": rows[-1]["tokens"] * H * D * 2 * 2 / 2**20,
        "decode_step_ms": result.get("decode_step_ms"),
    }
    write()
    return finish(result, f"ok; wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
