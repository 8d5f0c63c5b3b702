"""The A² step's kept-token logits, one layer: the PyTorch path of sessions 11-13
(HeadQLayer.heavy_logits) against the gather path it replaced, on packed random keys at
bench_e2e's shape.

Every A² decode step needs the corrected logits of each (sequence, KV head)'s kept tokens (3% of
the quantised ones) to add their a² weights. Since session 13 the library takes them from
``decode_attention(..., heavy_logits=)``, which computes them anyway; both paths here are kept as
the record of what came before. ``gather_int64`` is the code before commit 63c7d01: gather the
kept rows, unpack the codes bit by bit as int64 (the reference unpacker), dequantise, add the
side code through the basis for every key row, copy the rows for every query head, one einsum.
``heavy_logits`` is ``HeadQLayer.heavy_logits`` as it was until session 14 (removed from the
library then, once nothing called it), run on a minimal stand-in of a cache layer. Both give the
same logits (the maximum difference is recorded).

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
    return SimpleNamespace(s=s, buf=buf, H=H, basis=basis)


def _unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes of packed rows ``[..., n*bits/8]`` uint8 -> ``[..., n]`` uint8 (the bit stream of
    :func:`~headq_torch.reference.pack_bits`, least significant bit first). 2, 4 and 8 bits
    shift whole bytes (code ``i`` is bits ``(i*bits) % 8 ..`` of byte ``i*bits // 8``);
    3 bits, whose codes straddle bytes, go through the reference's bit-by-bit unpacking."""
    if 8 % bits:
        return unpack_bits(packed, bits, n).to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


def heavy_logits(layer, q: torch.Tensor, scale: float, heavy_idx: torch.Tensor) -> torch.Tensor:
    """``HeadQLayer.heavy_logits`` until session 14 (quantised keys; the stand-in always has
    them): the corrected logits of the kept slots ``heavy_idx`` ``[B, H, K]``, float32 ``[B, Hq,
    K]`` for ``q`` ``[B, Hq, D]``, from their packed key rows and group scales (no dense key
    copy); empty slots (-1) give token 0's logit, which callers masked.

    It ran at every A² decode step, so it kept its temporaries small: codes unpacked as bytes
    (:func:`_unpack_codes`), the query heads of a KV head share its kept rows (one batched
    product, no copy per query head), and the side-code term is ``(q U) · ẑ`` over the rank
    instead of adding ``U ẑ`` to every key row."""
    s, b, G = layer.s, layer.buf, layer.s.group_size
    B, Hq, D = q.shape
    n_rep = Hq // layer.H
    idx = heavy_idx.clamp_min(0).long()  # [B, H, K]
    K = idx.shape[-1]
    qg = q.float().view(B, layer.H, n_rep, D)
    codes = torch.gather(b["k_codes"], 2,
                         idx.unsqueeze(-1).expand(-1, -1, -1, b["k_codes"].shape[-1]))
    gi = (idx // G).unsqueeze(-1).expand(-1, -1, -1, D)
    sc = torch.gather(b["k_scale"], 2, gi).float()
    ze = torch.gather(b["k_zero"], 2, gi).float()
    khat = torch.addcmul(ze, _unpack_codes(codes, s.key_bits, D).float(), sc)
    logits = torch.einsum("bhrd,bhkd->bhrk", qg, khat)
    zc = torch.gather(b["z_codes"], 2,
                      idx.unsqueeze(-1).expand(-1, -1, -1, b["z_codes"].shape[-1]))
    zs = torch.gather(b["z_scale"], 2, idx)
    zhat = ops.dequantize_side(zc.contiguous(), zs.contiguous(), s.side_bits)
    qu = torch.einsum("bhrd,hdj->bhrj", qg, layer.basis.float())
    logits = logits + s.sign * torch.einsum("bhrj,bhkj->bhrk", qu, zhat)
    return logits.reshape(B, Hq, K) * scale


def gather_int64(layer, q, scale, heavy_idx):
    """``HeadQLayer.heavy_logits`` before commit 63c7d01 (quantised keys with a side code)."""
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
        "heavy_logits": lambda: heavy_logits(layer, q, scale, idx),
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
