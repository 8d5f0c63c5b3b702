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
of its 32). Random orthonormal bases (speed does not depend on them). The chunk's logits of each
path are compared with the first path's (max abs difference recorded).

A third path, ``decode_rows`` (``attention._prefill_decode_rows``: the decode op with the call's
query rows as its query heads and ``query_tokens``, causal over the call's own tokens; what the
library uses for calls of a few tokens, ``attention.DECODE_ROWS_MAX_TOKENS``), and the dense
``DynamicCache`` as a reference (``dynamic``), are timed with ``--paths``; several ``--chunk``
sizes (comma-separated) give the crossover (``--chunk 1`` times a decode step, the same fused op
on every HeadQ path). ``dequantised_masked`` is the dequantised path with transformers' masked
SDPA (the keys and values repeated per query head) where CUDA now runs PyTorch's flash kernel
with its causal mask aligned with the last key (``attention._attention_with_lse``): the path as
it was until session 18, and as it still is on the CPU and in float32. ``--padded N`` left-pads
the first sequence by ``N`` tokens (an attention mask for both calls):

    python benchmarks/bench_chunk_prefill.py --device cpu --out benchmarks/results/cpu_chunk_prefill.json
    python benchmarks/bench_chunk_prefill.py --device cpu --chunk 2,4,8,16 \
        --paths dequantised,decode_rows,rows --out benchmarks/results/cpu_few_rows.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings

import torch

from _common import cpu_model, median_ms, write_json
from transformers import DynamicCache

from headq_torch import attention, ops
from headq_torch.cache import HeadQCache, HeadQLayer
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


PATHS = ("rows", "dequantised", "dequantised_masked", "dequantised_old_kernels",
         "dequantised_copies", "dequantised_full_weights", "dequantised_packed_copies",
         "decode_rows", "dynamic")
_PACKED_OPS = ("dequantize_keys", "dequantize_values", "reconstruct_keys")
_OPS = {name: getattr(ops, name) for name in _PACKED_OPS}
_ATTENTION_WITH_LSE = attention._attention_with_lse
_KEPT_WINDOW_WEIGHTS = attention._a2_kept_window_weights
_DENSE_KV = HeadQLayer.dense_kv


