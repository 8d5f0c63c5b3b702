"""A/B of few-token calls on CUDA (session 17): session 16's ``_prefill_decode_rows`` (the decode
op over the quantised and earlier window tokens, then the call's own tokens attended in PyTorch
and merged by log-sum-exp: ~30 small kernels per layer; kept below, verbatim) against the
library's current one (``decode_attention(..., query_tokens=L)``: one op call per layer), and
the dequantised path, in one process, alternating. Llama-3-8B shape, 4 layers, batch 8, 32k
tokens, bf16, the whole model call per chunk size.

    python benchmarks/bench_few_rows_ab.py OUT.json 2,16,21,64

Results: ``benchmarks/results/gpu_few_rows.json`` (``session17.ab_query_tokens``).
"""
import sys, json, statistics, warnings
sys.path.insert(0, "benchmarks")
import torch
import bench_chunk_prefill as bc
from headq_torch import attention
from headq_torch.attention import (_padding_starts, _starts_tensor, _lengths_shared, _grouped,
                                   _visible_mask, _decode_op, _a2_step_weights, vp)
from typing import Optional
_DECODE_ROWS_PER_KV_HEAD = 64  # as in session 16's attention.py


# ---- session 16's implementation (headq_torch/attention.py at fa8eba1) ----
def _prefill_decode_rows(layer, query: torch.Tensor, attention_mask,
                         scale: float) -> Optional[torch.Tensor]:
    """``L`` query tokens over the packed cache through the decode op, ``[B, Hq, L, D]``, or
    None when the mask is not causal attention with left padding (the caller dequantises).

    The ``L`` tokens are the last ``L`` of the window (``update`` appended them), so every
    quantised token and every earlier window token precedes all of them: the op attends to
    those with the query rows as its query heads (row ``h·L' + i`` of query head ``h``, so the
    rows of a KV head stay together and share one read of the packed cache; ``L'`` tokens per
    op call, at most ``_DECODE_ROWS_PER_KV_HEAD`` rows of a KV head), and returns each row's
    output and log-sum-exp. The call's own tokens (causal among themselves) are attended to
    here, in float32, and the two parts merged by their log-sum-exps. With A²,
    ``ops.a2_step_weights`` adds the earlier window tokens' and the kept tokens' weights from
    the merged log-sum-exp, and the call's own tokens' weights are added here."""
    B, Hq, L, D = query.shape
    nq, nw = layer.n_quant, layer.n_window
    T = nq + nw
    device = query.device
    kv_start = None
    if attention_mask is not None:
        starts = _padding_starts(layer, attention_mask, B, L, T, device)
        if starts is None:
            return None
        if any(starts):
            kv_start = _starts_tensor(layer, starts, device)
    nq_t, nw_t = _lengths_shared(layer, B, nq, nw - L, device)
    kn = layer.buf["k_window"][:, :, nw - L:nw].float()
    vn = layer.buf["v_window"][:, :, nw - L:nw].float()
    s_all = _grouped(query.float(), kn.transpose(-1, -2)) * scale  # [B, Hq, L, L]
    s_all.masked_fill_(~_visible_mask(attention_mask, L, T, device)[..., T - L:], float("-inf"))
    step = max(1, _DECODE_ROWS_PER_KV_HEAD // (Hq // layer.H))
    outs = []
    for i0 in range(0, L, step):
        Lc = min(step, L - i0)
        q = query[:, :, i0:i0 + Lc].reshape(B, Hq * Lc, D)
        out_c, lse_c, hl = _decode_op(layer, q, nq_t, nw_t, kv_start, scale)
        s = s_all[:, :, i0:i0 + Lc]
        lse_c = lse_c.view(B, Hq, Lc)
        lse = torch.logaddexp(lse_c, torch.logsumexp(s, dim=-1))
        # rows that see no token (lse -inf): both parts weigh 0 and the output is 0
        ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(s - ref.unsqueeze(-1))
        outs.append(out_c.view(B, Hq, Lc, D).float() * torch.exp(lse_c - ref).unsqueeze(-1)
                    + _grouped(p, vn))
        if layer.a2:
            _a2_step_weights(layer, q, lse.view(B, Hq * Lc), hl, nq_t, nw_t, kv_start, scale)
            layer.buf["w_window"][:, :, nw - L:nw] += vp.squared_weights(p, layer.H)
    return torch.cat(outs, dim=2).to(query.dtype)


# ---- the A/B ----
if not torch.cuda.is_available():
    sys.exit("bench_few_rows_ab.py needs a CUDA device")
NEW = attention._prefill_decode_rows
OLD = _prefill_decode_rows
warnings.filterwarnings("ignore")
out_path = sys.argv[1]
chunks = [int(c) for c in sys.argv[2].split(",")]
model = bc.load("llama8b", "cuda", 4)
cal = bc.random_bases(model, 8)
g = torch.Generator().manual_seed(0)
rows = []
for chunk in chunks:
    ids = torch.randint(1, model.config.vocab_size, (8, 32768 + chunk), generator=g).cuda()
    for policy in ("uniform", "a2"):
        t = {"old": [], "new": [], "dequantised": []}
        outs = {}
        for rep in range(3):
            for impl in ("old", "new", "dequantised"):
                attention._prefill_decode_rows = OLD if impl == "old" else NEW
                s, outs[impl], _ = bc.run(model, cal, ids, 32768, policy,
                                       "dequantised" if impl == "dequantised" else "decode_rows", "cuda")
                if rep:
                    t[impl].append(s * 1000)
        attention._prefill_decode_rows = NEW
        row = dict(policy=policy, chunk=chunk,
                   **{f"{k}_ms": round(statistics.median(v), 2) for k, v in t.items()},
                   **{f"{k}_all_ms": [round(x, 2) for x in v] for k, v in t.items()},
                   new_vs_old_logits_max_abs_diff=(outs["new"] - outs["old"]).abs().max().item(),
                   new_vs_dequantised_logits_max_abs_diff=(outs["new"] - outs["dequantised"]).abs().max().item(),
                   logits_max_abs=outs["new"].abs().max().item())
        print(row, flush=True)
        rows.append(row)
json.dump(dict(command="python benchmarks/bench_few_rows_ab.py OUT " + sys.argv[2], machine=torch.cuda.get_device_name(),
               torch=torch.__version__, cuda=torch.version.cuda,
               shape=dict(model="llama8b", layers=4, batch=8, context=32768, dtype="bfloat16"),
               rows=rows), open(out_path, "w"), indent=1)
