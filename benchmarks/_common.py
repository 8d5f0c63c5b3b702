"""Helpers shared by the benchmark scripts (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() where that is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median_ms(times: list) -> float:
    """The median of a list of times (the upper one of an even count)."""
    return sorted(times)[len(times) // 2]


def wall_median_ms(f, reps: int) -> float:
    """Median wall time of ``f()`` over ``reps`` calls, in ms (CPU timing)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1000)
    return median_ms(times)


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's result as indented JSON, creating the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def write_timed(path: str, result: dict, t0: float, quiet: bool = False) -> None:
    """Set result["wall_s"] (seconds since ``t0``), write it (write_json) and say so."""
    result["wall_s"] = time.time() - t0
    write_json(path, result)
    if not quiet:
        print(f"wrote {path} ({result['wall_s']:.0f} s)")


def finish(result: dict, ok_message: str) -> int:
    """End of a checking benchmark: print result["summary"], then the failures (exit code 1) or
    ok_message (exit code 0)."""
    print(json.dumps(result["summary"], indent=1))
    if result["failures"]:
        print("FAILED:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
        return 1
    print(ok_message)
    return 0


def add_cache_args(p) -> None:
    """The HeadQ cache-format flags of the long-run benchmarks (see cache_kwargs)."""
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--key-bits", type=int, default=2)
    p.add_argument("--value-bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--value-group-size", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=0)


def cache_kwargs(a) -> dict:
    """HeadQCache keyword arguments from the flags of add_cache_args (rank goes to calibration)."""
    return dict(key_bits=a.key_bits, value_bits=a.value_bits, group_size=a.group_size,
                value_group_size=a.value_group_size, residual_length=a.residual_length)


_WINDOW_BUFFERS = ("k_window", "v_window", "w_window")


def capacity_terms(layer, group_size: int) -> tuple[int, int]:
    """What a HeadQ layer's allocation may hold beyond its stored tokens, for the long-run
    memory bounds: (fixed, per_group) bytes. fixed: the dense window buffers and the basis (they
    do not grow with the length); per_group: one more key group of every token-indexed packed
    buffer (the capacity grows in such steps)."""
    fixed = per_group = 0
    if layer.basis is not None:
        fixed += layer.basis.numel() * layer.basis.element_size()
    for k, t in layer.buf.items():
        if t is None:
            continue
        if k in _WINDOW_BUFFERS:
            fixed += t.numel() * t.element_size()
        elif t.shape[2]:
            per_group += t[:, :, :1].numel() * t.element_size() * group_size
    return fixed, per_group
