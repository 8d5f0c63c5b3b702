"""Decode-attention benchmark (GPU): fused HeadQ kernel vs dense fp16 SDPA vs dequantise + SDPA.

For each context length it times, with CUDA events (warm-up, then median / p10 / p90 over many
repetitions, rotating over several input sets so that the 60 MB L2 does not hold the cache):

  dense      torch SDPA over fp16 K/V (GQA through enable_gqa)
  deq_sdpa   dequantise keys + values to fp16 with the headq ops, then SDPA (what transformers'
             QuantizedCache does every step)
  headq      torch.ops.headq.decode_attention on the packed cache (2-bit K + side code + 2-bit V)

and reports bytes read by the fused kernel, its achieved GB/s, the device-to-device copy
bandwidth measured in the same run (bytes read + written), the fraction of it, and the speedup.

--check first runs a correctness grid (dtypes, bits, dense values, window, heavy slots,
kv_start, GQA ratios, head dim 64) and the benchmark shape at the smallest context: the fused
output is compared with a float64 reference (dequantise with the ops, float64 softmax
attention); the check fails (exit 1) if the kernel's max error exceeds 2x the error of the
same-precision PyTorch path (plus a tiny absolute floor for float32). Each case's errors (the
kernel's and the PyTorch path's, out and lse) go into the result JSON as `check_cases`;
--check-only writes them (without timings) only to an --out given explicitly.

Only torch.ops.headq.* is used (importing headq_torch registers the ops; --lib loads a built
extension directly).

--impl picks the CUDA split kernel through HEADQ_DECODE_IMPL (read by the op at every call):
auto (tensor-core kernel where supported, the default), mma (same), simt (SIMT kernel forced),
or both: the check grid runs once per kernel and the timing table gets a row for each.

  python benchmarks/bench_decode.py --check
  python benchmarks/bench_decode.py --check --impl both --contexts 4096,32768
  python benchmarks/bench_decode.py --contexts 4096,16384,32768,131072 --out benchmarks/results/gpu_decode.json

--heavy-frac F adds F x context heavy slots per (sequence, KV head) to the timed shape (the A²
value policy's kept tokens: heavy_idx / heavy_delta), e.g. --heavy-frac 0.03 --timing graph.

--variants base,ring4,ring5,lean,fixed runs the check grid and the timings once per configuration of the
tensor-core kernel (HEADQ_MMA_VARIANT, read by the op at every call; see decode_mma.cu) for the
mma / auto impls; rows are labelled impl:variant. Any failing case of any variant fails the run.

  python benchmarks/bench_decode.py --check --impl mma --variants base,ring4,ring5

--capacity 2 gives the buffers twice the context's capacity with the context's tokens valid (a
cache grown by doubling, or with a reserved capacity): the step should cost what the length
costs, not what the capacity would.

  python benchmarks/bench_decode.py --impl mma --variants fixed --capacity 2 --contexts 32768

--pdl both times every configuration also with plain launches (HEADQ_PDL=0; rows +nopdl): on
sm_90+ the window splits and the combine are programmatic dependent launches by default.

  python benchmarks/bench_decode.py --impl mma --variants fixed --pdl both --window 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _common import write_timed  # this folder is on sys.path when run as a script


def load_ops(lib: str | None) -> None:
    if lib:
        torch.ops.load_library(lib)
        return
    try:
        import headq_torch  # noqa: F401  (registers torch.ops.headq)
    except ImportError:
        import headq_torch._C  # noqa: F401


def ops():
    return torch.ops.headq


def set_impl(impl: str) -> None:
    """Select the CUDA decode split kernel (HEADQ_DECODE_IMPL, read by the op at every call)."""
    if impl == "auto":
        os.environ.pop("HEADQ_DECODE_IMPL", None)
    else:
        os.environ["HEADQ_DECODE_IMPL"] = impl


def impls_of(arg: str) -> list[str]:
    return ["simt", "mma"] if arg == "both" else [arg]


VARIANTS: list[str] = []  # --variants (empty: the op's default configuration)


def set_variant(variant: str | None) -> None:
    """Select the tensor-core kernel configuration (HEADQ_MMA_VARIANT, read at every call)."""
    if variant is None:
        os.environ.pop("HEADQ_MMA_VARIANT", None)
    else:
        os.environ["HEADQ_MMA_VARIANT"] = variant


PDL_MODES: list[str] = ["on"]  # --pdl: programmatic dependent launch of window splits + combine


def set_pdl(mode: str) -> None:
    """HEADQ_PDL (read by the op at every call): on = the op's default, off = plain launches."""
    if mode == "off":
        os.environ["HEADQ_PDL"] = "0"
    else:
        os.environ.pop("HEADQ_PDL", None)


