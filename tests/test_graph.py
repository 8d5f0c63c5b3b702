"""GraphDecoder (headq_torch.graph): the static-shape decode step against the eager path.

On the CPU the step runs without capture (graph=False): the same ops on the same inputs as the
eager step, so logits must agree exactly, across window flushes, buffer growth and left padding.
On CUDA the step is captured and replayed (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny, tiny_calibration
from headq_torch import attention
from headq_torch.cache import HeadQCache
from headq_torch.graph import GraphDecoder, generate
from headq_torch.value_policy import keep_budget

CUDA = torch.cuda.is_available()
KW = dict(key_bits=2, value_bits=2, group_size=32, value_group_size=32)


def _ids(model, batch, n, seed=5):
    # No token 0: it is the pad_token_id given to generate(), which hides prompt tokens equal to
    # it when no attention_mask is passed (holes HeadQ decoding refuses).
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, n), generator=g)


def _setup(restore_attn, device="cpu", dtype=torch.float32, **kw):
    # head dim 64: the fused CUDA decode is built for 64 and 128 (the CPU op takes any)
    model = make_tiny("llama", head_dim=64)
    cal = tiny_calibration(model)
    model = model.to(device=device, dtype=dtype)
    cal.bases = [b.to(device) for b in cal.bases]
    restore_attn.append(attention.enable(model))
    return model, cal


@torch.no_grad()
def _eager_and_static(model, cal, prompt, steps, graph, max_length=None, mask=None, **kw):
    """Logits of ``steps`` greedy steps (driven by the eager path's choices) from two caches:
    eager forward calls, and the GraphDecoder. ``mask``: the prompt's left-padding mask (the
    eager calls get the growing mask and its positions, as ``model.generate`` passes them)."""
    ce = HeadQCache(model.config, cal, **{**KW, **kw})
    cs = HeadQCache(model.config, cal, **{**KW, **kw})
    extra = {}
    if mask is not None:
        extra = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    out = model(prompt, past_key_values=ce, use_cache=True, **extra)
    model(prompt, past_key_values=cs, use_cache=True, **extra)
    dec = GraphDecoder(model, cs, max_length=max_length, attention_mask=mask, graph=graph)
    nxt = out.logits[:, -1:].argmax(-1)
    le, ls = [], []
    for _ in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            extra = dict(attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1)
        a = model(nxt, past_key_values=ce, use_cache=True, **extra).logits
        b = dec.step(nxt).clone()
        le.append(a)
        ls.append(b)
        nxt = a[:, -1:].argmax(-1)
    return torch.cat(le, 1), torch.cat(ls, 1), ce, cs, dec


@pytest.mark.parametrize("prompt_len,residual,extra", [
    (50, 0, {}), (64, 0, {}), (20, 0, {}), (70, 16, {}), (45, 16, {}),
    (50, 0, {"value_bits": 16}), (50, 0, {"key_bits": 4, "value_bits": 8, "side_bits": 4})])
def test_static_step_equals_eager(prompt_len, residual, extra, restore_attn):
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 2, prompt_len)
    le, ls, ce, cs, _ = _eager_and_static(model, cal, prompt, 75, graph=False,
                                          max_length=prompt_len + 80, residual_length=residual,
                                          **extra)
    if prompt_len >= 32 + residual:
        assert torch.equal(le, ls)
    else:
        # Until the first group is quantised the eager step attends through SDPA over the
        # window, the static step through the decode op (an empty quantised region): rounding
        # differs, and the cache contents then differ in the last bits.
        torch.testing.assert_close(ls, le, atol=1e-4, rtol=1e-4)
        return
    for a, b in zip(ce.layers, cs.layers):  # the same cache contents afterwards
        assert (a.n_quant, a.n_window) == (b.n_quant, b.n_window)
        assert a.n_quant >= 64  # the steps crossed window flushes
        nq, nw = a.n_quant, a.n_window
        for name in ("k_codes", "z_codes", "v_codes", "z_scale", "v_scale", "v_zero", "v_dense"):
            if name in a.buf:
                assert torch.equal(a.buf[name][:, :, :nq], b.buf[name][:, :, :nq]), name
        for name in ("k_scale", "k_zero"):
            assert torch.equal(a.buf[name][:, :, :nq // 32], b.buf[name][:, :, :nq // 32])
        assert torch.equal(a.buf["k_window"][:, :, :nw], b.buf["k_window"][:, :, :nw])


def test_static_step_grows_without_max_length(restore_attn):
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 1, 40)
    le, ls, _, cs, _ = _eager_and_static(model, cal, prompt, 100, graph=False, max_length=None)
    assert torch.equal(le, ls)
    assert cs.layers[0].buf["k_codes"].shape[2] >= cs.layers[0].n_quant >= 128


def test_reserve_is_exact_and_keeps_buffers(restore_attn):
    model, cal = _setup(restore_attn)
    cache = HeadQCache(model.config, cal, **KW)
    with torch.no_grad():
        model(_ids(model, 1, 40), past_key_values=cache, use_cache=True)
    cache.reserve(200)
    layer = cache.layers[0]
    assert layer.buf["k_codes"].shape[2] == 224  # 200 rounded up to the 32-token group
    assert layer.buf["k_scale"].shape[2] == 7
    before = [id(t) for t in layer.buf.values()]
    dec = GraphDecoder(model, cache, graph=False)
    dec.greedy(_ids(model, 1, 1), 150)
    assert [id(t) for t in layer.buf.values()] == before  # no step reallocated
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        cache.reserve(0)


def test_reserve_just_past_capacity_keeps_buffers_consistent(restore_attn):
    """A reserve one group past the current capacity: every buffer gets exactly that capacity
    (a doubled scale buffer next to exact codes would fail the op's shape checks)."""
    model, cal = _setup(restore_attn)
    cache = HeadQCache(model.config, cal, **KW)
    with torch.no_grad():
        out = model(_ids(model, 2, 64), past_key_values=cache, use_cache=True)
    assert cache.layers[0].buf["k_codes"].shape[2] == 64
    cache.reserve(96)
    for layer in cache.layers:
        b = layer.buf
        assert b["k_codes"].shape[2] == 96
        assert b["k_scale"].shape[2] == b["k_zero"].shape[2] == 3
        for name in ("z_codes", "z_scale", "v_codes", "v_scale", "v_zero"):
            assert b[name].shape[2] == 96, name
    dec = GraphDecoder(model, cache, graph=False)
    toks = dec.greedy(out.logits[:, -1:].argmax(-1), 31)  # up to the reserved 96
    assert toks.shape == (2, 31) and cache.layers[0].buf["k_codes"].shape[2] == 96


def _left_padded(model, lens, seed):
    """A left-padded batch of random prompts of lengths ``lens`` and its mask."""
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, T - n:] = _ids(model, 1, n, seed=seed + i)[0]
        mask[i, T - n:] = 1
    return ids, mask


