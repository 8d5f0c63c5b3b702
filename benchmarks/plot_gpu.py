"""Plot the recorded GPU benchmarks: the decode benchmark (benchmarks/results/gpu_decode.json) as
time per decode step vs context and achieved bandwidth vs the measured copy bandwidth (CUDA
events; the graph-timed device times of `graph_timing`, when recorded, dashed), and the
quantise + pack benchmark (gpu_quant.json) as GB/s per op and token count, current kernels
against the earlier ones, and the end-to-end decode tokens/s of the last complete run with the
graph decoder (gpu_e2e.json), and the decode step across batch sizes (gpu_decode_batch.json).

    python benchmarks/plot_gpu.py   # writes benchmarks/results/gpu_decode.png, gpu_quant.png,
                                    # gpu_e2e.png, gpu_a2.png, gpu_prefill.png,
                                    # gpu_few_rows.png, gpu_dequantised_path.png,
                                    # gpu_decode_batch.png
    python benchmarks/plot_gpu.py dequantised   # only gpu_dequantised_path.png
    python benchmarks/plot_gpu.py batch         # only gpu_decode_batch.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def loglog(ax, xlabel: str, ylabel: str, title: str, title_size=None, legend_size=8) -> None:
    """Log2 x / log y axes with labels, title, grid and legend (the figures' timing panels)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save(fig, name: str) -> None:
    """Lay out ``fig`` and write it to ``benchmarks/results/<name>``."""
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=110)
    print("wrote", RESULTS / name)


def main() -> None:
    d = json.loads((RESULTS / "gpu_decode.json").read_text())
    rows = d["rows"]
    ctx = [r["context"] for r in rows]
    series = {"dense fp16 SDPA": [r["dense_sdpa"]["median_ms"] for r in rows],
              "dequantise + SDPA": [r["deq_sdpa"]["median_ms"] for r in rows]}
    if all("quantized_cache_step" in r for r in rows):
        series["transformers QuantizedCache (quanto 2-bit) step"] = [
            r["quantized_cache_step"]["median_ms"] for r in rows]
    for key in sorted(k for k in rows[0] if k.startswith("headq_mma:")):
        series["HeadQ fused " + key.split(":", 1)[1]] = [r[key]["median_ms"] for r in rows]
    for run in d.get("earlier_runs", []):
        rows_e = run.get("rows", [])
        if rows_e and "headq_simt" in rows_e[0]:
            series["HeadQ fused SIMT (earlier kernel)"] = [r["headq_simt"]["median_ms"]
                                                          for r in rows_e]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, ys in series.items():
        a.plot(ctx[:len(ys)], ys, marker="o", label=name)
    # Device time (CUDA graphs, no host dispatch cost), dashed: the latest H200 run of the
    # current code (h200_session<N>), else session 6's graph_timing.
    latest = sorted((int(k[len("h200_session"):]), k) for k in d
                    if k.startswith("h200_session") and k[len("h200_session"):].isdigit())
    g, gtag = (d[latest[-1][1]], f", session {latest[-1][0]}") if latest else (d.get("graph_timing"), "")
    if g:
        gctx = [r["context"] for r in g["rows"]]
        a.plot(gctx, [r["dense_sdpa"]["median_ms"] for r in g["rows"]], ls="--", marker=".",
               color="C0", label=f"dense fp16 SDPA, device time (CUDA graphs{gtag})")
        a.plot(gctx, [r["headq_mma:fixed"]["median_ms"] for r in g["rows"]], ls="--", marker=".",
               color="k", label=f"HeadQ fused fixed, device time (CUDA graphs{gtag})")
        b.plot(gctx, [r["headq_bytes"] / (r["headq_mma:fixed"]["median_ms"] * 1e-3) / 1e9
                      for r in g["rows"]], ls="--", marker=".", color="k",
               label=f"HeadQ fused fixed, device time{gtag}")
    loglog(a, "context (tokens)", "ms per decode step (median)",
           f"decode attention, batch {rows[0]['batch']}, {rows[0]['q_heads']}/"
           f"{rows[0]['kv_heads']} heads, D={rows[0]['head_dim']}")
    b.plot(ctx, [r["headq_gbs"] for r in rows], marker="o", label="HeadQ fused (best variant)")
    b.plot(ctx, [r["dense_gbs"] for r in rows], marker="o", label="dense fp16 SDPA")
    b.axhline(d["copy_gbs"], ls="--", color="k", label=f"copy bandwidth {d['copy_gbs']:.0f} GB/s")
    b.axhline(0.8 * d["copy_gbs"], ls=":", color="k", label="80% target")
    b.set_xscale("log", base=2)
    b.set_xlabel("context (tokens)")
    b.set_ylabel("GB/s read")
    b.set_title(d.get("device", "GPU"))
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    save(fig, "gpu_decode.png")
    plot_quant()
    plot_e2e()
    plot_a2()
    plot_prefill()
    plot_few_rows()
    plot_dequantised()
    plot_batch()


