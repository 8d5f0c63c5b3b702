"""The attention of an A² cache's first prompt, one layer: output and A² weights, the row-block
PyTorch path it had until session 12 against the a2_weights op (with SDPA, or with the row
log-sum-exp of PyTorch's fused attention kernel).

An A² cache needs, for every prompt token j, ``w_j = Σ_(query heads, query rows) a²``. The
``rows`` path is the code before this benchmark's commit (``attention._prefill_rows`` on a first
prompt): for blocks of query rows it materialises float32 logits, masks them, takes the softmax,
multiplies by the values and squares and sums the probabilities. The ``sdpa_op`` path is session
12's: the output from SDPA and the weights from ``ops.a2_weights`` (two streaming passes: the
rows' log-sum-exp, then the per-key sums; nothing of size L x T in memory). The ``fused`` path
is the library's current code (``attention._attention_with_lse``): PyTorch's cuDNN attention
(or flash) returns the output and each row's log-sum-exp, and ``ops.a2_weights(..., lse=)`` runs
only the per-key pass (where neither applies, e.g. float32, it is the ``sdpa_op`` path). The
kernels that return the lse are timed alone too (``cudnn_ms``, ``flash_ms``). The weights of every
path are compared (max relative difference recorded).

    python benchmarks/bench_a2_prefill.py --device cuda --contexts 4096,8192,32768 \\
        --out benchmarks/results/gpu_a2_prefill.json
    python benchmarks/bench_a2_prefill.py --device cpu --batch 1 --contexts 1024,2048

The ``rows`` path is timed only up to --rows-max tokens (its cost grows as T², 4 s per layer at
32k on an H100); the fused path at every context. CUDA timing: events around each call, median of
--reps after a warm-up; CPU: wall time.
"""

from __future__ import annotations

import argparse
import platform
import sys
from types import SimpleNamespace

import torch

from _common import cpu_model, median_ms, wall_median_ms, write_json
from headq_torch import ops
from headq_torch import value_policy as vp
from headq_torch.attention import (_PREFILL_LOGIT_BYTES, _a2_prompt_weights,
                                   _attention_with_lse, _left_padding_starts,
                                   _padded_attention_with_lse)


def rows_path(q, k, v, scale):
    """Session 11's first-prompt A² prefill (attention._prefill_rows, causal, no mask)."""
    B, Hq, L, D = q.shape
    H, T = k.shape[1], k.shape[2]
    n_rep = Hq // H
    rows = max(1, _PREFILL_LOGIT_BYTES // max(1, 4 * B * Hq * T))
    kf, vf = k.float(), v.float()
    outs = []
    w = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    for s0 in range(0, L, rows):
        qb = q[:, :, s0:s0 + rows].float()
        nr = qb.shape[2]
        tv = T - L + s0 + nr
        lg = (qb.reshape(B, H, n_rep * nr, D) @ kf[:, :, :tv].transpose(-1, -2)).view(
            B, Hq, nr, tv) * scale
        vis = torch.ones(nr, tv, dtype=torch.bool, device=q.device).tril(T - L + s0)
        lg.masked_fill_(~vis, float("-inf"))
        a = torch.softmax(lg, dim=-1).nan_to_num_(0.0)
        del lg
        outs.append((a.reshape(B, H, n_rep * nr, tv) @ vf[:, :, :tv]).view(B, Hq, nr, D))
        w[..., :tv] += vp.squared_weights(a, H)
    return torch.cat(outs, dim=2).to(q.dtype), w


def sdpa_op_path(q, k, v, scale):
    """Session 12's first-prompt A² prefill: SDPA for the output, a2_weights (both passes)."""
    n_rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                           enable_gqa=n_rep > 1)
    w, _ = ops.a2_weights(q, k, None, scale)
    return out, w


def fused_path(q, k, v, scale):
    """The current first-prompt A² prefill (attention._prefill): the output and row lse of a
    fused attention kernel (cuDNN, else flash), then a2_weights' per-key pass with that lse."""
    fused = _attention_with_lse(None, q, k, v, None, scale)
    if fused is None:
        return sdpa_op_path(q, k, v, scale)
    out, lse = fused
    w, _ = ops.a2_weights(q, k, None, scale, lse=lse)
    return out, w