def _padded_batch_and_generate(model, cal, lens, steps, seed, **kw):
    """A left-padded batch of random prompts of lengths ``lens`` (the first the longest), its
    mask, and transformers' greedy generate of ``steps`` tokens with an eager HeadQ cache
    (``KW`` updated by ``kw``)."""
    ids, mask = _left_padded(model, lens, seed)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False,
                         past_key_values=HeadQCache(model.config, cal, **{**KW, **kw}),
                         pad_token_id=0)
    return ids, mask, ref


def test_greedy_equals_generate_left_padded(restore_attn):
    """A left-padded batch: the decoder's tokens equal transformers' generate with an eager
    HeadQ cache (positions and the first visible token follow the prompt mask)."""
    model, cal = _setup(restore_attn)
    T, steps = 60, 70
    ids, mask, ref = _padded_batch_and_generate(model, cal, [60, 37], steps, seed=20)
    cache = HeadQCache(model.config, cal, **KW)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
    first = out.logits[:, -1:].argmax(-1)
    dec = GraphDecoder(model, cache, max_length=T + steps, attention_mask=mask, graph=False)
    toks = dec.greedy(first, steps - 1)
    assert torch.equal(ref[:, T:T + 1], first)
    assert torch.equal(ref[:, T + 1:], toks)