def plot_batch() -> None:
    """Speed-up over dense SDPA per batch and context (the op's plan; solid without window,
    dashed with a 32-token window) and the split-plan rule's effect (time with the previous plan,
    m=1, over the default plan's)."""
    d = json.loads((RESULTS / "gpu_decode_batch.json").read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    runs = [(d["rows"], "-", "no window"), (d["window_32"]["rows"], "--", "window 32")]
    contexts = sorted({r["context"] for r in d["rows"]})
    for i, T in enumerate(contexts):
        for rows, ls, lab in runs:
            rs = sorted((r for r in rows if r["context"] == T), key=lambda r: r["batch"])
            a.plot([r["batch"] for r in rs], [r["speedup_vs_dense"]["auto"] for r in rs], ls=ls,
                   marker="o", color=f"C{i}", label=f"{T // 1024}k, {lab}")
        rs = sorted((r for r in d["rows"] if r["context"] == T), key=lambda r: r["batch"])
        b.plot([r["batch"] for r in rs], [r["headq_min_tiles_1"]["median_ms"] /
                                          r["headq_min_tiles_auto"]["median_ms"] for r in rs],
               marker="o", color=f"C{i}", label=f"{T // 1024}k")
    a.axhline(1.0, color="k", lw=0.8)
    a.set_xscale("log", base=2)
    a.set_xlabel("batch")
    a.set_ylabel("dense fp16 SDPA time / HeadQ fused time")
    a.set_title(f"decode attention, 32/8 heads, D=128, {d['device']} (graph timing)", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=7, ncol=2)
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("batch")
    b.set_ylabel("time with the previous plan (m=1) / default plan")
    b.set_title("split plan: half as many, twice as long splits where a full wave would be\n"
                "1-2 tiles each (elsewhere both plans are the same: the spread is ~±4%)",
                fontsize=9)
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    save(fig, "gpu_decode_batch.png")


def plot_quant() -> None:
    q = json.loads((RESULTS / "gpu_quant.json").read_text())
    ops = ["quantize_keys", "side_code", "quantize_values", "append_all"]
    runs = [("current kernels", q["rows"])]
    for run in q.get("earlier_kernels", [])[:1]:
        runs.append(("previous kernels", run["rows"]))
    big = max(r["tokens"] for r in q["rows"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(runs)
    for i, (name, rows) in enumerate(runs):
        row = next(r for r in rows if r["tokens"] == big)
        ax.bar([j + i * width for j in range(len(ops))], [row[o]["gbs"] for o in ops], width,
               label=name)
    labels = ["keys", "side code", "values", "all three"]
    ticks = [j + width * (len(runs) - 1) / 2 for j in range(len(ops))]
    # the whole append against what it has to move (k and v read once, outputs written once)
    row = next(r for r in q["rows"] if r["tokens"] == big)
    mins = [(o, lab) for o, lab in (("append_all", "3 ops,\nmin bytes"),
                                     ("quantize_kv_separate", "quantize_kv\n3 kernels"),
                                     ("quantize_kv_fused", "quantize_kv\nfused"))
            if "min_bytes" in row.get(o, {})]
    for j, (o, lab) in enumerate(mins):
        x = len(ops) + 0.4 + j * 0.8
        ax.bar(x, row[o]["min_bytes"] / row[o]["ms"] / 1e6, 0.6, color="C2",
               label="min bytes / time (current)" if j == 0 else None)
        ticks.append(x)
        labels.append(lab)
    ax.axhline(q["copy_gbs"], ls="--", color="k", label=f"copy bandwidth {q['copy_gbs']:.0f} GB/s")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"quantise + pack, {big} tokens x batch 8 x 8 heads, D=128, {q.get('device', '')}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save(fig, "gpu_quant.png")


def plot_e2e() -> None:
    """End-to-end decode tokens/s of the last complete run with the graph decoder."""
    e = json.loads((RESULTS / "gpu_e2e.json").read_text())
    run = next((r for r in reversed(e["runs"])
                if {"headq_2bit_graph", "quantized_quanto_2bit"} <= {x["cache"] for x in r["rows"]
                                                                     if "tokens_per_s" in x}),
               None)
    if run is None:
        return
    names = {"headq_2bit_graph": "HeadQ, GraphDecoder", "headq_2bit": "HeadQ, eager",
             "dynamic": "DynamicCache", "quantized_quanto_2bit": "QuantizedCache (quanto 2-bit)",
             "static_graph": "StaticCache, CUDA graph"}
    rows = [r for r in run["rows"] if "tokens_per_s" in r]
    rows.sort(key=lambda r: -r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.barh([names.get(r["cache"], r["cache"]) for r in rows], [r["tokens_per_s"] for r in rows],
            color=["k" if r["cache"].startswith("headq") else "C0" for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.0f} tok/s, "
                f"{r['peak_memory_bytes'] / 1e9:.0f} GB peak", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s")
    r0 = rows[0]
    ax.set_title(f"end to end, Llama-3-8B shape bf16, {r0['context'] // 1024}k prompt, "
                 f"batch {r0['batch']}, {run.get('device', 'GPU')}",
                 fontsize=10)
    ax.set_xlim(0, 1.35 * rows[0]["tokens_per_s"])
    ax.grid(alpha=0.3, axis="x")
    save(fig, "gpu_e2e.png")


def plot_a2() -> None:
    """The A² value policy: the first prompt's attention per layer (gpu_a2_prefill.json) and the
    end-to-end step and prefill of sessions 11-14 against the uniform cache (summary_session12,
    summary_session13, summary_session14)."""
    path = RESULTS / "gpu_a2_prefill.json"
    e = json.loads((RESULTS / "gpu_e2e.json").read_text())
    if not path.exists() or "summary_session14" not in e:
        return
    p = json.loads(path.read_text())
    s12, s13, s = e["summary_session12"], e["summary_session13"], e["summary_session14"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = p["rows"]
    old = [r for r in rows if "rows_ms" in r]
    a.plot([r["context"] for r in old], [r["rows_ms"] for r in old], marker="o",
           label="float32 logits per block of rows (before)")
    a.plot([r["context"] for r in rows], [r["sdpa_op_ms"] for r in rows], marker="o",
           label="SDPA + a2_weights, two passes (session 12)")
    a.plot([r["context"] for r in rows], [r["fused_ms"] for r in rows], marker="o",
           label="cuDNN attention's lse + a2_weights' key pass")
    a.plot([r["context"] for r in rows], [r["a2_weights_given_lse_ms"] for r in rows],
           marker=".", ls=":", label="of which the key pass (session 14)")
    prev = p["session13"]["rows"]
    a.plot([r["context"] for r in prev], [r["a2_weights_given_lse_ms"] for r in prev],
           marker=".", ls=":", color="grey", label="the key pass in session 13")
    loglog(a, "prompt tokens", "ms per layer (output + A² weights)",
           f"A² first prompt, batch {p['shape']['batch']}, {p['machine']}", title_size=9)
    s11 = s12["session11_same_shape_h100"]
    labels = ["A² s11", "A² s12", "A² s13", "A² s14", "uniform"]
    step = [s11["headq_a2_graph_ms_per_step"], s12["headq_a2_graph_ms_per_step"],
            s13["headq_a2_graph_ms_per_step"], s["ms_per_step"]["headq_a2_graph"],
            s["ms_per_step"]["headq_2bit_graph"]]
    pre = [s11["prefill_s_headq_a2"], s12["prefill_s"]["headq_a2"], s13["prefill_s"]["headq_a2"],
           s["prefill_s"]["headq_a2_graph"], s["prefill_s"]["headq_2bit_graph"]]
    x = range(len(labels))
    b.bar([i - 0.2 for i in x], step, 0.4, label="ms per decode step")
    b.bar([i + 0.2 for i in x], pre, 0.4, label="prefill s")
    for i in x:
        b.text(i - 0.2, step[i], f"{step[i]:.1f}", ha="center", va="bottom", fontsize=8)
        b.text(i + 0.2, pre[i], f"{pre[i]:.0f}", ha="center", va="bottom", fontsize=8)
    b.set_xticks(list(x))
    b.set_xticklabels(labels, fontsize=9)
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    b.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b.set_title(f"end to end, batch 8, 32k, graph decoder, {s['card']}", fontsize=9)
    b.grid(alpha=0.3, axis="y")
    b.legend(fontsize=8)
    save(fig, "gpu_a2.png")


def plot_prefill() -> None:
    """Calls that are not a plain first prompt (session 15): a chunked prefill over quantised
    tokens (gpu_e2e.json chunked_prefill_session15) and a left-padded A² first prompt
    (gpu_a2_prefill.json padded_first_prompt_session15), the path before against the current."""
    e = json.loads((RESULTS / "gpu_e2e.json").read_text())
    p = json.loads((RESULTS / "gpu_a2_prefill.json").read_text())
    if "chunked_prefill_session15" not in e or "padded_first_prompt_session15" not in p:
        return
    c = e["chunked_prefill_session15"]["ab_same_card"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = ["HeadQ 2-bit\nrow blocks (before)", "HeadQ 2-bit\ndequantised", "HeadQ A²\ndequantised",
              "DynamicCache"]
    vals = [c["prefill_s_row_blocks_until_session15"]["headq_2bit"], c["prefill_s_now"]["headq_2bit"],
            c["prefill_s_now"]["headq_a2"], c["prefill_s_now"]["dynamic"]]
    a.bar(range(4), vals, color=["grey", "C0", "C1", "C2"])
    for i, v in enumerate(vals):
        a.text(i, v, f"{v:.1f} s", ha="center", va="bottom", fontsize=8)
    a.set_xticks(range(4))
    a.set_xticklabels(labels, fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("prefill s")
    a.set_title(f"16k prompt x batch 4 in chunks of 4,096 (8B shape), {c['card']}", fontsize=9)
    a.grid(alpha=0.3, axis="y")
    rows = p["padded_first_prompt_session15"]["rows"]
    ctx = [r["context"] for r in rows]
    before = [r["padded_layer_masked_sdpa_ms"] - r["a2_weights_left_padded_ms"]
              + r["a2_weights_left_padded_as_mask_ms"] for r in rows]
    b.plot(ctx, before, marker="o", color="grey",
           label="masked SDPA + masked passes (before; derived)")
    b.plot(ctx, [r["padded_layer_masked_sdpa_ms"] for r in rows], marker="o",
           label="masked SDPA + both passes per sequence")
    b.plot(ctx, [r["padded_layer_fused_per_sequence_ms"] for r in rows], marker="o",
           label="fused call per sequence (lse) + key pass")
    loglog(b, "prompt tokens (sequences T down to ~T/2)", "ms per layer (output + A² weights)",
           f"left-padded A² first prompt, batch 8, {p['padded_first_prompt_session15']['machine']}",
           title_size=9)
    save(fig, "gpu_prefill.png")


def plot_few_rows() -> None:
    """Calls of a few tokens over quantised tokens (gpu_few_rows.json): the whole model call per
    path against the tokens of the call (1 = a decode step). Left: session 16 (2-16 tokens,
    against DynamicCache); right: session 17 (up to 128 tokens; the call's own tokens merged in
    PyTorch, as in session 16, against query_tokens in the op, A/B in one process)."""
    path = RESULTS / "gpu_few_rows.json"
    if not path.exists():
        return
    d = json.loads(path.read_text())
    s17 = d.get("session17")
    fig, axes = plt.subplots(1, 2 if s17 else 1, figsize=(12.8 if s17 else 6.4, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    names = {"dequantised": "HeadQ: dequantise, then SDPA (before)",
             "decode_rows": "HeadQ: decode op, rows as heads", "dynamic": "DynamicCache"}
    for policy, style in (("uniform", "-"), ("a2", "--")):
        rows = [r for r in d["rows"] if r["policy"] == policy]
        for i, (key, label) in enumerate(names.items()):
            if key == "dynamic" and policy == "a2":
                continue  # the dense cache has no policy: the uniform rows show it
            ax.plot([r["chunk"] for r in rows], [r[f"{key}_ms"] for r in rows], style,
                    marker="o", color=f"C{i}",
                    label=label + (" (A²)" if policy == "a2" else ""))
    loglog(ax, "query tokens of the call (1 = a decode step)", "ms per model call (median)",
           f"session 16: a call over 32k tokens, batch 8, 4 layers of the 8B shape, {d['machine']}",
           title_size=8, legend_size=7)
    chunks = sorted({r["chunk"] for r in d["rows"]})
    ax.set_xticks(chunks)
    ax.set_xticklabels([str(c) for c in chunks])
    if not s17:
        save(fig, "gpu_few_rows.png")
        return
    ax = axes[0][1]
    ab, big = s17["ab_query_tokens"]["rows"], s17["chunks_96_128"]["rows"]
    names = {"dequantised_ms": ("HeadQ: dequantise, then SDPA", "dequantised_ms"),
             "old_ms": ("decode op + own tokens merged in PyTorch (session 16)", None),
             "new_ms": ("decode op with query_tokens (session 17)", "decode_rows_ms")}
    for policy, style in (("uniform", "-"), ("a2", "--")):
        rows = [r for r in ab if r["policy"] == policy]
        more = [r for r in big if r["policy"] == policy]
        for i, (key, (label, big_key)) in enumerate(names.items()):
            xs = [r["chunk"] for r in rows] + ([r["chunk"] for r in more] if big_key else [])
            ys = [r[key] for r in rows] + ([r[big_key] for r in more] if big_key else [])
            ax.plot(xs, ys, style, marker="o", color=f"C{i}",
                    label=label + (" (A²)" if policy == "a2" else ""))
    loglog(ax, "query tokens of the call", "ms per model call (median)",
           f"session 17: same shape, {s17['ab_query_tokens']['machine']} "
           "(2-64: one process, alternating; 96, 128: next call)", title_size=8, legend_size=7)
    ax.set_ylim(4, 400)  # room above the lines for the legend
    ax.legend(fontsize=7, loc="upper left")
    chunks = sorted({r["chunk"] for r in ab + big})
    ax.set_xticks(chunks)
    ax.set_xticklabels([str(c) for c in chunks])
    save(fig, "gpu_few_rows.png")


def plot_dequantised() -> None:
    """Longer calls over quantised tokens (gpu_dequantised_path.json, sessions 20 and 24):
    left, the whole model call per path against the call's tokens (the dequantised path writing
    into the tensors attention reads, the same with the copies of session 19, DynamicCache);
    middle, the decode op against the dequantised path for a few tokens (the crossover that
    sets attention.DECODE_ROWS_MAX_TOKENS["cuda"]); right, when recorded, session 24's A² key
    pass over kept + window keys against the pass over every key."""
    path = RESULTS / "gpu_dequantised_path.json"
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    s20, s24 = recorded.get("session20"), recorded.get("session24")
    if s20 is None:
        return
    fig, axes = plt.subplots(1, 3 if s24 else 2, figsize=(19.2 if s24 else 12.8, 4.4))
    ax, bx = axes[0], axes[1]
    ab = s20["ab_out_writes"]
    names = {"dequantised": "HeadQ dequantised, written in place (session 20)",
             "dequantised_copies": "HeadQ dequantised, blocks copied in (until session 20)",
             "dynamic": "DynamicCache"}
    for policy, style in (("uniform", "-"), ("a2", "--")):
        rows = [r for r in ab["rows"] if r["policy"] == policy]
        for i, (key, label) in enumerate(names.items()):
            if key == "dynamic" and policy == "a2":
                continue  # the dense cache has no policy: the uniform rows show it
            ax.plot([r["chunk"] for r in rows], [r[f"{key}_ms"] for r in rows], style,
                    marker="o", color=f"C{i}", label=label + (" (A²)" if policy == "a2" else ""))
    loglog(ax, "query tokens of the call", "ms per model call (median)",
           f"a call over 32k tokens, batch 8, 4 layers of the 8B shape, bf16, {ab['machine']}",
           title_size=8, legend_size=7)
    chunks = sorted({r["chunk"] for r in ab["rows"]})
    ax.set_xticks(chunks)
    ax.set_xticklabels([str(c) for c in chunks])
    cx = s20["crossover_decode_rows"]
    rows = cx["tokens_16_32_48"]["rows"] + [r for r in cx["tokens_24_32"]["rows"]
                                            if r["chunk"] != 32]  # 32: the first call's rows
    for policy, style in (("uniform", "-"), ("a2", "--")):
        pr = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["chunk"])
        for i, (key, label) in enumerate((("decode_rows", "decode op, rows as heads"),
                                          ("dequantised", "dequantised, written in place"))):
            bx.plot([r["chunk"] for r in pr], [r[f"{key}_ms"] for r in pr], style, marker="o",
                    color=f"C{i + 3}", label=label + (" (A²)" if policy == "a2" else ""))
    bx.axvline(24.5, color="0.5", lw=0.8, ls=":")
    bx.text(24.8, bx.get_ylim()[1] * 0.97, "limit 24", fontsize=7, va="top", color="0.4")
    bx.set_xlabel("query tokens of the call")
    bx.set_ylabel("ms per model call (median)")
    bx.set_title("few tokens: the decode op or the dequantised path (same shape and machine)",
                 fontsize=8)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    if s24:
        plot_a2_kept_window(axes[2], s24)
    save(fig, "gpu_dequantised_path.png")


def plot_a2_kept_window(ax, s24: dict) -> None:
    """Session 24: the A² call with its key pass over the kept tokens and the window, against
    the pass over every key (until session 21) and DynamicCache, one process; the uniform rows
    from a second process of the same machine."""
    a2 = s24["a2_kept_window_weights"]["rows"]
    un = s24["uniform"]["rows"]
    for rows, key, style, color, label in (
            (a2, "dequantised", "--", "C0", "HeadQ A², key pass over kept + window (session 21)"),
            (a2, "dequantised_full_weights", "--", "C1", "HeadQ A², key pass over every key"),
            (a2, "dynamic", ":", "C2", "DynamicCache (A² run's process)"),
            (un, "dequantised", "-", "C0", "HeadQ uniform"),
            (un, "dynamic", "-", "C2", "DynamicCache (uniform run's process)")):
        ax.plot([r["chunk"] for r in rows], [r[f"{key}_ms"] for r in rows], style, marker="o",
                color=color, label=label)
    loglog(ax, "query tokens of the call", "ms per model call (median)",
           "session 24: same shape, another H100 instance (A² rows: one process, alternating)",
           title_size=8, legend_size=7)
    chunks = sorted({r["chunk"] for r in a2})
    ax.set_xticks(chunks)
    ax.set_xticklabels([str(c) for c in chunks])


if __name__ == "__main__":
    if sys.argv[1:] == ["dequantised"]:
        plot_dequantised()
    elif sys.argv[1:] == ["batch"]:
        plot_batch()
    else:
        main()