def runs_of(arg: str) -> list[tuple[str, str | None, str, str]]:
    """(impl, variant, pdl mode, label) of every kernel configuration to check and time; with
    --pdl both each configuration also runs with plain launches (label suffix "+nopdl")."""
    out = []
    for impl in impls_of(arg):
        if impl != "simt" and VARIANTS:
            base = [(impl, v, f"{impl}:{v}") for v in VARIANTS]
        else:
            base = [(impl, None, impl)]
        for mode in PDL_MODES:
            sfx = "+nopdl" if mode == "off" else ""
            out += [(i, v, mode, lb + sfx) for i, v, lb in base]
    return out


def select(impl: str, variant: str | None, pdl: str = "on") -> None:
    set_impl(impl)
    set_variant(variant)
    set_pdl(pdl)


# ----------------------------------------------------------------------------------- inputs ---
@dataclass
class Case:
    B: int = 8
    Hq: int = 32
    H: int = 8
    D: int = 128
    T: int = 4096  # capacity of the quantised region (multiple of G)
    n: int | None = None  # valid quantised tokens per sequence (None: T, the whole capacity)
    W: int = 0  # window capacity
    kb: int = 2
    vb: int = 2
    r: int = 8
    bz: int = 8
    G: int = 64
    Gv: int = 64
    dtype: torch.dtype = torch.float16
    side: bool = True
    values: str = "codes"  # or "dense"
    heavy: int = 0  # heavy slots per (b, h)
    ragged: bool = False  # per-sequence n_quant / n_window / kv_start
    sign: float = 1.0
    name: str = ""


