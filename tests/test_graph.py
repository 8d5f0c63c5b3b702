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

CUDA = torch.cuda.is_available()
KW = dict(key_bits=2, value_bits=2, group_size=32, value_group_size=32)


def _ids(model, batch, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=g)


def _setup(restore_attn, device="cpu", dtype=torch.float32, **kw):
    # head dim 64: the fused CUDA decode is built for 64 and 128 (the CPU op takes any)
    model = make_tiny("llama", head_dim=64)
    cal = tiny_calibration(model)
    model = model.to(device=device, dtype=dtype)
    cal.bases = [b.to(device) for b in cal.bases]
    restore_attn.append(attention.enable(model))
    return model, cal


@torch.no_grad()
def _eager_and_static(model, cal, prompt, steps, graph, max_length=None, **kw):
    """Logits of ``steps`` greedy steps (driven by the eager path's choices) from two caches:
    eager forward calls, and the GraphDecoder."""
    ce = HeadQCache(model.config, cal, **{**KW, **kw})
    cs = HeadQCache(model.config, cal, **{**KW, **kw})
    out = model(prompt, past_key_values=ce, use_cache=True)
    model(prompt, past_key_values=cs, use_cache=True)
    dec = GraphDecoder(model, cs, max_length=max_length, graph=graph)
    nxt = out.logits[:, -1:].argmax(-1)
    le, ls = [], []
    for _ in range(steps):
        a = model(nxt, past_key_values=ce, use_cache=True).logits
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


def _padded_batch_and_generate(model, cal, lens, steps, seed):
    """A left-padded batch of random prompts of lengths ``lens`` (the first the longest), its
    mask, and transformers' greedy generate of ``steps`` tokens with an eager HeadQ cache."""
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, T - n:] = _ids(model, 1, n, seed=seed + i)[0]
        mask[i, T - n:] = 1
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, past_key_values=HeadQCache(model.config, cal, **KW),
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
                   graph=False)
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
    a2 = HeadQCache(model.config, cal, **{**KW, "value_policy": "a2", "value_keep_frac": 0.1})
    with torch.no_grad():
        model(prompt, past_key_values=a2, use_cache=True)
    with pytest.raises(ValueError, match="value_policy='a2' is not supported"):
        GraphDecoder(model, a2, graph=False)
    attention.disable(model)
    with pytest.raises(ValueError, match="call headq_torch.attention.enable"):
        GraphDecoder(model, cache, graph=False)


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
    got = generate(model, ids, HeadQCache(model.config, cal, **KW), steps)
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
