"""Which key PyTorch's fused causal attention kernels align their causal mask with when the
queries are fewer than the keys (L < T), CUDA, bf16: the flash and cuDNN ops with ``is_causal``
against SDPA with the explicit lower-right (``tril(T - L)``, queries the last L of the T keys)
and upper-left (``tril(0)``) masks, and their mean time over 10 calls. attention.py uses only the
flash kernel for L < T because of it.

    python benchmarks/check_causal_alignment.py

Recorded: ``session18.cudnn_alignment_check`` in ``benchmarks/results/gpu_dequantised_path.json``.
"""
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("check_causal_alignment.py needs a CUDA device")
torch.manual_seed(0)
for (B, Hq, H, L, T) in ((2, 8, 2, 100, 1000), (8, 32, 8, 256, 32768)):
    q = torch.randn(B, Hq, L, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lr = torch.ones(L, T, dtype=torch.bool, device="cuda").tril(T - L)
    ul = torch.ones(L, T, dtype=torch.bool, device="cuda").tril(0)
    want_lr = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=lr, enable_gqa=True)
    want_ul = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ul, enable_gqa=True)
    res = {}
    for name in ("flash", "cudnn"):
        try:
            if name == "cudnn":
                f = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[0]
            else:
                f = lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[0]
            o = f()
            for _ in range(3): f()
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(10): f()
            torch.cuda.synchronize()
            res[name] = dict(ms=round((time.perf_counter() - t0) * 100, 3),
                             err_lower_right=(o.float() - want_lr.float()).abs().max().item(),
                             err_upper_left=(o.float() - want_ul.float()).abs().max().item())
        except Exception as e:
            res[name] = repr(e)[:200]
    print((B, Hq, H, L, T), res, flush=True)
