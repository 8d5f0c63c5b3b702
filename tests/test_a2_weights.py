"""ops.a2_weights (the A² weights of dense attention, used by an A² cache's prefill) against the
pure-PyTorch reference (headq_torch.reference.a2_weights) and its float64 twin, on the CPU and,
where a GPU exists, on CUDA (tensor cores for float16 / bfloat16, float32 FMAs for float32)."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from headq_torch import ops
from headq_torch import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(B, Hq, H, L, T, D, dtype, device, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, L, D, generator=g) * spread).to(device=device, dtype=dtype)
    k = (torch.randn(B, H, T, D, generator=g) * spread).to(device=device, dtype=dtype)
    return q, k


def _check(q, k, mask, scale):
    """The op against the float32 reference and the float64 computation: error vs float64 at
    most twice the float32 reference's plus a relative floor (exp2 on the GPU is 2 ulp)."""
    w, lse = ops.a2_weights(q, k, mask, scale)
    assert w.dtype == torch.float32 and lse.dtype == torch.float32
    assert w.shape == (q.shape[0], k.shape[1], k.shape[2])
    assert lse.shape == q.shape[:3]
    assert w.device == q.device and lse.device == q.device
    cpu = [t.cpu() if t is not None else None for t in (q, k, mask)]
    w32, lse32 = ref.a2_weights(*cpu, scale)
    w64, lse64 = ref.a2_weights(cpu[0].double(), cpu[1].double(), cpu[2], scale)
    w, lse = w.cpu().double(), lse.cpu().double()
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin), "rows that see no key must have lse -inf"
    assert (lse[~fin] == float("-inf")).all()
    floor = 1e-5 * max(1.0, w64.abs().max().item())
    err = (w - w64).abs().max().item()
    base = (w32.double() - w64).abs().max().item()
    assert err <= 2 * base + floor, f"w error {err:.3e} vs reference error {base:.3e}"
    if fin.any():
        err = (lse - lse64)[fin].abs().max().item()
        base = (lse32.double() - lse64)[fin].abs().max().item()
        assert err <= 2 * base + 1e-5 * max(1.0, lse64[fin].abs().max().item()), \
            f"lse error {err:.3e} vs reference error {base:.3e}"
    return w, w64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", [
    (2, 8, 2, 70, 70),     # first prompt: L == T, not a multiple of the 64-row tiles
    (1, 9, 3, 5, 133),     # a short chunk after 128 tokens, SmolLM2's 9 query / 3 KV heads
    (2, 4, 4, 130, 200),   # no grouping (n_rep 1)
    (1, 4, 1, 1, 65),      # one query row
])
def test_a2_weights_causal(device, dtype, D, shape):
    B, Hq, H, L, T = shape
    q, k = _case(B, Hq, H, L, T, D, dtype, device)
    _check(q, k, None, 1 / math.sqrt(D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [
    (1, 8, 2, 300, 300),   # several 128-key blocks of the key pass, the last one partial
    (2, 4, 2, 200, 700),   # a chunk after 500 tokens: warps whose keys no row of a tile sees
])
def test_a2_weights_cuda_key_blocks(dtype, D, masked, shape):
    """The 16-bit key pass (128 keys per block, 32 per warp) on shapes that cross its blocks:
    against float64, with and without a mask, with and without the row pass's own lse."""
    B, Hq, H, L, T = shape
    q, k = _case(B, Hq, H, L, T, D, dtype, "cuda", seed=11)
    mask = None
    if masked:
        g = torch.Generator().manual_seed(12)
        mask = torch.ones(L, T, dtype=torch.bool).tril(T - L)
        mask = (mask.expand(B, L, T) & (torch.rand(B, L, T, generator=g) > 0.2)).contiguous()
        mask = mask.cuda()
    _, w64 = _check(q, k, mask, 1 / math.sqrt(D))
    _, lse = ops.a2_weights(q, k, mask, 1 / math.sqrt(D))
    w, _ = ops.a2_weights(q, k, mask, 1 / math.sqrt(D), lse=lse)
    floor = 1e-5 * max(1.0, w64.abs().max().item())
    assert (w.cpu().double() - w64).abs().max().item() <= 2e-4 * w64.abs().max().item() + floor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_a2_weights_mask(device, dtype):
    """A transformers-style bool mask [B, 1, L, T]: left padding, a hole, and a padded query row
    that sees nothing (its lse is -inf and it adds nothing)."""
    B, Hq, H, L, T, D = 3, 6, 2, 67, 150, 64
    q, k = _case(B, Hq, H, L, T, D, dtype, device, seed=1)
    causal = torch.ones(L, T, dtype=torch.bool).tril(T - L)
    m = causal.expand(B, 1, L, T).clone()
    m[1, :, :, :40] = False  # left padding of 40 tokens
    m[2, :, :, 90:95] = False  # a hole
    m[2, :, 3, :] = False  # a row that sees nothing
    w, _ = _check(q, k, m.to(device), 0.125)
    assert (w[1, :, :40] == 0).all()
    assert (w[2, :, 90:95] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a2_weights_strided_mask(device):
    """A mask that is a slice of a wider one (row stride T + 13, as transformers' masks sliced to
    the keys a call sees): the same weights as its contiguous copy (the CUDA op packs the mask
    into bits through its strides), and both against float64."""
    B, Hq, H, L, T, D = 2, 4, 2, 45, 109, 64
    q, k = _case(B, Hq, H, L, T, D, torch.bfloat16, device, seed=9)
    g = torch.Generator().manual_seed(10)
    wide = torch.ones(L, T + 13, dtype=torch.bool).tril(T - L).expand(B, L, T + 13).clone()
    wide &= torch.rand(B, L, T + 13, generator=g) > 0.3
    m = wide.to(device)[:, :, :T]
    assert not m.is_contiguous() and m.stride(1) == T + 13
    w1, l1 = _check(q, k, m, 0.125)[0], ops.a2_weights(q, k, m, 0.125)[1]
    w2, l2 = ops.a2_weights(q, k, m.contiguous(), 0.125)
    torch.testing.assert_close(w1, w2.cpu().double(), rtol=0, atol=0)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a2_weights_broadcast_mask_equals_causal(device):
    """A [1, L, T] mask broadcast over the batch, equal to the causal rule: same result as no
    mask (the kernels take the mask's batch stride 0)."""
    B, Hq, H, L, T, D = 2, 4, 2, 33, 97, 64
    q, k = _case(B, Hq, H, L, T, D, torch.float16, device, seed=2)
    m = torch.ones(L, T, dtype=torch.bool, device=device).tril(T - L).unsqueeze(0)
    w1, l1 = ops.a2_weights(q, k, m, 0.1)
    w2, l2 = ops.a2_weights(q, k, None, 0.1)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_a2_weights_peaked_attention(device):
    """Large logits (a sharply peaked softmax): the online max keeps exp finite and the weights
    of the peak keys near one per query row."""
    B, Hq, H, L, T, D = 1, 4, 2, 40, 300, 64
    q, k = _case(B, Hq, H, L, T, D, torch.bfloat16, device, seed=3, spread=3.0)
    w, w64 = _check(q, k, None, 1.0)
    assert w.sum().item() > 0.5 * Hq * L  # most rows put nearly all weight on one key


@pytest.mark.parametrize("device", DEVICES)
def test_a2_weights_sums_over_query_heads_of_a_kv_head(device):
    """w of a KV head is the sum over its query heads: equal to running each query head alone
    against that KV head and adding."""
    B, Hq, H, L, T, D = 1, 6, 2, 20, 50, 64
    q, k = _case(B, Hq, H, L, T, D, torch.float32, device, seed=4)
    w, _ = ops.a2_weights(q, k, None, 0.2)
    for h in range(H):
        parts = [ops.a2_weights(q[:, h * 3 + r:h * 3 + r + 1], k[:, h:h + 1], None, 0.2)[0]
                 for r in range(3)]
        torch.testing.assert_close(w[:, h:h + 1], sum(parts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, T, i", [(9, 40, 4), (300, 300, 250)],
                         ids=["partial_tiles", "full_tiles"])
def test_a2_weights_nan_query_row_adds_nothing(device, L, T, i):
    """A NaN in one query row (not checked: a check would sync the GPU): that row's lse is NaN
    and it adds nothing to w; every other row is as without it. The second case puts the row
    where the CUDA key pass takes whole tiles without per-element checks."""
    B, Hq, H, D = 1, 4, 2, 64
    q, k = _case(B, Hq, H, L, T, D, torch.float16, device, seed=6)
    w0, l0 = ops.a2_weights(q, k, None, 0.125)
    q2 = q.clone()
    q2[0, 1, i, 7] = float("nan")
    w, lse = ops.a2_weights(q2, k, None, 0.125)
    assert torch.isnan(lse[0, 1, i])
    ok = torch.ones_like(lse, dtype=torch.bool)
    ok[0, 1, i] = False
    torch.testing.assert_close(lse[ok], l0[ok], rtol=1e-6, atol=1e-6)
    s = (q[0, 1, i].float() @ k[0, 0].float().T) * 0.125  # query head 1 reads KV head 0
    s[T - L + i + 1:] = float("-inf")  # row i sees t <= T - L + i
    row = torch.softmax(s, -1) ** 2
    want = w0.clone()
    want[0, 0] -= row.to(want.device)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("masked", [False, True])
def test_a2_weights_given_lse(device, dtype, masked):
    """The rows' lse given (what the flash kernel returns): the op skips its row pass. With its
    own lse given back the weights are unchanged; with a shifted lse, a row's lse -inf and
    another's NaN, the weights follow the reference with that lse (the op trusts it; a row whose
    lse is not finite adds nothing); the returned lse is a copy of the given one."""
    B, Hq, H, L, T, D = 2, 6, 2, 70, 100, 64
    q, k = _case(B, Hq, H, L, T, D, dtype, device, seed=3)
    mask = None
    if masked:
        g = torch.Generator().manual_seed(5)
        mask = (torch.rand(B, L, T, generator=g) < 0.7).to(device)
        mask[1, 4] = False  # a row that sees no key
    scale = 1 / math.sqrt(D)
    w0, l0 = ops.a2_weights(q, k, mask, scale)
    w1, l1 = ops.a2_weights(q, k, mask, scale, lse=l0)
    assert torch.equal(l1, l0) and l1.data_ptr() != l0.data_ptr()
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-7)
    strided = l0.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, not contiguous
    w1s, l1s = ops.a2_weights(q, k, mask, scale, lse=strided)
    assert torch.equal(w1s, w1) and torch.equal(l1s, l0) and l1s.is_contiguous()
    given = l0.nan_to_num(neginf=0.0) + 0.1 * torch.arange(L, device=device) / L
    given[0, 1, 5] = float("-inf")
    given[1, 2, 9] = float("nan")
    w2, l2 = ops.a2_weights(q, k, mask, scale, lse=given)
    torch.testing.assert_close(l2, given, rtol=0, atol=0, equal_nan=True)
    cpu = [t.cpu() if t is not None else None for t in (q, k, mask)]
    w64, _ = ref.a2_weights(cpu[0].double(), cpu[1].double(), cpu[2], scale, lse=given.cpu())
    assert torch.isfinite(w2).all()
    torch.testing.assert_close(w2.cpu().double(), w64, rtol=2e-5, atol=1e-6)
    # the -inf and NaN rows added nothing: the reference without those two rows agrees
    keep = given.clone()
    keep[0, 1, 5] = keep[1, 2, 9] = float("-inf")
    w3, _ = ref.a2_weights(cpu[0].double(), cpu[1].double(), cpu[2], scale, lse=keep.cpu())
    torch.testing.assert_close(w64, w3, rtol=0, atol=0)


def _padded_mask(starts, L, T, device):
    """transformers' layout ``[B, 1, L, T]``: causal (queries the last L of T) with left padding
    (sequence b's tokens before ``starts[b]`` hidden)."""
    t = torch.arange(T)
    rows = torch.arange(L).view(-1, 1) + (T - L)
    m = torch.stack([(t >= p) & (t <= rows) for p in starts])
    return m.unsqueeze(1).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("L, T, starts", [
    (70, 70, [0, 13, 69, 70]),   # a padded first prompt; one sequence all padding
    (70, 70, [0, 0, 0, 0]),      # a mask without padding: one causal call
    (24, 90, [5, 0, 40, 77]),    # a chunk after 66 tokens: pads only in the earlier tokens
    (24, 90, [70, 80, 89, 3]),   # a chunk whose first rows are padding rows of some sequences
], ids=["prompt", "no_padding", "chunk", "chunk_padding_rows"])
def test_a2_prompt_weights_left_padding(monkeypatch, device, dtype, L, T, starts):
    """attention._a2_prompt_weights: a causal mask with left padding (a padded batch) becomes
    one unmasked op call per sequence over its visible tokens; the weights equal the masked
    computation's (the pure-PyTorch reference with the same mask, float64) within the op's
    tolerance, and the mask is analysed once per mask object."""
    from types import SimpleNamespace

    from headq_torch import attention

    B, Hq, H, D = len(starts), 4, 2, 64
    q, k = _case(B, Hq, H, L, T, D, dtype, device, seed=3)
    mask = _padded_mask(starts, L, T, device)
    layer = SimpleNamespace(_owner=SimpleNamespace())
    calls, analysed = [], []
    real, real_starts = ops.a2_weights, attention._left_padding_starts
    monkeypatch.setattr(ops, "a2_weights", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    monkeypatch.setattr(attention, "_left_padding_starts",
                        lambda *a: analysed.append(1) or real_starts(*a))
    w = attention._a2_prompt_weights(layer, q, k, mask, 0.125)
    n_first = len(calls)
    w2 = attention._a2_prompt_weights(layer, q, k, mask, 0.125)  # memo: same mask object
    assert torch.equal(w, w2) and len(analysed) == 1
    assert all(m is None for m in calls), "left padding must not reach the op as a mask"
    assert n_first == (1 if not any(starts) else sum(p < T for p in starts))
    assert layer._owner._padding_memo[2] == starts
    w64, _ = ref.a2_weights(q.cpu().double(), k.cpu().double(), mask.cpu()[:, 0], 0.125)
    w32, _ = ref.a2_weights(q.cpu(), k.cpu(), mask.cpu()[:, 0], 0.125)
    base = (w32.double() - w64).abs().max().item()
    err = (w.cpu().double() - w64).abs().max().item()
    assert err <= 2 * base + 1e-5 * max(1.0, w64.abs().max().item()), (err, base)
    for b, p in enumerate(starts):
        assert bool((w[b, :, :p] == 0).all())  # padding: never visible
    # the memo does not keep the mask (a prompt's mask is L x T per sequence) alive
    gone = weakref.ref(mask)
    del mask
    assert gone() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("starts", [None, [0, 0, 0], [0, 7, 60], [75, 90, 2]],
                         ids=["no_mask", "no_padding", "padded", "padding_into_window"])
@pytest.mark.parametrize("K", [0, 9])
def test_a2_kept_window_weights_equal_full_pass(monkeypatch, device, dtype, starts, K):
    """attention._a2_kept_window_weights (a call over quantised tokens: the key pass over the
    kept tokens' keys gathered in front of the window's) equals the full key pass over all
    ``T`` keys (_a2_prompt_weights, then the kept slots gathered, as HeadQLayer.add_weights
    does) for the entries the cache uses: the kept slots (an empty slot, -1, and a slot before
    a left-padded sequence's first visible token get 0) and every window token, with the rows'
    lse of all ``T`` keys given. The op sees ``K + n_window`` keys (``K + T - p`` for a sequence
    whose padding reaches into the window), never ``T``."""
    from types import SimpleNamespace

    from headq_torch import attention

    B, Hq, H, L, D, nq, nw = 3, 4, 2, 24, 64, 64, 40
    T = nq + nw
    q, k = _case(B, Hq, H, L, T, D, dtype, device, seed=5)
    mask = None if starts is None else _padded_mask(starts, L, T, device)
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(0, nq, (B, H, K), generator=g, dtype=torch.int32)
    if K:
        idx[0, 1, 3] = idx[2, 0, 0] = -1  # empty slots
    layer = SimpleNamespace(_owner=SimpleNamespace(), n_quant=nq, n_window=nw,
                            heavy_idx=idx.to(device) if K else None)
    vis = None if mask is None else mask[:, 0]
    _, lse = ops.a2_weights(q, k, vis, 0.125)
    lens = []
    real = ops.a2_weights
    monkeypatch.setattr(ops, "a2_weights",
                        lambda q_, k_, m, s, lse=None: lens.append(k_.shape[2]) or
                        real(q_, k_, m, s, lse=lse))
    w_kept, w_window = attention._a2_kept_window_weights(layer, q, k, mask, 0.125, lse)
    p = [0] * B if starts is None else starts
    seen = [b for b in range(B) if p[b] < T]
    assert lens == ([K + nw] if not any(p) else [K + T - max(nq, p[b]) for b in seen])
    monkeypatch.undo()
    full = attention._a2_prompt_weights(SimpleNamespace(_owner=SimpleNamespace()), q, k, mask,
                                        0.125, lse)
    assert w_window.shape == (B, H, nw)
    torch.testing.assert_close(w_window, full[..., nq:], atol=1e-6, rtol=1e-5)
    if not K:
        assert w_kept is None
        return
    want = torch.gather(full[..., :nq], -1, idx.clamp_min(0).long().to(device))
    valid = idx.to(device) >= 0
    assert w_kept.shape == (B, H, K)
    torch.testing.assert_close(torch.where(valid, w_kept, 0), torch.where(valid, want, 0),
                               atol=1e-6, rtol=1e-5)
    for b in range(B):
        before = valid[b] & (idx[b].to(device) < p[b])  # kept, but hidden from sequence b
        assert bool((w_kept[b][before] == 0).all())
    assert bool((w_kept[valid] > 0).any())
    assert bool((w_kept[~valid] == 0).all())  # empty slots


@pytest.mark.parametrize("device", DEVICES)
def test_a2_prompt_weights_other_masks_go_to_the_op(device):
    """A mask that is not causal-with-left-padding (a hidden token after visible ones, a
    bidirectional block) goes to the op as it is: same weights as the op with that mask."""
    from types import SimpleNamespace

    from headq_torch import attention

    B, Hq, H, L, T, D = 2, 4, 2, 20, 50, 64
    q, k = _case(B, Hq, H, L, T, D, torch.float32, device, seed=4)
    hole = _padded_mask([3, 0], L, T, device)
    hole[1, :, :, 10] = False  # right/middle padding
    full = torch.ones(B, 1, L, T, dtype=torch.bool, device=device)
    for mask in (hole, full):
        layer = SimpleNamespace(_owner=SimpleNamespace())
        w = attention._a2_prompt_weights(layer, q, k, mask, 0.2)
        assert layer._owner._padding_memo[2] is None
        want, _ = ops.a2_weights(q, k, mask[:, 0], 0.2)
        assert torch.equal(w, want)
    # with a given lse the per-sequence calls pass each sequence's rows of it
    mask = _padded_mask([0, 35], L, T, device)
    _, lse = ops.a2_weights(q, k, mask[:, 0], 0.2)
    layer = SimpleNamespace(_owner=SimpleNamespace())
    w = attention._a2_prompt_weights(layer, q, k, mask, 0.2, lse=lse)
    want, _ = ops.a2_weights(q, k, mask[:, 0], 0.2)
    torch.testing.assert_close(w, want, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [300, 1000], ids=["prompt", "over_earlier"])
def test_a2_weights_fused_attention_lse(kernel, dtype, D, T):
    """The row lse of PyTorch's cuDNN and flash attention kernels (an A² cache's first prompt
    passes it, and a call over earlier tokens, whose 300 queries are the last of the ``T`` keys,
    the flash kernel's only; GQA keys not repeated; attention._attention_with_lse) against the
    op's own: the same lse and weights to float rounding, and the kernel's output equals
    SDPA's under the causal mask aligned with the last key. cuDNN declines ``L < T``."""
    from headq_torch.attention import _attention_with_lse

    B, Hq, H, L = 2, 9, 3, 300
    q, k = _case(B, Hq, H, L, T, D, dtype, "cuda", seed=4)
    v = torch.randn_like(k)
    scale = 1 / math.sqrt(D)
    res = _attention_with_lse(None, q, k, v, None, scale, kernels=(kernel,))
    if kernel == "cudnn" and L < T:
        assert res is None
        return
    if res is None:
        pytest.skip(f"PyTorch's {kernel} attention does not run here")
    out, lse = res
    assert lse.shape == (B, Hq, L) and lse.dtype == torch.float32
    causal = torch.ones(L, T, dtype=torch.bool, device="cuda").tril(T - L)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal,
                                                            scale=scale, enable_gqa=True)
    # SDPA may pick another kernel (cuDNN): the same attention to the dtype's rounding
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, want, atol=eps, rtol=eps)
    w0, l0 = ops.a2_weights(q, k, None, scale)
    torch.testing.assert_close(lse, l0, rtol=0, atol=2e-5)
    w1, _ = ops.a2_weights(q, k, None, scale, lse=lse)
    torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_attention_lse_not_taken_where_it_does_not_apply(device):
    """attention._attention_with_lse declines (None: SDPA + the op's own row pass) with a mask,
    for more queries than keys, for a non-causal module, and on CUDA in float32."""
    from types import SimpleNamespace

    from headq_torch.attention import _attention_with_lse

    q, k = _case(1, 4, 2, 16, 16, 64, torch.float16, device)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device)
    if device == "cuda":
        assert _attention_with_lse(None, q.float(), k.float(), v.float(), None, 0.125) is None
    assert _attention_with_lse(None, q, k, v, mask, 0.125) is None
    assert _attention_with_lse(None, q, k[:, :, 8:], v[:, :, 8:], None, 0.125) is None
    assert _attention_with_lse(SimpleNamespace(is_causal=False), q, k, v, None, 0.125) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("L, T", [(40, 40), (40, 300), (1, 77)], ids=["prompt", "over_earlier",
                                                                      "one_row"])
