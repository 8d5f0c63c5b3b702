"""Why HeadQ at 2 bits falls short of the same-budget 3-bit quantiser on SmolLM2 (see
benchmarks/results/investigations.json): diagnostics next to the recorded quality run.

    python benchmarks/investigate.py

1. Query-energy capture: per layer, the share of the (pooled, post-RoPE) query second moment
   in its top-r eigenvectors, ``Σ_{i<=r} λ_i / Σ λ`` (query PCA) — with isotropic key error
   this is the share of the logit-error variance the side code can remove.
2. Per layer: attention KL of the base 2-bit code, HeadQ r=8 and 3-bit G=128 (from
   metrics_correlation.json, one window), and HeadQ's KL reduction.
3. A summary of the knobs tried in quality.json (rank, Fisher vs PCA basis, side bits, base
   group size, a 3-bit base) and the centring check (extra runs listed in ``EXTRA_ROWS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headq_torch import data  # noqa: E402
from headq_torch import evaluation as E  # noqa: E402

EXTRA_ROWS = [
    E.EvalRow("base 2-bit", key_bits=2, family="base"),
    E.EvalRow("dense", family="dense"),
    E.EvalRow("HeadQ pca r=8", key_bits=2, rank=8, family="headq"),
    E.EvalRow("HeadQ pca r=8 centred", key_bits=2, rank=8, center=True, family="headq"),
    E.EvalRow("HeadQ pca r=32 bz=4", key_bits=2, rank=32, side_bits=4, family="headq"),
]


def knobs(res: Path):
    """The K-only rows of quality.json, grouped by the knob they vary."""
    qpath = res / "quality.json"
    if not qpath.exists():
        return None
    rows = [r for r in json.loads(qpath.read_text())["rows"] if r["mode"] == "k_only"]
    keep = ("bits_per_element", "bits_per_element_32k", "ppl", "excess_removed_frac")
    return {r["method"]: {k: r[k] for k in keep} for r in rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary-only", action="store_true",
                   help="only (re)write the summary of the knobs in quality.json into an "
                        "existing investigations.json (no model runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = Path(args.results)
    t0 = time.time()
    if args.summary_only:
        out = json.loads((res / "investigations.json").read_text())
        out["knobs_in_quality_json"] = knobs(res)
        with open(res / "investigations.json", "w") as f:
            json.dump(out, f, indent=1)
        return
    out: dict = {"command": "python benchmarks/investigate.py " + " ".join(sys.argv[1:])}

    model, tok = data.load_smollm2()
    calib, ev = data.calibration_eval_split()
    from headq_torch.calibration import calibrate

    cal = calibrate(model, tok, calib, rank=8, n_tokens=args.calib_tokens, progress=False)
    cap = {}
    for r in (4, 8, 16, 32):
        per_layer = []
        for m in cal._moments:
            lam = torch.linalg.eigvalsh(m.qq / max(m.n_q, 1)).flip(-1)  # [H, D] descending
            per_layer.append((lam[:, :r].sum(-1) / lam.sum(-1)).tolist())
        t = torch.tensor(per_layer)
        cap[f"r={r}"] = {"mean": float(t.mean()), "min": float(t.min()),
                         "per_layer_mean_over_heads": [round(float(x), 4) for x in t.mean(1)]}
    out["query_energy_captured_by_top_r_pca"] = cap

    mpath = res / "metrics_correlation.json"
    if mpath.exists():
        pts = json.loads(mpath.read_text())["points"]
        kl = defaultdict(lambda: defaultdict(float))
        for pt in pts:
            kl[pt["config"]][pt["layer"]] += pt["attention_kl"] / 3.0
        layers = sorted(kl["2-bit G=64"])
        out["per_layer_attention_kl"] = {
            c: [float(f"{kl[c][l]:.4g}") for l in layers]
            for c in ("2-bit G=64", "HeadQ r=8", "HeadQ r=16", "3-bit G=64", "4-bit G=64")
            if c in kl}
        out["per_layer_kl_ratio_headq8_over_base"] = [
            round(kl["HeadQ r=8"][l] / max(kl["2-bit G=64"][l], 1e-30), 3) for l in layers]

    rows = EXTRA_ROWS
    bases = E.learn_row_bases(model, tok, calib, rows, n_tokens=args.calib_tokens,
                              progress=False)
    windows = E.eval_windows(tok, ev, 1024, args.eval_tokens // 1024)
    extra = E.evaluate_rows(model, windows, rows, bases, progress=False,
                            resume=str(ROOT / "out" / "investigate_runs.pt"))
    print(E.format_table(extra))
    out["extra_runs"] = {"eval_tokens": sum(w.shape[1] for w in windows),
                         "note": "the first windows of the recorded run's evaluation text",
                         "rows": [{k: r[k] for k in ("method", "center", "rank", "side_bits",
                                                     "bits_per_element", "ppl", "excess_ppl",
                                                     "excess_removed_frac")} for r in extra]}
    out["knobs_in_quality_json"] = knobs(res)
    out["seconds"] = round(time.time() - t0, 1)
    with open(res / "investigations.json", "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["query_energy_captured_by_top_r_pca"], indent=1)[:2000])


if __name__ == "__main__":
    main()
