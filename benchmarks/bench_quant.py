"""GPU quantise + pack throughput: the ops that write new tokens into the packed cache.

    python benchmarks/bench_quant.py --out benchmarks/results/gpu_quant.json

For a prefill-sized block (batch 8, 8 KV heads, head dim 128, fp16, many tokens) and a decode
append (one complete key group of 64 tokens), times quantize_keys, side_code, quantize_values,
the three one after another (``append_all``, as the cache ran them until session 7) and the
``quantize_kv`` op with each of its implementations forced (``quantize_kv_fused``: one kernel,
k read once; ``quantize_kv_separate``: the three kernels in one op call) with CUDA events (warm-up, median over
repetitions, 3 rotating input sets), and reports bytes over time against a device-to-device copy
measured in the same run. ``bytes``: what the op moves (inputs read + outputs written, each
once; for append_all the side code's second read of k and of the key codes counts).
``min_bytes``: what any implementation of the append has to move (k and v read once, every
output written once), the honest measure of "near bandwidth" for append_all and quantize_kv.
The way back, ``dequantize_keys`` / ``dequantize_values`` to fp16 (what the dequantised path of
longer calls runs), is timed with the default kernels and with ``HEADQ_QUANT_IMPL=old`` (the
per-element kernels, ``*_old``); their ``bytes``: packed input read + fp16 output written.
``reconstruct_keys``: the keys with the side-code correction, to fp16, in one op
(``reconstruct_keys_l1``: its kernel without the basis staged in shared memory, forced by
``HEADQ_RECON_IMPL=l1``);
``reconstruct_keys_composed``: the same from dequantize_keys (float32), dequantize_side, an
in-place batched matmul and a cast, as the cache built them just before the op (session 19;
session 18 formed the product with an einsum and added it); same bytes counted: the op's inputs
and output. ``*_into_slice``: reconstruct_keys / dequantize_values (fp16) written with ``out=``
into the first T token rows of a [B, H, T + 256, D] tensor, as the cache's ``dense_kv`` does
from session 20; ``*_then_copy``: the functional op and a copy into that slice, as before. The
same bytes counted (the op's): the copy's are what ``out=`` saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import headq_torch as hq  # noqa: E402


def timed(fn, sets, reps=50, warmup=5):
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    out = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*sets[i % len(sets)])
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda x, y: y.copy_(x), [(a, b)], reps=20)
    return 2 * a.numel() / ms / 1e6  # GB/s, read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 4096, 32768])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/gpu_quant.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_quant needs a CUDA device")
    B, H, D, r, G = a.batch, a.heads, a.dim, a.rank, 64
    basis = torch.linalg.qr(torch.randn(H, D, r, device="cuda"))[0].contiguous()
    cbw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for T in a.tokens:
        sets = [(torch.randn(B, H, T, D, device="cuda", dtype=torch.float16),
                 torch.randn(B, H, T, D, device="cuda", dtype=torch.float16)) for _ in range(3)]
        kc = hq.quantize_keys(sets[0][0], 2, G)
        n = B * H * T
        kin = n * D * 2
        kout = n * D * 2 // 8 + 2 * (n // G) * D * 2
        zout = n * r + n * 2
        vout = n * D * 2 // 8 + 2 * n * (D // 64) * 2

        def keys(k, v):
            return hq.quantize_keys(k, 2, G)

        def side(k, v):
            return hq.side_code(k, *kc, basis, 2, G, 8, False)

        def vals(k, v):
            return hq.quantize_values(v, 2, 64)

        def all3(k, v):
            c = hq.quantize_keys(k, 2, G)
            hq.side_code(k, *c, basis, 2, G, 8, False)
            hq.quantize_values(v, 2, 64)

        def fused(k, v):
            hq.quantize_kv(k, v, basis, 2, G, 8, False, 2, 64)

        t = {name: timed(fn, sets) for name, fn in
             (("quantize_keys", keys), ("side_code", side), ("quantize_values", vals),
              ("append_all", all3))}
        # quantize_kv with each implementation forced (HEADQ_KV_IMPL is read at every launch)
        for impl in ("fused", "separate"):
            os.environ["HEADQ_KV_IMPL"] = impl
            try:
                t[f"quantize_kv_{impl}"] = timed(fused, sets)
            finally:
                del os.environ["HEADQ_KV_IMPL"]
        vc = hq.quantize_values(sets[0][1], 2, 64)
        for impl in ("", "old"):
            if impl:
                os.environ["HEADQ_QUANT_IMPL"] = impl
            try:
                suffix = "_" + impl if impl else ""
                t["dequantize_keys" + suffix] = timed(
                    lambda k, v: hq.dequantize_keys(*kc, 2, G, torch.float16), sets)
                t["dequantize_values" + suffix] = timed(
                    lambda k, v: hq.dequantize_values(*vc, 2, 64, torch.float16), sets)
            finally:
                os.environ.pop("HEADQ_QUANT_IMPL", None)
        zc = hq.side_code(sets[0][0], *kc, basis, 2, G, 8, False)

        def recon(k, v):
            return hq.reconstruct_keys(*kc, *zc, basis, 2, G, 8, 1.0, torch.float16)

        def composed(k, v):
            khat = hq.dequantize_keys(*kc, 2, G, torch.float32)
            zhat = hq.dequantize_side(*zc, 8)
            u_t = basis.transpose(1, 2).unsqueeze(0).expand(B, H, -1, D)
            khat.view(B * H, T, D).baddbmm_(zhat.view(B * H, T, -1), u_t.reshape(B * H, -1, D))
            return khat.to(torch.float16)

        t["reconstruct_keys"] = timed(recon, sets)
        os.environ["HEADQ_RECON_IMPL"] = "l1"  # the kernel without the staged basis
        try:
            t["reconstruct_keys_l1"] = timed(recon, sets)
        finally:
            del os.environ["HEADQ_RECON_IMPL"]
        t["reconstruct_keys_composed"] = timed(composed, sets)
        # into a token slice of a longer tensor (what the cache's dense_kv does: the quantised
        # region's slice of the keys / values attention reads), with out= and, as until session
        # 20, the functional op then a copy into the slice
        big = torch.empty(B, H, T + 256, D, device="cuda", dtype=torch.float16)
        sl = big[:, :, :T]
        t["reconstruct_keys_into_slice"] = timed(
            lambda k, v: hq.reconstruct_keys(*kc, *zc, basis, 2, G, 8, 1.0, out=sl), sets)
        t["reconstruct_keys_then_copy"] = timed(lambda k, v: sl.copy_(recon(k, v)), sets)
        t["dequantize_values_into_slice"] = timed(
            lambda k, v: hq.dequantize_values(*vc, 2, 64, out=sl), sets)
        t["dequantize_values_then_copy"] = timed(
            lambda k, v: sl.copy_(hq.dequantize_values(*vc, 2, 64, torch.float16)), sets)
        min_bytes = 2 * kin + kout + zout + vout
        three = 2 * (kin + kout) + kin + zout + kin + vout
        by = {"quantize_keys": kin + kout, "side_code": kin + kout + zout,
              "quantize_values": kin + vout, "append_all": three,
              "quantize_kv_fused": min_bytes, "quantize_kv_separate": three}
        for suffix in ("", "_old"):
            by["dequantize_keys" + suffix] = kout + kin
            by["dequantize_values" + suffix] = vout + kin
        for name in ("reconstruct_keys", "reconstruct_keys_l1", "reconstruct_keys_composed",
                     "reconstruct_keys_into_slice", "reconstruct_keys_then_copy"):
            by[name] = kout + zout + kin
        for name in ("dequantize_values_into_slice", "dequantize_values_then_copy"):
            by[name] = vout + kin
        # the op's own choice (csrc/cuda/quant_kernels.cu fused_kv): fused while its blocks fit
        # in one wave (3 per SM)
        default = "fused" if B * H * (T // G) <= 3 * sms else "separate"
        row = dict(tokens=T, batch=B, kv_heads=H, head_dim=D, quantize_kv_default=default)
        for name in t:
            gbs = by[name] / t[name] / 1e6
            row[name] = dict(ms=t[name], bytes=by[name], gbs=gbs, fraction_of_copy=gbs / cbw)
            if name in ("append_all", "quantize_kv_fused", "quantize_kv_separate"):
                row[name].update(min_bytes=min_bytes,
                                 min_bytes_fraction_of_copy=min_bytes / t[name] / 1e6 / cbw)
        rows.append(row)
        print(f"T={T:6d} " + "  ".join(f"{k} {v['ms'] * 1e3:8.1f} us {v['gbs']:6.0f} GB/s"
                                       for k, v in row.items() if isinstance(v, dict)))
    res = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
               torch=torch.__version__, cuda=torch.version.cuda, copy_gbs=cbw, rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"copy bandwidth {cbw:.0f} GB/s; wrote {a.out}")


if __name__ == "__main__":
    main()
