"""Per-kernel CUDA time of one HeadQ decode step (torch.profiler), for tuning the fused kernel.

    python benchmarks/profile_decode.py --context 32768
"""

from __future__ import annotations

import argparse
import math

import torch

import headq_torch as hq


def build(B, H, Hq, D, T, rank, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, H, T, D, device=device, dtype=torch.float16, generator=g)
    v = torch.randn(B, H, T, D, device=device, dtype=torch.float16, generator=g)
    basis = torch.linalg.qr(torch.randn(H, D, rank, device=device))[0].contiguous()
    kc = hq.quantize_keys(k, 2, 64)
    zc = hq.side_code(k, *kc, basis, 2, 64, 8, False)
    vc = hq.quantize_values(v, 2, 64)
    q = torch.randn(B, Hq, D, device=device, dtype=torch.float16, generator=g)
    empty = k.new_zeros(B, H, 0, D)
    n = torch.full((B,), T, dtype=torch.int32, device=device)
    z = torch.zeros(B, dtype=torch.int32, device=device)
    return (q, *kc, *zc, basis, *vc, None, None, None, empty, empty, n, z, None,
            2, 64, 8, 2, 64, 1.0, 1 / math.sqrt(D))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    a = build(args.batch, 8, 32, 128, args.context, 8)
    for _ in range(5):
        hq.decode_attention(*a)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            hq.decode_attention(*a)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))


if __name__ == "__main__":
    main()
