"""Profile one few-token call (the decode-rows path) against a decode step: Llama-3-8B shape
(random weights, bf16), 4 layers, batch 8, 32k tokens, CUDA. Prints one timed call per size
(after a warm-up pair) and the torch profiler's tables (device time, CPU time) for each.

    python benchmarks/profile_few_rows.py

Figures from it: ``session17.profile`` in ``benchmarks/results/gpu_few_rows.json``.
"""
import sys, time, warnings

sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import profile, ProfilerActivity
import bench_chunk_prefill as bc
from headq_torch.cache import HeadQCache
warnings.filterwarnings("ignore")
model = bc.load("llama8b", "cuda", 4)
cal = bc.random_bases(model, 8)
g = torch.Generator().manual_seed(0)
ctx = 32768
ids = torch.randint(1, model.config.vocab_size, (8, ctx + 2), generator=g).cuda()
kw = dict(key_bits=2, value_bits=2, group_size=64, value_group_size=64)
bc.use_path("decode_rows")
for L in (1, 2, 1, 2):
    with torch.no_grad():
        cache = HeadQCache(model.config, cal, **kw)
        model(ids[:, :ctx], past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids[:, ctx:ctx + L], past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        print("L", L, "ms", round((time.perf_counter() - t0) * 1000, 2), flush=True)
for L in (1, 2):
    with torch.no_grad():
        cache = HeadQCache(model.config, cal, **kw)
        model(ids[:, :ctx], past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids[:, ctx:ctx + L], past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    print(f"===== L {L} by device time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(f"===== L {L} by CPU time")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
