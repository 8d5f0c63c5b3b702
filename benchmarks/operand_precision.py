"""How precise must the tensor-core operands of the decode kernel be? (CPU, no GPU.)

The fused decode kernel multiplies unpacked codes by per-group operands on the tensor cores:
keys by Q' = q * s (the query times the key group's per-channel scales, one row per query head
and 64-token key group) and values by P' = p * s_v (a token's softmax weight times its value
group's scale). Today both are fp16 hi + lo pairs (~22 significant bits); #5's targets need fewer
instructions per code, and the integer tensor cores (`mma.m16n8k32` u8 x s8, native on sm_90)
would take the codes four to a register, but then Q' and P' become fixed-point integers: two
int8 halves give a 16-bit signed integer per row (15 bits of magnitude relative to the row's
largest value), one int8 gives 7. docs/PERF.md "What would be needed next" assumed 15 bits are
enough; this script measures it against #5's accuracy rule: the kernel's error against a float64
reference at most twice that of the PyTorch reference path in the query's precision
(bench_decode.check_case).

For each case (bench_decode's inputs, made on the CPU by the library's own quantisers) it computes
the decode step in float64 with only the operands rounded, as each format would round them:

  hilo     Q' and P' as fp16 hi (the value truncated to 11 significant bits) + fp16 lo (the rest,
           rounded): today's kernel; both scaled first by the kernel's powers of two
  fp16     Q' and P' rounded to fp16 (one HMMA operand, no lo part), scaled the same way
  int<m>   Q' per (query head, key group) and P' per (query head, 64-token sub-tile) as signed
           fixed point with m bits of magnitude relative to the row's largest absolute value
           (the integer products and their int32 sums are exact)
  int<m>b  the same with the exponent from a bound made of maxima the kernel already reduces:
           Q' <= (the head's largest |q|) x (the group's largest scale), P' <= (the sub-tile's
           largest weight) x (the sub-tile's largest value scale)
  f:g      keys' operand in format f, values' in g (either may be empty: exact), to see which
           operand sets the error

Everything else (q.z, the side-code correction, the softmax, z_v sums, the window) stays float64,
so the error printed is the operand format's own: the kernel's fp32 accumulation, exp2 and output
rounding come on top, and check_case's small additive floors are left out (slightly stricter).
Codes, scales and zeros are exactly what the cache stores. Two sets: #5's format (the main set:
check-grid shape, #5's heads, a peaked softmax) and the other tensor-core formats and shapes
(4-bit codes, groups of 32 / 128, D = 64, GQA ratios 1 and 8). Results:
benchmarks/results/operand_precision.json.

    python benchmarks/operand_precision.py
    python benchmarks/operand_precision.py --formats hilo,int15,int7 --seeds 3 --json OUT
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import bench_decode as bd  # this folder is on sys.path when run as a script
from headq_torch import reference  # (importing headq_torch registers torch.ops.headq)
from _common import write_json

F64 = torch.float64


def hi11(x: torch.Tensor) -> torch.Tensor:
    """x (float64) as float32 truncated to 11 significant bits, as the kernel's hi11."""
    i = x.float().view(torch.int32) & torch.tensor(-8192, dtype=torch.int32)  # 0xFFFFE000
    return i.view(torch.float32).double()


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for x > 0, 0 where x == 0."""
    return torch.floor(torch.log2(torch.where(x > 0, x, torch.ones_like(x))))


def round_operand(x: torch.Tensor, fmt: str, row_dims: tuple[int, ...],
                  bound: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x (float64) as the tensor cores would see it in format fmt; row_dims: the dimensions one
    fixed-point exponent spans (the row of one query head and key group / sub-tile).
    factor: the power of two by which the kernel scales the row before rounding to fp16 (hilo,
    fp16: it decides which small values fall into fp16 subnormals). Formats int<m>b take the
    row's exponent from `bound`, an upper bound of |x| over the row made of maxima the kernel
    already reduces, instead of the row's largest |x|."""
    if fmt == "exact":
        return x
    if fmt in ("hilo", "fp16"):
        y = x * factor
        if fmt == "fp16":
            return y.half().double() / factor
        h = hi11(y)
        return (h + (y.float() - h.float()).half().double()) / factor
    if fmt.startswith("int"):
        m = int(fmt[3:].rstrip("b"))
        amax = x.abs().amax(dim=row_dims, keepdim=True)
        if fmt.endswith("b"):
            assert bool((bound >= amax).all()), "the bound must bound |x|"
            amax = bound
        step = torch.exp2(floor_log2(amax) + 1 - m)  # |x| < 2^(e+1) = 2^m steps: m bits of magnitude
        return torch.round(x / step).clamp(-(2 ** m) + 1, 2 ** m - 1) * step
    raise SystemExit(f"operand_precision: unknown format {fmt!r}")