def _dense_kv_copies(self, out_dtype=None):
    """HeadQLayer.dense_kv as until session 20: the functional ops over blocks of the quantised
    region (256 MB of float32 each), every block then copied into its token slice of the keys
    and values attention reads (now the ops write there directly, ``out=``)."""
    dt = self.dtype if out_dtype is None else out_dtype
    nq, nw, G = self.n_quant, self.n_window, self.s.group_size
    k = torch.empty(self.B, self.H, nq + nw, self.D, dtype=dt, device=self.device)
    v = torch.empty_like(k)
    k[:, :, nq:] = self.buf["k_window"][:, :, :nw]
    v[:, :, nq:] = self.buf["v_window"][:, :, :nw]
    step = max(G, (256 << 20) // max(1, 4 * self.B * self.H * self.D) // G * G)
    for t0 in range(0, nq, step):
        t1 = min(nq, t0 + step)
        k[:, :, t0:t1] = self.quantised_keys(dt, t0, t1)
        v[:, :, t0:t1] = self.quantised_values(dt, t0, t1)
    return k, v


def _lse_prompts_only(module, query, key, *args, **kwargs):
    """attention._attention_with_lse as it was until session 18: first prompts only."""
    if query.shape[2] < key.shape[2]:
        return None
    return _ATTENTION_WITH_LSE(module, query, key, *args, **kwargs)


def use_path(path: str) -> None:
    """Route calls over quantised tokens through one path (attention's two predicates).
    ``dequantised_masked``: the dequantised path with transformers' masked SDPA (repeat_kv)
    instead of the flash kernel, as every such call ran until session 18 (what the CPU and
    float32 still use). ``dequantised_old_kernels``: the dequantised path with the per-element
    dequantise kernels (``HEADQ_QUANT_IMPL=old``, read at every launch), as until session 19.
    ``dequantised_copies``: the dequantised path with ``dense_kv`` as until session 20 (blocks
    dequantised by the functional ops, then copied into the keys / values).
    ``dequantised_full_weights``: with A², the a2_weights key pass over every key of the call
    (the weights of all quantised tokens, of which the cache uses the kept ones), as until
    session 21 (now over the kept tokens' keys and the window, ``_a2_kept_window_weights``).
    ``dequantised_packed_copies``: the dequantised path with every packed input of the three
    dequantising ops copied contiguous first, as until session 20 (the ops now read a token
    slice of the cache's buffers in place); it matters once the buffers have grown past the
    length (``--pre-calls``)."""
    attention._dense_prefill = (lambda layer, q: layer.n_quant > 0) \
        if path.startswith("dequantised") else (lambda layer, q: False)
    attention._attention_with_lse = _lse_prompts_only if path == "dequantised_masked" \
        else _ATTENTION_WITH_LSE
    attention.DECODE_ROWS_MAX_TOKENS = {"cpu": 1 << 30, "cuda": 1 << 30} \
        if path == "decode_rows" else {}
    HeadQLayer.dense_kv = _dense_kv_copies if path == "dequantised_copies" else _DENSE_KV
    attention._a2_kept_window_weights = (lambda *a: None) \
        if path == "dequantised_full_weights" else _KEPT_WINDOW_WEIGHTS
    for name, op in _OPS.items():
        setattr(ops, name, _contiguous_inputs(op) if path == "dequantised_packed_copies" else op)
    if path == "dequantised_old_kernels":
        os.environ["HEADQ_QUANT_IMPL"] = "old"
    else:
        os.environ.pop("HEADQ_QUANT_IMPL", None)


def _contiguous_inputs(op):
    """``op`` with its tensor arguments (the packed inputs; the basis is contiguous already)
    copied contiguous first."""
    return lambda *a, **kw: op(*[x.contiguous() if isinstance(x, torch.Tensor) else x
                                 for x in a], **kw)


@contextlib.contextmanager
def paths_restored():
    """Restore what :func:`use_path` replaces in ``attention`` when the block ends."""
    saved = attention._dense_prefill, attention.DECODE_ROWS_MAX_TOKENS, \
        attention._attention_with_lse, HeadQLayer.dense_kv, attention._a2_kept_window_weights
    saved_ops = {name: getattr(ops, name) for name in _PACKED_OPS}
    impl = os.environ.get("HEADQ_QUANT_IMPL")
    try:
        yield
    finally:
        attention._dense_prefill, attention.DECODE_ROWS_MAX_TOKENS, \
            attention._attention_with_lse, HeadQLayer.dense_kv, \
            attention._a2_kept_window_weights = saved
        for name, op in saved_ops.items():
            setattr(ops, name, op)
        if impl is None:
            os.environ.pop("HEADQ_QUANT_IMPL", None)
        else:
            os.environ["HEADQ_QUANT_IMPL"] = impl


@torch.no_grad()
def run(model, cal, ids, context: int, policy: str, path: str, device: str, mask=None,
        pre_calls: int = 0):
    """Prefill ``ids[:, :context]``, then time the call with the rest: ``(seconds, logits,
    cache)``; ``mask`` (``[B, context + chunk]``): the attention mask of both calls (left
    padding). ``pre_calls``: untimed calls of the same tokens between the two (each with the
    earlier ones in the cache; the first grows the cache's buffers past the length)."""
    kw = dict(key_bits=2, value_bits=2, group_size=64, value_group_size=64)
    if policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=0.03)
    use_path(path)
    cache = DynamicCache(config=model.config) if path == "dynamic" else \
        HeadQCache(model.config, cal, **kw)
    first = {} if mask is None else dict(attention_mask=mask[:, :context])
    model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1, **first)
    # a later call's mask: the cached tokens' (the padding among the first ``context``), then
    # the call's own
    later = lambda: {} if mask is None else dict(attention_mask=torch.cat(  # noqa: E731
        [mask[:, :context], mask[:, context:].new_ones(
            (mask.shape[0], cache.get_seq_length() - context)), mask[:, context:]], 1))
    for _ in range(pre_calls):
        model(ids[:, context:], past_key_values=cache, use_cache=True, logits_to_keep=1,
              **later())
    sync(device)
    t0 = time.perf_counter()
    second = later()
    out = model(ids[:, context:], past_key_values=cache, use_cache=True, **second).logits
    sync(device)
    return time.perf_counter() - t0, out.float(), cache


