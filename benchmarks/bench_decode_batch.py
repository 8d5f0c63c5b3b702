"""Decode attention across batch sizes (GPU): the fused HeadQ kernel against dense fp16 SDPA.

bench_decode.py times #5's shape (batch 8). A single long sequence (batch 1) is what a local
user runs, and there the plan is different: with 8 (sequence, KV head) pairs the split plan cuts
each sequence into ~64 splits of one or two 256-token tiles to fill one wave of resident blocks,
so every block pays the per-block setup for little streaming and the combine merges 64 partials
per query head. This script times, for each batch and context:

  dense        torch SDPA over fp16 K / V (GQA through enable_gqa), as in bench_decode.py
  headq[m]     torch.ops.headq.decode_attention (tensor-core kernel, `fixed` configuration) with
               HEADQ_SPLIT_MIN_TILES=m: at least m tiles per split (m = 1: the full wave of
               one-tile splits where the tokens allow it; m = auto: the op's default plan,
               which halves a full wave of one- or two-tile splits, split_plan.h)

with CUDA graphs (device time, no host dispatch cost). Small shapes fit in the L2 cache (50 MB on
an H100: a batch-1 4k step reads 3 MB packed, 17 MB dense), where a real model's step finds them
evicted by the other layers' weights; so each graph cycles through enough input sets that the
bytes between two reads of the same set exceed twice the L2 size (at least --sets), one call
per set in turn (bench_decode.py's graphs repeat one set ten times, which is right for its
batch-8 shapes of 24 MB and up only). Before timing, every m is checked on a
batch-1 and a batch-2 case against the float64 reference of bench_decode.py (error at most 2x
that of the same-precision PyTorch path): a changed split plan must not change the answer.

  python benchmarks/bench_decode_batch.py --out benchmarks/results/gpu_decode_batch.json
  python benchmarks/bench_decode_batch.py --batches 1 --contexts 32768 --min-tiles 1,4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import bench_decode as bd
from _common import write_json, write_timed  # this folder is on sys.path when run as a script


def set_min_tiles(m: str) -> None:
    """HEADQ_SPLIT_MIN_TILES (read by the op at every call); "auto": unset, the op's default."""
    if m == "auto":
        os.environ.pop("HEADQ_SPLIT_MIN_TILES", None)
    else:
        os.environ["HEADQ_SPLIT_MIN_TILES"] = m


def check(min_tiles: list[str], args) -> list[str]:
    """Every min-tiles setting against the float64 reference on batch-1 / batch-2 cases."""
    fails = []
    for m in min_tiles:
        set_min_tiles(m)
        for B, T, n in [(1, 8192, None), (2, 8192, 5000), (1, 4096, 300)]:
            c = bd.Case(B=B, Hq=args.hq, H=args.hkv, D=args.dim, T=T, n=n,
                        name=f"min_tiles={m} B={B} T={T} n={n}")
            ok, msg = bd.check_case(c, seed=7 + B)
            print(("ok   " if ok else "FAIL ") + msg, flush=True)
            if not ok:
                fails.append(msg)
    set_min_tiles("auto")
    return fails


