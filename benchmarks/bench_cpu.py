"""CPU decode-attention benchmark: HeadQ packed-cache decode vs dense fp32 SDPA.

DESIGN.md section 4 asks for the CPU path to be "parallel over heads and within 3x of dense
fp32 attention time at equal context". For each context T this times, on the CPU with a fixed
thread count (warm-up, then the median of --reps repetitions):

  dense       torch SDPA on float32 dense K/V, q [B, 32, 1, 128], K/V [B, 8, T, 128]; both
              enable_gqa=True and K/V repeated to 32 heads (repeat done outside the timing) are
              timed and the faster one is reported as the baseline
  headq       torch.ops.headq.decode_attention on the packed cache (2-bit keys, G=64, 8-bit
              rank-8 side code, 2-bit values, Gv=64), float32 query
  deq_sdpa    dequantise keys + values with the headq ops to float32, then SDPA (enable_gqa)

Inputs are built with the headq quantise ops from random float32 keys/values. The results are
written as JSON (command, machine, torch version, thread count, one row per context).

  python benchmarks/bench_cpu.py                       # 4096,16384,32768 -> results/cpu_decode.json
  python benchmarks/bench_cpu.py --contexts 4096 --reps 50 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ops() -> None:
    # Load the built extension directly (the .so registers torch.ops.headq), so that the
    # benchmark does not depend on the Python package's other modules.
    import glob

    libs = glob.glob(os.path.join(ROOT, "headq_torch", "_C*.so"))
    if libs:
        torch.ops.load_library(libs[0])
    else:
        import headq_torch  # noqa: F401


from _common import cpu_model, write_json  # noqa: E402


def median_ms(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def interleaved_ms(fns, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in ts]


def make_case(B, Hq, H, D, T, kb, vb, G, Gv, r, bz, seed=0):
    ops = torch.ops.headq
    g = torch.Generator().manual_seed(seed)
    # keys with a few outlier channels (as real post-RoPE keys), values plain
    chan = 1.0 + 4.0 * (torch.rand(H, 1, D, generator=g) > 0.95).float()
    k = torch.randn(B, H, T, D, generator=g) * chan
    v = torch.randn(B, H, T, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    basis = torch.linalg.qr(torch.randn(H, D, r, generator=g))[0].contiguous()
    kc = ops.quantize_keys(k, kb, G)
    zc = ops.side_code(k, *kc, basis, kb, G, bz, True)
    vc = ops.quantize_values(v, vb, Gv)
    empty = torch.zeros(B, H, 0, D)
    nq = torch.full((B,), T, dtype=torch.int32)
    nw = torch.zeros(B, dtype=torch.int32)
    args = (q, *kc, *zc, basis, *vc, None, None, None, empty, empty, nq, nw, None,
            kb, G, bz, vb, Gv, 1.0, D ** -0.5)
    return dict(q=q, k=k, v=v, kc=kc, vc=vc, args=args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096,16384,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_decode.json"))
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    load_ops()
    ops = torch.ops.headq
    B, Hq, H, D = a.batch, 32, 8, 128
    kb, vb, G, Gv, r, bz = 2, 2, 64, 64, 8, 8
    rows = []
    for T in [int(x) for x in a.contexts.split(",")]:
        c = make_case(B, Hq, H, D, T, kb, vb, G, Gv, r, bz)
        q4 = c["q"].unsqueeze(2)  # [B, Hq, 1, D]
        k, v = c["k"], c["v"]
        krep = k.repeat_interleave(Hq // H, 1).contiguous()
        vrep = v.repeat_interleave(Hq // H, 1).contiguous()
        args = c["args"]

        def dense_gqa():
            return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

        def dense_rep():
            return F.scaled_dot_product_attention(q4, krep, vrep)

        def headq():
            return ops.decode_attention(*args)

        def deq_sdpa():
            kh = ops.dequantize_keys(*c["kc"], kb, G, torch.float32)
            vh = ops.dequantize_values(*c["vc"], vb, Gv, torch.float32)
            return F.scaled_dot_product_attention(q4, kh, vh, enable_gqa=True)

        # sanity: headq (without the side-code correction it would be the dequantised path)
        out, _ = headq()
        ref = F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]
        err = (out - ref).abs().max().item()

        # The dense variants and headq are timed interleaved (one call of each per round) so
        # that load from other processes on a shared box hits all of them alike.
        t_gqa, t_rep, t_hq = interleaved_ms([dense_gqa, dense_rep, headq], a.reps, a.warmup)
        t_dq = median_ms(deq_sdpa, max(a.reps // 2, 10), 2)
        dense = min(t_gqa, t_rep)
        row = dict(context=T, batch=B, dense_ms=round(dense, 4),
                   dense_variant="enable_gqa" if t_gqa <= t_rep else "repeat_kv",
                   dense_gqa_ms=round(t_gqa, 4), dense_repeat_kv_ms=round(t_rep, 4),
                   headq_ms=round(t_hq, 4), ratio=round(t_hq / dense, 3),
                   dequant_sdpa_ms=round(t_dq, 4), max_abs_err_vs_fp32_dense=round(err, 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del c, k, v, krep, vrep, args

    res = dict(
        command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        machine=dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform()),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average_at_end=os.getloadavg(),
        config=dict(Hq=Hq, H=H, D=D, key_bits=kb, value_bits=vb, group_size=G,
                    value_group_size=Gv, side_rank=r, side_bits=bz, window=0,
                    q_dtype="float32", reps=a.reps, warmup=a.warmup, statistic="median"),
        rows=rows,
    )
    write_json(a.out, res)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
