"""The perplexity evaluation: the one-pass simulation equals token-by-token decode (float64, to
1e-9; and against HeadQCache with the fused decode op in float32), the A² rule, budgets, rows,
the table/JSON/plot and the metrics experiment."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch

from headq_torch import evaluation as E
from headq_torch import ops

N_LAYERS = 2


@pytest.fixture
def one_thread():
    """Token-by-token loops are thousands of tiny ops: one thread avoids OpenMP spin-waits
    (3-5x faster on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small(smollm2):
    """The packaged SmolLM2 cut to its first 2 layers (a deep copy; the shared model is left
    whole), its tokenizer, a rank-8 calibration and a 76-token window of the eval text."""
    from headq_torch.calibration import calibrate
    from headq_torch.data import calibration_eval_split

    model, tok = smollm2
    layers = model.model.layers
    try:
        model.model.layers = layers[:N_LAYERS]
        m = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    m.config.num_hidden_layers = N_LAYERS
    calib, ev = calibration_eval_split()
    cal = calibrate(m, tok, calib, rank=8, n_tokens=256, chunk_len=256, progress=False)
    ids = E.eval_windows(tok, ev, 76, 1)[0]
    return m, tok, cal, ids


ROWS = {
    "headq-center-R8": E.EvalRow("h", key_bits=2, group_size=32, rank=8, center=True,
                                 residual_length=8),
    "kv-a2-R5": E.EvalRow("a", mode="full_kv", key_bits=2, group_size=32, rank=8, value_bits=2,
                          value_group_size=32, value_policy="a2", value_keep_frac=0.1,
                          residual_length=5),
}


def test_quantised_counts_follow_the_cache_rule():
    """n_q(t) = what a cache that quantises complete groups after attention holds when query t
    attends: simulate the window/flush bookkeeping of HeadQLayer directly."""
    for G, R in [(32, 0), (32, 5), (64, 8), (128, 130)]:
        T = 400
        nq_rule = E.quantised_counts(T, G, R)
        n_quant = n_window = 0
        for t in range(T):
            n_window += 1                      # append token t
            assert int(nq_rule[t]) == n_quant  # query t reads this many quantised tokens
            m = (n_window - R) // G            # flush after attention
            if m > 0:
                n_quant += m * G
                n_window -= m * G
        segs = E.segments(T, G, R)
        assert segs[0][0] == 0 and segs[-1][1] == T
        for t0, t1, c in segs:
            assert (nq_rule[t0:t1] == c).all()


def _bruteforce_a2(probs, n_kv, G, R, frac):
    """The sequential A² rule, written as a plain loop over decode steps."""
    B, Hq, T, _ = probs.shape
    rep = Hq // n_kv
    kept_at = torch.zeros(B, n_kv, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(n_kv):
            keep: set[int] = set()
            nq_prev = 0
            for t in range(T):
                nq = E.n_quantised(t, G, R)
                if nq > nq_prev:
                    w = {j: sum(float(probs[b, h * rep + i, tp, j]) ** 2
                                for i in range(rep) for tp in range(t)) for j in range(nq)}
                    cand = sorted(keep | set(range(nq_prev, nq)), key=lambda j: (-w[j], j))
                    keep = set(cand[:int(math.floor(frac * nq + 1e-9))])
                    nq_prev = nq
                for j in keep:
                    kept_at[b, h, t, j] = True
    return kept_at


def test_a2_keep_mask_matches_sequential_rule():
    g = torch.Generator().manual_seed(0)
    T = 100
    logits = 3 * torch.randn(2, 4, T, T, generator=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    for G, R, frac in [(32, 0, 0.1), (32, 7, 0.25)]:
        got = E.a2_keep_mask(probs, 2, G, R, frac, T)
        want = _bruteforce_a2(probs, 2, G, R, frac)
        assert torch.equal(got, want)
        assert got.any()


def test_dense_row_is_causal_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g),
               torch.randn(1, 2, 50, 16, generator=g))
    res = E.simulate_layer(q, k, v, 0.25, E.EvalRow("dense"))
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True, scale=0.25)
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


def test_simulated_logits_match_the_corrected_logits_op():
    """The quantised logits of the simulation equal headq.corrected_logits on the same codes."""
    g = torch.Generator().manual_seed(2)
    T, D = 96, 32
    q, k, v = (torch.randn(1, 4, T, D, generator=g), torch.randn(1, 2, T, D, generator=g),
               torch.randn(1, 2, T, D, generator=g))
    u = torch.linalg.qr(torch.randn(2, D, 8, generator=g))[0].contiguous()
    row = E.EvalRow("h", key_bits=2, group_size=32, rank=8, sign=-1.0)
    res = E.simulate_layer(q, k, v, D ** -0.5, row, u, details=True)
    nq = int(E.quantised_counts(T, 32)[-1])
    kq = k[:, :, :nq].contiguous()
    c, s, z = ops.quantize_keys(kq, 2, 32)
    zc, zs = ops.side_code(kq, c, s, z, u, 2, 32, 8, False)
    want = ops.corrected_logits(q[:, :, -1:].contiguous(), c, s, z, zc, zs, u, 2, 32, 8, -1.0,
                                D ** -0.5)
    torch.testing.assert_close(res.logits[:, :, -1:, :nq], want, atol=1e-5, rtol=1e-5)
    # keys beyond n_q(t) are read dense
    dense = (q[:, :, -1:] @ k.repeat_interleave(2, 1)[:, :, nq:].transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(res.logits[:, :, -1:, nq:], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROWS))
