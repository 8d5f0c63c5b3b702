"""CPU decode op: float32 error against a float64 reference as the context grows, and its
single-thread time.

For each context T it builds a packed cache with the headq quantise ops (2-bit keys in groups of
64 with an 8-bit rank-8 side code, 2-bit values in groups of 64 channels, 50 kept tokens, a
5-token window; 3 sequences, 2 KV heads x 4 query heads, head dim 64, float32 query) and
reports the max |error| of ``ops.decode_attention`` and of the float32 PyTorch reference path
(headq_torch.reference) against the float64 reference. Then it times the op on one thread
(process CPU time, best of 7 x 10 calls; 1 sequence, 8 KV x 32 query heads, head dim 128, 8k
tokens). Writes JSON with the command and machine. With --device cuda it measures the CUDA
decode's float32 error instead (float32 queries run the SIMT kernel), without the timing.

    python benchmarks/bench_cpu_accuracy.py --out benchmarks/results/cpu_accuracy.json
    python benchmarks/bench_cpu_accuracy.py --device cuda --contexts 1024,8192,32768,131072 \
        --out benchmarks/results/gpu_accuracy_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _common import cpu_model, write_json  # noqa: E402
from headq_torch import ops  # noqa: E402
import test_ops as T  # noqa: E402  (the decode test's inputs and float64 reference)
from headq_torch import reference as ref  # noqa: E402


def accuracy(Tq: int, device: str = "cpu") -> dict:
    args = T._decode_case(device, torch.float32, D=64, heavy=50, Tq=Tq, G=64, Gv=64)
    out, _ = ops.decode_attention(*args)
    want32, _ = ref.decode_attention(*T._upcast(args, torch.float32))
    want64, _ = T._decode_fp64(args)
    return dict(context=Tq, device=device, kernel_err=(out.cpu().double() - want64).abs().max().item(),
                torch_float32_err=(want32.double() - want64).abs().max().item())


def cpu_time_ms(T_tokens: int = 8192) -> float:
    g = torch.Generator().manual_seed(0)
    B, H, n_rep, D = 1, 8, 4, 128
    k = torch.randn(B, H, T_tokens, D, generator=g)
    v = torch.randn(B, H, T_tokens, D, generator=g)
    q = torch.randn(B, H * n_rep, D, generator=g)
    kc = ops.quantize_keys(k, 2, 64)
    basis = torch.linalg.qr(torch.randn(H, D, 8, generator=g))[0].contiguous()
    zc = ops.side_code(k, *kc, basis, 2, 64, 8, False)
    vc = ops.quantize_values(v, 2, 64)
    e = k.new_zeros(B, H, 0, D)
    nq = torch.full((B,), T_tokens, dtype=torch.int32)
    nw = torch.zeros(B, dtype=torch.int32)
    args = (q, *kc, *zc, basis, *vc, None, None, None, e, e, nq, nw, None, 2, 64, 8, 2, 64, 1.0,
            D ** -0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            ops.decode_attention(*args)
        best = float("inf")
        for _ in range(7):
            t0 = time.process_time()
            for _ in range(10):
                ops.decode_attention(*args)
            best = min(best, (time.process_time() - t0) / 10)
    finally:
        torch.set_num_threads(threads)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,1024,4096,16384")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the float32 (SIMT) CUDA kernel's error, no CPU timing")
    ap.add_argument("--out", default="benchmarks/results/cpu_accuracy.json")
    args = ap.parse_args()
    rows = []
    for Tq in [int(x) for x in args.contexts.split(",") if x]:
        rows.append(accuracy(Tq, args.device))
        print(json.dumps(rows[-1]), flush=True)
    machine = dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform())
    result = dict(command=" ".join(["python"] + sys.argv), torch=torch.__version__,
                  machine=machine, rows=rows)
    if args.device == "cpu":
        ms = cpu_time_ms()
        print(f"one thread, 8 KV x 32 query heads, D 128, 8k tokens: {ms:.2f} ms", flush=True)
        result["single_thread_ms_8k"] = ms
    else:
        machine.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
