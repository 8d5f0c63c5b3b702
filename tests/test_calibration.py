"""Calibration: capture through the attention interface, bases, the file format, the CLI."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import make_tiny, save_tiny_folder, tiny_calibration
from headq_torch import reference as ref
from headq_torch.calibration import (FORMAT_VERSION, Calibration, CalibrationError, LayerSamples,
                                     Moments, bases_from_moments, calibrate, capture_qk,
                                     learn_bases, residual_objective)


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def llama_cal(llama):
    return tiny_calibration(llama)


def test_capture_is_post_rope_as_attention_sees_it(llama):
    """The captured q/k reproduce the model's own attention probabilities (eager, causal)."""
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    samples = capture_qk(llama, ids, fisher=True)
    llama.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = llama(ids, output_attentions=True).attentions
    finally:
        llama.set_attn_implementation("sdpa")
    assert llama.config._attn_implementation == "sdpa"  # capture restored the implementation
    H, D, L, n_rep = 2, 32, 24, 2
    for layer, s in enumerate(samples):
        assert s.queries.shape == (H, n_rep * L, D) and s.keys.shape == (H, L, D)
        assert s.fisher_weights.shape == (H, n_rep * L)
        q = s.queries.view(H, n_rep, L, D).reshape(H * n_rep, L, D)  # query head h -> KV h//2
        k = s.keys.repeat_interleave(n_rep, dim=0)
        logits = (q @ k.transpose(-1, -2)) * D ** -0.5
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        a = logits.softmax(-1)
        torch.testing.assert_close(a, attn[layer][0], atol=1e-5, rtol=1e-4)
        fw = (1 - (a * a).sum(-1)).view(H, n_rep * L)
        torch.testing.assert_close(s.fisher_weights, fw, atol=1e-5, rtol=1e-4)
        # RoPE is applied: the same token content at different positions gives different q
        assert not torch.allclose(s.queries[:, :1], s.queries[:, 1:2])


def test_learn_bases_methods():
    g = torch.Generator().manual_seed(0)
    H, N, D, r = 2, 2000, 32, 4
    planted = torch.linalg.qr(torch.randn(H, D, r, generator=g))[0]
    q = (torch.randn(H, N, r, generator=g) * 5) @ planted.transpose(1, 2)
    q = q + 0.01 * torch.randn(H, N, D, generator=g)
    keys = torch.randn(H, N, D, generator=g) * torch.cat([torch.full((r,), 10.0), torch.full((D - r,), 0.1)])
    s = LayerSamples(q, keys, torch.rand(H, N, generator=g))
    eye = torch.eye(r).expand(H, r, r)
    for method in ("pca", "fisher", "random", "key_pca"):
        u = learn_bases(s, r, method)
        assert u.shape == (H, D, r) and u.dtype == torch.float32
        torch.testing.assert_close(u.transpose(1, 2) @ u, eye, atol=1e-5, rtol=0)
    proj = lambda u: u @ u.transpose(1, 2)  # noqa: E731
    assert (proj(learn_bases(s, r, "pca")) - proj(planted)).abs().max() < 1e-2
    assert (proj(learn_bases(s, r, "random")) - proj(planted)).abs().max() > 0.1
    # key PCA finds the high-variance key channels 0..r-1
    uk = learn_bases(s, r, "key_pca")
    assert uk[:, :r].abs().sum() > 0.99 * uk.abs().sum()
    # Fisher weighting: queries of weight 0 do not count
    q2 = torch.cat([q, 100 * torch.randn(H, N, D, generator=g)], dim=1)
    w2 = torch.cat([torch.ones(H, N), torch.zeros(H, N)], dim=1)
    uf = learn_bases(LayerSamples(q2, keys, w2), r, "fisher")
    assert (proj(uf) - proj(planted)).abs().max() < 1e-2
    assert torch.equal(learn_bases(q, r, "pca"), learn_bases(s, r, "pca"))  # bare tensor
    with pytest.raises(ValueError, match="method"):
        learn_bases(s, r, "svd")
    with pytest.raises(ValueError, match="fisher"):
        learn_bases(q, r, "fisher")
    with pytest.raises(ValueError, match="residual"):  # needs whole sequences' residuals
        learn_bases(s, r, "residual")


