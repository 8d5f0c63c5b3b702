"""The A² step's kept-token logits, one layer: HeadQLayer.heavy_logits against the gather path it
replaced (session 11), on packed random keys at bench_e2e's shape.

Every A² decode step computes the corrected logits of each (sequence, KV head)'s kept tokens
(3% of the quantised ones) to add their a² weights. ``gather_int64`` is the code before commit
63c7d01: gather the kept rows, unpack the codes bit by bit as int64 (the reference unpacker),
dequantise, add the side code through the basis for every key row, copy the rows for every query
head, one einsum. ``heavy_logits`` is the library's current code, called on a minimal stand-in
of a cache layer (the attributes it reads). Both give the same logits (the maximum difference is
recorded).

    python benchmarks/bench_kept_logits.py --device cpu --out benchmarks/results/cpu_kept_logits.json
    python benchmarks/bench_kept_logits.py --device cuda --context 32768 --out ...

Timing: CPU wall time, median of --reps calls after one warm-up; CUDA: events around a CUDA
graph of 10 calls, median of --reps replays.
"""

from __future__ import annotations

import argparse
import platform
import sys
from types import SimpleNamespace

import torch

from _common import cpu_model, median_ms, wall_median_ms, write_json
from headq_torch import ops
from headq_torch.cache import HeadQLayer
from headq_torch.reference import unpack_bits


def make_layer(B, H, T, D, G, r, key_bits, side_bits, device):
    """Packed random keys and a random orthonormal basis, as a stand-in for HeadQLayer."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, T, D, generator=g).to(device)
    kc = ops.quantize_keys(k, key_bits, G)
    basis = torch.linalg.qr(torch.randn(H, D, r, generator=g))[0].contiguous().to(device)
    zc = ops.side_code(k, *kc, basis, key_bits, G, side_bits, False)
    s = SimpleNamespace(key_bits=key_bits, group_size=G, side_bits=side_bits, sign=1.0)
    buf = dict(k_codes=kc[0], k_scale=kc[1], k_zero=kc[2], z_codes=zc[0], z_scale=zc[1])
    return SimpleNamespace(s=s, buf=buf, H=H, basis=basis, quantise_keys=True)


def gather_int64(layer, q, scale, heavy_idx):
    """HeadQLayer.heavy_logits before commit 63c7d01 (quantised keys with a side code)."""
    s, b, G = layer.s, layer.buf, layer.s.group_size
    B, Hq, D = q.shape
    idx = heavy_idx.clamp_min(0).long()
    codes = torch.gather(b["k_codes"], 2,
                         idx.unsqueeze(-1).expand(-1, -1, -1, b["k_codes"].shape[-1]))
    gi = (idx // G).unsqueeze(-1).expand(-1, -1, -1, D)
    sc = torch.gather(b["k_scale"], 2, gi).float()
    ze = torch.gather(b["k_zero"], 2, gi).float()
    khat = unpack_bits(codes, s.key_bits, D).float() * sc + ze
    zc = torch.gather(b["z_codes"], 2,
                      idx.unsqueeze(-1).expand(-1, -1, -1, b["z_codes"].shape[-1]))
    zs = torch.gather(b["z_scale"], 2, idx)
    zhat = ops.dequantize_side(zc.contiguous(), zs.contiguous(), s.side_bits)
    khat = khat + s.sign * torch.einsum("bhkr,hdr->bhkd", zhat, layer.basis)
    khat = khat.repeat_interleave(Hq // layer.H, dim=1)
    return torch.einsum("bhd,bhkd->bhk", q.float(), khat) * scale


def time_ms(f, device: str, reps: int) -> float:
    f()
    if device != "cuda":
        return wall_median_ms(f, reps)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            f()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return median_ms(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192, help="quantised tokens in the cache")
    ap.add_argument("--kept", type=int, default=983,
                    help="kept slots per (sequence, KV head): 3%% of 32k, as in bench_e2e")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")
    B, H, Hq, D, G, r = args.batch, 8, 32, 128, 64, 8
    layer = make_layer(B, H, args.context, D, G, r, 2, 8, args.device)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, D, generator=g).to(args.device, torch.bfloat16)
    idx = torch.randint(0, args.context, (B, H, args.kept), generator=g,
                        dtype=torch.int32).to(args.device)
    scale = D ** -0.5
    paths = {
        "gather_int64": lambda: gather_int64(layer, q, scale, idx),
        "heavy_logits": lambda: HeadQLayer.heavy_logits(layer, q, scale, idx),
    }
    diff = (paths["gather_int64"]() - paths["heavy_logits"]()).abs().max().item()
    ms = {name: round(time_ms(f, args.device, args.reps), 3) for name, f in paths.items()}
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    result = dict(
        command=" ".join(["python"] + sys.argv), machine=machine, torch=torch.__version__,
        python=platform.python_version(),
        shape=dict(batch=B, kv_heads=H, q_heads=Hq, head_dim=D, group=G, rank=r, key_bits=2,
                   side_bits=8, quantised_tokens=args.context, kept_slots=args.kept),
        unit="ms per call (one layer, one decode step)", ms=ms,
        speedup=round(ms["gather_int64"] / ms["heavy_logits"], 2), max_abs_diff=diff,
    )
    print(result)
    if args.out:
        write_json(args.out, result)
    assert diff < 1e-3, f"the two paths disagree: max |diff| = {diff}"


if __name__ == "__main__":
    main()
