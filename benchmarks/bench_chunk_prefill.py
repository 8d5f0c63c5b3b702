"""A call over already quantised tokens (a second turn, a chunk of a chunked prefill): the
materialised row blocks (``attention._prefill_rows``: float32 logits over the dequantised keys,
one softmax for the output and the A² weights; an A² cache's path on the CPU; until session 15
every such call's, with the logits from the corrected_logits op) against the dequantised path
(``attention._prefill_dequantised``: the quantised region dequantised once, then SDPA, with A²
the a2_weights op).

A prompt of ``--context`` tokens is prefilled (untimed), then one call of ``--chunk`` tokens is
timed, for each cache policy and path, alternating the paths ``--reps`` times with a fresh cache
each time. The model is the packaged SmolLM2-135M (``--model smollm2``, float32, CPU or CUDA)
or the random Llama-3-8B-shaped model of bench_e2e (``--model llama8b``, bf16, CUDA; ``--layers``
of its 32). Random orthonormal bases (speed does not depend on them). The chunk's logits of the
two paths are compared (max abs difference recorded).

    python benchmarks/bench_chunk_prefill.py --device cpu --out benchmarks/results/cpu_chunk_prefill.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings

import torch

from _common import cpu_model, median_ms, write_json
from headq_torch import attention
from headq_torch.cache import HeadQCache
from headq_torch.calibration import Calibration
from headq_torch.config import config_fingerprint, model_geometry


def random_bases(model, rank: int) -> Calibration:
    n_layers, _, n_kv, D = model_geometry(model.config)
    g = torch.Generator().manual_seed(1)
    bases = [torch.linalg.qr(torch.randn(n_kv, D, rank, generator=g))[0].to(model.device)
             for _ in range(n_layers)]
    return Calibration(bases, model_name=model.config.name_or_path or "model",
                       fingerprint=config_fingerprint(model.config), num_layers=n_layers,
                       num_kv_heads=n_kv, head_dim=D, rank=rank, method="random")


def load(name: str, device: str, layers: int):
    if name == "smollm2":
        from headq_torch.data import load_smollm2

        model = load_smollm2()[0].to(device)
    else:
        from bench_e2e import build_model

        model = build_model(layers, device)
    return attention.enable(model)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run(model, cal, ids, context: int, policy: str, dequantised: bool, device: str):
    """Prefill ``ids[:, :context]``, then time the call with the rest: ``(seconds, logits)``."""
    kw = dict(key_bits=2, value_bits=2, group_size=64, value_group_size=64)
    if policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=0.03)
    attention._dense_prefill = (lambda layer, q: layer.n_quant > 0) if dequantised else \
        (lambda layer, q: False)
    cache = HeadQCache(model.config, cal, **kw)
    model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    t0 = time.perf_counter()
    out = model(ids[:, context:], past_key_values=cache, use_cache=True).logits
    sync(device)
    return time.perf_counter() - t0, out.float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b"])
    ap.add_argument("--layers", type=int, default=8, help="llama8b: layers of its 32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--policies", default="uniform,a2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    model = load(args.model, args.device, args.layers)
    cal = random_bases(model, 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context + args.chunk),
                        generator=g).to(args.device)
    real = attention._dense_prefill
    rows = []
    try:
        for policy in args.policies.split(","):
            times = {"rows": [], "dequantised": []}
            outs = {}
            for rep in range(args.reps + 1):  # the first round warms up, untimed
                for path in times:
                    s, outs[path] = run(model, cal, ids, args.context, policy,
                                        path == "dequantised", args.device)
                    if rep:
                        times[path].append(s * 1000)
                    print(f"{policy} {path} rep {rep}: {s * 1000:.1f} ms", flush=True)
            row = dict(policy=policy, rows_ms=round(median_ms(times["rows"]), 2),
                       dequantised_ms=round(median_ms(times["dequantised"]), 2),
                       rows_all_ms=[round(t, 2) for t in times["rows"]],
                       dequantised_all_ms=[round(t, 2) for t in times["dequantised"]],
                       logits_max_abs_diff=(outs["rows"] - outs["dequantised"]).abs().max().item())
            row["speedup"] = round(row["rows_ms"] / row["dequantised_ms"], 2)
            print(row, flush=True)
            rows.append(row)
    finally:
        attention._dense_prefill = real
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    result = dict(
        command=" ".join(["python"] + sys.argv), machine=machine, torch=torch.__version__,
        python=platform.python_version(),
        shape=dict(model=args.model, batch=args.batch, context=args.context, chunk=args.chunk,
                   format="2-bit keys (groups of 64 tokens) + rank-8 side code, 2-bit values "
                          "(groups of 64 channels); a2: 3% kept"),
        unit="ms for the one call of --chunk tokens over the prefilled context (median of --reps)",
        rows=rows,
    )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
