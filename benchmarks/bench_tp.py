"""Tensor-parallel HeadQ decoding with transformers' own TP (``tp_plan="auto"``), 2 GPUs.

One command, one process per GPU (multicast off, as on the lent machines)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out benchmarks/results/gpu_tp.json

Two parts:

1. Equality: a small random Llama (4 layers, 16 query / 8 KV heads, fp32, embeddings and
   output weights scaled as in the tests so greedy choices are not near-tied) is saved with
   ``save_pretrained`` by rank 0, calibrated once on rank 0 (single process, rank-8 PCA on random
   tokens) and run there on one GPU with HeadQ (the reference); then every rank loads it with
   ``tp_plan="auto"`` (4 KV heads per rank), loads its calibration shard
   (``Calibration.load(..., shard="auto")``) and generates greedily. Recorded: whether each
   rank's tokens equal the single-GPU tokens, for 8-bit (the check) and 2-bit keys/values.
2. Speed and memory: a random Llama-3-8B-shaped model (32 layers, hidden 4096, 32 query / 8 KV
   heads, head dim 128, bf16) saved by rank 0 and loaded with ``tp_plan="auto"``; HeadQ cache
   with 2-bit keys and values, group 64, rank-8 random bases (sliced per rank by the cache);
   ``--context`` random tokens prefilled, then ``--steps`` greedy decode steps timed. Per GPU:
   decode tokens/s, weights, HeadQ cache bytes and peak memory. With ``--single`` (default on
   CUDA) rank 0 then runs the same model on one GPU for the speedup.

Results JSON (rank 0) to ``--out``; a short summary is printed. CPU smoke test of the control
flow (gloo, tiny shapes)::

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --device cpu --smoke --out /tmp/tp.json
"""

from __future__ import annotations

import os

# multicast off (must be set before NCCL / symmetric memory start)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[bench_tp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def llama_config(kind: str, layers: int, smoke: bool):
    from transformers import LlamaConfig

    if kind == "small" or smoke:
        cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                          num_hidden_layers=4 if kind == "small" else layers,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                          max_position_embeddings=8192, initializer_range=0.02,
                          tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=False)
    return cfg


def save_random_model(cfg, path: Path, dtype, device: str, scale: bool) -> None:
    """Rank 0: a random model with ``save_pretrained`` (built on ``device``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if scale:  # as tests/conftest.make_tiny: no near-tied greedy choices
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(4.0)
            model.lm_head.weight.mul_(10.0)
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def tp_kwargs() -> dict:
    """``tp_plan="auto"`` as this transformers wants it (``DistributedConfig`` in >= 5.17; the
    bare ``tp_plan=`` argument is deprecated there)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return dict(tp_plan="auto")
    return dict(distributed_config=DistributedConfig(tp_plan="auto"))


def load(path: Path, dtype, device: str, tp: bool):
    from transformers import AutoModelForCausalLM

    if tp:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **tp_kwargs())
    else:
        dm = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=dm)
    return model.eval()


