"""HeadQ cache + attention function inside real transformers generate / forward calls."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from conftest import TINY_KINDS, make_tiny, tiny_calibration
from headq_torch import attention, ops
from headq_torch.cache import HeadQCache, HeadQLayer

N_NEW = 20


def _prompt(model, n=70, batch=1, seed=3):
    # Token 0 is the pad_token_id the tests give generate(), which without an attention_mask
    # hides prompt tokens equal to it: holes that HeadQ decoding refuses (left padding only).
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, n), generator=g)


def _confident_prompt(model, n=70, min_gap=0.03):
    """A random prompt whose *dense* greedy continuation has a top-2 logit gap >= ``min_gap``
    at every step (chosen without looking at HeadQ), so an 8-bit cache must reproduce it."""
    for seed in range(20):
        ids = _prompt(model, n, seed=seed)
        out = _greedy(model, ids, DynamicCache(config=model.config), output_scores=True,
                      return_dict_in_generate=True)
        top2 = torch.stack(out.scores)[:, 0].float().topk(2, -1).values
        if (top2[:, 0] - top2[:, 1]).min() >= min_gap:
            return ids, out.sequences
    raise AssertionError("no prompt with a clear greedy margin")


def _greedy(model, ids, cache, attention_mask=None, n=N_NEW, **extra):
    """``n`` greedy tokens (exactly) with ``cache``; ``extra``: more generate() arguments."""
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, past_key_values=cache, pad_token_id=0, **extra)


def _kv8(policy: str = "uniform", **extra) -> dict:
    """HeadQCache arguments of the 8-bit tests: keys and values 8-bit in groups of 32, the A²
    policy keeping a quarter of the quantised tokens when ``policy == "a2"``."""
    kw = dict(key_bits=8, value_bits=8, group_size=32, value_group_size=32, **extra)
    if policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=0.25)
    return kw


def _kv2(policy: str, cal):
    """``(calibration, HeadQCache arguments)`` of the two-call prefill tests: 2-bit keys and
    values in groups of 32; ``"a2"`` keeps a tenth of the quantised tokens; ``"dense_keys"`` is
    16-bit keys and values without a calibration (the second call reads dense keys)."""
    kw = dict(key_bits=2, value_bits=2, group_size=32, value_group_size=32)
    if policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=0.1)
    if policy == "dense_keys":
        cal = None
        kw.update(key_bits=16, value_bits=16)
    return cal, kw


def _assert_same_a2_state(got, want):
    """Two A² caches accumulated the same weights (window and kept tokens) and keep sets."""
    for lw, lg in zip(want.layers, got.layers):
        assert lw.n_quant > 0 and lw.heavy_idx is not None and lw.heavy_idx.shape[-1] > 0
        torch.testing.assert_close(lg.buf["w_window"], lw.buf["w_window"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lg.heavy_w, lw.heavy_w, atol=1e-6, rtol=1e-5)
        assert torch.equal(lg.heavy_idx, lw.heavy_idx)


def _two_call_prompt(model, n: int, padded: bool):
    """``(ids, mask)`` of a batch of two ``n``-token prompts, the second with 9 left-padding
    tokens when ``padded``."""
    ids = _prompt(model, n=n, batch=2).to(model.device)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :9] = 0
        mask[1, :9] = 0
    return ids, mask


def _record_calls(monkeypatch, name: str) -> list:
    """Wrap ``attention.<name>`` (a function of a layer first) so that each call appends its
    layer's ``n_quant`` to the returned list."""
    used = []
    real = getattr(attention, name)
    monkeypatch.setattr(attention, name,
                        lambda layer, *a, **k: used.append(layer.n_quant) or real(layer, *a, **k))
    return used