def test_cpu_attention_with_lse(dtype, L, T):
    """attention._attention_with_lse on the CPU (PyTorch's CPU flash kernel; for ``L < T`` the
    earlier keys and the call's own in two calls merged by their log-sum-exps): causal from the
    last key, GQA keys not repeated; output and lse against the float64 computation within twice
    the error of the same computation in the inputs' dtype plus a floor of 1e-6 (output) / 1e-5
    relative (lse), and the lse then gives the a2_weights op the weights of its own row
    pass."""
    from headq_torch.attention import _attention_with_lse

    B, Hq, H, D, scale = 2, 6, 2, 64, 0.125
    q, k = _case(B, Hq, H, L, T, D, dtype, "cpu", seed=7)
    v = _case(B, Hq, H, L, T, D, dtype, "cpu", seed=8)[1]
    res = _attention_with_lse(None, q, k, v, None, scale)
    assert res is not None
    out, lse = res
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    def reference(t):  # (out, lse) computed in dtype t
        kk, vv = (x.to(t).repeat_interleave(Hq // H, 1) for x in (k, v))
        logits = q.to(t) @ kk.transpose(-1, -2) * scale
        logits.masked_fill_(~torch.ones(L, T, dtype=torch.bool).tril(T - L), float("-inf"))
        return torch.softmax(logits, -1) @ vv, torch.logsumexp(logits, -1)

    want, want_lse = reference(torch.float64)
    ref_out, ref_lse = reference(dtype)
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    assert err(out, want) <= 2 * err(ref_out, want) + 1e-6
    assert err(lse, want_lse) <= 2 * err(ref_lse, want_lse) + \
        1e-5 * max(1.0, want_lse.abs().max().item())
    w0, _ = ops.a2_weights(q, k, None, scale)
    w1, _ = ops.a2_weights(q, k, None, scale, lse=lse)
    torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-6)


def test_a2_weights_empty():
    q = torch.zeros(2, 4, 0, 64)
    k = torch.zeros(2, 2, 10, 64)
    w, lse = ops.a2_weights(q, k, None, 1.0)
    assert w.shape == (2, 2, 10) and (w == 0).all() and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_a2_weights_bad_input(device):
    q, k = _case(1, 4, 2, 8, 16, 64, torch.float32, device)
    with pytest.raises(RuntimeError, match="a2_weights: k must have dtype float32"):
        ops.a2_weights(q, k.half(), None, 1.0)
    with pytest.raises(RuntimeError, match=r"a2_weights: query_heads \(4\) must be a positive "
                                           r"multiple of k heads \(3\)"):
        ops.a2_weights(q, torch.zeros(1, 3, 16, 64, device=device), None, 1.0)
    with pytest.raises(RuntimeError, match=r"a2_weights: query_len \(8\) must be at most"):
        ops.a2_weights(q, k[:, :, :4], None, 1.0)
    with pytest.raises(RuntimeError, match=r"a2_weights: k head_dim \(32\) must equal"):
        ops.a2_weights(q, torch.zeros(1, 2, 16, 32, device=device), None, 1.0)
    with pytest.raises(RuntimeError, match="a2_weights: mask must have dtype bool"):
        ops.a2_weights(q, k, torch.ones(1, 8, 16, device=device), 1.0)
    with pytest.raises(RuntimeError, match=r"a2_weights: mask must have shape \[1 or 1, 8, 16\]"):
        ops.a2_weights(q, k, torch.ones(1, 8, 15, dtype=torch.bool, device=device), 1.0)
    with pytest.raises(RuntimeError, match="a2_weights: scale must be finite"):
        ops.a2_weights(q, k, None, float("nan"))
    with pytest.raises(RuntimeError, match="a2_weights: q must have 4 dims"):
        ops.a2_weights(q[0], k, None, 1.0)
    lse = torch.zeros(1, 4, 8, device=device)
    with pytest.raises(RuntimeError, match="a2_weights: lse must have dtype float32"):
        ops.a2_weights(q, k, None, 1.0, lse=lse.double())
    with pytest.raises(RuntimeError, match=r"a2_weights: lse must have shape \[1, 4, 8\]"):
        ops.a2_weights(q, k, None, 1.0, lse=lse[:, :, :7])
    with pytest.raises(RuntimeError, match="a2_weights: lse is on meta but q is on"):
        ops.a2_weights(q, k, None, 1.0, lse=lse.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_a2_weights_cuda_head_dim_error():
    q, k = _case(1, 2, 1, 4, 8, 96, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="a2_weights: head_dim must be 64 or 128 on CUDA"):
        ops.a2_weights(q, k, None, 1.0)
    # the CPU op takes any head_dim
    w, _ = ops.a2_weights(q.cpu(), k.cpu(), None, 1.0)
    assert torch.isfinite(w).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_a2_weights_cuda_matches_cpu_long():
    """A prompt of a few thousand tokens (many tiles in both passes): CUDA against the CPU op."""
    B, Hq, H, L, T, D = 1, 8, 2, 2048, 2048, 128
    q, k = _case(B, Hq, H, L, T, D, torch.bfloat16, "cuda", seed=5)
    w, lse = ops.a2_weights(q, k, None, D ** -0.5)
    wc, lc = ops.a2_weights(q.cpu(), k.cpu(), None, D ** -0.5)
    torch.testing.assert_close(w.cpu(), wc, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), lc, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- a2_step_weights


def _step_case(B, Hq, H, W, D, K, dtype, device, seed=0, kv_start=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(device=device, dtype=dtype)
    kw = torch.randn(B, H, W, D, generator=g).to(device=device, dtype=dtype)
    lse = (torch.randn(B, Hq, generator=g) + 3.0).to(device)
    nq = torch.randint(0, 200, (B,), generator=g, dtype=torch.int32).to(device)
    nw = torch.randint(0, W + 1, (B,), generator=g, dtype=torch.int32).to(device)
    nw[0] = W
    ks = (nq + torch.randint(0, W, (B,), generator=g, dtype=torch.int32).to(device)) \
        if kv_start else None
    w0 = torch.rand(B, H, W, generator=g).to(device)
    hl = hw0 = None
    if K:
        hl = (torch.randn(B, Hq, K, generator=g) + 1.0).to(device)
        hl[:, :, K // 2:][torch.rand(B, Hq, K - K // 2, generator=g).to(device) < 0.5] = \
            float("-inf")  # empty slots / tokens before kv_start
        hw0 = torch.rand(B, H, K, generator=g).to(device)
    return q, kw, lse, nq, nw, ks, w0, hl, hw0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [
    (2, 8, 2, 96, 64, 37),    # n_rep 4, kept slots
    (3, 9, 3, 80, 40, 0),     # SmolLM2's 9 / 3 heads, an odd head dim, no kept slots
    (1, 4, 4, 33, 128, 5),    # n_rep 1
])
@pytest.mark.parametrize("kv_start", [False, True])
@pytest.mark.parametrize("few", [False, True], ids=["step", "query_tokens"])
def test_a2_step_weights(device, dtype, shape, kv_start, few):
    """The op adds the step's A² weights in place: the window tokens it may see and every slot,
    against the float64 reference (error at most twice the float32 reference's plus a floor);
    positions past n_window or before kv_start unchanged. few: the query heads are the rows of
    a call of L tokens (query_tokens=L: head j sees the window up to its token j % L)."""
    B, Hq, H, W, D, K = shape
    L = {8: 2, 9: 3, 4: 4}[Hq] if few else 1
    q, kw, lse, nq, nw, ks, w0, hl, hw0 = _step_case(B, Hq, H, W, D, K, dtype, device,
                                                     kv_start=kv_start)
    w, hw = w0.clone(), (hw0.clone() if K else None)
    ops.a2_step_weights(q, kw, lse, nq, nw, ks, 0.125, w, hl, hw, query_tokens=L)
    cpu = [t.cpu() if t is not None else None for t in (q, kw, lse, nq, nw, ks, w0, hl, hw0)]
    w32, hw32 = ref.a2_step_weights(*cpu[:6], 0.125, *cpu[6:], query_tokens=L)
    c64 = [cpu[0].double(), cpu[1].double(), cpu[2].double()] + cpu[3:6]
    w64, hw64 = ref.a2_step_weights(*c64, 0.125, cpu[6].double(), cpu[7],
                                    None if hw0 is None else cpu[8].double(), query_tokens=L)
    err = (w.cpu().double() - w64).abs().max().item()
    base = (w32.double() - w64).abs().max().item()
    assert err <= 2 * base + 1e-5, f"w_window error {err:.3e} vs reference {base:.3e}"
    t = torch.arange(W).view(1, 1, -1)
    hidden = t >= cpu[4].view(-1, 1, 1).long()
    if kv_start:
        hidden = hidden | (cpu[3].view(-1, 1, 1).long() + t < cpu[5].view(-1, 1, 1).long())
    hidden = hidden.expand(B, H, W)
    assert torch.equal(w.cpu()[hidden], cpu[6][hidden])
    assert (w.cpu() >= cpu[6]).all()
    if K:
        err = (hw.cpu().double() - hw64).abs().max().item()
        base = (hw32.double() - hw64).abs().max().item()
        assert err <= 2 * base + 1e-5, f"heavy_w error {err:.3e} vs reference {base:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_a2_step_weights_non_finite_adds_nothing(device):
    """A NaN query head and an lse of -inf add nothing (w stays finite); an empty slot (-inf
    logit) adds 0; the other heads add as without them."""
    B, Hq, H, W, D, K = 2, 4, 2, 20, 64, 6
    q, kw, lse, nq, nw, _, w0, hl, hw0 = _step_case(B, Hq, H, W, D, K, torch.float16, device,
                                                    seed=2, kv_start=False)
    q2, lse2, hl2 = q.clone(), lse.clone(), hl.clone()
    q2[0, 1, 3] = float("nan")
    hl2[0, 1] = float("nan")  # what decode_attention writes for a NaN query
    lse2[1, 2] = float("-inf")
    w, hw = w0.clone(), hw0.clone()
    ops.a2_step_weights(q2, kw, lse2, nq, nw, None, 0.1, w, hl2, hw)
    assert torch.isfinite(w).all() and torch.isfinite(hw).all()
    # the same as the op with those two heads' lse at NaN: both add nothing
    wr, hwr = w0.clone(), hw0.clone()
    lse3 = lse.clone()
    lse3[0, 1] = lse3[1, 2] = float("nan")
    ops.a2_step_weights(q, kw, lse3, nq, nw, None, 0.1, wr, hl, hwr)
    torch.testing.assert_close(w, wr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hw, hwr, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_a2_step_weights_bad_input(device):
    B, Hq, H, W, D, K = 2, 4, 2, 16, 64, 3
    q, kw, lse, nq, nw, ks, w, hl, hw = _step_case(B, Hq, H, W, D, K, torch.float32, device)

    def call(**ch):
        a = dict(q=q, k_window=kw, lse=lse, n_quant=nq, n_window=nw, kv_start=ks, scale=1.0,
                 w_window=w, heavy_logits=hl, heavy_w=hw)
        a.update(ch)
        ops.a2_step_weights(**a)

    with pytest.raises(RuntimeError, match="a2_step_weights: q must have 3 dims"):
        call(q=q[:, :, None])
    with pytest.raises(RuntimeError, match="a2_step_weights: k_window must have dtype float32"):
        call(k_window=kw.half())
    with pytest.raises(RuntimeError, match=r"a2_step_weights: query_heads \(4\) must be a "
                                           r"positive multiple of k_window heads \(3\)"):
        call(k_window=torch.zeros(B, 3, W, D, device=device))
    with pytest.raises(RuntimeError, match="a2_step_weights: lse must have shape"):
        call(lse=lse[:, :2])
    with pytest.raises(RuntimeError, match="a2_step_weights: n_window must have dtype int32"):
        call(n_window=nw.long())
    with pytest.raises(RuntimeError, match="a2_step_weights: w_window must have shape"):
        call(w_window=w[:, :, :4])
    with pytest.raises(RuntimeError, match=r"a2_step_weights: w_window \(written in place\) "
                                           r"must be contiguous"):
        call(w_window=torch.zeros(B, W, H, device=device).transpose(1, 2))
    with pytest.raises(RuntimeError, match="heavy_logits and heavy_w must be given together"):
        call(heavy_w=None)
    with pytest.raises(RuntimeError, match="a2_step_weights: heavy_w must have shape"):
        call(heavy_w=hw[:, :, :2])
    with pytest.raises(RuntimeError, match="a2_step_weights: scale must be finite"):
        call(scale=float("inf"))
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"a2_step_weights: n_window\[0\] \(17\) must be "
                                               r"<= its capacity \(16\)"):
            call(n_window=torch.full((B,), 17, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="a2_step_weights: lse is on meta"):
        call(lse=lse.to("meta"))
