"""Helpers shared by the benchmark scripts (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import json
import platform
import sys


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


def finish(result: dict, ok_message: str) -> int:
    """End of a checking benchmark: print result["summary"], then the failures (exit code 1) or
    ok_message (exit code 0)."""
    print(json.dumps(result["summary"], indent=1))
    if result["failures"]:
        print("FAILED:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
        return 1
    print(ok_message)
    return 0