def _two_calls(model, ids, mask, first: int, cal, kw):
    """A fresh HeadQCache fed ``ids[:, :first]``, then the rest in a second call (which reads
    the tokens the first quantised): ``(second call's logits, cache)``."""
    with torch.no_grad():
        c = HeadQCache(model.config, cal, **kw)
        model(ids[:, :first], attention_mask=mask[:, :first], past_key_values=c, use_cache=True)
        b = model(ids[:, first:], attention_mask=mask, past_key_values=c, use_cache=True).logits
    return b, c


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("policy", ["uniform", "a2"])
def test_generate_prefill_chunk_size(kind, policy, restore_attn, monkeypatch):
    """transformers' chunked prefill (``generate(prefill_chunk_size=...)``): the 70-token prompt
    arrives in chunks of 24 tokens, so the later chunks attend to already quantised tokens
    (group size 32). 8-bit greedy output equals the dense cache's; the cache holds every
    token."""
    model = make_tiny(kind)
    cal = tiny_calibration(model)
    ids, ref = _confident_prompt(model)
    kw = _kv8(policy)
    calls = []  # (query tokens, quantised tokens) of every multi-token attention call
    prefill = attention._prefill

    def spy(layer, module, query, *args, **kwargs):
        calls.append((query.shape[2], layer.n_quant))
        return prefill(layer, module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "_prefill", spy)
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **kw)
    out = _greedy(model, ids, cache, prefill_chunk_size=24)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + N_NEW - 1
    assert {n for n, _ in calls} == {24, 22}  # 24 + 24 + 22 prompt tokens
    assert any(nq > 0 for _, nq in calls)  # a chunk over quantised tokens


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("policy", ["uniform", "a2"])
@pytest.mark.parametrize("residual", [0, 32])
def test_assisted_decoding(kind, policy, residual, restore_attn, monkeypatch):
    """transformers' assisted (speculative) decoding: a draft model proposes tokens, the target
    verifies them in one multi-token call and rolls the rejected ones back with crop() (a 0-d
    tensor under transformers 5.17). Greedy 8-bit output equals the dense cache's. With
    residual_length >= the drafts (32) every rollback stays in the dense window: no lossy-crop
    warning; with 0 a rollback may reach the quantised region, and the cache warns at most
    once."""
    import warnings

    model = make_tiny(kind)
    draft = make_tiny(kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a draft that agrees with the target only in part
        for p in draft.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    cal = tiny_calibration(model)
    ids, ref = _confident_prompt(model)
    try:  # the same with the dense cache
        dense = _greedy(model, ids, DynamicCache(config=model.config), assistant_model=draft)
    except RuntimeError as e:  # transformers 5.17, Gemma 3: the draft's sliding layers
        pytest.skip(f"assisted decoding fails with DynamicCache too in this transformers: {e}")
    assert torch.equal(dense, ref)
    removed = []
    crop = HeadQLayer.crop

    def spy(layer, n):
        removed.append(n)
        return crop(layer, n)

    monkeypatch.setattr(HeadQLayer, "crop", spy)
    kw = _kv8(policy, residual_length=residual)
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _greedy(model, ids, cache, assistant_model=draft)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + N_NEW - 1
    assert any(n < 0 for n in removed)  # drafts were rejected and rolled back
    lossy = [w for w in caught if "quantised region" in str(w.message)]
    assert len(lossy) <= (1 if residual == 0 else 0)


@pytest.mark.parametrize("policy", ["uniform", "a2"])
def test_prompt_lookup_decoding(policy, restore_attn):
    """Prompt-lookup decoding (``generate(prompt_lookup_num_tokens=5)``: drafts copied from the
    prompt, verified and rolled back like assisted decoding) over a prompt that repeats itself:
    greedy 8-bit output equals the dense cache's."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    ids, _ = _confident_prompt(model)
    ids = torch.cat([ids, ids[:, :30]], dim=1)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    kw = _kv8(policy, residual_length=32)
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **kw)
    out = _greedy(model, ids, cache, prompt_lookup_num_tokens=5)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + N_NEW - 1


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("variant", ["kv8", "kv8_residual", "kv8_a2", "k8_dense_v"])
def test_greedy_8bit_matches_dynamic_cache(kind, variant, restore_attn):
    model = make_tiny(kind)
    cal = tiny_calibration(model)
    ids, ref = _confident_prompt(model)
    kw = dict(key_bits=8, value_bits=8, group_size=32, value_group_size=32)
    if variant == "kv8_residual":
        kw["residual_length"] = 16
    elif variant == "kv8_a2":
        kw.update(value_policy="a2", value_keep_frac=0.25)
    elif variant == "k8_dense_v":
        kw["value_bits"] = 16
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **kw)
    out = _greedy(model, ids, cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + N_NEW - 1
    hq = cache.headq_layers[0]
    assert hq.n_quant > 0 and hq.n_quant % 32 == 0


def test_gemma3_sliding_layers_stay_dense(restore_attn):
    model = make_tiny("gemma3")
    cal = tiny_calibration(model)
    assert cal.bases[0] is None and cal.bases[2] is None  # sliding layers: no basis
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, key_bits=8, value_bits=8, group_size=32,
                       value_group_size=32)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[0] is DynamicSlidingWindowLayer and kinds[2] is DynamicSlidingWindowLayer
    assert kinds[1] is HeadQLayer and kinds[3] is HeadQLayer
    ids = _prompt(model, n=40)  # beyond the sliding window of 24
    _greedy(model, ids, cache)
    assert cache.get_seq_length(1) == 40 + N_NEW - 1
    assert cache.layers[0].keys.shape[2] < 24  # the sliding layer kept only its window
    assert cache.layers[1].n_quant == 32


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_fallback_without_headq_attention_matches(kind, restore_attn):
    """With sdpa (no enable), update() returns the dense reconstruction: same logits."""
    model = make_tiny(kind)
    cal = tiny_calibration(model)
    ids = _prompt(model, n=75)

    def run():
        cache = HeadQCache(model.config, cal, key_bits=2, group_size=32)
        with torch.no_grad():
            logits = [model(ids[:, :50], past_key_values=cache, use_cache=True).logits[:, -1]]
            for t in range(50, 75):
                logits.append(model(ids[:, t:t + 1], past_key_values=cache,
                                    use_cache=True).logits[:, -1])
        return torch.stack(logits)

    dense_path = run()
    restore_attn.append(attention.enable(model))
    packed_path = run()
    torch.testing.assert_close(packed_path, dense_path, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("policy", ["uniform", "a2", "dense_keys"])
@pytest.mark.parametrize("padded", [False, True], ids=["same_length", "left_padded"])
@pytest.mark.parametrize("fused", [False, True], ids=["masked_sdpa", "cpu_flash"])
def test_prefill_dequantised_matches_row_blocks(restore_attn, monkeypatch, policy, padded, fused):
    """A call over already quantised tokens (the second of two) through
    attention._prefill_dequantised (the quantised region dequantised once into keys
    ``k̂ + sign·U ẑ`` and values, then masked SDPA (forced: attention._attention_with_lse
    declines), or with ``fused`` a flash kernel's causal attention from the last key with its
    lse (here the CPU's), one call per sequence for a left-padded batch; with A² the a2_weights
    op, per sequence for a left-padded batch, with the lse only over the kept tokens and the
    window) equals the materialised row blocks (forced here; what an A² cache uses on CUDA with
    a head dim the a2_weights kernels lack): the logits, and with A² the accumulated weights
    and the keep set."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids, mask = _two_call_prompt(model, 120, padded)
    cal, kw = _kv2(policy, cal)
    run = lambda: _two_calls(model, ids, mask, 70, cal, kw)  # noqa: E731
    monkeypatch.setattr(attention, "_dense_prefill", lambda layer, q: False)
    b_rows, c_rows = run()
    monkeypatch.setattr(attention, "_dense_prefill", lambda layer, q: layer.n_quant > 0)
    used = _record_calls(monkeypatch, "_prefill_dequantised")
    lengths, lse_passed = [], []
    if not fused:
        monkeypatch.setattr(attention, "_attention_with_lse", lambda *a, **kw: None)
    else:
        real_lse = attention._attention_with_lse
        monkeypatch.setattr(attention, "_attention_with_lse",
                            lambda m, q, k, *a, **kw: lengths.append((q.shape[2], k.shape[2])) or
                            real_lse(m, q, k, *a, **kw))
        real_a2 = ops.a2_weights
        monkeypatch.setattr(ops, "a2_weights",
                            lambda q, k, m, s, lse=None: lse_passed.append(lse is not None) or
                            a2_keys.append(k.shape[2]) or real_a2(q, k, m, s, lse=lse))
        a2_keys, kept_window = [], []
        real_kw = attention._a2_kept_window_weights
        monkeypatch.setattr(attention, "_a2_kept_window_weights",
                            lambda layer, *a: kept_window.append(
                                layer.heavy_idx.shape[-1] + layer.n_window) or real_kw(layer, *a))
    b_deq, c_deq = run()
    assert len(used) == len(c_deq.layers) and all(nq > 0 for nq in used)
    n_layers = len(c_deq.layers)
    if fused:  # the 50 tokens over all 120 (a padded batch: one call per sequence, the second
        # over its 111 visible tokens); with A² the op's key pass only
        per_layer = [(50, 120), (50, 111)] if padded else [(50, 120)]
        assert lengths == per_layer * n_layers
        assert lse_passed == ([True] * len(per_layer) * n_layers if policy == "a2" else [])
        # with A² the key pass runs over the kept tokens' keys and the window only (the
        # padded sequence's padding ends before its quantised tokens: the same keys)
        assert a2_keys == [n for n in kept_window for _ in per_layer]
        assert all(n < 120 for n in a2_keys)
    torch.testing.assert_close(b_deq, b_rows, atol=2e-5, rtol=1e-5)
    if policy == "a2":
        _assert_same_a2_state(c_deq, c_rows)
        if padded:  # the padded sequence's hidden tokens carry no weight
            assert c_deq._padding_memo[2] == [0, 9]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["uniform", "a2", "keys_only"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_rows,rows_per_op", [(2, 64), (5, 64), (5, 4)])
def test_prefill_decode_rows_matches_row_blocks(device, policy, padded, n_rows, rows_per_op,
                                                restore_attn, monkeypatch):
    """A few query tokens over already quantised tokens (an assisted-decoding verification, a
    short chunk) through attention._prefill_decode_rows (the decode op with the tokens' rows as
    its query heads and ``query_tokens``: causal over the call's own window tokens) equal the
    materialised row blocks (forced here): the logits, and with A² the accumulated weights and
    the keep set. Head dim 64, so CUDA runs its fused kernel; float32 model. ``rows_per_op`` 4
    (2 query heads per KV head): the 5 tokens go in op calls of 2, 2 and 1, each over the
    window up to its last token."""
    model = make_tiny("llama", head_dim=64).to(device)
    cal = tiny_calibration(model)
    cal.bases = [b.to(device) for b in cal.bases]
    restore_attn.append(attention.enable(model))
    ids, mask = _two_call_prompt(model, 100 + n_rows, padded)
    cal, kw = _kv2("a2" if policy == "a2" else "uniform", cal)
    if policy == "keys_only":
        kw.update(value_bits=16)
    run = lambda: _two_calls(model, ids, mask, 100, cal, kw)  # noqa: E731
    monkeypatch.setattr(attention, "_decode_rows", lambda layer, q: False)
    monkeypatch.setattr(attention, "_dense_prefill", lambda layer, q: False)
    b_rows, c_rows = run()
    monkeypatch.undo()
    restore_attn.append(attention.enable(model))
    monkeypatch.setattr(attention, "DECODE_ROWS_MAX_TOKENS", {"cpu": 8, "cuda": 8})
    monkeypatch.setattr(attention, "_DECODE_ROWS_PER_KV_HEAD", rows_per_op)
    used = _record_calls(monkeypatch, "_prefill_decode_rows")
    ops_rows = _record_calls(monkeypatch, "_decode_op")
    b_dec, c_dec = run()
    assert len(used) == len(c_dec.layers) and all(nq > 0 for nq in used)
    assert len(ops_rows) == len(used) * -(-n_rows // (rows_per_op // 2))
    torch.testing.assert_close(b_dec, b_rows, atol=5e-5, rtol=1e-5)
    if policy == "a2":
        _assert_same_a2_state(c_dec, c_rows)
    if padded:  # the per-forward kv_start tensor the layers take from the memo
        assert c_dec._starts_tensor_memo[1].tolist() == [0, 9]


def test_prefill_decode_rows_takes_only_left_padded_causal_masks(restore_attn):
    """attention._prefill_decode_rows under a causal mask equals the row blocks; another mask
    (here: a hole in the middle) is not for the decode op, whose ``kv_start`` hides only the
    tokens before a sequence's first one: it returns None (and _prefill dequantises)."""
    model = make_tiny("llama", head_dim=64)
    cal, kw = _kv2("uniform", tiny_calibration(model))
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=104, batch=1)
    with torch.no_grad():
        c = HeadQCache(model.config, cal, **kw)
        model(ids[:, :100], past_key_values=c, use_cache=True)
    layer = c.headq_layers[0]
    q = torch.randn(1, model.config.num_attention_heads, 4, 64)
    k = torch.randn(1, layer.H, 4, 64)
    layer.update(k, k.clone())
    T = layer.n_quant + layer.n_window
    mask = torch.ones(1, 1, 4, T, dtype=torch.bool).tril(T - 4)
    assert attention._decode_rows(layer, q)
    got = attention._prefill_decode_rows(layer, q, mask, 0.125)
    keys, values = layer.dense_kv(torch.float32)
    want = attention._prefill_rows(layer, q, mask, 0.125, 0, values, keys)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    mask = mask.clone()  # a new mask object (the answer is kept per object)
    mask[..., 40] = False  # a hole
    assert attention._prefill_decode_rows(layer, q, mask, 0.125) is None


def test_decode_rows_only_for_few_rows():
    """attention._decode_rows: calls of 2 .. DECODE_ROWS_MAX_TOKENS query tokens (per device
    type) over quantised keys, on CUDA only for the decode kernels' head dims, and never inside
    a graph-decode step."""
    from types import SimpleNamespace

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    owner = SimpleNamespace(_static_step=None)
    layer = SimpleNamespace(_owner=owner, n_quant=64, quantise_keys=True, H=2)
    q = lambda dev, L, d=64, hq=8: SimpleNamespace(device=dev, shape=(1, hq, L, d))  # noqa: E731
    n_cpu, n_cuda = (attention.DECODE_ROWS_MAX_TOKENS[k] for k in ("cpu", "cuda"))
    assert attention._decode_rows(layer, q(cpu, 2)) and attention._decode_rows(layer, q(cpu, n_cpu))
    assert not attention._decode_rows(layer, q(cpu, 1))
    assert not attention._decode_rows(layer, q(cpu, n_cpu + 1))
    assert attention._decode_rows(layer, q(cuda, n_cuda, 128))
    assert not attention._decode_rows(layer, q(cuda, 2, 96))
    layer.n_quant = 0
    assert not attention._decode_rows(layer, q(cpu, 2))
    layer.n_quant, layer.quantise_keys = 64, False
    assert not attention._decode_rows(layer, q(cpu, 2))
    layer.quantise_keys, owner._static_step = True, object()
    assert not attention._decode_rows(layer, q(cpu, 2))


def test_a2_padded_first_prompt_fused_per_sequence(restore_attn, monkeypatch):
    """A left-padded A² first prompt on the fused path (CUDA; forced here on the CPU, whose flash
    kernel stands in for the CUDA ones): one fused call per sequence over its own tokens gives
    the output and the rows' lse, and the a2_weights op runs only its key pass per sequence.
    The logits at real positions, the weights and the keep sets equal the row blocks' (the CPU
    path)."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=90, batch=3)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    ids[2, :40], mask[2, :40] = 0, 0

    def run():
        with torch.no_grad():
            c = HeadQCache(model.config, cal, key_bits=2, value_bits=2, group_size=32,
                           value_group_size=32, value_policy="a2", value_keep_frac=0.1)
            return model(ids, attention_mask=mask, past_key_values=c, use_cache=True).logits, c

    want, c_rows = run()
    lengths, passes = [], []
    real_a2 = ops.a2_weights
    monkeypatch.setattr(attention, "_fused_a2_weights", lambda q: True)
    real_lse = attention._attention_with_lse
    monkeypatch.setattr(attention, "_attention_with_lse",
                        lambda m, q, *a, **kw: lengths.append(q.shape[2]) or
                        real_lse(m, q, *a, **kw))
    monkeypatch.setattr(ops, "a2_weights",
                        lambda q, k, m, s, lse=None: passes.append(lse is not None) or
                        real_a2(q, k, m, s, lse=lse))
    got, c_fused = run()
    n_layers = model.config.num_hidden_layers
    assert lengths == [90, 81, 50] * n_layers  # one fused call per sequence, its visible tokens
    assert passes == [True] * 3 * n_layers  # key pass only, one call per sequence
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert bool((got[~real] == got[~real]).all())  # padding rows: finite
    _assert_same_a2_state(c_fused, c_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["uniform", "a2"])
def test_decode_without_fused_kernel_falls_back(device, policy, restore_attn, monkeypatch):
    """A decode step the fused op cannot take (on CUDA a head dim other than 64 or 128: the tiny
    models' 32) goes through the prefill path with its one query, with one warning per cache:
    greedy 8-bit output equals the dense cache's and the decode op is never called. On the CPU
    (where the op takes any head dim) the fallback is forced."""
    import warnings

    model = make_tiny("llama")
    assert model.config.head_dim == 32
    ids, ref = _confident_prompt(model)
    cal = tiny_calibration(model)
    if device == "cpu":
        monkeypatch.setattr(attention, "_fused_decode", lambda layer, q: False)
    else:
        model, ids, ref = model.cuda(), ids.cuda(), ref.cuda()
        cal.bases = [b.cuda() for b in cal.bases]
    decoded = []
    monkeypatch.setattr(attention, "_decode", lambda *a: decoded.append(1))
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **_kv8(policy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _greedy(model, ids, cache)
    assert torch.equal(out, ref)
    assert not decoded and cache.headq_layers[0].n_quant > 0
    msgs = [str(w.message) for w in caught if "no fused CUDA decode kernel" in str(w.message)]
    assert len(msgs) == (1 if device == "cuda" else 0), msgs


def test_fused_decode_only_for_the_kernels_head_dims():
    """attention._fused_decode: True on the CPU and for CUDA head dims 64 / 128; otherwise False
    with a RuntimeWarning once per cache."""
    from types import SimpleNamespace

    import warnings

    cuda = torch.device("cuda")
    layer = SimpleNamespace(_owner=SimpleNamespace())
    q = lambda dev, d: SimpleNamespace(device=dev, shape=(1, 4, 1, d))  # noqa: E731
    assert attention._fused_decode(layer, q(torch.device("cpu"), 32))
    assert attention._fused_decode(layer, q(cuda, 64))
    assert attention._fused_decode(layer, q(cuda, 128))
    with pytest.warns(RuntimeWarning, match="head dim 96 has no fused CUDA decode kernel"):
        assert not attention._fused_decode(layer, q(cuda, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not attention._fused_decode(layer, q(cuda, 96))  # once per cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batch_left_padding_matches_separate_runs(kind, restore_attn):
    model = make_tiny(kind)
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    lens = [70, 45]
    seqs = [_prompt(model, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    T = max(lens)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    kw = dict(key_bits=8, value_bits=8, group_size=32, value_group_size=32)
    batched = _greedy(model, ids, HeadQCache(model.config, cal, **kw), attention_mask=mask)
    for i, s in enumerate(seqs):
        alone = _greedy(model, s.unsqueeze(0), HeadQCache(model.config, cal, **kw))
        assert torch.equal(batched[i, T:], alone[0, len(s):])
        dense = _greedy(model, s.unsqueeze(0), DynamicCache(config=model.config))
        assert torch.equal(alone, dense)


def test_masks_with_holes_are_refused_at_decode(restore_attn):
    """The decode op masks only the tokens before each sequence's first visible one (left
    padding): a mask hiding a later token (right padding; or a prompt token equal to the pad id
    that generate() hides when given no mask) must raise, not be attended silently."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    kw = dict(key_bits=8, value_bits=8, group_size=32, value_group_size=32)
    ids = _prompt(model, n=40, batch=2, seed=4)
    right = torch.ones_like(ids)
    right[1, -5:] = 0  # right padding of the second sequence
    with pytest.raises(ValueError, match="left padding only"):
        _greedy(model, ids, HeadQCache(model.config, cal, **kw), attention_mask=right, n=3)
    holey = ids.clone()
    holey[0, 20] = 0  # the pad id inside the prompt, no mask given
    with pytest.raises(ValueError, match="explicit attention_mask"):
        _greedy(model, holey, HeadQCache(model.config, cal, **kw), n=3)
    # with the mask given explicitly the same prompt decodes (token 0 is then an ordinary token)
    out = _greedy(model, holey, HeadQCache(model.config, cal, **kw),
                  attention_mask=torch.ones_like(holey), n=3)
    assert out.shape == (2, 43)
    # a left-padded batch decodes; its mask is read on the host (checked for holes) at the first
    # decode step after the prompt only
    left = torch.ones_like(ids)
    left[1, :5] = 0
    checks = []
    real = attention._kv_start

    def spy(mask, *args, **kwargs):
        if mask is not None:
            checks.append(kwargs.get("check_holes", True))
        return real(mask, *args, **kwargs)

    attention._kv_start = spy
    try:
        out = _greedy(model, ids, HeadQCache(model.config, cal, **kw), attention_mask=left, n=4)
    finally:
        attention._kv_start = real
    assert out.shape == (2, 44)
    assert checks == [True, False, False], checks  # the three decode steps after the prompt


def test_decode_op_matches_prefill_path(restore_attn):
    """One query token through ops.decode_attention == the same token through the chunk path
    (corrected_logits + dequantised values), A² keep set included."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=80)
    kw = dict(key_bits=2, value_bits=2, group_size=32, value_group_size=32, value_policy="a2",
              value_keep_frac=0.2)
    with torch.no_grad():
        c1 = HeadQCache(model.config, cal, **kw)
        model(ids[:, :70], past_key_values=c1, use_cache=True)
        step = model(ids[:, 70:71], past_key_values=c1, use_cache=True).logits
        c2 = HeadQCache(model.config, cal, **kw)
        model(ids[:, :70], past_key_values=c2, use_cache=True)
        # two query tokens take the chunk path; compare the first one's logits
        chunk = model(ids[:, 70:72], past_key_values=c2, use_cache=True).logits[:, :1]
    torch.testing.assert_close(step, chunk, atol=1e-4, rtol=1e-4)


def test_decode_lengths_made_once_per_step(restore_attn, monkeypatch):
    """The decode op's per-sequence length tensors are built once per step and shared by every
    layer (values checked against each layer's own lengths), and rebuilt when the lengths move."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=80)
    seen = []
    real = attention.ops.decode_attention

    def spy(*args, **kwargs):
        seen.append((args[15], args[16]))  # n_quant, n_window
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.ops, "decode_attention", spy)
    with torch.no_grad():
        cache = HeadQCache(model.config, cal, key_bits=2, value_bits=2, group_size=32,
                           value_group_size=32)
        model(ids[:, :70], past_key_values=cache, use_cache=True)
        firsts = []
        for t in (70, 71):
            seen.clear()
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert len(seen) == model.config.num_hidden_layers
            assert all(a is seen[0][0] and w is seen[0][1] for a, w in seen)
            nq_t, nw_t = seen[0]
            assert nq_t.dtype == torch.int32 and nq_t.shape == (1,)
            assert nq_t.item() > 0 and nq_t.item() + nw_t.item() == t + 1  # every token so far
            firsts.append(seen[0])
    assert firsts[0][1] is not firsts[1][1]  # the window grew: new tensors


def test_a2_keep_all_equals_dense_values(restore_attn):
    """value_keep_frac=1 keeps every quantised value at full precision: same logits as dense
    values (the heavy deltas are read by both the decode op and the chunk path)."""
    model = make_tiny("qwen2")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=90)

    def logits(**kw):
        cache = HeadQCache(model.config, cal, key_bits=4, group_size=32, value_group_size=32, **kw)
        with torch.no_grad():
            out = [model(ids[:, :40], past_key_values=cache, use_cache=True).logits]
            for t in range(40, 90):
                out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(out, 1), cache

    dense_v, _ = logits(value_bits=16)
    kept, cache = logits(value_bits=2, value_policy="a2", value_keep_frac=1.0)
    lossy, _ = logits(value_bits=2)
    torch.testing.assert_close(kept, dense_v, atol=2e-4, rtol=1e-4)
    assert (lossy - dense_v).abs().max() > 10 * (kept - dense_v).abs().max()
    layer = cache.headq_layers[0]
    assert layer.heavy_idx.shape[-1] == layer.n_quant
    assert layer.heavy_idx.dtype == torch.int32
    assert sorted(layer.heavy_idx[0, 0].tolist()) == list(range(layer.n_quant))


def test_two_bit_logits_bound_tiny(restore_attn):
    """2-bit keys + side code on a tiny random model (prefill 40, 60 decode steps): measured
    max |Δlogit| = 0.0026 x the logit std (std ≈ 1.6); asserted bound 0.02 x std."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    ids = _prompt(model, n=100)
    with torch.no_grad():
        dense = model(ids).logits
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, key_bits=2, group_size=32)
    with torch.no_grad():
        out = [model(ids[:, :40], past_key_values=cache, use_cache=True).logits]
        for t in range(40, 100):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    dev = (torch.cat(out, 1) - dense).abs().max() / dense.std()
    assert 0 < dev < 0.02


# ---------------------------------------------------------------------------------------------
# SmolLM2 (the packaged real model)
# ---------------------------------------------------------------------------------------------

def _smol_prompt(tok):
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


@pytest.mark.slow
def test_smollm2_greedy_8bit_matches_dynamic_cache(smollm2, smollm2_calibration):
    model, tok = smollm2
    ids = _smol_prompt(tok)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    attention.enable(model)
    try:
        cache = HeadQCache(model.config, smollm2_calibration, key_bits=8, value_bits=8,
                           group_size=32)
        out = _greedy(model, ids, cache)
    finally:
        attention.disable(model)
    assert torch.equal(out, ref)
    assert cache.headq_layers[0].n_quant >= 32


@pytest.mark.slow
def test_smollm2_two_bit_logits_bound(smollm2, smollm2_calibration):
    """Teacher-forced on 192 tokens of the packaged evaluation text (prefill 128, then 64
    decode steps), 2-bit keys, G=32, dense values. Measured (CPU, fp32, rank 8 on 512
    calibration tokens): base 2-bit mean KL 0.117 (max 0.50), HeadQ mean KL 0.045 (max 0.23);
    mean |Δlogit| base 1.28, HeadQ 0.58, max |Δlogit| HeadQ 5.2 (logit std 6.9).
    Asserted: HeadQ mean KL < 0.1 and < 0.6 x base, HeadQ mean |Δlogit| < 1.2."""
    from headq_torch.data import calibration_eval_split

    model, tok = smollm2
    _, eval_text = calibration_eval_split()
    ids = tok(eval_text[:4000], return_tensors="pt")["input_ids"][:, :192]
    with torch.no_grad():
        dense = model(ids).logits[0, 127:191]
    attention.enable(model)
    results = {}
    try:
        for name, cal in (("base", None), ("headq", smollm2_calibration)):
            cache = HeadQCache(model.config, cal, key_bits=2, group_size=32)
            with torch.no_grad():
                out = [model(ids[:, :128], past_key_values=cache, use_cache=True).logits[0, -1:]]
                for t in range(128, 191):
                    out.append(model(ids[:, t:t + 1], past_key_values=cache,
                                     use_cache=True).logits[0])
            x = torch.cat(out)
            lp, lq = dense.log_softmax(-1), x.log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
            results[name] = (kl, (x - dense).abs().mean().item())
    finally:
        attention.disable(model)
    kl_base, _ = results["base"]
    kl_hq, dlogit_hq = results["headq"]
    assert kl_hq < 0.1 and kl_hq < 0.6 * kl_base, results
    assert dlogit_hq < 1.2, results


@pytest.mark.parametrize("fused", [False, True], ids=["row_blocks", "a2_weights_op"])
def test_a2_prefill_weights_match_eager_attention(restore_attn, monkeypatch, fused):
    """The A² weights a first prompt accumulates are Σ a² over each KV head's query heads and
    the prompt's queries, with ``a`` the attention probabilities transformers' eager attention
    returns (the prompt is attended at full precision): checked for the kept tokens (their
    ``heavy_w``) and the window, with the prompt in one block of rows and in ~7-row blocks, and
    by SDPA + the a2_weights op (the CUDA path, forced here on the CPU op)."""
    from headq_torch import value_policy as vp

    model = make_tiny("llama")
    cal = tiny_calibration(model)
    ids = _prompt(model, n=70)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions
    restore_attn.append(attention.enable(model))
    calls = []
    if fused:
        real = ops.a2_weights
        monkeypatch.setattr(attention, "_fused_a2_weights", lambda q: True)
        monkeypatch.setattr(ops, "a2_weights", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for rows_bytes in (None, 4 * 4 * 70 * 7):
        if rows_bytes is not None:
            monkeypatch.setattr(attention, "_PREFILL_LOGIT_BYTES", rows_bytes)
        cache = HeadQCache(model.config, cal, key_bits=2, value_bits=2, group_size=32,
                           value_group_size=32, value_policy="a2", value_keep_frac=0.1)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        for layer, a in zip(cache.headq_layers, probs):
            want = vp.squared_weights(a, layer.H)  # [B, H, 70]
            nq, nw = layer.n_quant, layer.n_window
            assert nq > 0 and nq + nw == 70
            torch.testing.assert_close(layer.buf["w_window"][:, :, :nw], want[..., nq:],
                                       atol=1e-6, rtol=1e-5)
            idx = layer.heavy_idx
            assert idx.shape[-1] > 0 and bool((idx >= 0).all())
            torch.testing.assert_close(layer.heavy_w, torch.gather(want, -1, idx.long()),
                                       atol=1e-6, rtol=1e-5)
            # the kept tokens are the heaviest of the quantised region
            top = want[..., :nq].topk(idx.shape[-1], dim=-1).values.min(-1).values
            assert bool((layer.heavy_w.min(-1).values >= top - 1e-6).all())
    assert len(calls) == (2 * len(probs) if fused else 0)


@pytest.mark.parametrize("policy", ["uniform", "a2", "dense_keys"])
def test_prefill_row_chunks_match_unchunked(restore_attn, monkeypatch, policy):
    """Long multi-token calls are processed in query-row chunks (bounded logit memory): the
    result equals the unchunked computation, for a first prompt (dense fast path, or with A²
    the materialised one, whose blocks skip the columns after them) and for a second chunk that
    reads quantised tokens; with A² the accumulated weights and the keep set too."""
    model = make_tiny("llama")
    cal = tiny_calibration(model)
    restore_attn.append(attention.enable(model))
    ids = _prompt(model, n=120)
    cal, kw = _kv2(policy, cal)

    def run():
        with torch.no_grad():
            c = HeadQCache(model.config, cal, **kw)
            a = model(ids[:, :70], past_key_values=c, use_cache=True).logits
            b = model(ids[:, 70:], past_key_values=c, use_cache=True).logits
        return a, b, c

    # the row blocks also for the second call (an A² cache's path on the CPU and on CUDA with
    # a head dim the a2_weights kernels lack; test_prefill_dequantised_matches_row_blocks
    # compares them with the path the second call takes otherwise)
    monkeypatch.setattr(attention, "_dense_prefill", lambda layer, q: False)
    a_full, b_full, c_full = run()
    monkeypatch.setattr(attention, "_PREFILL_LOGIT_BYTES", 4 * 4 * 90 * 7)  # ~7-row chunks
    a_chunk, b_chunk, c_chunk = run()
    torch.testing.assert_close(a_chunk, a_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_chunk, b_full, atol=1e-5, rtol=1e-5)
    if policy == "a2":
        _assert_same_a2_state(c_chunk, c_full)
    with torch.no_grad():
        dc = DynamicCache(config=model.config)
        dense = model(ids[:, :70], past_key_values=dc, use_cache=True).logits
        dense_b = model(ids[:, 70:], past_key_values=dc, use_cache=True).logits
    torch.testing.assert_close(a_full, dense, atol=1e-5, rtol=1e-5)
    if policy == "dense_keys":  # nothing is quantised: the second call is plain attention too
        assert c_full.layers[0].n_quant > 0
        torch.testing.assert_close(b_full, dense_b, atol=1e-5, rtol=1e-5)