def codes_of(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Unpacked codes [B, H, T, D] (float64) of packed rows [B, H, T, D * bits / 8]."""
    return reference.unpack_bits(packed, bits, D).double()


def decode_with_operands(inp: dict, c: bd.Case, fmt: str, sub: int = 64):
    """bench_decode.attention_path in float64 with Q' and P' rounded as fmt would round them.
    Returns (out [B, Hq, D], lse [B, Hq]); the fixed format only (codes for keys and values)."""
    B, H, Hq, D, T, G, Gv = c.B, c.H, c.Hq, c.D, c.T, c.G, c.Gv
    rep = Hq // H
    q = inp["q"].double()  # [B, Hq, D]
    ng = T // G
    kc = codes_of(inp["k_codes"], c.kb, D).repeat_interleave(rep, 1)      # [B, Hq, T, D]
    ks = inp["k_scale"].double().repeat_interleave(rep, 1)                # [B, Hq, ng, D]
    kz = inp["k_zero"].double().repeat_interleave(rep, 1)
    fk, fv = (fmt.split(":") + [""])[:2] if ":" in fmt else (fmt, fmt)
    fk, fv = fk or "exact", fv or "exact"
    # Q' per (head, group). Bound: the head's largest |q| times the group's largest scale (the
    # kernel has both: the head's power of two e_h, build_qfrag's group maximum). Factor as the
    # kernel's: q * 2^-e_h (|.| in [0.5, 1)) times s * 2^(14 - E), E = floor(log2(max s)).
    qmax = q.abs().amax(-1)[:, :, None, None]
    smax = ks.amax(-1, keepdim=True)
    qf = torch.exp2(14 - floor_log2(smax) - (floor_log2(qmax) + 1))
    qs = round_operand(q[:, :, None, :] * ks, fk, (3,), qmax * smax, qf)   # Q' [B, Hq, ng, D]
    logits_q = torch.einsum("bhgd,bhgtd->bhgt", qs, kc.reshape(B, Hq, ng, G, D)).reshape(B, Hq, T)
    logits_q = logits_q + torch.einsum("bhd,bhgd->bhg", q, kz).repeat_interleave(G, 2)
    if inp["z_codes"] is not None:
        zhat = bd.ops().dequantize_side(inp["z_codes"], inp["z_scale"], c.bz).double()
        qu = torch.einsum("bhd,hdr->bhr", q, inp["basis"].double().repeat_interleave(rep, 0))
        logits_q = logits_q + c.sign * torch.einsum("bhr,bhtr->bht", qu, zhat.repeat_interleave(rep, 1))
    logits_w = torch.einsum("bhd,bhwd->bhw", q, inp["k_window"].double().repeat_interleave(rep, 1))
    logits = torch.cat([logits_q, logits_w], dim=-1) * (D ** -0.5)
    logits = logits.masked_fill(~bd.visible(inp, c)[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    a = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    aq = a[..., :T]                                                        # [B, Hq, T]
    ngv = D // Gv
    vc = codes_of(inp["v_codes"], c.vb, D).repeat_interleave(rep, 1)       # [B, Hq, T, D]
    vs = inp["v_scale"].double().repeat_interleave(rep, 1)                 # [B, Hq, T, ngv]
    vz = inp["v_zero"].double().repeat_interleave(rep, 1)
    # P' per token and value group, one exponent per (head, sub-tile): the kernel's rows.
    # Bound: the sub-tile's largest weight times its largest value scale (the kernel has both:
    # the softmax's sub-tile maximum mx, the value phase's vmax). Factor as the kernel's late in
    # a long step: weights relative to the step's largest (its running maximum has reached it)
    # times 2^kv, kv = 14 - floor(log2(the largest value scale so far)) (non-increasing).
    ns = T // sub
    p = (aq[..., None] * vs).reshape(B, Hq, ns, sub, ngv)
    vsub = vs.reshape(B, Hq, ns, sub, ngv).amax((3, 4), keepdim=True)
    pb = aq.reshape(B, Hq, ns, sub).amax(-1)[..., None, None] * vsub
    amax_a = aq.amax(-1)[..., None, None, None]  # the step's largest weight
    kv = 14 - floor_log2(torch.cummax(vsub, dim=2).values)
    pf = torch.exp2(kv) / torch.where(amax_a > 0, amax_a, torch.ones_like(amax_a))
    p = round_operand(p, fv, (3, 4), pb, pf).reshape(B, Hq, T, ngv)
    out = torch.einsum("bhtg,bhtgd->bhgd", p, vc.reshape(B, Hq, T, ngv, Gv)).reshape(B, Hq, D)
    out = out + torch.einsum("bht,bhtg->bhg", aq, vz).repeat_interleave(Gv, 2)
    out = out + torch.einsum("bhw,bhwd->bhd", a[..., T:], inp["v_window"].double().repeat_interleave(rep, 1))
    return out, lse


def cases(args) -> list[tuple[bd.Case, str, str]]:
    """(case, kind, set): the main set (#5's format) and the other tensor-core formats / shapes."""
    small = dict(B=3, Hq=8, H=2, D=128, T=1024, W=48, ragged=True)
    bench = dict(B=2, Hq=32, H=8, D=128, T=args.tokens, W=0)
    out = []
    for dt, n in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        out.append((bd.Case(**small, dtype=dt, name=f"{n} check-grid shape"), "plain", "main"))
        out.append((bd.Case(**bench, dtype=dt, name=f"{n} bench shape {args.tokens}"), "plain", "main"))
        out.append((bd.Case(**bench, dtype=dt, name=f"{n} bench shape, sharp q x8"), "sharp", "main"))
    for dt, n in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for kw, name in ((dict(kb=4, vb=4, bz=4), "k4 v4 bz4"), (dict(G=32, Gv=32), "G32 Gv32"),
                         (dict(G=128, Gv=128), "G128 Gv128"), (dict(D=64), "D64"),
                         (dict(D=64, vb=4), "D64 v4"), (dict(Hq=16), "ratio 8"), (dict(Hq=2), "ratio 1")):
            out.append((bd.Case(**{**small, **kw}, dtype=dt, name=f"{n} {name}"), "plain", "other"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="hilo,fp16,fp16:,:fp16,int15,int15b,int15:,:int15,int15b:,:int15b,int11,int7")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per case of the main set")
    ap.add_argument("--other-seeds", type=int, default=2, help="seeds per case of the other formats")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the bench-shaped cases")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    fmts = args.formats.split(",")
    t0 = time.time()
    rows = []
    worst = {"main": {f: 0.0 for f in fmts}, "other": {f: 0.0 for f in fmts}}
    for c, kind, which in cases(args):
        for seed in range(args.seeds if which == "main" else args.other_seeds):
            inp = bd.make_inputs(c, seed, device="cpu")
            if kind == "sharp":  # a peaked softmax: q scaled by 8
                inp["q"] = (inp["q"].float() * 8).to(c.dtype)
            ref, ref_lse = bd.attention_path(inp, c, F64)
            base, base_lse = bd.attention_path(inp, c, c.dtype)
            exact, exact_lse = decode_with_operands(inp, c, "exact")
            berr = (base.double() - ref).abs().max().item()
            fin = torch.isfinite(ref_lse)
            lberr = (base_lse.double() - ref_lse)[fin].abs().max().item()
            # the simulation with no rounding must be the reference itself
            same = (exact - ref).abs().max().item()
            same_lse = (exact_lse - ref_lse)[fin].abs().max().item()
            assert same <= 1e-9 * max(1.0, ref.abs().max().item()) and same_lse <= 1e-9, \
                f"simulation differs from the reference: {same}, {same_lse}"
            row = {"case": c.name, "set": which, "seed": seed, "dtype": str(c.dtype).replace("torch.", ""),
                   "torch_path_out_err": berr, "torch_path_lse_err": lberr, "formats": {}}
            for f in fmts:
                out, lse = decode_with_operands(inp, c, f)
                err = (out - ref).abs().max().item()
                lerr = (lse - ref_lse)[fin].abs().max().item()
                ratio = max(err / berr, lerr / lberr)
                worst[which][f] = max(worst[which][f], ratio)
                row["formats"][f] = {"out_err": err, "lse_err": lerr, "ratio_to_torch_path": ratio}
            rows.append(row)
            print(f"{c.name:<30} seed {seed}  torch {berr:.2e} / {lberr:.2e}   " +
                  "  ".join(f"{f} {row['formats'][f]['ratio_to_torch_path']:.3f}" for f in fmts), flush=True)
    for which in ("main", "other"):
        print(f"worst error / torch path error, {which} set (the rule allows 2):  " +
              "  ".join(f"{f} {worst[which][f]:.3f}" for f in fmts))
    if args.json:
        write_json(args.json, {
            "command": "python benchmarks/operand_precision.py " + " ".join(sys.argv[1:]),
            "machine": "CPU (no GPU): float64 simulation of the operand rounding",
            "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
            "rule": "kernel error vs float64 <= 2 x that of the PyTorch path in the query dtype (out and lse)",
            "simulated": "Q' and P' rounded, scaled by the kernel's powers of two; no fp32 accumulation, exp2, "
                         "output rounding or check_case's additive floors (which make the rule slightly looser)",
            "worst_ratio": {f: round(v, 4) for f, v in worst["main"].items()},
            "worst_ratio_other_formats": {f: round(v, 4) for f, v in worst["other"].items()},
            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