def weights_only(q, k, scale, lse=None, mask=None):
    return ops.a2_weights(q, k, mask, scale, lse=lse)[0]


def time_ms(f, device: str, reps: int) -> float:
    f()
    if device != "cuda":
        return wall_median_ms(f, reps)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median_ms(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--contexts", default="4096,8192,32768")
    ap.add_argument("--rows-max", type=int, default=8192,
                    help="largest context at which the old row-block path is timed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    B, Hq, H, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    scale = D ** -0.5
    rows_out = []
    for T in (int(x) for x in args.contexts.split(",")):
        g = torch.Generator().manual_seed(T)
        q = torch.randn(B, Hq, T, D, generator=g).to(args.device, dtype)
        k = torch.randn(B, H, T, D, generator=g).to(args.device, dtype)
        v = torch.randn(B, H, T, D, generator=g).to(args.device, dtype)
        row = dict(context=T)
        row["fused_ms"] = round(time_ms(lambda: fused_path(q, k, v, scale), args.device,
                                        args.reps), 3)
        row["sdpa_op_ms"] = round(time_ms(lambda: sdpa_op_path(q, k, v, scale), args.device,
                                          args.reps), 3)
        row["a2_weights_ms"] = round(time_ms(lambda: weights_only(q, k, scale), args.device,
                                             args.reps), 3)
        # the path of a masked prompt (e.g. a left-padded batch): here the causal mask itself,
        # passed explicitly ([1, L, T], broadcast over the batch), so both passes read it
        mask = torch.ones(T, T, dtype=torch.bool, device=args.device).tril().unsqueeze(0)
        row["a2_weights_masked_ms"] = round(time_ms(
            lambda: weights_only(q, k, scale, mask=mask), args.device, args.reps), 3)
        wm, wc = weights_only(q, k, scale, mask=mask), weights_only(q, k, scale)
        row["w_max_rel_diff_masked"] = ((wm - wc).abs().max() / wc.abs().max()).item()
        del mask, wm, wc
        # a left-padded batch (sequence b starts at b·T/(2B): lengths T down to ~T/2) in
        # transformers' mask layout [B, 1, L, T]: the library's path (attention._a2_prompt_
        # weights: one unmasked causal call per sequence over its tokens; the mask analysed once
        # per forward, timed apart) against the op with the mask (the path until session 15)
        starts = [b * T // (2 * B) for b in range(B)]
        t = torch.arange(T, device=args.device)
        pmask = torch.stack([(t >= p) & (t <= t.view(-1, 1)) for p in starts]).unsqueeze(1)
        owner = SimpleNamespace()
        layer = SimpleNamespace(_owner=owner)

        def padded(analyse: bool):
            if analyse:
                owner.__dict__.pop("_padding_memo", None)
            return _a2_prompt_weights(layer, q, k, pmask, scale)

        row["left_padding_analysis_ms"] = round(time_ms(
            lambda: _left_padding_starts(pmask, B, T, T, args.device), args.device, args.reps), 3)
        row["a2_weights_left_padded_ms"] = round(time_ms(lambda: padded(False), args.device,
                                                         args.reps), 3)
        row["a2_weights_left_padded_as_mask_ms"] = round(time_ms(
            lambda: weights_only(q, k, scale, mask=pmask), args.device, args.reps), 3)
        wp, wm = padded(True), weights_only(q, k, scale, mask=pmask)
        assert owner._padding_memo[2] == starts
        row["w_max_rel_diff_left_padded"] = ((wp - wm).abs().max() / wm.abs().max()).item()
        del wp, wm
        # the whole padded first-prompt layer (output + weights): masked SDPA + the weights per
        # sequence (both passes), against one fused call per sequence (cuDNN or flash: output and
        # lse) + the key pass per sequence (attention._padded_attention_with_lse)
        if args.device == "cuda" and dtype != torch.float32:
            def padded_masked():
                n_rep = Hq // H
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                    attn_mask=pmask, scale=scale)
                return out, _a2_prompt_weights(layer, q, k, pmask, scale)

            def padded_fused():
                out, lse = _padded_attention_with_lse(layer, None, q, k, v, pmask, scale)
                return out, _a2_prompt_weights(layer, q, k, pmask, scale, lse)

            row["padded_layer_masked_sdpa_ms"] = round(time_ms(padded_masked, args.device,
                                                               args.reps), 3)
            row["padded_layer_fused_per_sequence_ms"] = round(time_ms(padded_fused, args.device,
                                                                      args.reps), 3)
            (o1, w1), (o2, w2) = padded_masked(), padded_fused()
            real = (t.view(1, -1) >= torch.tensor(starts, device=args.device).view(-1, 1))
            real = real.view(B, 1, T, 1)
            row["padded_out_max_abs_diff_real_rows"] = \
                ((o1.float() - o2.float()).abs() * real).max().item()
            row["w_max_rel_diff_padded_fused"] = ((w1 - w2).abs().max() / w1.abs().max()).item()
            del o1, o2, w1, w2
        del pmask
        for name in ("cudnn", "flash"):
            f = (lambda n=name: _attention_with_lse(None, q, k, v, None, scale, kernels=(n,)))
            if f() is not None:
                row[f"{name}_ms"] = round(time_ms(f, args.device, args.reps), 3)
        fused = _attention_with_lse(None, q, k, v, None, scale)
        if fused is not None:
            lse = fused[1]
            row["a2_weights_given_lse_ms"] = round(
                time_ms(lambda: weights_only(q, k, scale, lse), args.device, args.reps), 3)
            wa, wb = weights_only(q, k, scale), weights_only(q, k, scale, lse)
            row["w_max_rel_diff_given_lse"] = ((wa - wb).abs().max() / wa.abs().max()).item()
            del lse, wa, wb
        del fused
        if T <= args.rows_max:
            row["rows_ms"] = round(time_ms(lambda: rows_path(q, k, v, scale), args.device,
                                           max(1, args.reps - 1)), 3)
            row["speedup"] = round(row["rows_ms"] / row["fused_ms"], 2)
            (o1, w1), (o2, w2) = rows_path(q, k, v, scale), fused_path(q, k, v, scale)
            row["w_max_rel_diff"] = ((w1 - w2).abs().max() / w1.abs().max()).item()
            row["out_max_abs_diff"] = (o1.float() - o2.float()).abs().max().item()
        print(row, flush=True)
        rows_out.append(row)
        del q, k, v
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    result = dict(
        command=" ".join(["python"] + sys.argv), machine=machine, torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
        shape=dict(batch=B, q_heads=Hq, kv_heads=H, head_dim=D, dtype=args.dtype,
                   first_prompt="query rows = context, causal"),
        unit=("ms per call (one layer: output + A² weights; a2_weights_ms: the weights alone, "
              "both passes; a2_weights_masked_ms: both passes with the causal mask given as a "
              "boolean [1, L, T] mask, as a masked prompt ran them until session 15; "
              "a2_weights_left_padded_ms: a left-padded batch's weights as the library computes "
              "them (one unmasked call per sequence), a2_weights_left_padded_as_mask_ms: the same "
              "with the padded mask given to the op; left_padding_analysis_ms: the mask read "
              "once per forward to find that out; padded_layer_masked_sdpa_ms: a padded first "
              "prompt's layer (output + weights) by masked SDPA + the weights per sequence, "
              "padded_layer_fused_per_sequence_ms: by one fused call per sequence (output and "
              "lse) + the key pass per sequence, as the library does since session 15; "
              "a2_weights_given_lse_ms: the "
              "per-key pass with the fused kernel's lse; cudnn_ms / flash_ms: those attention "
              "kernels alone, with their lse)"),
        rows=rows_out,
    )
    if args.out:
        write_json(args.out, result)
    for row in rows_out:
        for key in ("w_max_rel_diff", "w_max_rel_diff_given_lse", "w_max_rel_diff_masked",
                    "w_max_rel_diff_left_padded", "w_max_rel_diff_padded_fused"):
            if key in row:
                assert row[key] < 1e-3, f"the paths' weights disagree ({key}): {row}"


if __name__ == "__main__":
    main()
