"""headq_torch.metrics against direct small computations (explicit projector / Fisher matrix /
loops), their invariances, and the null-space control."""

from __future__ import annotations

import math

import pytest
import torch

from headq_torch import metrics as M


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_key_mse_direct():
    k, kh = _rand(2, 3, 7, 8, seed=1), _rand(2, 3, 7, 8, seed=2)
    got = M.key_mse(k, kh)
    assert got.shape == (2, 3)
    want = torch.tensor([[float(((k[b, h] - kh[b, h]) ** 2).sum()) / (7 * 8) for h in range(3)]
                         for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_score_error_explicit_projector(n):
    s, s2 = _rand(4, n, seed=3), _rand(4, n, seed=4)
    P = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    want = ((s2 - s) @ P.T).pow(2).sum(-1)
    torch.testing.assert_close(M.score_error(s, s2), want)


def test_fisher_error_explicit_matrix():
    s, s2 = _rand(5, 11, seed=5), _rand(5, 11, seed=6)
    want = []
    for i in range(5):
        a = torch.softmax(s[i], -1)
        F = torch.diag(a) - torch.outer(a, a)
        d = s2[i] - s[i]
        want.append(0.5 * d @ F @ d)
    torch.testing.assert_close(M.fisher_error(s, s2), torch.stack(want))


def test_attention_kl_direct():
    s, s2 = _rand(3, 6, seed=7), _rand(3, 6, seed=8)
    a, b = torch.softmax(s, -1), torch.softmax(s2, -1)
    want = (a * (a.log() - b.log())).sum(-1)
    torch.testing.assert_close(M.attention_kl(s, s2), want)
    assert (M.attention_kl(s, s2) > 0).all()
    torch.testing.assert_close(M.attention_kl(s, s), torch.zeros(3, dtype=torch.float64))


def test_shift_invariance():
    """Adding a per-query constant to the perturbed logits changes neither the score-space
    error modulo shift, nor the Fisher error, nor the KL; it does change the raw logit error."""
    s, s2 = _rand(2, 4, 10, seed=9), _rand(2, 4, 10, seed=10)
    c = 100.0 * _rand(2, 4, 1, seed=11)
    for fn in (M.score_error, M.fisher_error, M.attention_kl):
        torch.testing.assert_close(fn(s, s2 + c), fn(s, s2), rtol=1e-9, atol=1e-9)
    # a pure shift is invisible
    for fn in (M.score_error, M.fisher_error, M.attention_kl):
        assert float(fn(s, s + c).abs().max()) < 1e-9


def test_fisher_is_second_order_kl():
    s = _rand(8, 32, seed=12)
    d = _rand(8, 32, seed=13)
    for eps in (1e-2, 1e-3):
        kl = M.attention_kl(s, s + eps * d)
        fe = M.fisher_error(s, s + eps * d)
        assert float(((kl - fe) / fe).abs().max()) < 20 * eps


def test_mask_equals_sliced():
    """Masked entries are excluded from every sum, mean and softmax: a causal row equals the
    metric on its visible prefix."""
    T = 7
    s, s2 = _rand(T, T, seed=14), _rand(T, T, seed=15)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for fn in (M.score_error, M.fisher_error, M.attention_kl):
        got = fn(s, s2, causal)
        want = torch.stack([fn(s[t, :t + 1], s2[t, :t + 1]) for t in range(T)])
        torch.testing.assert_close(got, want)
    # -inf in the masked part of the logits is harmless
    s_inf = s.masked_fill(~causal, float("-inf"))
    s2_inf = s2.masked_fill(~causal, float("-inf"))
    for fn in (M.score_error, M.fisher_error, M.attention_kl):
        torch.testing.assert_close(fn(s_inf, s2_inf, causal), fn(s, s2, causal))
    with pytest.raises(ValueError, match="bool"):
        M.score_error(s, s2, causal.int())


def test_value_distortion_direct_gqa():
    B, Hq, H, L, n, d = 2, 6, 2, 3, 5, 4
    a = torch.softmax(_rand(B, Hq, L, n, seed=16), -1)
    v, vh = _rand(B, H, n, d, seed=17), _rand(B, H, n, d, seed=18)
    got = M.value_distortion(a, v, vh)
    assert got.shape == (B, Hq, L)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // H)
            for t in range(L):
                want = sum(float(a[b, h, t, j]) ** 2 * float(((v[b, kv, j] - vh[b, kv, j]) ** 2)
                                                           .sum()) for j in range(n)) / d
                assert math.isclose(float(got[b, h, t]), want, rel_tol=1e-12)


def test_value_distortion_predicts_output_error_in_expectation():
    """With attention fixed and i.i.d. zero-mean value errors, E‖Δo‖²/d = D_V."""
    n, d = 16, 8
    a = torch.softmax(3 * _rand(1, 1, 1, n, seed=19), -1)
    v = _rand(1, 1, n, d, seed=20)
    g = torch.Generator().manual_seed(21)
    sig = torch.rand(1, 1, n, 1, generator=g, dtype=torch.float64)
    errs = []
    for _ in range(4000):
        vh = v + sig * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
        errs.append(float(M.output_error(a, v, a, vh)))
    expected = float((a[0, 0, 0] ** 2 * sig[0, 0, :, 0] ** 2).sum())  # Σ a² σ² d / d
    vh = v + sig * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    assert abs(sum(errs) / len(errs) - expected) < 0.06 * expected
    # and D_V of one draw is the realised Σ a² ‖Δv‖²/d
    dv = float(M.value_distortion(a, v, vh))
    want = float((a[0, 0, 0] ** 2 * ((vh - v)[0, 0] ** 2).sum(-1)).sum()) / d
    assert math.isclose(dv, want, rel_tol=1e-12)


def test_null_space_control():
    """A per-channel constant added to every key (K + 1μᵀ): large key MSE, but every logit of a
    query moves by the same q·μ, so score/Fisher error and KL are ~0 (float32 logits)."""
    g = torch.Generator().manual_seed(22)
    T, D = 64, 32
    q = torch.randn(4, T, D, generator=g)
    k = torch.randn(T, D, generator=g)
    mu = 3.0 * torch.randn(D, generator=g)
    k2 = k + mu
    s = q @ k.T / math.sqrt(D)
    s2 = q @ k2.T / math.sqrt(D)
    assert float(M.key_mse(k, k2)) > 5.0
    assert float(M.attention_kl(s, s2).max()) < 1e-9
    assert float(M.fisher_error(s, s2).max()) < 1e-9
    assert float(M.score_error(s, s2).max()) < 1e-6
    # the same key MSE spread as noise is clearly visible
    noise = k + mu.norm() / math.sqrt(D) * torch.randn(T, D, generator=g)
    sn = q @ noise.T / math.sqrt(D)
    assert float(M.attention_kl(s, sn).mean()) > 1e-2


def test_per_kv_head_and_weights():
    x = torch.arange(2 * 6 * 3, dtype=torch.float64).reshape(2, 6, 3)
    got = M.per_kv_head(x, 2)
    torch.testing.assert_close(got, x.reshape(2, 2, 9).mean(-1))
    w = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    got_w = M.per_kv_head(x, 2, w)
    want = x[..., 1:].reshape(2, 2, 6).mean(-1)
    torch.testing.assert_close(got_w, want)


def test_spearman():
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # monotone transform invariance
    x = _rand(50, seed=23)
    y = x + 0.5 * _rand(50, seed=24)
    assert M.spearman(x, y) == pytest.approx(M.spearman(x.exp(), y ** 3))
    # ties get average ranks
    torch.testing.assert_close(M.rankdata([3, 1, 3, 2]),
                               torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = _rand(40, seed=25).round(decimals=1), _rand(40, seed=26)
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        M.score_error(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        M.key_mse(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="multiple"):
        M.value_distortion(torch.zeros(1, 5, 2, 3), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