@torch.no_grad()
def generate(model, cal, ids, new_tokens: int, bits: int, shard="auto"):
    from headq_torch import attention
    from headq_torch.cache import HeadQCache

    attention.enable(model)
    try:
        cache = HeadQCache(model.config, cal, key_bits=bits, value_bits=bits, group_size=64,
                           value_group_size=64, shard=shard)
        out = model.generate(ids.to(model.device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                             pad_token_id=0)
    finally:
        attention.disable(model)
    return out[0, ids.shape[1]:].tolist(), cache


def first_mismatch(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def part_equality(args, work: Path, device: str, rank: int, world: int) -> dict:
    from headq_torch.calibration import Calibration, calibrate

    path, cal_path = work / "small", work / "small-cal.safetensors"
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 2048, (1, args.eq_prompt), generator=g)
    bits_list = (8, 2)
    ref = {}
    if rank == 0:
        save_random_model(llama_config("small", 4, args.smoke), path, torch.float32, device,
                          scale=True)
        model = load(path, torch.float32, device, tp=False)
        cal_ids = torch.randint(0, 2048, (1024,), generator=torch.Generator().manual_seed(4))
        cal = calibrate(model, None, cal_ids, rank=8, n_tokens=1024, chunk_len=256,
                        progress=False)
        cal.save(cal_path)
        cal = Calibration.load(cal_path, expected_config=model.config)
        for bits in bits_list:
            ref[bits] = generate(model, cal, ids, args.eq_new, bits, shard=None)[0]
        del model
        gc.collect()
    dist.barrier()
    model = load(path, torch.float32, device, tp=True)
    cal = Calibration.load(cal_path, expected_config=model.config, shard="auto")
    mine = {}
    info = None
    for bits in bits_list:
        toks, cache = generate(model, cal, ids, args.eq_new, bits)
        mine[bits] = toks
        info = dict(rank=rank, shard=list(cache.shard), kv_heads_local=cache.num_kv_heads,
                    kv_heads_total=cache.total_kv_heads,
                    calibration_shard=list(cache.calibration.shard_info),
                    n_quant=cache.headq_layers[0].n_quant)
    gathered = [None] * world
    dist.all_gather_object(gathered, (info, mine))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if rank != 0:
        return {}
    out = dict(model="random Llama, 4 layers, hidden 512, 16 q / 8 KV heads, head dim 64, fp32",
               prompt_tokens=args.eq_prompt, new_tokens=args.eq_new, ranks=[g[0] for g in gathered])
    for bits in bits_list:
        per = [g[1][bits] for g in gathered]
        out[f"bits{bits}"] = dict(
            single_gpu_tokens=ref[bits], tp_equal_per_rank=[p == ref[bits] for p in per],
            tp_first_mismatch_per_rank=[first_mismatch(p, ref[bits]) for p in per])
    out["equal"] = all(out["bits8"]["tp_equal_per_rank"])
    return out


def random_calibration(cfg, rank: int):
    from headq_torch.calibration import Calibration
    from headq_torch.config import config_fingerprint

    g = torch.Generator().manual_seed(1)
    bases = []
    for _ in range(cfg.num_hidden_layers):
        q, _ = torch.linalg.qr(torch.randn(cfg.num_key_value_heads, cfg.head_dim, rank,
                                           generator=g))
        bases.append(q)
    return Calibration(bases, model_name="random-llama3-8b-shape",
                       fingerprint=config_fingerprint(cfg), num_layers=cfg.num_hidden_layers,
                       num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rank=rank,
                       method="random")


@torch.no_grad()
def decode_bench(model, device: str, context: int, steps: int, chunk: int, tp: bool,
                 kind: str = "headq") -> dict:
    """Prefill ``context`` tokens, then time ``steps`` greedy steps. ``kind``: "headq" (HeadQ
    cache + "headq" attention) or "dynamic" (transformers' DynamicCache + sdpa: the control that
    says how much of a TP slowdown is TP itself)."""
    from transformers import DynamicCache

    from headq_torch import attention
    from headq_torch.cache import HeadQCache

    def barrier():
        if tp:
            dist.barrier()

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if device == "cuda" else 0
    if kind == "headq":
        attention.enable(model)
        cache = HeadQCache(model.config, random_calibration(model.config, 8), key_bits=2,
                           value_bits=2, group_size=64, value_group_size=64,
                           shard="auto" if tp else None)
    else:
        cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, context),
                        generator=torch.Generator().manual_seed(2)).to(model.device)
    barrier()
    sync(device)
    t0 = time.perf_counter()
    chunk = chunk or context
    out = None
    for s in range(0, context, chunk):
        out = model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - t0
    after_prefill = torch.cuda.memory_allocated() if device == "cuda" else 0
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    barrier()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync(device)
    dt = time.perf_counter() - t0
    if kind == "headq":
        attention.disable(model)
        extra = dict(shard=list(cache.shard), kv_heads_local=cache.num_kv_heads,
                     headq_cache_bytes=cache.memory_bytes())
    else:
        extra = dict(dense_cache_bytes=sum(
            t.numel() * t.element_size() for layer in cache.layers
            for t in (layer.keys, layer.values) if t is not None))
    row = dict(cache=kind, context=context, steps=steps, decode_ms_per_step=1000.0 * dt / steps,
               tokens_per_s=steps / dt, prefill_s=prefill_s, **extra,
               weights_bytes=weights,
               cache_and_state_bytes_after_prefill=after_prefill - weights if weights else None,
               peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    del cache, out
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def part_speed(args, work: Path, device: str, rank: int, world: int) -> dict:
    path = work / ("smoke-big" if args.smoke else f"llama3-8b-shape-{args.layers}l")
    cfg = llama_config("big", args.layers, args.smoke)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    if rank == 0 and not (path / "config.json").is_file():
        save_random_model(cfg, path, dtype, device, scale=False)
    dist.barrier()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load(path, dtype, device, tp=True)
    load_s = time.perf_counter() - t0
    row = decode_bench(model, device, args.context, args.steps, args.chunk, tp=True)
    row.update(rank=rank, load_s=load_s)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    dense_rows = None
    if args.dense_control:
        drow = decode_bench(model, device, args.context, args.steps, args.chunk, tp=True,
                            kind="dynamic")
        drow.update(rank=rank)
        dense_rows = [None] * world
        dist.all_gather_object(dense_rows, drow)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    single = single_dense = None
    if args.single and rank == 0:
        model = load(path, dtype, device, tp=False)
        single = decode_bench(model, device, args.context, args.steps, args.chunk, tp=False)
        if args.dense_control:
            single_dense = decode_bench(model, device, args.context, args.steps, args.chunk,
                                        tp=False, kind="dynamic")
        del model
        gc.collect()
    dist.barrier()
    if rank != 0:
        return {}
    return dict(model=("tiny smoke shape" if args.smoke else
                       f"random LlamaForCausalLM, Llama-3-8B shape, {args.layers} layers, bf16"),
                save_s=save_s, tp_per_rank=rows, single_gpu=single,
                dense_control_tp_per_rank=dense_rows, dense_control_single_gpu=single_dense,
                cache="HeadQ 2-bit keys + 2-bit values, group 64, rank-8 random bases")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk (0: one call)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--eq-prompt", type=int, default=200)
    ap.add_argument("--eq-new", type=int, default=64)
    ap.add_argument("--single", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the big model on one GPU (rank 0) for the speedup "
                         "(default: on with CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU test of the flow)")
    ap.add_argument("--workdir", default=None,
                    help="where the random models are saved (default: a temp dir, removed); "
                         "a model already there is reused")
    ap.add_argument("--dense-control", action=argparse.BooleanOptionalAction, default=True,
                    help="also time DynamicCache + sdpa (TP and single GPU): how much of the TP "
                         "cost is TP itself")
    ap.add_argument("--skip-equality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_tp.json")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_tp.py ...")
    if args.smoke:
        args.context = min(args.context, 512)
        args.steps = min(args.steps, 8)
        args.layers = 2
    if args.single is None:
        args.single = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() < world:
            sys.exit(f"bench_tp needs {world} CUDA devices (or --device cpu --smoke)")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local),
                                timeout=timedelta(minutes=20))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=20))
    import transformers
    from transformers.utils import logging as hf_logging

    import headq_torch  # noqa: F401

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    made_tmp = args.workdir is None
    box = [tempfile.mkdtemp(prefix="headq_bench_tp_") if (rank == 0 and made_tmp)
           else args.workdir]
    dist.broadcast_object_list(box, src=0)
    work = Path(box[0])
    work.mkdir(parents=True, exist_ok=True)
    result = dict(command=" ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
                  world_size=world, torch=torch.__version__, cuda=torch.version.cuda,
                  transformers=transformers.__version__, python=platform.python_version(),
                  device=(torch.cuda.get_device_name() if device == "cuda" else "cpu"),
                  backend=dist.get_backend(),
                  env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                      "TORCH_SYMM_MEM_DISABLE_MULTICAST")})
    try:
        if not args.skip_equality:
            log("equality: small model, single-GPU HeadQ vs tp_plan='auto'")
            result["equality"] = part_equality(args, work, device, rank, world)
            if rank == 0:
                e = result["equality"]
                log(f"equality: 8-bit equal per rank {e['bits8']['tp_equal_per_rank']}, "
                    f"2-bit {e['bits2']['tp_equal_per_rank']}")
        if not args.skip_speed:
            log(f"speed: {'smoke' if args.smoke else 'Llama-3-8B shape'}, context "
                f"{args.context}, {args.steps} decode steps")
            result["speed"] = part_speed(args, work, device, rank, world)
    finally:
        dist.barrier()
        if rank == 0 and made_tmp:
            shutil.rmtree(work, ignore_errors=True)
    if rank == 0:
        result["wall_s"] = time.perf_counter() - t_start
        summary = {}
        if "equality" in result:
            summary["greedy_equal_8bit"] = result["equality"]["equal"]
            summary["greedy_equal_2bit"] = all(result["equality"]["bits2"]["tp_equal_per_rank"])
        if "speed" in result:
            sp = result["speed"]
            tp_rows = sp["tp_per_rank"]
            summary["tp_tokens_per_s"] = min(r["tokens_per_s"] for r in tp_rows)
            summary["tp_peak_gib_per_gpu"] = [None if r["peak_memory_bytes"] is None else
                                              round(r["peak_memory_bytes"] / 2**30, 2)
                                              for r in tp_rows]
            summary["tp_headq_cache_mib_per_gpu"] = [round(r["headq_cache_bytes"] / 2**20, 1)
                                                     for r in tp_rows]
            if sp["single_gpu"]:
                s = sp["single_gpu"]
                summary["single_tokens_per_s"] = s["tokens_per_s"]
                summary["tp_speedup_vs_single"] = summary["tp_tokens_per_s"] / s["tokens_per_s"]
                summary["single_peak_gib"] = (None if s["peak_memory_bytes"] is None else
                                              round(s["peak_memory_bytes"] / 2**30, 2))
                summary["single_headq_cache_mib"] = round(s["headq_cache_bytes"] / 2**20, 1)
            if sp["dense_control_tp_per_rank"]:
                summary["dense_tp_tokens_per_s"] = min(
                    r["tokens_per_s"] for r in sp["dense_control_tp_per_rank"])
            if sp["dense_control_single_gpu"]:
                summary["dense_single_tokens_per_s"] = sp["dense_control_single_gpu"][
                    "tokens_per_s"]
        result["summary"] = summary
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
        print(f"wrote {args.out} in {result['wall_s']:.0f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