def a2_state_diff(got, want) -> dict:
    """How far two A² caches' state after the call differs: the largest relative difference of
    the kept tokens' and the window's weights over the layers, and whether every layer kept
    the same tokens."""
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa
    w, same = 0.0, True
    for lg, lw in zip(got.layers, want.layers):
        w = max(w, rel(lg.buf["w_window"], lw.buf["w_window"]))
        if lw.heavy_idx is not None:
            w = max(w, rel(lg.heavy_w, lw.heavy_w))
            same = same and torch.equal(lg.heavy_idx, lw.heavy_idx)
    return dict(a2_weights_max_rel_diff=w, a2_same_kept_tokens=same)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b"])
    ap.add_argument("--layers", type=int, default=8, help="llama8b: layers of its 32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", default="256", help="tokens of the timed call; several: 2,4,8")
    ap.add_argument("--policies", default="uniform,a2")
    ap.add_argument("--paths", default="rows,dequantised", help=f"of {','.join(PATHS)}")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--padded", type=int, default=0,
                    help="left-padding tokens of the first sequence (an attention mask)")
    ap.add_argument("--pre-calls", type=int, default=0,
                    help="untimed calls of the chunk's tokens before the timed one (the "
                         "cache's buffers then have grown past the length)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS) or len(paths) < 2:
        sys.exit(f"--paths: two or more of {PATHS}")
    chunks = [int(c) for c in args.chunk.split(",")]
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    model = load(args.model, args.device, args.layers)
    cal = random_bases(model, 8)
    g = torch.Generator().manual_seed(0)
    if not 0 <= args.padded < args.context:
        sys.exit("--padded: 0 or more tokens, fewer than --context")
    rows = []
    with paths_restored():
        for chunk in chunks:
            ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context + chunk),
                                generator=g).to(args.device)
            mask = None
            if args.padded:
                mask = torch.ones_like(ids)
                mask[0, :args.padded] = 0
            for policy in args.policies.split(","):
                times = {path: [] for path in paths}
                outs, caches = {}, {}
                for rep in range(args.reps + 1):  # the first round warms up, untimed
                    for path in paths:
                        s, outs[path], caches[path] = run(model, cal, ids, args.context,
                                                          policy, path, args.device, mask,
                                                          args.pre_calls)
                        if rep:
                            times[path].append(s * 1000)
                        print(f"chunk {chunk} {policy} {path} rep {rep}: {s * 1000:.1f} ms",
                              flush=True)
                row = dict(policy=policy, chunk=chunk)
                for path in paths:
                    row[f"{path}_ms"] = round(median_ms(times[path]), 2)
                    row[f"{path}_all_ms"] = [round(t, 2) for t in times[path]]
                base = paths[0]
                row["logits_max_abs"] = outs[base].abs().max().item()
                for path in paths[1:]:
                    row[f"{path}_logits_max_abs_diff"] = \
                        (outs[path] - outs[base]).abs().max().item()
                    row[f"speedup_{path}_vs_{base}"] = round(row[f"{base}_ms"] /
                                                             row[f"{path}_ms"], 2)
                    if policy == "a2" and "dynamic" not in (path, base):
                        row.update({f"{path}_{k}": v for k, v in
                                    a2_state_diff(caches[path], caches[base]).items()})
                print(row, flush=True)
                rows.append(row)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    result = dict(
        command=" ".join(["python"] + sys.argv), machine=machine, torch=torch.__version__,
        cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"),
        python=platform.python_version(),
        shape=dict(model=args.model, batch=args.batch, context=args.context, chunks=chunks,
                   left_padding_of_first_sequence=args.padded, pre_calls=args.pre_calls,
                   format="2-bit keys (groups of 64 tokens) + rank-8 side code, 2-bit values "
                          "(groups of 64 channels); a2: 3% kept"),
        unit="ms for the one call of `chunk` tokens over the prefilled context (median of --reps)",
        paths=paths,
        rows=rows,
    )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
