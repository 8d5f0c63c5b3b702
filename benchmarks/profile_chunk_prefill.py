"""Profile one call over already quantised tokens (a chunk of a chunked prefill, a second turn)
on the dequantised path: Llama-3-8B shape (random weights, bf16), 4 layers, batch 8, 32k
tokens, CUDA; a call of ``--chunk`` tokens per path of ``--paths`` (bench_chunk_prefill's
paths: ``dequantised`` with the flash kernel, ``dequantised_masked`` with transformers' masked
SDPA as until session 18, ``dynamic`` for the dense cache). Prints the torch profiler's table
per path and writes the kernels that took the most device time, with the call's time, to
``--out`` (JSON).

    python benchmarks/profile_chunk_prefill.py --out profile.json
"""
import argparse
import sys
import time
import warnings

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_chunk_prefill as bc  # noqa: E402
from _common import write_json  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from headq_torch.cache import HeadQCache  # noqa: E402


def self_device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--policy", default="uniform", choices=["uniform", "a2"])
    ap.add_argument("--paths", default="dequantised_masked,dequantised,dynamic")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    model = bc.load("llama8b", "cuda", 4)
    cal = bc.random_bases(model, 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context + args.chunk),
                        generator=g).cuda()
    kw = dict(key_bits=2, value_bits=2, group_size=64, value_group_size=64)
    if args.policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=0.03)
    result = dict(command=" ".join(["python"] + sys.argv), machine=torch.cuda.get_device_name(),
                  torch=torch.__version__, cuda=torch.version.cuda,
                  date=time.strftime("%Y-%m-%d"),
                  shape=dict(model="llama8b, 4 layers, bf16", batch=args.batch,
                             context=args.context, chunk=args.chunk, policy=args.policy),
                  unit="ms of device time (self) per kernel over the profiled call; call_ms: "
                       "the same call timed alone before the profile (host clock, synchronised)",
                  paths={})
    with bc.paths_restored():
        for path in args.paths.split(","):
            bc.use_path(path)
            times = []
            for rep in range(3):  # one warm-up, two timed, then the profiled one
                cache = DynamicCache(config=model.config) if path == "dynamic" else \
                    HeadQCache(model.config, cal, **kw)
                model(ids[:, :args.context], past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
                torch.cuda.synchronize()
                if rep == 2:
                    with profile(activities=[ProfilerActivity.CPU,
                                             ProfilerActivity.CUDA]) as prof:
                        model(ids[:, args.context:], past_key_values=cache, use_cache=True)
                        torch.cuda.synchronize()
                else:
                    t0 = time.perf_counter()
                    model(ids[:, args.context:], past_key_values=cache, use_cache=True)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1000)
                del cache
            events = [e for e in prof.key_averages() if self_device_us(e) > 0]
            events.sort(key=self_device_us, reverse=True)
            total = sum(self_device_us(e) for e in events) / 1000
            result["paths"][path] = dict(
                call_ms=round(times[-1], 2), device_ms_total=round(total, 2),
                top=[dict(kernel=e.key[:120], ms=round(self_device_us(e) / 1000, 3),
                          calls=e.count) for e in events[:args.top]])
            print(f"===== {path}: call {times[-1]:.1f} ms, device {total:.1f} ms", flush=True)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top,
                                            max_name_column_width=70), flush=True)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
