"""The 'residual' query basis against query PCA on the packaged SmolLM2 (K-only, 2-bit keys in
groups of 64 tokens, dense values): the perplexity rows of quality.json's setting (same
calibration split and tokens, same evaluation windows) for ranks 4, 8 and 16 with each basis,
and, per layer and KV head, the share of the pair logit error ``tr(Σ_q Σ_e)`` that each
basis leaves (``headq_torch.calibration.residual_objective``); and rank 8 fitted on fewer
calibration tokens (``--calib-size-check``); and quality.json's best full-KV row (2-bit
values + the A² policy at 3.5 bits) with either basis.

    python benchmarks/residual_basis.py            # ~13 min on 2 cores

Writes benchmarks/results/residual_basis.json and residual_basis.png. The PCA rows repeat
quality.json's (same calibration and windows): a check that the two runs agree. Finished
(row, window) runs are kept in out/residual_basis_runs.pt, so an interrupted run resumes
(``eval_seconds`` then counts only the runs it did).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headq_torch import data  # noqa: E402
from headq_torch import evaluation as E  # noqa: E402
from headq_torch.calibration import calibrate, residual_objective  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import machine  # noqa: E402


def objective_shares(cal, bases: dict, rank: int) -> dict:
    """Per layer (mean over KV heads) and overall: the share of tr(Σ_q Σ_e) that a side code
    on each basis (``bases[(name, rank)]``, per layer) leaves."""
    out = {"pca": [], "residual": []}
    for i, m in enumerate(cal._moments):
        sq, se = m.qq / max(m.n_q, 1), m.residual_covariance()
        tot = torch.einsum("hij,hji->h", sq, se)
        for name in out:
            u = bases[(name, rank)][i]
            out[name].append((residual_objective(u, sq, se) / tot).tolist())
    return {name: {"mean": round(float(torch.tensor(v).mean()), 4),
                   "per_layer_mean_over_heads": [round(float(torch.tensor(x).mean()), 4)
                                                 for x in v]}
            for name, v in out.items()}


def plot(rows: list[dict], path: Path, baselines: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for basis, marker, dy in (("pca", "o", -12), ("residual", "s", 5)):
        pts = sorted((r["bits_per_element"], r["excess_removed_frac"] * 100, r["rank"])
                     for r in rows if r.get("basis") == basis and r["rank"]
                     and r["mode"] == "k_only")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                label=f"HeadQ, {basis} basis")
        for x, y, r in pts:
            ax.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=(4, dy),
                        fontsize=8)
    for i, b in enumerate(baselines):
        ax.plot(b["bits_per_element"], b["excess_removed_frac"] * 100, "x", color="grey",
                label="plain quantisers (quality.json)" if i == 0 else None)
        ax.annotate(b["method"], (b["bits_per_element"], b["excess_removed_frac"] * 100),
                    textcoords="offset points", xytext=(4, -12), fontsize=8, color="grey")
    ax.axhline(85, color="grey", ls=":", lw=1, label="DESIGN target (85%)")
    ax.set_xlabel("key bits per element (everything counted)")
    ax.set_ylabel("excess perplexity of base 2-bit removed (%)")
    ax.set_title("SmolLM2-135M, K-only 2-bit G=64: query basis")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--calib-size-check", type=int, nargs="*", default=[1024, 2048, 4096],
                   help="also fit rank 8 on these fewer calibration tokens (same evaluation)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", default=str(ROOT / "out" / "residual_basis_runs.pt"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    Path(args.resume).parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/residual_basis.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    model, tok = data.load_smollm2()
    calib, ev = data.calibration_eval_split()
    fit_ranks = sorted({*args.ranks, 8})  # the full-KV rows below are rank 8
    cal = calibrate(model, tok, calib, rank=max(fit_ranks), n_tokens=args.calib_tokens,
                    key_bits=2, group_size=64)
    bases = {("pca", r): cal.with_bases("pca", r).bases for r in fit_ranks}
    print(f"calibrated on {cal.n_tokens} tokens; fitting the residual bases", flush=True)
    for r in fit_ranks:
        bases[("residual", r)] = cal.with_bases("residual", r).bases
    shares = {f"r={r}": objective_shares(cal, bases, r) for r in args.ranks}
    for k, v in shares.items():
        print(f"{k}: pair logit error left, pca {v['pca']['mean']:.4f}, "
              f"residual {v['residual']['mean']:.4f}", flush=True)
    rows = [E.EvalRow("dense", family="dense"),
            E.EvalRow("base 2-bit", key_bits=2, family="base")]
    for basis in ("pca", "residual"):
        rows += [E.EvalRow(f"HeadQ {basis} r={r}", key_bits=2, rank=r, basis=basis,
                           family="headq") for r in args.ranks]
    # full KV at 3.5 bits: quality.json's best row (2-bit values + A², 3% kept), either basis
    keep = E.value_keep_frac_for(64, 2, 2, target_value_group_size=32)
    rows += [E.EvalRow("dense", mode="full_kv", family="dense"),
             E.EvalRow("base 2-bit K+V", mode="full_kv", key_bits=2, value_bits=2,
                       family="base")]
    rows += [E.EvalRow(f"HeadQ {basis} r=8 + 2-bit V + A² f={keep:.3f}", mode="full_kv",
                       key_bits=2, rank=8, basis=basis, value_bits=2, value_policy="a2",
                       value_keep_frac=keep, family="a2") for basis in ("pca", "residual")]
    windows = E.eval_windows(tok, ev, args.window, args.eval_tokens // args.window)
    t1 = time.time()
    out = E.evaluate_rows(model, windows, rows, bases, resume=args.resume)
    table = E.format_table(out)
    print(table)
    # Rank 8 fitted on fewer calibration tokens, same windows (no resume file: its runs are
    # keyed by row and window, not by the bases); excess against this run's dense / base rows.
    by = {r["method"]: r for r in out if r["mode"] == "k_only"}
    size_check = []
    for n in args.calib_size_check:
        c = calibrate(model, tok, calib, rank=8, n_tokens=n, key_bits=2, group_size=64,
                      progress=False)
        b = {("pca", 8): c.bases, ("residual", 8): c.with_bases("residual").bases}
        rr = [E.EvalRow(f"HeadQ {m} r=8", key_bits=2, rank=8, basis=m, family="headq")
              for m in ("pca", "residual")]
        got = E.evaluate_rows(model, windows, rr, b, progress=False)
        E._add_excess([by["dense"], by["base 2-bit"], *got])
        for r in got:
            size_check.append({"calib_tokens": c.n_tokens, "method": r["method"],
                               "ppl": r["ppl"], "excess_removed_frac": r["excess_removed_frac"]})
            print(f"calibration {c.n_tokens:5d} tokens: {r['method']:18s} ppl {r['ppl']:.4f} "
                  f"removed {100 * r['excess_removed_frac']:.1f}%", flush=True)
    doc = {"command": command,
           "model": "SmolLM2-135M-Instruct (packaged GGUF Q4_1, run in fp32; 30 layers, 9 query "
                    "/ 3 KV heads, head dim 64)",
           "text": "gensim's lee_background.cor: articles 0-99 calibrate, articles 100- evaluate "
                   "(headq_torch.data.calibration_eval_split), as in quality.json",
           "window": args.window, "n_windows": len(windows),
           "eval_tokens": sum(w.shape[1] for w in windows), "calib_tokens": cal.n_tokens,
           "machine": machine(), "seconds": round(time.time() - t0, 1),
           "eval_seconds": round(time.time() - t1, 1),
           "notes": ("K-only rows (values dense), each window an empty cache, residual_length 0, "
                     "as quality.json. 'residual': the orthonormal basis that minimises "
                     "tr((I-P) Σ_q (I-P) Σ_e), Σ_e the covariance of the 2-bit G=64 key "
                     "residuals of the calibration keys (headq_torch.calibration). "
                     "pair_logit_error_left: that objective over tr(Σ_q Σ_e), per layer the "
                     "mean over KV heads, from the calibration moments. "
                     "calibration_size_check: rank 8 with both bases calibrated on the first N "
                     "tokens of the same calibration text, evaluated on the same windows."),
           "pair_logit_error_left": shares, "table": table.splitlines(), "rows": out,
           "calibration_size_check": size_check}
    with open(res_dir / "residual_basis.json", "w") as f:
        json.dump(doc, f, indent=1)
    qpath = res_dir / "quality.json"
    baselines = [] if not qpath.exists() else [
        r for r in json.loads(qpath.read_text())["rows"]
        if r["mode"] == "k_only" and r.get("family") == "baseline"
        and r["bits_per_element"] <= 5.5]
    plot(out, res_dir / "residual_basis.png", baselines)
    print(f"done in {time.time() - t0:.0f} s; results in {res_dir}")


if __name__ == "__main__":
    main()