def test_generate_equals_transformers_generate(restore_attn):
    """graph.generate (prefill + static steps) == model.generate with an eager HeadQ cache, for
    a left-padded batch; EOS handling pads after the first EOS like generate does."""
    model, cal = _setup(restore_attn)
    T, steps = 55, 60
    ids, mask, ref = _padded_batch_and_generate(model, cal, [55, 40], steps, seed=30)
    got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, attention_mask=mask,
                   eos_token_id=[], graph=False)  # min_new_tokens above: no EOS stop
    assert torch.equal(got, ref)
    eos = int(ref[0, T + 5])  # a token the first sequence emits: pad after its first use
    cut = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, attention_mask=mask,
                   eos_token_id=eos, pad_token_id=-1, graph=False)
    for b in range(2):
        hits = (ref[b, T:] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else steps
        assert torch.equal(cut[b, T:T + stop], ref[b, T:T + stop])
        assert bool((cut[b, T + stop:] == -1).all())
    with pytest.raises(ValueError, match="the cache must be empty"):
        c = HeadQCache(model.config, cal, **KW)
        generate(model, ids, c, 2, attention_mask=mask, graph=False)
        generate(model, ids, c, 2, attention_mask=mask, graph=False)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(model, ids, HeadQCache(model.config, cal, **KW), 0, graph=False)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        generate(model, ids, HeadQCache(model.config, cal, **KW), 3, attention_mask=mask[:, 1:])


def test_generate_stops_at_eos_like_transformers(restore_attn):
    """With an EOS both sequences emit, graph.generate stops (checking every few steps) and
    returns exactly what model.generate returns: pads after each sequence's first EOS, cut at
    the step the last one finished."""
    model, cal = _setup(restore_attn)
    T, steps = 55, 60
    ids, mask, ref = _padded_batch_and_generate(model, cal, [55, 40], steps, seed=30)
    firsts = [{int(t): i for i, t in reversed(list(enumerate(ref[b, T:])))} for b in range(2)]
    common = [t for t in firsts[0] if t in firsts[1] and max(firsts[0][t], firsts[1][t]) < 40]
    assert common, "the two greedy continuations share no token in their first 40"
    eos = common[0]
    want = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          past_key_values=HeadQCache(model.config, cal, **KW), eos_token_id=eos,
                          pad_token_id=1)
    assert want.shape[1] < T + steps  # transformers stopped early
    for every in (1, 4, 16):
        got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps,
                       attention_mask=mask, eos_token_id=eos, pad_token_id=1, graph=False,
                       check_every=every)
        assert torch.equal(got, want), f"check_every={every}"


def test_generate_takes_eos_and_pad_from_the_generation_config(restore_attn):
    """Without eos_token_id / pad_token_id, graph.generate stops and pads as model.generate does
    with its defaults: the generation config's EOS (an id or a list of ids) and pad token (else
    the first EOS id)."""
    model, cal = _setup(restore_attn)
    T, steps = 55, 60
    ids, mask, ref = _padded_batch_and_generate(model, cal, [55, 40], steps, seed=30)
    firsts = [{int(t): i for i, t in reversed(list(enumerate(ref[b, T:])))} for b in range(2)]
    common = [t for t in firsts[0] if t in firsts[1] and max(firsts[0][t], firsts[1][t]) < 40]
    only0 = [t for t in firsts[0] if t not in firsts[1] and firsts[0][t] < 20]
    assert common and only0, "no shared / first-sequence-only token to use as EOS"
    gc = model.generation_config
    saved = (gc.eos_token_id, gc.pad_token_id)
    try:
        for eos, pad in ((common[0], None), ([only0[0], common[0]], 3), (only0[0], None)):
            gc.eos_token_id, gc.pad_token_id = eos, pad
            want = model.generate(ids, attention_mask=mask, max_new_tokens=steps,
                                  do_sample=False,
                                  past_key_values=HeadQCache(model.config, cal, **KW))
            got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps,
                           attention_mask=mask, graph=False)
            assert torch.equal(got, want), f"eos={eos} pad={pad}"
            first = eos[0] if isinstance(eos, list) else eos
            if pad is None:  # padded with the (first) EOS id after the first EOS
                b0 = got[0, T:]
                k = int((b0 == first).nonzero()[0])
                assert bool((b0[k:] == first).all())
        gc.eos_token_id = common[0]  # an explicit empty list: no EOS stop
        got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps,
                       attention_mask=mask, eos_token_id=[], graph=False)
        assert torch.equal(got, ref)
    finally:
        gc.eos_token_id, gc.pad_token_id = saved
    for bad, match in ((dict(eos_token_id=1.5), "eos_token_id .*must be an integer token id"),
                       (dict(eos_token_id=[2, "x"]), "eos_token_id must be an integer"),
                       (dict(pad_token_id=True), "pad_token_id must be an integer")):
        with pytest.raises(ValueError, match=match):
            generate(model, ids, HeadQCache(model.config, cal, **KW), 3, graph=False, **bad)