def test_residual_objective_is_the_mean_pair_logit_error():
    """residual_objective(U, Σ_q, Σ_e) = mean over every (query, residual) pair of
    (qᵀ (I − UUᵀ) e)², computed here pair by pair."""
    g = torch.Generator().manual_seed(3)
    H, D, r, N, M = 2, 16, 3, 40, 30
    q = torch.randn(H, N, D, generator=g, dtype=torch.float64)
    e = torch.randn(H, M, D, generator=g, dtype=torch.float64) * torch.rand(D, generator=g,
                                                                              dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(H, D, r, generator=g, dtype=torch.float64))[0]
    sq = q.transpose(1, 2) @ q / N
    se = e.transpose(1, 2) @ e / M
    resid = e - (e @ u) @ u.transpose(1, 2)  # (I − P) e per residual
    want = ((q @ resid.transpose(1, 2)) ** 2).mean((1, 2))
    torch.testing.assert_close(residual_objective(u, sq, se), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(residual_objective(u[..., :0], sq, se),
                               ((q @ e.transpose(1, 2)) ** 2).mean((1, 2)), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="se must be"):
        residual_objective(u, sq, se[:, :3])
    with pytest.raises(ValueError, match="basis must be"):
        residual_objective(u[0], sq, se)


def _moments(sq: torch.Tensor, se: torch.Tensor) -> Moments:
    """Moments whose query second moment is ``sq`` and residual covariance ``se`` (one
    residual token per unit count, zero mean)."""
    H, D, _ = sq.shape
    m = Moments.zeros(H, D)
    m.qq, m.n_q = sq.double().clone(), 1
    m.rr, m.r_sum, m.n_r = se.double().clone(), torch.zeros(H, D, dtype=torch.float64), 1
    return m


def test_residual_basis():
    """'residual' minimises the pair logit error: with isotropic residuals it is query PCA;
    where the queries' energy sits on channels the base code gets almost right, it moves to
    the channels with the error; it is orthonormal, deterministic, never worse than PCA."""
    g = torch.Generator().manual_seed(4)
    H, D, r = 2, 16, 3
    a = torch.randn(H, D, D, generator=g, dtype=torch.float64)
    sq = a @ a.transpose(1, 2) / D + torch.diag(torch.linspace(8, 0.1, D, dtype=torch.float64))
    proj = lambda u: u.double() @ u.double().transpose(1, 2)  # noqa: E731
    eye = torch.eye(D, dtype=torch.float64).expand(H, D, D)
    u_pca = bases_from_moments(_moments(sq, eye), r, "pca")
    u_res = bases_from_moments(_moments(sq, eye), r, "residual")
    assert (proj(u_res) - proj(u_pca)).abs().max() < 1e-3
    # planted: queries strongest on channels 0..r-1 (PCA's pick), whose residuals are tiny;
    # channels r..2r-1 a little weaker in the queries but with 100x the residual variance
    dq = torch.cat([torch.full((r,), 10.0), torch.full((r,), 5.0), torch.full((D - 2 * r,), 0.5)])
    de = torch.cat([torch.full((r,), 0.01), torch.full((r,), 1.0), torch.full((D - 2 * r,), 0.1)])
    sq2, se2 = torch.diag(dq).expand(H, D, D).double(), torch.diag(de).expand(H, D, D).double()
    u_pca = bases_from_moments(_moments(sq2, se2), r, "pca")
    u_res = bases_from_moments(_moments(sq2, se2), r, "residual")
    assert u_res.shape == (H, D, r) and u_res.dtype == torch.float32
    torch.testing.assert_close(u_res.transpose(1, 2) @ u_res, torch.eye(r).expand(H, r, r),
                               atol=1e-5, rtol=0)
    assert u_res[:, r:2 * r].abs().pow(2).sum() > 0.99 * H * r  # the error's channels
    assert u_pca[:, :r].abs().pow(2).sum() > 0.99 * H * r
    f_pca, f_res = residual_objective(u_pca, sq2, se2), residual_objective(u_res, sq2, se2)
    assert (f_res < 0.5 * f_pca).all()
    # never worse than PCA, and the same bits twice
    se3 = torch.randn(H, D, D, generator=g, dtype=torch.float64)
    se3 = se3 @ se3.transpose(1, 2) / D
    m3 = _moments(sq, se3)
    u3 = bases_from_moments(m3, r, "residual")
    assert torch.equal(u3, bases_from_moments(m3, r, "residual"))
    assert (residual_objective(u3, sq, se3)
            <= residual_objective(bases_from_moments(m3, r, "pca"), sq, se3) + 1e-12).all()
    bare = Moments(sq, sq, sq, 1, 1)  # no residuals added yet
    with pytest.raises(ValueError, match="residual"):
        bases_from_moments(bare, r, "residual")  # no residuals collected
    bare.add_residuals(torch.randn(H, 64, D, generator=g), 2, 32)
    assert bare.n_r == 64 and bare.residual_covariance().shape == (H, D, D)


def test_moments_add_residuals_matches_the_reference_quantiser():
    """add_residuals: second moment and sum of k − k̂ over the complete groups (reference
    quantiser), the incomplete tail left out; residual_covariance centres them."""
    g = torch.Generator().manual_seed(5)
    H, D, G = 2, 32, 32
    keys = [torch.randn(H, 75, D, generator=g) * 3 + 1, torch.randn(H, 20, D, generator=g)]
    m = Moments.zeros(H, D)
    for k in keys:
        m.add_residuals(k, 3, G)
    assert m.n_r == 64  # 75 -> 2 groups of 32; 20 -> none
    with pytest.raises(ValueError, match="keys must be"):
        m.add_residuals(keys[0][:1], 3, G)
    with pytest.raises(ValueError, match="key_bits"):
        m.add_residuals(keys[0], 5, G)
    with pytest.raises(ValueError, match="group_size"):
        m.add_residuals(keys[0], 3, 48)
    assert m.n_r == 64  # the rejected calls added nothing
    k = keys[0][:, :64].unsqueeze(0)
    c, s, z = ref.quantize_keys(k, 3, G)
    e = (k - ref.dequantize_keys(c, s, z, 3, G))[0].double()
    torch.testing.assert_close(m.rr, e.transpose(1, 2) @ e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.r_sum, e.sum(1), rtol=1e-6, atol=1e-6)
    ec = e - e.mean(1, keepdim=True)
    torch.testing.assert_close(m.residual_covariance(), ec.transpose(1, 2) @ ec / 64,
                               rtol=1e-6, atol=1e-8)


def test_calibrate_metadata_and_controls(llama, llama_cal):
    cal = llama_cal
    assert (cal.num_layers, cal.num_kv_heads, cal.head_dim, cal.rank) == (2, 2, 32, 8)
    assert cal.method == "pca" and cal.model_name == "tiny-llama" and cal.n_tokens == 192
    ctrl = {m: cal.with_bases(m) for m in ("random", "key_pca", "fisher", "pca")}
    for m, c in ctrl.items():
        assert c.method == m and c.bases[0].shape == (2, 32, 8)
    assert torch.equal(ctrl["pca"].bases[1], cal.bases[1])
    assert not torch.allclose(ctrl["random"].bases[0], cal.bases[0])
    assert cal.with_bases("pca", rank=4).bases[0].shape == (2, 32, 4)
    # one pass accumulates every method: calibrate(method='fisher') == with_bases('fisher')
    fisher = tiny_calibration(llama, method="fisher")
    torch.testing.assert_close(fisher.bases[0], ctrl["fisher"].bases[0])
    resid = tiny_calibration(llama, method="residual")
    assert resid.method == "residual"
    assert (resid.extra["residual_key_bits"], resid.extra["residual_group_size"]) == (2, 64)
    assert torch.equal(resid.bases[1], cal.with_bases("residual").bases[1])
    assert not torch.allclose(resid.bases[0], cal.bases[0])
    # a tensor-parallel shard's residual basis is the full one's heads (to rounding: batched
    # linear algebra over 1 head instead of 2)
    torch.testing.assert_close(cal.shard(1, 2).with_bases("residual").bases[0],
                               cal.with_bases("residual").bases[0][1:], atol=1e-4, rtol=0)


def test_gemma3_calibration_skips_sliding_layers():
    cal = tiny_calibration(make_tiny("gemma3"), n_tokens=96)
    assert [b is None for b in cal.bases] == [True, False, True, False]


def test_round_trip(tmp_path, llama, llama_cal):
    p = tmp_path / "c.safetensors"
    llama_cal.save(p)
    back = Calibration.load(p, expected_config=llama.config, expected_rank=8)
    for a, b in zip(llama_cal.bases, back.bases):
        assert torch.equal(a, b)
    for f in ("model_name", "fingerprint", "num_layers", "num_kv_heads", "head_dim", "rank",
              "method", "format_version", "n_tokens"):
        assert getattr(back, f) == getattr(llama_cal, f)
    assert back.format_version == FORMAT_VERSION
    assert back.with_bases("random").bases[0].shape == (2, 32, 8)
    with pytest.raises(CalibrationError, match="moments"):
        back.with_bases("key_pca")


def _rewrite_metadata(src, dst, **changes):
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_bad_files(tmp_path, llama, llama_cal):
    good = tmp_path / "c.safetensors"
    llama_cal.save(good)
    raw = good.read_bytes()

    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.safetensors")
    (tmp_path / "trunc").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CalibrationError, match="truncated|corrupt"):
        Calibration.load(tmp_path / "trunc")
    (tmp_path / "tiny").write_bytes(raw[:5])
    with pytest.raises(CalibrationError, match="not a safetensors"):
        Calibration.load(tmp_path / "tiny")
    (tmp_path / "text").write_text("this is a text file, not a calibration\n" * 10)
    with pytest.raises(CalibrationError, match="not a safetensors"):
        Calibration.load(tmp_path / "text")
    corrupt = bytearray(raw)
    corrupt[10:30] = b"\xff" * 20  # inside the JSON header
    (tmp_path / "corrupt").write_bytes(bytes(corrupt))
    with pytest.raises(CalibrationError, match="truncated|corrupt"):
        Calibration.load(tmp_path / "corrupt")

    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CalibrationError, match="not a HeadQ calibration"):
        Calibration.load(tmp_path / "other.safetensors")

    _rewrite_metadata(good, tmp_path / "v99", format_version="99")
    with pytest.raises(CalibrationError, match="version 99"):
        Calibration.load(tmp_path / "v99")
    _rewrite_metadata(good, tmp_path / "r4", rank="4")
    with pytest.raises(CalibrationError, match="shape"):
        Calibration.load(tmp_path / "r4")
    _rewrite_metadata(good, tmp_path / "fp", fingerprint="0123456789abcdef")
    with pytest.raises(CalibrationError, match="another model"):
        Calibration.load(tmp_path / "fp", expected_config=llama.config)

    qwen = make_tiny("qwen2")
    with pytest.raises(CalibrationError, match="another model"):
        Calibration.load(good, expected_config=qwen.config)
    with pytest.raises(CalibrationError, match="rank=4"):
        Calibration.load(good, expected_config=llama.config, expected_rank=4)


