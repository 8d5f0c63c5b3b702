"""The recorded quality run: the full perplexity table on the packaged SmolLM2 with >= 8k
evaluation tokens, and the metrics experiment (metrics vs attention KL).

    python benchmarks/quality.py                      # the recorded run (~40-60 min on 2 cores)
    python benchmarks/quality.py --eval-tokens 2048   # a shorter look

Writes (to --results, default benchmarks/results/):
    quality.json               every row of the table + the command, text, model, machine
    quality.png                perplexity vs bits per element (K-only and full-KV panels)
    metrics_correlation.json   Spearman rank correlations of each metric with attention KL
                               (layer x KV head x configuration) with the number of points,
                               and every point
    metrics_scatter.png        the scatter plots
Finished (row, window) runs are kept in out/quality_runs.pt, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headq_torch import data  # noqa: E402
from headq_torch import evaluation as E  # noqa: E402


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--metrics-tokens", type=int, default=512)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", default=str(ROOT / "out" / "quality_runs.pt"))
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--worker", action="store_true",
                   help="only fill the resume file (rows in reverse order) to help another "
                        "run of this script; writes no results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    Path(args.resume).parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    t0 = time.time()
    model, tok = data.load_smollm2()
    n_layers, n_heads, n_kv, D = E._geometry(model)
    calib, ev = data.calibration_eval_split()
    text = (f"{data.packaged_text_path().name} from gensim's test data: articles 0-99 "
            "calibrate, articles 100- evaluate (headq_torch.data.calibration_eval_split)")
    rows = E.default_rows(ranks=args.ranks, head_dim=D)
    mcfgs = E.metric_configs()
    bases = E.learn_row_bases(model, tok, calib, rows + mcfgs, n_tokens=args.calib_tokens)
    windows = E.eval_windows(tok, ev, args.window, args.eval_tokens // args.window)
    meta = {"command": command, "model": "SmolLM2-135M-Instruct (packaged GGUF Q4_1, run in "
            "fp32; 30 layers, 9 query / 3 KV heads, head dim 64)", "text": text,
            "window": args.window, "n_windows": len(windows),
            "eval_tokens": sum(w.shape[1] for w in windows),
            "calib_tokens": bases.get("_n_tokens"), "machine": machine()}
    if args.worker:
        E.evaluate_rows(model, windows, rows, bases, resume=args.resume, reverse=True)
        return
    if not args.skip_table:
        t1 = time.time()
        out = E.evaluate_rows(model, windows, rows, bases, resume=args.resume)
        table = E.format_table(out)
        print(table)
        doc = dict(meta)
        doc.update({
            "scored_tokens": out[0]["n_tokens"],
            "seconds": round(time.time() - t1, 1),
            "notes": ("Perplexity with the cache as decoding reads it (one-pass simulation, "
                      "proven equal to token-by-token decode in tests/test_evaluation.py); each "
                      "window starts an empty cache, residual_length 0. bits_per_element: keys "
                      "only for k_only rows (values dense in all of them), keys+values for "
                      "full_kv rows; storage_report at the window length with the bases "
                      "amortised over it; bits_per_element_32k at 32768 tokens. "
                      "excess_removed_frac = 1 - excess/excess of the base 2-bit quantiser of "
                      "the same mode (keys 2-bit G=64; full_kv: also 2-bit values)."),
            "table": table.splitlines(),
            "rows": out,
        })
        with open(res_dir / "quality.json", "w") as f:
            json.dump(doc, f, indent=1)
        E.plot_rows(out, res_dir / "quality.png")
    if not args.skip_metrics:
        t1 = time.time()
        ids = windows[0][:, :args.metrics_tokens]
        mx = E.metrics_experiment(model, ids, mcfgs, bases)
        doc = dict(meta)
        doc.update({"seconds": round(time.time() - t1, 1), "metrics_tokens": ids.shape[1],
                    "configs": [c.method for c in mcfgs],
                    "notes": ("One window, captured densely; per layer x KV head x "
                              "configuration the metrics are averaged over the queries that "
                              "read at least one quantised key (all queries for the "
                              "perturbation controls). Key metrics are correlated with "
                              "attention KL over the key configurations; D_V and value MSE "
                              "with the attention-output error over the value "
                              "configurations (keys dense, attention fixed). The "
                              "'quantisers_only' entries leave out the shift/noise controls."),
                    "correlations": mx["correlations"], "points": mx["points"]})
        with open(res_dir / "metrics_correlation.json", "w") as f:
            json.dump(doc, f, indent=1)
        E.plot_metrics(mx["points"], res_dir / "metrics_scatter.png")
        for name, c in mx["correlations"].items():
            print(f"spearman {name:48} rho={c['rho']:+.3f} n={c['n']}")
    print(f"done in {time.time() - t0:.0f} s; results in {res_dir}")


if __name__ == "__main__":
    main()