def test_one_pass_equals_token_by_token_decode_float64(small, name, one_thread):
    """Feeding the text one token at a time (DynamicCache + step-by-step quantisation, A² rule
    applied at each group event) gives the one-pass NLL of every token, in float64 to 1e-9."""
    model, _, cal, ids = small
    row = ROWS[name]
    m64 = copy.deepcopy(model).double()
    one = E.window_nll(m64, ids, row, cal.bases)
    dec = E.decode_nll(m64, ids, row, cal.bases, use_op=False)
    assert one.shape == dec.shape == (ids.shape[1] - 1,)
    assert float((one - dec).abs().max()) < 1e-9
    # and the quantisation did something (the comparison is not vacuous)
    dense = E.window_nll(m64, ids, E.EvalRow("dense"))
    assert float((one - dense).abs().max()) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kv-a2-R5"])
def test_one_pass_matches_headq_cache_decode(small, name, one_thread):
    """Token by token through HeadQCache + the "headq" attention (fused decode op, float32):
    the same NLLs up to float32 noise amplified by the quantisers (a key or value within float32
    noise of a rounding boundary may flip a code)."""
    from headq_torch.attention import disable, enable
    from headq_torch.cache import HeadQCache

    model, _, cal, ids = small
    row = ROWS[name]
    one = E.window_nll(model, ids, row, cal.bases)
    cache = HeadQCache(model.config, cal, key_bits=row.key_bits, value_bits=row.value_bits,
                       group_size=row.group_size, value_group_size=row.value_group_size,
                       residual_length=row.residual_length, side_bits=row.side_bits,
                       center=row.center, sign=row.sign, value_policy=row.value_policy,
                       value_keep_frac=row.value_keep_frac)
    enable(model)
    logits = []
    try:
        with torch.no_grad():
            for t in range(ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1:])
    finally:
        disable(model)
    dec = E._token_nll(torch.cat(logits, 1), ids)
    dense = E.window_nll(model, ids, E.EvalRow("dense"))
    diff = (one - dec).abs()
    assert float(diff.max()) < 0.05
    assert float(diff.mean()) < 5e-3
    assert float(diff.mean()) < 0.2 * float((one - dense).abs().mean())


@pytest.mark.slow
def test_one_pass_matches_own_decode_through_the_op(small, one_thread):
    """The step-by-step decode through headq.decode_attention (float32) agrees too."""
    model, _, cal, ids = small
    row = ROWS["headq-center-R8"]
    one = E.window_nll(model, ids, row, cal.bases)
    dec = E.decode_nll(model, ids, row, cal.bases, use_op=True)
    assert float((one - dec).abs().mean()) < 5e-3


def test_value_keep_frac_gives_equal_budgets():
    for (b, target, g, tg) in [(2, 3, 64, None), (2, 2, 64, 32), (3, 4, 64, None)]:
        f = E.value_keep_frac_for(64, b, target, g, tg)
        a2 = E.EvalRow("a", mode="full_kv", key_bits=2, value_bits=b, value_group_size=g,
                       value_policy="a2", value_keep_frac=f)
        un = E.EvalRow("u", mode="full_kv", key_bits=2, value_bits=target,
                       value_group_size=tg or g)
        ra, ru = a2.storage(64, 1 << 20), un.storage(64, 1 << 20)
        assert ra.value_bits_per_element == pytest.approx(ru.value_bits_per_element, rel=1e-4)


def test_rows_and_validation():
    rows = E.default_rows()
    fams = {r.family for r in rows}
    assert {"dense", "base", "baseline", "headq", "control", "a2", "uniform"} <= fams
    assert {r.mode for r in rows} == {"k_only", "full_kv"}
    assert {(r.basis, r.rank) for r in rows if r.family == "headq"} >= {
        ("pca", 4), ("pca", 8), ("pca", 16), ("fisher", 4), ("fisher", 8), ("fisher", 16),
        ("residual", 4), ("residual", 8), ("residual", 16)}
    quick = {(r.basis, r.rank) for r in E.default_rows(quick=True) if r.family == "headq"}
    assert {("pca", 4), ("pca", 8), ("pca", 16), ("fisher", 8), ("residual", 8)} <= quick
    assert ("residual", 4) not in quick
    base = next(r for r in rows if r.family == "base" and r.mode == "k_only")
    hq8 = next(r for r in rows if r.method == "HeadQ pca r=8")
    assert hq8.bits_per_element(64, 1024) > base.bits_per_element(64, 1024)
    # labels do not split simulations
    assert E.EvalRow("x", key_bits=2).sim_key == E.EvalRow("y", key_bits=2, family="z").sim_key
    with pytest.raises(ValueError, match="mode"):
        E.EvalRow("x", mode="kv")
    with pytest.raises(ValueError, match="k_only"):
        E.EvalRow("x", value_bits=2)
    with pytest.raises(ValueError, match="side code"):
        E.EvalRow("x", rank=8)
    with pytest.raises(ValueError, match="A²"):
        E.EvalRow("x", mode="full_kv", value_policy="a2")
    with pytest.raises(ValueError, match="group_size"):
        E.EvalRow("x", key_bits=2, group_size=16)