def make_inputs(c: Case, seed: int, device: str = "cuda", keep_dense: bool = False) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(device=device, dtype=torch.float32)
    B, H, Hq, D, T, W = c.B, c.H, c.Hq, c.D, c.T, c.W
    # keys with a few outlier channels (as real post-RoPE keys), values plain
    chan = 1.0 + 4.0 * (torch.rand(H, 1, D, generator=g, **f32) > 0.95).float()
    k = (torch.randn(B, H, T, D, generator=g, **f32) * chan).to(c.dtype)
    v = torch.randn(B, H, T, D, generator=g, **f32).to(c.dtype)
    q = torch.randn(B, Hq, D, generator=g, **f32).to(c.dtype)
    inp = dict(q=q)
    u8 = dict(device=device, dtype=torch.uint8)
    f16 = dict(device=device, dtype=torch.float16)
    if T > 0:
        inp["k_codes"], inp["k_scale"], inp["k_zero"] = ops().quantize_keys(k, c.kb, c.G)
    else:  # empty quantised region (the quantisers need T >= 1)
        inp["k_codes"] = torch.empty(B, H, 0, D * c.kb // 8, **u8)
        inp["k_scale"] = torch.empty(B, H, 0, D, **f16)
        inp["k_zero"] = torch.empty(B, H, 0, D, **f16)
    if c.side:
        basis = torch.linalg.qr(torch.randn(H, D, c.r, generator=g, **f32))[0].contiguous()
        if T > 0:
            inp["z_codes"], inp["z_scale"] = ops().side_code(
                k, inp["k_codes"], inp["k_scale"], inp["k_zero"], basis, c.kb, c.G, c.bz, True)
        else:
            inp["z_codes"] = torch.empty(B, H, 0, c.r * c.bz // 8, **u8)
            inp["z_scale"] = torch.empty(B, H, 0, **f16)
        inp["basis"] = basis
    else:
        inp["z_codes"] = inp["z_scale"] = inp["basis"] = None
    if c.values == "codes":
        if T > 0:
            inp["v_codes"], inp["v_scale"], inp["v_zero"] = ops().quantize_values(v, c.vb, c.Gv)
        else:
            inp["v_codes"] = torch.empty(B, H, 0, D * c.vb // 8, **u8)
            inp["v_scale"] = torch.empty(B, H, 0, D // c.Gv, **f16)
            inp["v_zero"] = torch.empty(B, H, 0, D // c.Gv, **f16)
        inp["v_dense"] = None
    else:
        inp["v_codes"] = inp["v_scale"] = inp["v_zero"] = None
        inp["v_dense"] = v
    if c.ragged:
        nq = torch.randint(max(T // 2, 0), T + 1, (B,), generator=g, device=device)
        nq[0] = T
        nw = torch.randint(0, W + 1, (B,), generator=g, device=device)
        ks = torch.randint(0, 64, (B,), generator=g, device=device)
        ks[0] = 0
        inp["kv_start"] = ks.to(torch.int32)
    else:
        nq = torch.full((B,), T if c.n is None else c.n, device=device)
        nw = torch.full((B,), W, device=device)
        inp["kv_start"] = None
    inp["n_quant"] = nq.to(torch.int32)
    inp["n_window"] = nw.to(torch.int32)
    inp["k_window"] = torch.randn(B, H, W, D, generator=g, **f32).to(c.dtype)
    inp["v_window"] = torch.randn(B, H, W, D, generator=g, **f32).to(c.dtype)
    if c.heavy > 0 and T > 0:
        idx = torch.randint(0, T, (B, H, c.heavy), generator=g, device=device)
        idx[..., -1] = -1  # an empty slot
        vhat = dequant_values(inp, c, torch.float32)
        safe = idx.clamp(min=0)
        gather = lambda x: torch.gather(x, 2, safe[..., None].expand(B, H, c.heavy, D))
        delta = (gather(v.float()) - gather(vhat)).to(c.dtype)
        inp["heavy_delta"], inp["heavy_idx"] = delta, idx.to(torch.int32)
    else:
        inp["heavy_delta"] = inp["heavy_idx"] = None
    if keep_dense:
        inp["k_dense"], inp["v_dense_full"] = k, v
    return inp


def dequant_values(inp: dict, c: Case, dtype: torch.dtype) -> torch.Tensor:
    if c.T == 0:
        return torch.zeros(c.B, c.H, 0, c.D, device=inp["q"].device, dtype=dtype)
    if inp["v_codes"] is None:
        return inp["v_dense"].to(dtype)
    return ops().dequantize_values(inp["v_codes"], inp["v_scale"], inp["v_zero"], c.vb, c.Gv, dtype)


def headq_decode(inp: dict, c: Case):
    return ops().decode_attention(
        inp["q"], inp["k_codes"], inp["k_scale"], inp["k_zero"], inp["z_codes"], inp["z_scale"],
        inp["basis"], inp["v_codes"], inp["v_scale"], inp["v_zero"], inp["v_dense"],
        inp["heavy_delta"], inp["heavy_idx"], inp["k_window"], inp["v_window"], inp["n_quant"],
        inp["n_window"], inp["kv_start"], c.kb, c.G, c.bz, c.vb, c.Gv, c.sign, c.D ** -0.5)


def packed_bytes(inp: dict, c: Case | None = None) -> int:
    """Bytes of the inputs the fused kernel reads; with ``c.n`` set, of the valid rows only."""
    names = ["q", "k_codes", "k_scale", "k_zero", "z_codes", "z_scale", "basis", "v_codes",
             "v_scale", "v_zero", "v_dense", "heavy_delta", "heavy_idx", "k_window", "v_window"]
    per_token = {"k_codes", "k_scale", "k_zero", "z_codes", "z_scale", "v_codes", "v_scale",
                 "v_zero", "v_dense"}
    frac = 1.0 if c is None or c.n is None or c.T == 0 else c.n / c.T
    return int(sum(inp[n].numel() * inp[n].element_size() * (frac if n in per_token else 1.0)
                   for n in names if inp.get(n) is not None))


def step_bytes(inp: dict, c: Case) -> int:
    """Bytes one decode step moves: what the fused kernel reads (packed_bytes) + out and lse."""
    return packed_bytes(inp, c) + c.B * c.Hq * c.D * 2 + c.B * c.Hq * 4


def case_fields(c: Case) -> dict:
    """A timed row's description of the case's heads and cache format."""
    return dict(q_heads=c.Hq, kv_heads=c.H, head_dim=c.D, key_bits=c.kb, value_bits=c.vb,
                rank=c.r, side_bits=c.bz, group=c.G, value_group=c.Gv, window=c.W)


# ----------------------------------------------------------------------------- reference ---
def visible(inp: dict, c: Case) -> torch.Tensor:
    """[B, T + W] bool: the quantised tokens t < n_quant and window tokens w < n_window a
    sequence's decode step sees, all at or after kv_start (LAYOUT.md)."""
    dev = inp["q"].device
    nq = inp["n_quant"].long().clamp(0, c.T)
    nw = inp["n_window"].long().clamp(0, c.W)
    ks = inp["kv_start"].long() if inp["kv_start"] is not None else torch.zeros_like(nq)
    tq = torch.arange(c.T, device=dev)
    tw = torch.arange(c.W, device=dev)
    vis_q = (tq[None] < nq[:, None]) & (tq[None] >= ks[:, None])
    vis_w = (tw[None] < nw[:, None]) & (tw[None] + nq[:, None] >= ks[:, None])
    return torch.cat([vis_q, vis_w], dim=-1)


def attention_path(inp: dict, c: Case, dtype: torch.dtype):
    """Decode attention of LAYOUT.md computed with PyTorch ops in `dtype` (float64: reference).

    Returns (out [B, Hq, D], lse [B, Hq])."""
    B, H, Hq, D, T = c.B, c.H, c.Hq, c.D, c.T
    rep = Hq // H
    dev = inp["q"].device
    dq = torch.float32 if dtype == torch.float64 else dtype  # the ops' output dtype
    q = inp["q"].to(dtype)
    if T > 0:
        khat = ops().dequantize_keys(inp["k_codes"], inp["k_scale"], inp["k_zero"], c.kb, c.G, dq)
    else:
        khat = torch.zeros(B, H, 0, D, device=dev, dtype=dq)
    khat = khat.to(dtype).repeat_interleave(rep, 1)  # [B, Hq, T, D]
    logits_q = torch.einsum("bhd,bhtd->bht", q, khat)
    if inp["z_codes"] is not None and T > 0:
        zhat = ops().dequantize_side(inp["z_codes"], inp["z_scale"], c.bz).to(dtype)
        qu = torch.einsum("bhd,hdr->bhr", q, inp["basis"].to(dtype).repeat_interleave(rep, 0))
        logits_q = logits_q + c.sign * torch.einsum("bhr,bhtr->bht", qu, zhat.repeat_interleave(rep, 1))
    logits_w = torch.einsum("bhd,bhwd->bhw", q, inp["k_window"].to(dtype).repeat_interleave(rep, 1))
    logits = torch.cat([logits_q, logits_w], dim=-1) * (D ** -0.5)
    nq = inp["n_quant"].long().clamp(0, T)
    logits = logits.masked_fill(~visible(inp, c)[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits.float() if dtype != torch.float64 else logits, dim=-1)
    a = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all masked -> zeros
    vhat = dequant_values(inp, c, dq).to(dtype).repeat_interleave(rep, 1)
    vw = inp["v_window"].to(dtype).repeat_interleave(rep, 1)
    out = torch.einsum("bht,bhtd->bhd", a[..., :T], vhat) + torch.einsum("bhw,bhwd->bhd", a[..., T:], vw)
    if inp["heavy_idx"] is not None:
        idx = inp["heavy_idx"].long().repeat_interleave(rep, 1)  # [B, Hq, K]
        ok = (idx >= 0) & (idx < nq[:, None, None])
        aw = torch.gather(a[..., :T], 2, idx.clamp(min=0)) * ok
        out = out + torch.einsum("bhk,bhkd->bhd", aw, inp["heavy_delta"].to(dtype).repeat_interleave(rep, 1))
    return out, lse


LSE_FLOOR = 1e-5  # absolute slack of the lse comparison (float32 logsumexp)
CHECK_RULE = (f"out err <= 2 x torch_out_err + out_floor and lse err <= 2 x torch_lse_err + "
              f"{LSE_FLOOR:g} (errors: max abs against the float64 path; torch: the PyTorch path "
              f"in the query's dtype)")


def check_case(c: Case, seed: int = 0, records: list | None = None) -> tuple[bool, str]:
    """One case of the accuracy rule; with `records`, its errors are appended to it as a dict."""
    inp = make_inputs(c, seed)
    out, lse = headq_decode(inp, c)
    ref, ref_lse = attention_path(inp, c, torch.float64)
    base, base_lse = attention_path(inp, c, c.dtype)
    err = (out.double() - ref).abs().max().item()
    berr = (base.double() - ref).abs().max().item()
    floor = 4e-6 * max(1.0, ref.abs().max().item())  # float32: exp2f / summation-order noise
    fin = torch.isfinite(ref_lse)
    lerr = (lse.double() - ref_lse)[fin].abs().max().item() if fin.any() else 0.0
    lberr = (base_lse.double() - ref_lse)[fin].abs().max().item() if fin.any() else 0.0
    inf_ok = bool(torch.equal(torch.isfinite(lse), fin))
    ok = (err <= 2 * berr + floor and lerr <= 2 * lberr + LSE_FLOOR and inf_ok
          and out.dtype == c.dtype and tuple(out.shape) == (c.B, c.Hq, c.D))
    msg = (f"{c.name:<28} out err {err:.3e} (torch {c.dtype} {berr:.3e})  "
           f"lse err {lerr:.3e} (torch {lberr:.3e})  {'ok' if ok else 'FAIL'}")
    if records is not None:
        records.append(dict(case=c.name, seed=seed, out_err=err, torch_out_err=berr, out_floor=floor,
                            lse_err=lerr, torch_lse_err=lberr, ok=ok))
    return ok, msg


def check_grid(contexts: list[int], args, records: list | None = None) -> bool:
    """The accuracy grid; with `records`, one dict per run and case (check_case's) is appended,
    with the run's label."""
    small = dict(B=3, Hq=8, H=2, D=128, T=1024, W=48, ragged=True)
    cases = [
        Case(**small, name="fp16 k2 v2 r8"),
        Case(**small, dtype=torch.bfloat16, name="bf16 k2 v2"),
        Case(**small, dtype=torch.float32, name="fp32 k2 v2"),
        Case(**small, kb=3, vb=3, name="k3 v3"),
        Case(**small, kb=4, vb=4, bz=4, name="k4 v4 bz4"),
        Case(**small, kb=8, vb=8, r=16, name="k8 v8 r16"),
        Case(**small, values="dense", name="dense values"),
        Case(**small, values="dense", dtype=torch.bfloat16, side=False, name="dense bf16 no side"),
        Case(**small, heavy=6, name="heavy slots"),
        Case(**small, sign=-1.0, name="wrong sign"),
        Case(**small, G=32, Gv=32, name="G32 Gv32"),
        Case(**small, G=128, Gv=128, name="G128 Gv=D"),
        Case(**{**small, "D": 64}, name="D64"),
        Case(**{**small, "D": 64}, kb=3, vb=4, name="D64 k3 v4"),
        Case(**{**small, "Hq": 2}, name="MHA ratio 1"),
        Case(**{**small, "Hq": 6}, name="ratio 3 (padded)"),
        Case(**{**small, "Hq": 16}, name="ratio 8"),
        Case(**{**small, "Hq": 24}, name="ratio 12 (chunked)"),
        Case(**{**small, "T": 0}, name="window only"),
        Case(**{**small, "W": 0}, name="no window"),
        Case(**{**small, "T": 8192}, heavy=4, name="8k ragged heavy"),
        Case(**{**small, "T": 8192}, heavy=300, name="8k ragged 300 heavy"),
        Case(**{**small, "T": 16384}, heavy=2500, name="16k ragged 2500 heavy"),
        Case(B=args.batch, Hq=args.hq, H=args.hkv, D=args.dim, T=contexts[0], W=0,
             kb=args.key_bits, vb=args.value_bits, r=args.rank, bz=args.side_bits, G=args.group,
             Gv=args.value_group, name=f"bench shape {contexts[0]}"),
        Case(B=args.batch, Hq=args.hq, H=args.hkv, D=args.dim, T=2 * contexts[0],
             n=contexts[0] - 3 * args.group // 2, W=0, kb=args.key_bits, vb=args.value_bits,
             r=args.rank, bz=args.side_bits, G=args.group, Gv=args.value_group,
             name="bench shape, 2x capacity"),
    ]
    all_ok = True
    failed = []
    for impl, variant, pdl, label in runs_of(args.impl):
        select(impl, variant, pdl)
        for c in cases:
            rec: list = []
            ok, msg = check_case(c, records=rec)
            if records is not None:
                records.extend(dict(run=label, **r) for r in rec)
            print(f"[{label}] {msg}", flush=True)
            all_ok &= ok
            if not ok:
                failed.append(f"{label}: {c.name}")
    select(args.impl if args.impl != "both" else "auto", None)
    if failed:
        print("bench_decode: FAILED cases: " + "; ".join(failed), file=sys.stderr, flush=True)
    return all_ok


# ----------------------------------------------------------------------------------- timing ---
TIMING = ["events"]  # --timing: "events" around each call, or "graph" (CUDA graphs of calls)
GRAPH_CALLS = 10  # calls captured per CUDA graph in graph timing


def time_fn(fns: list, reps: int, warmup: int) -> dict:
    """fns: one closure per input set; rep i runs fns[i % len(fns)].

    events: CUDA events around each call, calls issued back to back from Python (the GPU time
    when the GPU is the bottleneck; at short contexts the host's launch cost can show through).
    graph: each closure captured GRAPH_CALLS times into one CUDA graph, replays timed with events
    and divided by GRAPH_CALLS (device time including the gaps between the op's kernels, without
    the host's dispatch cost)."""
    if TIMING[0] == "graph":
        return time_graph(fns, reps, warmup)
    return time_events(fns, reps, warmup)


def time_events(fns: list, reps: int, warmup: int) -> dict:
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
    return dict(median_ms=statistics.median(ms), p10_ms=q(0.1), p90_ms=q(0.9))


def time_graph(fns: list, reps: int, warmup: int) -> dict:
    graphs = []
    for fn in fns:
        for _ in range(max(warmup, 2)):  # allocations and lazy init happen outside the capture
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(GRAPH_CALLS):
                fn()
        graphs.append(g)
    return time_replays(graphs, GRAPH_CALLS, reps, warmup)


def time_replays(graphs: list, calls: int, reps: int, warmup: int) -> dict:
    """Replays of the captured ``graphs`` in turn (each ``calls`` calls), timed with events after
    a few warm-up replays: median / p10 / p90 ms per call."""
    for i in range(max(warmup // GRAPH_CALLS, 2)):
        graphs[i % len(graphs)].replay()
    torch.cuda.synchronize()
    n = max(reps // GRAPH_CALLS, 5)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        graphs[i % len(graphs)].replay()
        ends[i].record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) / calls for s, e in zip(starts, ends))
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
    return dict(median_ms=statistics.median(ms), p10_ms=q(0.1), p90_ms=q(0.9), timing="graph",
                calls_per_graph=calls, replays=n)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    # always events: captured into a graph, the copy becomes a memcpy node on a copy engine
    # (~2.7 TB/s measured) instead of the copy kernel
    t = time_events([lambda: dst.copy_(src)], reps, 3)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9  # GB/s, read + write


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def bench_context(T: int, args, copy_gbs: float) -> dict:
    # --capacity: buffers of capacity x T tokens holding T valid ones (a cache that has grown)
    cap = -(-int(T * args.capacity) // args.group) * args.group
    c = Case(B=args.batch, Hq=args.hq, H=args.hkv, D=args.dim, T=cap, n=T if cap != T else None,
             W=args.window, kb=args.key_bits, vb=args.value_bits, r=args.rank, bz=args.side_bits,
             G=args.group, Gv=args.value_group, heavy=int(args.heavy_frac * T))
    sets = [make_inputs(c, seed=100 + s, keep_dense=True) for s in range(args.sets)]
    dense = [(s["q"], s["k_dense"][:, :, :T], s["v_dense_full"][:, :, :T]) for s in sets]
    for s in sets:  # keep only what each path reads
        s.pop("k_dense"), s.pop("v_dense_full")
    row = dict(context=T, batch=c.B, **case_fields(c), capacity=cap, heavy_slots=c.heavy)
    row["dense_sdpa"] = time_fn([lambda d=d: sdpa(*d) for d in dense], args.reps, args.warmup)

    def deq_sdpa(s):
        kh = ops().dequantize_keys(s["k_codes"], s["k_scale"], s["k_zero"], c.kb, c.G, c.dtype)
        vh = ops().dequantize_values(s["v_codes"], s["v_scale"], s["v_zero"], c.vb, c.Gv, c.dtype)
        return sdpa(s["q"], kh, vh)

    if cap == T:  # (dequantise + SDPA over the valid rows only would need copies: not timed)
        row["deq_sdpa"] = time_fn([lambda s=s: deq_sdpa(s) for s in sets],
                                  max(args.reps // 2, 5), 2)
    for impl, variant, pdl, label in runs_of(args.impl):
        select(impl, variant, pdl)
        row[f"headq_{label}"] = time_fn([lambda s=s: headq_decode(s, c) for s in sets], args.reps,
                                        args.warmup)
    select(args.impl if args.impl != "both" else "auto", None)
    labels = [label for *_, label in runs_of(args.impl)]
    if VARIANTS:  # summary columns: the fastest configuration
        row["headq_best"] = min(labels, key=lambda lb: row[f"headq_{lb}"]["median_ms"])
        row["headq"] = row[f"headq_{row['headq_best']}"]
    else:
        row["headq"] = row[f"headq_{labels[-1]}"]
    nbytes = step_bytes(sets[0], c)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense[0])
    t = row["headq"]["median_ms"] * 1e-3
    row["headq_bytes"] = nbytes
    row["headq_bytes_per_token_per_kv_head"] = nbytes / (c.B * c.H * max(T, 1))
    row["headq_gbs"] = nbytes / t / 1e9
    row["copy_gbs"] = copy_gbs
    row["fraction_of_copy_bw"] = row["headq_gbs"] / copy_gbs
    row["dense_bytes"] = dense_bytes
    row["dense_gbs"] = dense_bytes / (row["dense_sdpa"]["median_ms"] * 1e-3) / 1e9
    row["speedup_vs_dense"] = row["dense_sdpa"]["median_ms"] / row["headq"]["median_ms"]
    if "deq_sdpa" in row:
        row["speedup_vs_deq_sdpa"] = row["deq_sdpa"]["median_ms"] / row["headq"]["median_ms"]
    del sets, dense
    torch.cuda.empty_cache()
    return row


DEFAULT_OUT = "benchmarks/results/gpu_decode.json"  # a timing run's result (the recorded table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,16384,32768,131072")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--key-bits", type=int, default=2)
    ap.add_argument("--value-bits", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--side-bits", type=int, default=8)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--value-group", type=int, default=64)
    ap.add_argument("--window", type=int, default=0, help="dense window tokens per sequence")
    ap.add_argument("--heavy-frac", type=float, default=0.0,
                    help="A² value policy: kept-token slots per (sequence, KV head) as a fraction "
                         "of the context (e.g. 0.03 keeps 3%%)")
    ap.add_argument("--capacity", type=float, default=1.0,
                    help="buffer capacity as a multiple of the context (the context's tokens "
                         "valid, the rest spare: a cache grown by doubling, or reserved)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sets", type=int, default=3, help="input sets rotated between repetitions")
    ap.add_argument("--check", action="store_true", help="run the correctness grid first; exit 1 on failure")
    ap.add_argument("--check-only", action="store_true", help="only the correctness grid")
    ap.add_argument("--impl", default="auto", choices=["auto", "mma", "simt", "both"],
                    help="decode split kernel (HEADQ_DECODE_IMPL); both: check and time each")
    ap.add_argument("--variants", default="",
                    help="comma list of tensor-core kernel configurations (HEADQ_MMA_VARIANT: "
                         "base, ring4, ring5, lean, fixed, default) to check and time one after another")
    ap.add_argument("--pdl", default="on", choices=["on", "off", "both"],
                    help="programmatic dependent launch of the window splits and the combine "
                         "(HEADQ_PDL; sm_90+): on (the op's default), off, or both (rows +nopdl)")
    ap.add_argument("--timing", default="events", choices=["events", "graph"],
                    help="events around each call (default), or CUDA graphs of %d calls (device "
                         "time without the host's dispatch cost)" % GRAPH_CALLS)
    ap.add_argument("--lib", default=None, help="path of a built _C .so to load instead of headq_torch")
    ap.add_argument("--out", default=None,
                    help=f"result JSON (default {DEFAULT_OUT}); a --check-only "
                         "run or a failed check writes the grid's per-case errors only here, "
                         "only when given")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device", file=sys.stderr)
        return 2
    load_ops(args.lib)
    TIMING[0] = args.timing
    VARIANTS[:] = [v for v in args.variants.split(",") if v]
    PDL_MODES[:] = ["on", "off"] if args.pdl == "both" else [args.pdl]
    torch.backends.cuda.matmul.allow_tf32 = False
    contexts = [int(x) for x in args.contexts.split(",") if x]
    t_start = time.time()

    result = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, cuda=torch.version.cuda, timing=args.timing, rows=[])
    if args.check or args.check_only:
        result["check_rule"] = CHECK_RULE
        result["check_cases"] = []
        ok = check_grid(contexts, args, result["check_cases"])
        result["check"] = "pass" if ok else "FAIL"
        if args.out and (not ok or args.check_only):  # the per-case errors, without timings
            write_timed(args.out, result, t_start)
        if not ok:
            print("bench_decode: check FAILED", file=sys.stderr)
            return 1
        if args.check_only:
            return 0

    copy_gbs = copy_bandwidth()
    print(f"device {result['device']}  copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    hdr = (f"{'ctx':>12} {'dense ms':>9} {'deq+sdpa':>9} {'headq ms':>9} {'p10':>7} {'p90':>7} "
           f"{'MB read':>8} {'GB/s':>6} {'of copy':>7} {'x dense':>7} {'x deq':>6}")
    print(hdr)
    for T in contexts:
        row = bench_context(T, args, copy_gbs)
        result["rows"].append(row)
        runs = runs_of(args.impl)
        for *_, lb in runs:
            h = row[f"headq_{lb}"]
            t = h["median_ms"]
            gbs = row["headq_bytes"] / (t * 1e-3) / 1e9
            label = f"{T}" if len(runs) == 1 else f"{T}:{lb}"
            deq = row["deq_sdpa"]["median_ms"] if "deq_sdpa" in row else float("nan")
            print(f"{label:>12} {row['dense_sdpa']['median_ms']:>9.4f} {deq:>9.4f} "
                  f"{t:>9.4f} {h['p10_ms']:>7.4f} {h['p90_ms']:>7.4f} "
                  f"{row['headq_bytes'] / 1e6:>8.1f} {gbs:>6.0f} "
                  f"{gbs / copy_gbs:>7.2f} {row['dense_sdpa']['median_ms'] / t:>7.2f} "
                  f"{deq / t:>6.2f}", flush=True)
    result["copy_gbs"] = copy_gbs
    write_timed(args.out or DEFAULT_OUT, result, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
