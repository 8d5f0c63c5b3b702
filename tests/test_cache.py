"""HeadQCache semantics, modelled on what transformers tests for its own caches."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_tiny, tiny_calibration
from headq_torch import attention, ops
from headq_torch import value_policy as vp
from headq_torch.cache import HeadQCache
from headq_torch.calibration import CalibrationError


@pytest.fixture(scope="module")
def llama():
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    attention.enable(model)
    yield model, cal
    attention.disable(model)


def _ids(model, n, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=g)


def _step(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


KW = dict(key_bits=4, value_bits=4, group_size=32, value_group_size=32)


@pytest.mark.parametrize("residual_length", [0, 16])
def test_seq_length_and_quantisation_rule(llama, residual_length):
    model, cal = llama
    cache = HeadQCache(model.config, cal, residual_length=residual_length, **KW)
    ids = _ids(model, 100)
    _step(model, ids[:, :40], cache)
    n = 40
    for t in range(40, 100):
        assert cache.get_seq_length() == n
        assert cache.get_mask_sizes(1, 0) == (n + 1, 0)
        _step(model, ids[:, t:t + 1], cache)
        n += 1
        for layer in cache.headq_layers:
            # while the window holds >= residual + G tokens, its oldest G tokens are quantised
            assert layer.n_window < residual_length + 32
            assert layer.n_quant % 32 == 0
            assert layer.n_quant + layer.n_window == n
            assert layer.n_quant == max(0, (n - residual_length) // 32 * 32)
    assert cache.get_seq_length() == 100


def test_buffers_grow_amortised(llama):
    model, cal = llama
    cache = HeadQCache(model.config, cal, **KW)
    ids = _ids(model, 400)
    _step(model, ids[:, :8], cache)
    layer = cache.headq_layers[0]
    ptrs = set()
    for t in range(8, 400):
        _step(model, ids[:, t:t + 1], cache)
        if layer.buf.get("k_codes") is not None:
            ptrs.add(layer.buf["k_codes"].data_ptr())
    assert layer.n_quant == 384
    assert len(ptrs) <= 6  # doubling: log2(384/32) + 1 reallocations, not one per group


def test_crop_within_window_and_into_quantised_region(llama):
    model, cal = llama
    ids = _ids(model, 90)
    cache = HeadQCache(model.config, cal, **KW)
    _step(model, ids[:, :80], cache)  # 64 quantised + 16 window
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a crop inside the window does not warn
        cache.crop(torch.tensor(-10))  # a 0-d tensor, as assisted decoding passes it
    assert cache.get_seq_length() == 70
    fresh = HeadQCache(model.config, cal, **KW)
    _step(model, ids[:, :70], fresh)
    # cropping inside the window is exact: the next step matches a fresh cache of 70 tokens
    torch.testing.assert_close(_step(model, ids[:, 70:71], cache),
                               _step(model, ids[:, 70:71], fresh), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="reaches 24 token"):
        cache.crop(-31)  # 71 -> 40: cuts into the second group (lossy, tokens 32..39 come back)
    layer = cache.headq_layers[0]
    assert cache.get_seq_length() == 40 and layer.n_quant == 32 and layer.n_window == 8
    out = _step(model, ids[:, 40:41], cache)
    assert torch.isfinite(out).all() and cache.get_seq_length() == 41
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lossy again, but the cache warned once already
        cache.crop(20)  # earlier 5.x semantics: positive = keep that many tokens
    assert cache.get_seq_length() == 20
    for bad in (torch.tensor(2.5), torch.tensor([3]), torch.tensor(True)):
        with pytest.raises(TypeError, match="crop"):
            cache.crop(bad)


def test_reorder_select_repeat(llama):
    model, cal = llama
    ids = _ids(model, 75, batch=2, seed=5)
    nxt = _ids(model, 1, batch=2, seed=6)
    base = HeadQCache(model.config, cal, **KW)
    _step(model, ids, base)
    ref = _step(model, nxt, base)[:, -1]

    c = HeadQCache(model.config, cal, **KW)
    _step(model, ids, c)
    c.reorder_cache(torch.tensor([1, 0]))
    out = _step(model, nxt.flip(0), c)[:, -1]
    torch.testing.assert_close(out, ref.flip(0), atol=1e-5, rtol=1e-5)

    c = HeadQCache(model.config, cal, **KW)
    _step(model, ids, c)
    c.batch_select_indices(torch.tensor([1]))
    out = _step(model, nxt[1:], c)[:, -1]
    torch.testing.assert_close(out, ref[1:], atol=1e-5, rtol=1e-5)

    c = HeadQCache(model.config, cal, **KW)
    _step(model, ids, c)
    c.batch_repeat_interleave(2)
    out = _step(model, nxt.repeat_interleave(2, dim=0), c)[:, -1]
    torch.testing.assert_close(out, ref.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)


def test_beam_search_runs(llama):
    model, cal = llama
    ids = _ids(model, 70, seed=2)
    out = model.generate(ids, num_beams=3, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         past_key_values=HeadQCache(model.config, cal, **KW), pad_token_id=0)
    assert out.shape == (1, 78)


def test_reset(llama):
    model, cal = llama
    ids = _ids(model, 70)
    cache = HeadQCache(model.config, cal, **KW)
    first = _step(model, ids, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
    torch.testing.assert_close(_step(model, ids, cache), first)


@pytest.mark.parametrize("kw", [
    dict(key_bits=2, value_bits=16),
    dict(key_bits=2, value_bits=2, residual_length=8),
    dict(key_bits=3, value_bits=4, side_bits=4),
    dict(key_bits=2, value_bits=2, value_policy="a2", value_keep_frac=0.1),
], ids=["k2", "kv2_res8", "k3v4_z4", "kv2_a2"])
def test_memory_bytes_matches_storage_report(llama, kw):
    model, cal = llama
    cache = HeadQCache(model.config, cal, group_size=32, value_group_size=32, **kw)
    _step(model, _ids(model, 300), cache)
    rep = cache.storage_report()
    expected = rep.bytes_per_token_all_layers * 300
    got = cache.memory_bytes()
    # the A² policy also stores its float32 weights (window + kept tokens), not counted there
    tol = 0.03 if kw.get("value_policy") == "a2" else 0.002
    assert abs(got - expected) <= tol * expected, (got, expected, cache.memory_breakdown())
    assert cache.memory_breakdown()["k_codes"] == 2 * 2 * 288 * 32 * kw["key_bits"] // 8


def b_window(layer, name, n, dt):
    return layer.buf[name][:, :, :n].to(dt)


@pytest.mark.parametrize("kw", [
    dict(key_bits=2, value_bits=2, value_policy="a2", value_keep_frac=0.1),
    dict(key_bits=16, value_bits=16),
], ids=["kv2_a2", "dense"])
def test_quantised_keys_values_ranges(llama, kw):
    """quantised_keys / quantised_values of a token range equal that slice of the whole region
    (kept tokens' deltas included, as defined: added in float32, then cast), in float32 and
    cast; with out= written into a token slice of a longer tensor; dense_kv is them and the
    window; bad ranges name the argument."""
    model, cal = llama
    cache = HeadQCache(model.config, None if kw["key_bits"] == 16 else cal, group_size=32,
                       value_group_size=32, **kw)
    _step(model, _ids(model, 150, batch=2), cache)
    layer = cache.headq_layers[0]
    assert layer.n_quant == 128
    if "value_policy" in kw:
        assert layer.heavy_idx.shape[-1] > 0
        # empty slots (-1, zero delta), as a keep set with fewer candidates than its budget
        # has: the last two of every (b, h) row, and all of one row
        idx, delta = layer.heavy_idx.clone(), layer.heavy_delta.clone()
        idx[:, :, -2:] = -1
        idx[1, 0] = -1
        delta[idx < 0] = 0
        layer.heavy_idx, layer.heavy_delta = idx, delta
    k, v = layer.quantised_keys(), layer.quantised_values()
    assert k.shape == v.shape == (2, layer.H, 128, layer.D)
    for t0, t1 in [(0, 32), (32, 96), (96, 128), (64, 64)]:
        assert torch.equal(layer.quantised_keys(torch.float32, t0, t1), k[:, :, t0:t1])
        assert torch.equal(layer.quantised_values(torch.float32, t0, t1), v[:, :, t0:t1])
    assert torch.equal(layer.quantised_values(torch.bfloat16, 32, 96),
                       v[:, :, 32:96].to(torch.bfloat16))
    if "value_policy" in kw:  # the definition: v̂ + the kept tokens' deltas in float32, cast
        b, nq = layer.buf, layer.n_quant
        vhat = ops.dequantize_values(b["v_codes"][:, :, :nq], b["v_scale"][:, :, :nq],
                                     b["v_zero"][:, :, :nq], 2, 32, torch.float32)
        valid = layer.heavy_idx >= 0
        assert valid.any() and not valid.all()  # empty slots too
        delta = layer.heavy_delta.float() * valid.unsqueeze(-1)
        idx = layer.heavy_idx.long().clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, layer.D)
        want = vhat.scatter_add(2, idx, delta)
        assert torch.equal(v, want)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(layer.quantised_values(dt), want.to(dt))
    # out=: written into a token slice of a longer tensor, the same bits
    for dt in (torch.float32, torch.bfloat16):
        big_k = torch.full((2, layer.H, 200, layer.D), float("nan"), dtype=dt)
        big_v = big_k.clone()
        assert layer.quantised_keys(start=32, end=96, out=big_k[:, :, 10:74]) is not None
        layer.quantised_values(start=32, end=96, out=big_v[:, :, 10:74])
        assert torch.equal(big_k[:, :, 10:74], k[:, :, 32:96].to(dt))
        assert torch.equal(big_v[:, :, 10:74], v[:, :, 32:96].to(dt))
        assert big_k[:, :, :10].isnan().all() and big_k[:, :, 74:].isnan().all()
        assert big_v[:, :, :10].isnan().all() and big_v[:, :, 74:].isnan().all()
        dk, dv = layer.dense_kv(dt)
        nw = layer.n_window
        assert torch.equal(dk, torch.cat([k.to(dt), b_window(layer, "k_window", nw, dt)], 2))
        assert torch.equal(dv, torch.cat([v.to(dt), b_window(layer, "v_window", nw, dt)], 2))
    with pytest.raises(ValueError, match="start <= end <= n_quant"):
        layer.quantised_keys(torch.float32, 0, 160)
    with pytest.raises(ValueError, match="start <= end <= n_quant"):
        layer.quantised_values(torch.float32, 64, 32)
    if kw["key_bits"] < 16:
        with pytest.raises(ValueError, match="multiple of the key group size"):
            layer.quantised_keys(torch.float32, 16, 64)


def test_add_weights_bad_shapes_name_the_argument(llama):
    """HeadQLayer.add_weights refuses weights of the wrong shape (a [B, H, 1] tensor would
    broadcast into every slot) before changing anything, and names the argument."""
    model, cal = llama
    cache = HeadQCache(model.config, cal, group_size=32, value_group_size=32, key_bits=2,
                       value_bits=2, value_policy="a2", value_keep_frac=0.1)
    _step(model, _ids(model, 150, batch=2), cache)
    layer = cache.headq_layers[0]
    B, H, nq, nw, K = layer.B, layer.H, layer.n_quant, layer.n_window, layer.heavy_idx.shape[-1]
    assert nq > 0 and nw > 0 and K > 0
    before = (layer.buf["w_window"].clone(), layer.heavy_w.clone())
    ok_w = torch.ones(B, H, nw)
    for args, kwargs, name in [
        ((None, torch.ones(B, H, 1)), {}, "w_window"),
        ((torch.ones(B, H, nq + 1), ok_w), {}, "w_quant"),
        ((None, ok_w), dict(w_heavy=torch.ones(B, H, 1)), "w_heavy"),
        ((None, torch.ones(1, H, nw)), {}, "w_window"),
    ]:
        with pytest.raises(ValueError, match=name):
            layer.add_weights(*args, **kwargs)
        assert torch.equal(layer.buf["w_window"], before[0])
        assert torch.equal(layer.heavy_w, before[1])
    layer.add_weights(None, ok_w, w_heavy=torch.ones(B, H, K))
    assert torch.equal(layer.buf["w_window"][:, :, :nw], before[0][:, :, :nw] + 1)
    valid = layer.heavy_idx >= 0
    assert torch.equal(layer.heavy_w[valid], before[1][valid] + 1)


def test_a2_keep_set_rule():
    B, H, D = 1, 1, 4
    idx, w, delta = vp.update_keep_set(None, None, None, 0, torch.tensor([[[0.1, 0.9, 0.5, 0.2]]]),
                                       torch.arange(16.).view(B, H, 4, D), 2)
    assert idx.tolist() == [[[1, 2]]] and idx.dtype == torch.int32
    assert torch.equal(delta[0, 0, 0], torch.arange(4., 8.))
    # the next group competes with the kept tokens by current weight; dropped tokens are gone
    idx2, w2, _ = vp.update_keep_set(idx, w + torch.tensor([[[0.0, 0.6]]]), delta, 4,
                                     torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]),
                                     torch.zeros(B, H, 4, D), 3)
    assert idx2.tolist() == [[[2, 4, 1]]]
    assert torch.allclose(w2, torch.tensor([[[1.1, 1.0, 0.9]]]))
    assert vp.keep_budget(0.1, 320) == 32 and vp.keep_budget(0.3, 10) == 3


@pytest.mark.parametrize("kw, match", [
    (dict(key_bits=5), "key_bits=5"),
    (dict(value_bits=1), "value_bits=1"),
    (dict(group_size=48), "group_size=48"),
    (dict(value_bits=4, value_group_size=48), "value_group_size=48"),
    (dict(side_bits=6), "side_bits=6"),
    (dict(value_policy="top"), "value_policy='top'"),
    (dict(value_bits=16, value_policy="a2", value_keep_frac=0.1), "value_policy='a2'"),
    (dict(value_keep_frac=0.2), "value_keep_frac=0.2"),
    (dict(residual_length=-1), "residual_length=-1"),
    (dict(sign=0.5), "sign=0.5"),
])
def test_bad_arguments_name_the_argument(llama, kw, match):
    model, _ = llama
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        HeadQCache(model.config, **kw)


def test_bad_calibration_for_cache():
    llama, qwen = make_tiny("llama"), make_tiny("qwen2")
    cal = tiny_calibration(llama, n_tokens=96)
    with pytest.raises(CalibrationError, match="another model"):
        HeadQCache(qwen.config, cal)
    with pytest.raises(CalibrationError, match="rank=4"):
        HeadQCache(llama.config, cal, rank=4)
    with pytest.raises(ValueError, match="rank=8 was given without a calibration"):
        HeadQCache(llama.config, None, rank=8)
    with pytest.raises(ValueError, match="key_bits"):
        HeadQCache(llama.config, cal, key_bits=16)
    with pytest.raises(TypeError, match="calibration"):
        HeadQCache(llama.config, "calib.safetensors")


def test_long_prompt_gives_back_window_capacity(restore_attn):
    """A long prompt grows the dense window to the prompt length; once its complete groups are
    quantised the spare capacity is released, so allocated bytes stay close to the used ones."""
    model = make_tiny("llama")
    restore_attn.append(attention.enable(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    cache = HeadQCache(model.config, None, key_bits=2, value_bits=2, group_size=32,
                       value_group_size=32)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for layer in cache.headq_layers:
        assert layer.buf["k_window"].shape[2] <= 2 * 32
        assert layer.n_window == 600 % 32
        assert layer.allocated_bytes() <= 1.3 * sum(layer.memory_breakdown().values())
