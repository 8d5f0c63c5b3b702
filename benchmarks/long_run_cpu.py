"""Long CPU generation with the packaged SmolLM2 and the HeadQ cache: memory stays on the report.

Generates ``--tokens`` tokens (default 20000) one at a time with the packaged SmolLM2-135M
(``headq_torch.data.load_smollm2``), the ``"headq"`` attention function and a ``HeadQCache``
calibrated on a small slice of the packaged calibration text. Every ``--every`` tokens (and at
the end) it records:

  used_bytes        cache.memory_bytes(): bytes of the rows in use of every stored tensor
  report_bytes      cache.storage_report().bytes_per_token_all_layers x tokens: what the storage
                    report says the cache costs (bits per element x elements, every scale, zero,
                    side code, dense window and the amortised bases counted)
  allocated_bytes   sum over the HeadQ layers of layer.allocated_bytes(): the *capacity* the
                    cache holds (buffers grow by doubling, so spare rows are included)
  rss_bytes         the process resident set size (psutil)
  tokens_per_s      over the last interval

and checks, at every checkpoint:

  1. used_bytes == report_bytes (within --tol, default 0.2 %: the report is an exact count
     except for rounding of the A² keep budget; the A² policy's float32 weights are not in it,
     so use --tol 0.03 with --value-policy a2);
  2. allocated_bytes <= 2 x report_bytes + fixed: doubling growth means the capacity of every
     token-indexed buffer is below twice the rows it has ever needed (plus one key group of
     rounding); ``fixed`` is the part that does not scale with the length: the dense window
     buffers (sized by the largest window ever held, i.e. the prompt) and the bases. So the
     cache holds no memory beyond the report apart from the doubling slack;
  3. RSS growth since the first checkpoint <= allocated-bytes growth + --rss-slack-mb (default
     256 MB, for the allocator, activations and Python objects): nothing outside the cache
     grows with the length.

Results go to ``--out`` (JSON, rewritten at every checkpoint with ``"status": "running"``, then
``"done"`` or ``"failed"``) and a PNG plot of memory vs tokens next to it (``--plot``).

SmolLM2-135M has ``max_position_embeddings = 8192``. Beyond that RoPE simply extrapolates
(positions are computed on the fly); generation quality is not the point of this run, memory is.
The JSON records this.

  python benchmarks/long_run_cpu.py                                   # 20000 tokens
  python benchmarks/long_run_cpu.py --tokens 300 --every 100 --out /tmp/lr.json   # a quick check
  nohup nice -n 10 python benchmarks/long_run_cpu.py > benchmarks/results/long_run_cpu.log 2>&1 &
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


def machine(torch) -> dict:
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["tokens"] for r in rows]
    mb = 1 / 2**20
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(n, [r["report_bytes"] * mb for r in rows], "k--", label="storage report (bits/elt x elts)")
    ax.plot(n, [r["used_bytes"] * mb for r in rows], "o-", ms=3, label="cache.memory_bytes() (used rows)")
    ax.plot(n, [r["allocated_bytes"] * mb for r in rows], "s-", ms=3, label="allocated capacity (doubling)")
    ax.plot(n, [r["limit_bytes"] * mb for r in rows], ":", label="limit: 2 x report + fixed")
    ax.plot(n, [(r["rss_bytes"] - rows[0]["rss_bytes"] + rows[0]["allocated_bytes"]) * mb
                for r in rows], "^-", ms=3, label="RSS growth + first allocation")
    ax.set_xlabel("tokens in the cache")
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20000, help="tokens to generate")
    p.add_argument("--every", type=int, default=1000, help="checkpoint interval (tokens)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="prompt: the first tokens of the packaged evaluation text")
    p.add_argument("--calib-tokens", type=int, default=512)
    add_cache_args(p)
    p.add_argument("--value-policy", default="uniform", choices=("uniform", "a2"))
    p.add_argument("--value-keep-frac", type=float, default=0.0)
    p.add_argument("--sample", action="store_true",
                   help="sample (temperature 1, seeded) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance of used vs report bytes (default 0.002; 0.03 for a2)")
    p.add_argument("--rss-slack-mb", type=float, default=256.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "long_run_cpu.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    if a.tokens < 1 or a.every < 1:
        p.error("--tokens and --every must be >= 1")
    tol = a.tol if a.tol is not None else (0.03 if a.value_policy == "a2" else 0.002)
    plot_path = a.plot or os.path.splitext(a.out)[0] + ".png"

    import warnings

    import psutil
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from headq_torch import attention
    from headq_torch.cache import HeadQCache
    from headq_torch.calibration import calibrate
    from headq_torch.data import calibration_eval_split, load_smollm2

    # transformers >= 5.2x renames forward's `past_key_values` to `cache`; both accept the old one
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    hf_logging.disable_progress_bar()
    proc = psutil.Process()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.time()

    model, tok = load_smollm2()
    cfg = model.config
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    cal_text, eval_text = calibration_eval_split()
    t0 = time.time()
    cal = calibrate(model, tok, cal_text, rank=a.rank, n_tokens=a.calib_tokens,
                    chunk_len=min(256, a.calib_tokens), progress=not a.no_progress)
    calib_s = time.time() - t0
    attention.enable(model)
    cache = HeadQCache(cfg, cal, **cache_kwargs(a), value_policy=a.value_policy,
                       value_keep_frac=a.value_keep_frac)
    prompt = tok(eval_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    prompt = prompt[:, :a.prompt_tokens]
    total = prompt.shape[1] + a.tokens

    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "what": "CPU generation with SmolLM2-135M and the HeadQ cache; memory vs storage report",
        "command": " ".join([sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "machine": machine(torch),
        "started_utc": started,
        "status": "running",
        "model": {"name": getattr(cfg, "name_or_path", "smollm2"),
                  "num_layers": cfg.num_hidden_layers,
                  "num_kv_heads": cfg.num_key_value_heads,
                  "head_dim": cache.head_dim,
                  "max_position_embeddings": max_pos,
                  "attn_implementation": cfg._attn_implementation},
        "context_note": (
            f"the run reaches {total} tokens, beyond SmolLM2's max_position_embeddings="
            f"{max_pos}: RoPE extrapolates (positions computed on the fly); generation quality "
            f"past {max_pos} is not meaningful and not the point; memory is"
            if max_pos and total > max_pos else
            f"the run stays within max_position_embeddings={max_pos}"),
        "settings": {**cache.settings.as_dict(), "rank": cache.rank,
                     "calib_tokens": cal.n_tokens, "calib_seconds": round(calib_s, 1),
                     "prompt_tokens": int(prompt.shape[1]), "new_tokens": a.tokens,
                     "decoding": "sample" if a.sample else "greedy", "seed": a.seed},
        "checks": {
            "used_vs_report": f"|memory_bytes - report_bytes| <= {tol} x report_bytes",
            "capacity": "allocated_bytes <= 2 x report_bytes + fixed (window buffers + bases "
                        "+ one key group of rounding per token-indexed buffer)",
            "rss": f"rss growth since first checkpoint <= allocated growth + {a.rss_slack_mb} MB",
        },
        "rows": [],
        "failures": [],
    }

    def write():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)

    first = {}
    gen_s = [0.0]  # seconds spent generating (checkpoints excluded)

    def checkpoint(n_new: int, dt: float, dn: int) -> None:
        n = cache.get_seq_length()
        rep = cache.storage_report()
        report_bytes = rep.bytes_per_token_all_layers * n
        used = cache.memory_bytes()
        layers = cache.headq_layers
        allocated = sum(layer.allocated_bytes() for layer in layers)
        # the part of the capacity that does not scale with the length
        terms = [capacity_terms(layer, a.group_size) for layer in layers]
        fixed = sum(f for f, _ in terms)
        per_group = sum(g for _, g in terms)
        limit = 2 * report_bytes + fixed + per_group
        rss = proc.memory_info().rss
        if not first:
            first.update(rss=rss, allocated=allocated)
        row = {
            "tokens": n, "new_tokens": n_new,
            "used_bytes": used, "report_bytes": report_bytes,
            "used_over_report": used / report_bytes,
            "allocated_bytes": allocated, "allocated_over_report": allocated / report_bytes,
            "fixed_bytes": fixed, "limit_bytes": limit,
            "bits_per_element": rep.bits_per_element,
            "rss_bytes": rss, "rss_growth_bytes": rss - first["rss"],
            "tokens_per_s": dn / dt if dt > 0 else None,
            "elapsed_s": round(time.time() - t_start, 1),
        }
        fails = []
        if abs(used - report_bytes) > tol * report_bytes:
            fails.append(f"used {used} vs report {report_bytes:.0f} (tol {tol})")
        if allocated > limit:
            fails.append(f"allocated {allocated} > limit {limit:.0f}")
        if rss - first["rss"] > allocated - first["allocated"] + a.rss_slack_mb * 2**20:
            fails.append(f"rss grew {(rss - first['rss']) / 2**20:.1f} MB, cache capacity "
                         f"{(allocated - first['allocated']) / 2**20:.1f} MB")
        row["ok"] = not fails
        result["rows"].append(row)
        for msg in fails:
            result["failures"].append(f"at {n} tokens: {msg}")
        write()
        try:
            plot(result["rows"], plot_path,
                 f"SmolLM2-135M, HeadQ k{a.key_bits}/v{a.value_bits} G{a.group_size} r{a.rank}, "
                 f"{rep.bits_per_element:.2f} bits/elt")
        except Exception as e:  # the plot is a convenience; never lose the run for it
            result["plot_error"] = repr(e)

    g = torch.Generator().manual_seed(a.seed)
    bar = tqdm(total=a.tokens, unit="tok", desc="generate", disable=a.no_progress,
               mininterval=5.0)
    try:
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
            t_last, n_last = time.time(), 0
            checkpoint(0, 0.0, 0)
            for i in range(1, a.tokens + 1):
                if a.sample:
                    nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
                if not torch.isfinite(logits).all():
                    result["failures"].append(f"non-finite logits at new token {i}")
                    break
                bar.update(1)
                if i % a.every == 0 or i == a.tokens:
                    now = time.time()
                    gen_s[0] += now - t_last
                    checkpoint(i, now - t_last, i - n_last)
                    t_last, n_last = time.time(), i
                    bar.set_postfix(mem_MB=f"{result['rows'][-1]['used_bytes'] / 2**20:.1f}",
                                    tok_s=f"{result['rows'][-1]['tokens_per_s']:.1f}")
    except BaseException as e:
        result["status"] = "failed"
        result["failures"].append(f"exception: {e!r}")
        result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write()
        raise
    finally:
        bar.close()
    rows = result["rows"]
    result["status"] = "failed" if result["failures"] else "done"
    result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["wall_s"] = round(time.time() - t_start, 1)
    result["summary"] = {
        "final_tokens": rows[-1]["tokens"],
        "final_used_MiB": rows[-1]["used_bytes"] / 2**20,
        "final_report_MiB": rows[-1]["report_bytes"] / 2**20,
        "final_allocated_MiB": rows[-1]["allocated_bytes"] / 2**20,
        "max_used_over_report": max(r["used_over_report"] for r in rows),
        "max_allocated_over_report": max(r["allocated_over_report"] for r in rows[1:] or rows),
        "rss_growth_MiB": rows[-1]["rss_growth_bytes"] / 2**20,
        "mean_tokens_per_s": (rows[-1]["new_tokens"] / gen_s[0]) if gen_s[0] else None,
        "bits_per_element": rows[-1]["bits_per_element"],
    }
    result["plot"] = plot_path
    write()
    return finish(result, "ok: memory matches the storage report at every checkpoint; "
                          f"wrote {a.out}, {plot_path}")


if __name__ == "__main__":
    sys.exit(main())