def test_evaluate_rows_table_json_plot(tiny, tmp_path):
    """End to end on a tiny random Llama: rows, excess and fractions, table, plot."""
    from conftest import tiny_calibration

    model = tiny("llama")
    cal = tiny_calibration(model, n_tokens=128, rank=4)
    g = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, 128, (1, 96), generator=g) for _ in range(2)]
    rows = [E.EvalRow("dense", family="dense"),
            E.EvalRow("base 2-bit", key_bits=2, group_size=32, family="base"),
            E.EvalRow("HeadQ r=4", key_bits=2, group_size=32, rank=4, family="headq"),
            E.EvalRow("null-space", key_perturb="shift", perturb_scale=2.0, family="control"),
            E.EvalRow("dense", mode="full_kv", family="dense"),
            E.EvalRow("base", mode="full_kv", key_bits=2, value_bits=2, group_size=32,
                      value_group_size=32, family="base"),
            E.EvalRow("a2", mode="full_kv", key_bits=2, value_bits=2, group_size=32,
                      value_group_size=32, rank=4, value_policy="a2", value_keep_frac=0.1,
                      family="a2")]
    out = E.evaluate_rows(model, windows, rows, {("pca", 4): cal.bases}, progress=False)
    assert len(out) == len(rows)
    need = {"method", "mode", "key_bits", "value_bits", "rank", "bits_per_element", "ppl",
            "excess_ppl", "excess_removed_frac"}
    for r in out:
        assert need <= set(r)
        assert r["n_tokens"] == 2 * 95
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    by = {(r["mode"], r["method"]): r for r in out}
    assert by[("k_only", "dense")]["excess_ppl"] == 0.0
    frac = by[("k_only", "base 2-bit")]["excess_removed_frac"]
    assert math.isnan(frac) or frac == pytest.approx(0.0)  # NaN if the base is not worse
    assert by[("k_only", "dense")]["bits_per_element"] == 16.0
    # the null-space shift does not change attention: same perplexity as dense
    assert by[("k_only", "null-space")]["ppl"] == pytest.approx(by[("k_only", "dense")]["ppl"],
                                                                 rel=1e-4)
    table = E.format_table(out)
    assert "HeadQ r=4" in table and "full_kv" in table
    E.plot_rows(out, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(out)


def test_metrics_experiment_tiny(tiny):
    from conftest import tiny_calibration

    model = tiny("llama")
    cal = tiny_calibration(model, n_tokens=128, rank=4)
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(4))
    cfgs = [E.EvalRow("2-bit G=32", key_bits=2, group_size=32),
            E.EvalRow("HeadQ r=4", key_bits=2, group_size=32, rank=4),
            E.EvalRow("null-space shift 2", key_perturb="shift", perturb_scale=2.0),
            E.EvalRow("noise 0.5", key_perturb="noise", perturb_scale=0.5),
            E.EvalRow("V 2-bit", mode="full_kv", value_bits=2, value_group_size=32,
                      group_size=32)]
    res = E.metrics_experiment(model, ids, cfgs, {("pca", 4): cal.bases}, progress=False)
    pts = res["points"]
    assert len(pts) == 2 * 2 * len(cfgs)  # layers x KV heads x configs
    ns = [p for p in pts if p["config"].startswith("null")]
    assert all(p["key_mse"] > 1.0 and p["attention_kl"] < 1e-9 for p in ns)
    nz = [p for p in pts if p["config"].startswith("noise")]
    assert all(p["attention_kl"] > 1e-6 for p in nz)
    vp = [p for p in pts if p["kind"] == "value"]
    assert all(p["attention_kl"] == 0.0 and p["output_error"] > 0 for p in vp)
    c = res["correlations"]
    for k in ("key_mse_vs_attention_kl", "score_error_vs_attention_kl",
              "fisher_error_vs_attention_kl", "value_distortion_vs_output_error"):
        assert c[k]["n"] > 0 and -1.0 <= c[k]["rho"] <= 1.0


def test_headq_cli_has_eval():
    from headq_torch import cli

    args = cli.build_parser().parse_args(["eval", "--no-full-kv", "--window", "512"])
    assert args.func is E.cmd_eval and args.no_full_kv and args.window == 512


def test_eval_parser():
    p = argparse.ArgumentParser(prog="headq")
    sub = p.add_subparsers(dest="cmd")
    E.add_eval_parser(sub)
    args = p.parse_args(["eval", "--quick", "--eval-tokens", "1024", "--ranks", "4", "8"])
    assert args.func is E.cmd_eval
    assert args.quick and args.eval_tokens == 1024 and args.ranks == [4, 8]