def test_generate_samples_like_transformers(restore_attn):
    """do_sample: with the same seed and warpers (temperature, top-k, top-p) the tokens are
    model.generate's (its EOS included: the tiny model's generation config has one); top_k=1
    is greedy; an explicit generator makes runs repeatable."""
    model, cal = _setup(restore_attn)
    ids, steps = _ids(model, 2, 45), 40
    warp = dict(temperature=0.7, top_k=20, top_p=0.9)
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, int)
    torch.manual_seed(123)
    want = model.generate(ids, max_new_tokens=steps, do_sample=True, pad_token_id=0,
                          past_key_values=HeadQCache(model.config, cal, **KW), **warp)
    torch.manual_seed(123)
    got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, do_sample=True,
                   eos_token_id=eos, pad_token_id=0, graph=False, **warp)
    assert torch.equal(got, want)
    assert bool((want[:, 45:] == eos).any())  # a sequence did finish (checked: seed 123)
    greedy = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, graph=False)
    assert not torch.equal(got, greedy)  # sampling did sample
    top1 = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, do_sample=True,
                    top_k=1, graph=False)
    assert torch.equal(top1, greedy)
    runs = [generate(model, ids, HeadQCache(model.config, cal, **KW), steps, do_sample=True,
                     generator=torch.Generator().manual_seed(7), graph=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    for bad, match in ((dict(temperature=0.0), "temperature must be a finite number > 0"),
                       (dict(top_k=0), "top_k must be None or an integer >= 1"),
                       (dict(top_p=1.5), "top_p must be None or a number in"),
                       (dict(do_sample=1), "do_sample must be a bool"),
                       (dict(check_every=0), "check_every must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            generate(model, ids, HeadQCache(model.config, cal, **KW), 3, graph=False, **bad)


def test_bad_use_is_refused(restore_attn):
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 2, 40)
    cache = HeadQCache(model.config, cal, **KW)
    with pytest.raises(ValueError, match="cache is empty"):
        GraphDecoder(model, cache, graph=False)
    with pytest.raises(TypeError, match="cache must be a HeadQCache"):
        GraphDecoder(model, object())
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    if not CUDA:
        with pytest.raises(ValueError, match="graph=True needs a CUDA cache"):
            GraphDecoder(model, cache, graph=True)
    with pytest.raises(ValueError, match="max_length must be an integer > the cached length 40"):
        GraphDecoder(model, cache, max_length=40, graph=False)
    bad_mask = torch.ones(2, 40, dtype=torch.long)
    bad_mask[1, -1] = 0  # right padding
    with pytest.raises(ValueError, match="row 1 is not left padding"):
        GraphDecoder(model, cache, attention_mask=bad_mask, graph=False)
    with pytest.raises(ValueError, match=r"attention_mask must be the \[batch, cached tokens\]"):
        GraphDecoder(model, cache, attention_mask=torch.ones(2, 39), graph=False)
    dec = GraphDecoder(model, cache, graph=False)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \[2, 1\]"):
        dec.step(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        dec.greedy(torch.zeros(2, 1, dtype=torch.long), -1)
    dense_keys = HeadQCache(model.config, None, **{**KW, "key_bits": 16})
    with torch.no_grad():
        model(prompt, past_key_values=dense_keys, use_cache=True)
    with pytest.raises(ValueError, match="key_bits=16"):
        GraphDecoder(model, dense_keys, graph=False)
    a2 = HeadQCache(model.config, cal, **{**KW, "value_policy": "a2", "value_keep_frac": 0.1})
    with torch.no_grad():
        model(prompt, past_key_values=a2, use_cache=True)
    GraphDecoder(model, a2, graph=False)  # the A² value policy is supported
    gemma = make_tiny("gemma3", head_dim=64)
    restore_attn.append(attention.enable(gemma))
    sliding = HeadQCache(gemma.config, None, **KW)
    with torch.no_grad():
        gemma(prompt, past_key_values=sliding, use_cache=True)
    with pytest.raises(ValueError, match=r"layers \[0, 2\] are not HeadQ layers"):
        GraphDecoder(gemma, sliding, graph=False)
    attention.disable(model)
    with pytest.raises(ValueError, match="call headq_torch.attention.enable"):
        GraphDecoder(model, cache, graph=False)


A2 = dict(value_policy="a2", value_keep_frac=0.1)


def _same_keep_set(a, b, exact_weights=True):
    """Layer ``b`` (fixed-capacity keep set) holds layer ``a``'s (exact size) keep set in its
    first K slots, padding after them, and the same window weights. ``exact_weights=False``
    (``a`` eager, ``b`` the static step): the A² weights agree to float rounding only, since
    the step's ``q·k`` products run over the whole window buffer and every keep-set slot, and
    the CPU BLAS rounds a matrix product's columns differently for other widths."""
    assert b.keep_store is not None and a.keep_store is None
    si, sw, sd = b.keep_store

    def same(x, y):
        if exact_weights:
            return torch.equal(x, y)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-9)
        return True

    if a.heavy_idx is None:
        K = 0
    else:
        K = a.heavy_idx.shape[-1]
        assert torch.equal(a.heavy_idx, si[..., :K]) and torch.equal(a.heavy_idx, b.heavy_idx)
        assert same(a.heavy_w, sw[..., :K]) and b.heavy_w.data_ptr() == sw.data_ptr()
        assert torch.equal(a.heavy_delta, sd[..., :K, :])
        assert torch.equal(a.heavy_delta, b.heavy_delta)
    assert bool((si[..., K:] == -1).all()) and bool((sw[..., K:] == float("-inf")).all())
    assert not bool(sd[..., K:, :].any())
    nw = a.n_window
    assert same(a.buf["w_window"][:, :, :nw], b.buf["w_window"][:, :, :nw])
    assert a.memory_breakdown() == b.memory_breakdown()


@pytest.mark.parametrize("prompt_len,residual,extra,max_extra", [
    (50, 0, {}, 80), (70, 16, {}, 80), (64, 0, {"value_keep_frac": 0.25}, 80),
    # nothing kept at the start: 32 quantised tokens, budget floor(0.02 * 32) = 0
    (40, 0, {"value_keep_frac": 0.02}, 80),
    # no max_length: the region (and the keep set's slots with it) grows during the run
    (40, 0, {}, None)])
def test_a2_static_step_equals_eager(prompt_len, residual, extra, max_extra, restore_attn):
    """A²: the static step (window weights over the whole window buffer, the keep set in fixed
    slots) gives the eager logits bit for bit across several flushes, and leaves the eager keep
    set behind (its weights to float rounding, see _same_keep_set)."""
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 2, prompt_len)
    kw = {**A2, "residual_length": residual, **extra}
    max_length = None if max_extra is None else prompt_len + max_extra
    with torch.no_grad():
        probe = HeadQCache(model.config, cal, **{**KW, **kw})
        model(prompt, past_key_values=probe, use_cache=True)
    k0, nq0 = probe.layers[0].heavy_idx.shape[-1], probe.layers[0].n_quant
    le, ls, ce, cs, dec = _eager_and_static(model, cal, prompt, 75, graph=False,
                                            max_length=max_length, **kw)
    assert torch.equal(le, ls)
    for a, b in zip(ce.layers, cs.layers):
        assert (a.n_quant, a.n_window) == (b.n_quant, b.n_window)
        assert a.n_quant >= nq0 + 64  # at least two flushes in the run
        assert a.heavy_idx.shape[-1] > k0  # the budget grew
        assert bool((a.heavy_idx >= 0).all())  # the eager set is full: it was really compared
        # the slots: keep_budget of the quantised capacity (grown with it without max_length)
        assert b.keep_store[0].shape[-1] == keep_budget(kw["value_keep_frac"],
                                                        b.buf["k_codes"].shape[2])
        assert b.keep_store[0].shape[-1] >= a.heavy_idx.shape[-1]
        _same_keep_set(a, b, exact_weights=False)
        store = [id(t) for t in b.keep_store]
        assert all(any(t is u for u in dec._buffers()) for t in b.keep_store)
    if extra.get("value_keep_frac") == 0.02:
        assert k0 == 0
    if max_extra is not None:  # reserved: the keep set never moved (a captured step stays valid)
        with torch.no_grad():
            dec.greedy(ls[:, -1:].argmax(-1), 3)
        assert [id(t) for t in cs.layers[-1].keep_store] == store
    # reorder_cache replaces the keep set's tensors: the decoder sees new buffers (a captured
    # step would be captured again) and the next step still equals the eager one
    le, ls, ce, cs, dec = _eager_and_static(model, cal, prompt, 40, graph=False,
                                            max_length=max_length, **kw)
    before = dec._buffers()
    perm = torch.tensor([1, 0])
    for c in (ce, cs):
        c.reorder_cache(perm)
    assert not any(t is u for t in cs.layers[0].keep_store for u in before)
    assert all(any(t is u for u in dec._buffers()) for t in cs.layers[0].keep_store)
    nxt = le[:, -1:].argmax(-1).index_select(0, perm)
    with torch.no_grad():
        for _ in range(3):
            a = model(nxt, past_key_values=ce, use_cache=True).logits
            assert torch.equal(a, dec.step(nxt))
            nxt = a[:, -1:].argmax(-1)


def test_a2_warm_up_runs_count_once(restore_attn, monkeypatch):
    """A capture first runs the step twice for real (warm-up). Those runs add A² weights: the
    decoder undoes them, so a step preceded by warm-up runs still equals the eager step (here
    every step is, as if the step were captured again each time)."""
    model, cal = _setup(restore_attn)
    real = GraphDecoder._forward

    def forward_after_warm_up(self):
        if getattr(self, "_warming", False):
            return real(self)
        self._warming = True
        try:
            self._warm_up()
        finally:
            self._warming = False
        return real(self)

    monkeypatch.setattr(GraphDecoder, "_forward", forward_after_warm_up)
    le, ls, ce, cs, _ = _eager_and_static(model, cal, _ids(model, 2, 50), 40, graph=False,
                                          max_length=130, **A2)
    assert torch.equal(le, ls)
    for a, b in zip(ce.layers, cs.layers):
        assert a.n_quant == 64
        _same_keep_set(a, b, exact_weights=False)


def test_a2_static_step_left_padded(restore_attn):
    """A² with a left-padded batch: kv_start masks the padding out of the window and kept-token
    weights in the static step as in the eager one (logits bit for bit, same keep sets)."""
    model, cal = _setup(restore_attn)
    T = 60
    ids, mask = _left_padded(model, [60, 23], seed=40)
    le, ls, ce, cs, _ = _eager_and_static(model, cal, ids, 70, graph=False, max_length=T + 80,
                                          mask=mask, **A2)
    assert torch.equal(le, ls)
    for a, b in zip(ce.layers, cs.layers):
        assert a.n_quant >= 96
        _same_keep_set(a, b, exact_weights=False)


def test_a2_generate_equals_transformers_generate(restore_attn):
    """graph.generate with an A² cache == model.generate with an eager A² cache (greedy), for a
    left-padded batch and for an unpadded one."""
    model, cal = _setup(restore_attn)
    T, steps = 55, 60
    ids, mask, ref = _padded_batch_and_generate(model, cal, [55, 40], steps, seed=30, **A2)
    got = generate(model, ids, HeadQCache(model.config, cal, **{**KW, **A2}), steps,
                   attention_mask=mask, eos_token_id=[], graph=False)
    assert torch.equal(got, ref)
    ids = _ids(model, 2, 45)  # unpadded (no token 0, see _ids)
    ref = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         past_key_values=HeadQCache(model.config, cal, **{**KW, **A2}),
                         pad_token_id=0)
    got = generate(model, ids, HeadQCache(model.config, cal, **{**KW, **A2}), steps,
                   eos_token_id=[], graph=False)
    assert torch.equal(got, ref)


def test_a2_reserved_keep_set_keeps_eager_behaviour(restore_attn):
    """cache.reserve() puts the A² keep set in fixed slots: eager decoding, reorder_cache and a
    crop into the quantised region then give exactly what an unreserved cache gives (the same
    keep set, counted the same in memory_breakdown)."""
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 2, 50)
    plain = HeadQCache(model.config, cal, **{**KW, **A2})
    fixed = HeadQCache(model.config, cal, **{**KW, **A2})
    with torch.no_grad():
        out = model(prompt, past_key_values=plain, use_cache=True)
        model(prompt, past_key_values=fixed, use_cache=True)
        fixed.reserve(200)
        assert fixed.layers[0].keep_store[0].shape == (2, 2, 22)  # floor(0.1 * 224)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(60):
            a = model(nxt, past_key_values=plain, use_cache=True).logits
            b = model(nxt, past_key_values=fixed, use_cache=True).logits
            assert torch.equal(a, b), i
            nxt = a[:, -1:].argmax(-1)
            if i == 30:
                for c in (plain, fixed):
                    c.reorder_cache(torch.tensor([1, 0]))
        for a, b in zip(plain.layers, fixed.layers):
            _same_keep_set(a, b)
        for c in (plain, fixed):
            c.crop(-40)  # into the quantised region: kept tokens past the cut are dropped
        for a, b in zip(plain.layers, fixed.layers):
            _same_keep_set(a, b)
        a = model(nxt, past_key_values=plain, use_cache=True).logits
        b = model(nxt, past_key_values=fixed, use_cache=True).logits
        assert torch.equal(a, b)
        pick = torch.tensor([3, 0, 1])
        for c in (plain, fixed):  # batch changes act on the store as on exact tensors
            c.batch_repeat_interleave(2)
            c.batch_select_indices(pick)
        for a, b in zip(plain.layers, fixed.layers):
            assert b.keep_store[0].shape[:2] == (3, 2)
            _same_keep_set(a, b)
        nxt = nxt.repeat_interleave(2, 0)[pick]
        a = model(nxt, past_key_values=plain, use_cache=True).logits
        b = model(nxt, past_key_values=fixed, use_cache=True).logits
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype, restore_attn):
    model, cal = _setup(restore_attn, "cuda", dtype)
    prompt = _ids(model, 3, 50).cuda()
    le, ls, _, _, dec = _eager_and_static(model, cal, prompt, 80, graph=True, max_length=140)
    assert dec.captures == 1
    assert dec.graph and dec._graph is not None
    # the same kernels on the same inputs; cuBLAS may pick another reduction order in a graph
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(ls.float(), le.float(), atol=tol * le.abs().max().item(), rtol=0)
    assert (ls.argmax(-1) == le.argmax(-1)).float().mean() >= 0.97


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_refuses_head_dims_without_a_kernel(restore_attn):
    """The CUDA decode kernels are built for head dims 64 and 128: a CUDA cache of the tiny
    models' 32 is refused by name (eager decoding falls back instead, test_hf_integration)."""
    model = make_tiny("llama").cuda()
    cal = tiny_calibration(model)
    cal.bases = [b.cuda() for b in cal.bases]
    restore_attn.append(attention.enable(model))
    cache = HeadQCache(model.config, cal, **KW)
    with torch.no_grad():
        model(_ids(model, 1, 70).cuda(), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="head dim 32 has no fused CUDA decode kernel"):
        GraphDecoder(model, cache)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_recaptures_when_buffers_grow(restore_attn):
    model, cal = _setup(restore_attn, "cuda", torch.float16)
    prompt = _ids(model, 2, 40).cuda()
    le, ls, _, cs, dec = _eager_and_static(model, cal, prompt, 100, graph=True, max_length=None)
    assert dec.captures >= 2  # 40 -> 128+ quantised tokens: the region doubled at least once
    torch.testing.assert_close(ls.float(), le.float(), atol=2e-3 * le.abs().max().item(), rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_generate_equals_transformers_generate(restore_attn):
    model, cal = _setup(restore_attn, "cuda", torch.float16)
    ids = _ids(model, 2, 70).cuda()
    steps = 50
    ref = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         past_key_values=HeadQCache(model.config, cal, **KW), pad_token_id=0)
    got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps, eos_token_id=[])
    assert got.shape == ref.shape
    # same kernels; a different cuBLAS reduction order in the graph may flip a near-tie late
    assert (got[:, 70:] == ref[:, 70:]).float().mean() >= 0.9
    assert torch.equal(got[:, 70:80], ref[:, 70:80])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_generate_samples_like_transformers(restore_attn):
    """Sampling between graph replays draws from the CUDA generator as model.generate does."""
    model, cal = _setup(restore_attn, "cuda", torch.float16)
    ids = _ids(model, 2, 70).cuda()
    warp = dict(temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    ref = model.generate(ids, max_new_tokens=40, do_sample=True, pad_token_id=0,
                         past_key_values=HeadQCache(model.config, cal, **KW), **warp)
    torch.manual_seed(5)
    got = generate(model, ids, HeadQCache(model.config, cal, **KW), 40, do_sample=True,
                   eos_token_id=model.generation_config.eos_token_id, pad_token_id=0, **warp)
    # same kernels and random stream; a near-tie flipped by the graph's cuBLAS order may change
    # a later draw and everything after it
    assert torch.equal(got[:, 70:80], ref[:, 70:80])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("max_length", [140, None])
def test_cuda_a2_graph_replay_equals_eager(max_length, restore_attn):
    """A² through captured replays: logits close to the eager path's, the keep set the eager
    one where the weights did not tie differently; without max_length the growing region (and
    keep set) makes the step be captured again."""
    model, cal = _setup(restore_attn, "cuda", torch.float16)
    prompt = _ids(model, 3, 50).cuda()
    le, ls, ce, cs, dec = _eager_and_static(model, cal, prompt, 80, graph=True,
                                            max_length=max_length, **A2)
    if max_length is not None:
        assert dec.captures == 1
    else:
        assert dec.captures >= 2
    torch.testing.assert_close(ls.float(), le.float(), atol=2e-3 * le.abs().max().item(), rtol=0)
    assert (ls.argmax(-1) == le.argmax(-1)).float().mean() >= 0.97
    for a, b in zip(ce.layers, cs.layers):
        K = a.heavy_idx.shape[-1]
        assert b.heavy_idx.shape[-1] == K and bool((b.keep_store[0][..., K:] == -1).all())
        # float weights from another reduction order may reorder near-ties: most kept tokens agree
        same = (a.heavy_idx.unsqueeze(-1) == b.heavy_idx.unsqueeze(-2)).any(-1).float().mean()
        assert same >= 0.8
        torch.testing.assert_close(b.buf["w_window"][:, :, :a.n_window],
                                   a.buf["w_window"][:, :, :a.n_window], atol=1e-3, rtol=1e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_a2_prefill_op_equals_row_blocks(dtype, padded, restore_attn, monkeypatch):
    """An A² cache's first prompt on CUDA: SDPA + the a2_weights op (the default) against the
    row-block path that materialises the logits, causal and left-padded (a bool mask): the same
    logits to the precision of the dtype, the same window weights and kept tokens' weights to
    float rounding, most kept tokens the same."""
    model, cal = _setup(restore_attn, "cuda", dtype)
    prompt = _ids(model, 3, 90).cuda()
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :17] = 0
        prompt[1, :17] = 0
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(attention, "_fused_a2_weights", lambda q, f=fused: f)
        cache = HeadQCache(model.config, cal, **KW, **A2)
        with torch.no_grad():
            logits = model(prompt, attention_mask=mask, past_key_values=cache,
                           use_cache=True).logits
        runs.append((logits.float(), cache))
    (lr, cr), (lf, cf) = runs
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    real = mask.bool()  # a padding position sees nothing: its output is arbitrary on either path
    torch.testing.assert_close(lf[real], lr[real], atol=tol * lr[real].abs().max().item(), rtol=0)
    for i, (a, b) in enumerate(zip(cr.headq_layers, cf.headq_layers)):
        assert a.n_quant == b.n_quant > 0
        nw = a.n_window
        # layer 0 sees the same q and k on both paths; later layers the other path's output
        # (SDPA in the dtype vs float32 row blocks), so their weights differ by its rounding
        rtol = 1e-4 if i == 0 or dtype == torch.float32 else 50 * torch.finfo(dtype).eps
        torch.testing.assert_close(b.buf["w_window"][:, :, :nw], a.buf["w_window"][:, :, :nw],
                                   atol=1e-5 if i == 0 else 1e-3, rtol=rtol)
        same = (a.heavy_idx.unsqueeze(-1) == b.heavy_idx.unsqueeze(-2)).any(-1).float().mean()
        assert same >= 0.9
        if padded:  # padding tokens get no weight
            assert bool((b.buf["w_window"][1, :, :max(0, 17 - a.n_quant)] == 0).all())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_a2_prefill_fused_lse(dtype, restore_attn, monkeypatch):
    """An unpadded A² first prompt on CUDA (sm80+) takes its output and the rows' log-sum-exp
    from PyTorch's cuDNN or flash kernel in every layer, and a2_weights runs only its per-key
    pass: the same logits, window weights and kept tokens as SDPA + the op's own row pass."""
    model, cal = _setup(restore_attn, "cuda", dtype)
    prompt = _ids(model, 3, 90).cuda()
    real, used = attention._attention_with_lse, []

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        used.append(res is not None)
        return res

    runs = []
    for flash in (False, True):
        monkeypatch.setattr(attention, "_attention_with_lse",
                            spy if flash else (lambda *args, **kwargs: None))
        cache = HeadQCache(model.config, cal, **KW, **A2)
        with torch.no_grad():
            logits = model(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                           use_cache=True).logits
        runs.append((logits.float(), cache))
    assert len(used) == model.config.num_hidden_layers
    if torch.cuda.get_device_capability() >= (8, 0):
        assert all(used)
    (ls, cs), (lf, cf) = runs
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(lf, ls, atol=tol * ls.abs().max().item(), rtol=0)
    for i, (a, b) in enumerate(zip(cs.headq_layers, cf.headq_layers)):
        assert a.n_quant == b.n_quant > 0
        nw = a.n_window
        rtol = 1e-4 if i == 0 else 50 * torch.finfo(dtype).eps
        torch.testing.assert_close(b.buf["w_window"][:, :, :nw], a.buf["w_window"][:, :, :nw],
                                   atol=1e-5 if i == 0 else 1e-3, rtol=rtol)
        same = (a.heavy_idx.unsqueeze(-1) == b.heavy_idx.unsqueeze(-2)).any(-1).float().mean()
        assert same >= 0.9


def test_a2_eager_step_after_reserve_equals_unreserved(restore_attn):
    """Eager decode steps of an A² cache whose keep set was reserved (heavy_w then a view of
    the fixed-capacity store, not contiguous: the step reads and adds through the store, as a
    graph step does) add the same weights as without the reservation (the exact-size set)."""
    model, cal = _setup(restore_attn)
    prompt = _ids(model, 2, 100)
    caches = []
    for reserve in (False, True):
        c = HeadQCache(model.config, cal, **KW, **A2)
        with torch.no_grad():
            out = model(prompt, past_key_values=c, use_cache=True)
            if reserve:
                c.reserve(200)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(nxt, past_key_values=c, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
        caches.append(c)
    a, b = caches
    for la, lb in zip(a.headq_layers, b.headq_layers):
        assert la.heavy_w.is_contiguous() and not lb.heavy_w.is_contiguous()
        assert torch.equal(la.heavy_idx, lb.heavy_idx)
        torch.testing.assert_close(lb.heavy_w, la.heavy_w, rtol=1e-6, atol=1e-7)
        nw = la.n_window
        assert lb.n_window == nw
        torch.testing.assert_close(lb.buf["w_window"][:, :, :nw], la.buf["w_window"][:, :, :nw],
                                   rtol=0, atol=0)