def time_cycled(fns: list, reps: int, warmup: int) -> dict:
    """Median ms per call of calls cycling through ``fns`` (one call of each in turn): CUDA
    graphs of len(fns) x ceil(20 / len(fns)) calls, replays timed with events (--timing graph),
    or events around each call in the same order (--timing events)."""
    if bd.TIMING[0] != "graph":
        return bd.time_events(fns, reps, warmup)
    for fn in fns:  # allocations and lazy init outside the capture
        fn()
    torch.cuda.synchronize()
    calls = len(fns) * -(-20 // len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return bd.time_replays([g], calls, reps, warmup)


def sets_needed(set_bytes: int, l2_bytes: int, least: int) -> int:
    """Input sets to cycle through so that 2 x L2 bytes are read between two reads of one."""
    return max(least, -(-2 * l2_bytes // max(set_bytes, 1)) + 1)


def bench(B: int, T: int, min_tiles: list[str], args, l2_bytes: int) -> dict:
    c = bd.Case(B=B, Hq=args.hq, H=args.hkv, D=args.dim, T=T, W=args.window)
    probe = bd.make_inputs(c, seed=100, keep_dense=True)
    dense_set = (probe["k_dense"].nbytes + probe["v_dense_full"].nbytes + probe["q"].nbytes
                 + probe["k_window"].nbytes + probe["v_window"].nbytes)
    packed_set = bd.packed_bytes({k: v for k, v in probe.items()
                                  if k not in ("k_dense", "v_dense_full")}, c)
    n_dense = sets_needed(dense_set, l2_bytes, args.sets)
    n_headq = sets_needed(packed_set, l2_bytes, args.sets)
    sets = [probe] + [bd.make_inputs(c, seed=100 + s, keep_dense=s < n_dense)
                      for s in range(1, max(n_dense, n_headq))]
    # dense attention over the same tokens: the context, then the window
    dense = [(s["q"], torch.cat([s.pop("k_dense"), s["k_window"]], 2),
              torch.cat([s.pop("v_dense_full"), s["v_window"]], 2)) for s in sets[:n_dense]]
    row = dict(batch=B, context=T, **bd.case_fields(c), sets_dense=n_dense, sets_headq=n_headq)
    row["dense_sdpa"] = time_cycled([lambda d=d: bd.sdpa(*d) for d in dense], args.reps,
                                    args.warmup)
    del dense
    sets = sets[:n_headq]
    bd.select("mma", "fixed")
    for m in min_tiles:
        set_min_tiles(m)
        row[f"headq_min_tiles_{m}"] = time_cycled(
            [lambda s=s: bd.headq_decode(s, c) for s in sets], args.reps, args.warmup)
    set_min_tiles("auto")
    bd.select("auto", None)
    t_dense = row["dense_sdpa"]["median_ms"]
    row["dense_bytes"] = dense_set
    row["headq_bytes"] = bd.step_bytes(sets[0], c)
    row["speedup_vs_dense"] = {m: t_dense / row[f"headq_min_tiles_{m}"]["median_ms"]
                               for m in min_tiles}
    best = min(min_tiles, key=lambda m: row[f"headq_min_tiles_{m}"]["median_ms"])
    row["best_min_tiles"] = best
    del sets
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--contexts", default="4096,16384,32768,131072")
    ap.add_argument("--min-tiles", default="auto,1,2,4,8",
                    help="HEADQ_SPLIT_MIN_TILES values to time (auto: unset, the op's default)")
    ap.add_argument("--max-tokens", type=int, default=8 * 131072,
                    help="skip (batch, context) pairs with more tokens than this in all")
    ap.add_argument("--window", type=int, default=0,
                    help="dense recent-window tokens per sequence (a cache between two flushes "
                         "holds 0 .. group - 1; dense SDPA then reads context + window tokens)")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sets", type=int, default=3,
                    help="input sets cycled through, at least (more where 2 x L2 needs them)")
    ap.add_argument("--timing", default="graph", choices=["events", "graph"])
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--lib", default=None, help="path of a built _C .so to load instead of headq_torch")
    ap.add_argument("--out", default="benchmarks/results/gpu_decode_batch.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_batch: no CUDA device", file=sys.stderr)
        return 2
    bd.load_ops(args.lib)
    bd.TIMING[0] = args.timing
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = [int(x) for x in args.batches.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    min_tiles = [x for x in args.min_tiles.split(",") if x]
    if any(m != "auto" and not m.isdigit() for m in min_tiles):
        ap.error(f"--min-tiles: expected a comma list of counts or 'auto', got {args.min_tiles!r}")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    result = dict(command="python benchmarks/bench_decode_batch.py " + " ".join(sys.argv[1:]),
                  device=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                  l2_bytes=l2,
                  torch=torch.__version__, cuda=torch.version.cuda, timing=args.timing,
                  min_tiles=min_tiles, rows=[])
    if not args.no_check:
        fails = check(min_tiles, args)
        result["check"] = "pass" if not fails else "FAIL"
        if fails:
            write_json(args.out, result)
            print("bench_decode_batch: check FAILED", file=sys.stderr)
            return 1
    print(f"device {result['device']} ({result['sm_count']} SMs, L2 {l2 >> 20} MB), timing "
          f"{args.timing}")
    print(f"x dense: with m={min_tiles[0]}")
    print(f"{'batch':>5} {'ctx':>7} {'sets':>7} {'dense ms':>9} " +
          " ".join(f"{'m=' + str(m):>8}" for m in min_tiles) + f" {'x dense':>8} {'best':>4}")
    for B in batches:
        for T in contexts:
            if B * T > args.max_tokens:
                continue
            row = bench(B, T, min_tiles, args, l2)
            result["rows"].append(row)
            ts = [row[f"headq_min_tiles_{m}"]["median_ms"] for m in min_tiles]
            sets = f"{row['sets_dense']}/{row['sets_headq']}"
            print(f"{B:>5} {T:>7} {sets:>7} {row['dense_sdpa']['median_ms']:>9.4f} " +
                  " ".join(f"{t:>8.4f}" for t in ts) +
                  f" {row['speedup_vs_dense'][min_tiles[0]]:>8.2f} {row['best_min_tiles']:>4}",
                  flush=True)
            write_timed(args.out, result, t0, quiet=True)  # partial results survive a time limit
    write_timed(args.out, result, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