def test_cli_calibrate(tmp_path, llama):
    """`headq calibrate` on a local model folder (tokenizer from the packaged SmolLM2 is not
    needed: a word-level tokenizer is saved next to the tiny model)."""
    from headq_torch.cli import main

    d = save_tiny_folder(llama, tmp_path / "tiny")
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{i}" for i in torch.randint(0, 127, (300,), generator=g).tolist()))
    out = tmp_path / "calib.safetensors"
    rc = main(["calibrate", "--model", str(d), "--text", str(text), "--rank", "4",
               "--tokens", "256", "--chunk-len", "128", "--method", "fisher", "--out", str(out),
               "--quiet"])
    assert rc == 0
    cal = Calibration.load(out, expected_config=llama.config, expected_rank=4)
    assert cal.method == "fisher" and cal.n_tokens == 256 and cal.bases[0].shape == (2, 32, 4)
    rc = main(["calibrate", "--model", str(d), "--text", str(text), "--rank", "4",
               "--tokens", "256", "--chunk-len", "128", "--method", "residual", "--key-bits",
               "3", "--group-size", "32", "--out", str(out), "--quiet"])
    assert rc == 0
    cal = Calibration.load(out, expected_config=llama.config, expected_rank=4)
    assert cal.method == "residual" and cal.bases[0].shape == (2, 32, 4)
    assert (cal.extra["residual_key_bits"], cal.extra["residual_group_size"]) == (3, 32)
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(d), "--text", str(tmp_path / "nope.txt"),
              "--out", str(out)])


def test_calibrate_argument_errors(llama):
    ids = torch.arange(64) % 128
    with pytest.raises(ValueError, match="rank"):
        calibrate(llama, None, ids, rank=0, progress=False)
    with pytest.raises(ValueError, match="method"):
        calibrate(llama, None, ids, method="svd", progress=False)
    with pytest.raises(ValueError, match="key_bits"):
        calibrate(llama, None, ids, key_bits=5, progress=False)
    with pytest.raises(ValueError, match="group_size"):
        calibrate(llama, None, ids, group_size=48, progress=False)


def test_cli_generate(tmp_path, llama, capsys):
    """`headq generate` on a local model folder with a calibration file: the HeadQ cache's text
    and size, and with --compare the DynamicCache's; a configuration the cache refuses exits 2
    with one line."""
    from headq_torch.cli import main

    d = save_tiny_folder(llama, tmp_path / "tiny")
    calib = tmp_path / "c.safetensors"
    tiny_calibration(llama).save(calib)
    prompt = " ".join(f"w{(7 * i) % 128}" for i in range(50))
    rc = main(["generate", "--model", str(d), "--calibration", str(calib), "--prompt", prompt,
               "--no-chat", "--max-new-tokens", "12", "--key-bits", "4", "--value-bits", "4",
               "--value-policy", "a2", "--value-keep-frac", "0.25", "--compare", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "== DynamicCache: 62 tokens" in out
    assert "== HeadQCache (keys 4-bit, values 4-bit, A², rank " in out and "62 tokens" in out
    assert "bits per cached element" in out and "same tokens as DynamicCache:" in out
    rc = main(["generate", "--model", str(d), "--calibration", str(calib), "--prompt", prompt,
               "--no-chat", "--value-policy", "a2", "--quiet"])  # A² needs quantised values
    err = capsys.readouterr().err
    assert rc == 2 and "headq generate: error:" in err and "value" in err
    rc = main(["generate", "--model", str(d), "--calibration", str(calib), "--prompt", prompt,
               "--device", "cuda", "--no-chat", "--max-new-tokens", "12", "--key-bits", "8",
               "--value-bits", "8", "--compare", "--quiet"])
    out, err = capsys.readouterr()
    if torch.cuda.is_available():  # the model, the cache and its kernels on the GPU
        assert rc == 0, err
        assert "== HeadQCache (keys 8-bit, values 8-bit" in out and "62 tokens" in out
        assert "same tokens as DynamicCache: True" in out
    else:
        assert rc == 2 and "--device cuda: no CUDA device is visible" in err


def test_cli_generate_smollm2(capsys):
    """`headq generate` on the packaged SmolLM2 with the chat template, calibrated on the
    packaged text: a short prompt stays in the dense window, so the 2-bit cache's greedy answer
    is the DynamicCache's."""
    from headq_torch.cli import main

    rc = main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8",
               "--calib-tokens", "256", "--compare", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    assert "same tokens as DynamicCache: True" in out
