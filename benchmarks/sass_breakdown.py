"""Static SASS breakdown of the fixed tensor-core decode kernel's per-sub-tile work (no GPU).

On the H200 the fixed kernel's time follows its executed instruction count (docs/PERF.md, "The
operands' share on the H200"), so the instructions one warp spends on one 64-token sub-tile are
the budget to cut. This script compiles csrc/cuda/decode_mma.cu for sm_90 with the sub-tile
test `whole(t0)` forced true (so the mask-free path, the one a long context runs, is the only
copy of the key and value phases), disassembles it with line information and counts, in
`decode_mma_kernel<128, 1, 4>` (D 128, one head group, variant fixed), the instructions that the
two calls of the ring loop inline: `key_softmax` (key phase, per-group Q' and q.z, side code,
online softmax) and `values` (P' and the value phase). Each is broken down by opcode and by the
innermost source line. The count is static: every instruction of those two calls runs once per
warp and sub-tile (their loops are unrolled; the lazy rescale is a branch, counted as if taken);
the out-of-line code after the kernel's last EXIT is left out.

    python benchmarks/sass_breakdown.py --nvdisasm /path/to/nvdisasm [--top 30] [--json OUT]
    python benchmarks/sass_breakdown.py --nvdisasm PATH --json benchmarks/results/sass_breakdown.json

nvdisasm comes with the CUDA toolkit or from PyPI (`pip download nvidia-cuda-nvdisasm`, unzip).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import write_json  # this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "decode_mma.cu"
WHOLE_OLD = "auto whole = [&](int t0) { return kFix && t0 + tl0 >= lo && t0 + tl0 + kSub <= s1; };"
WHOLE_NEW = "auto whole = [&](int t0) { return kFix; };"
CALLS = {"key_softmax": "if (act) key_softmax(sb, t0, alpha, pw);",
         "values": "if (act) values(sb, t0, alpha, pw);"}
KERNEL = "decode_mma_kernelILi128ELi1ELi4EEE"


def parse(listing: str) -> dict[int, tuple[tuple[str, int], str]]:
    """address -> ((file, line) of the annotation above it, opcode) in KERNEL's section."""
    lines = listing.split("\n")
    start = next(i for i, l in enumerate(lines) if ".section" in l and ".text." in l and KERNEL in l)
    end = next((j for j in range(start + 1, len(lines))
                if ".section" in lines[j] and ".text." in lines[j]), len(lines))
    cur, out = ("?", 0), {}
    for l in lines[start:end]:
        if "//## File" in l:
            f, n = re.findall(r'"([^"]+)", line (\d+)', l)[0]
            cur = (os.path.basename(f), int(n))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
        if m:
            op = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip()).split()[0]
            out[int(m.group(1), 16)] = (cur, op.split(".")[0])
    return out


def tool_version(tool: str) -> str:
    """The last line of `tool --version` (its build)."""
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().split("\n")[-1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--top", type=int, default=30, help="source lines listed per call")
    ap.add_argument("--json", default=None, help="write the counts here")
    args = ap.parse_args()
    for flag, tool in (("--nvdisasm", args.nvdisasm), ("--nvcc", args.nvcc)):
        if shutil.which(tool) is None:
            sys.exit(f"sass_breakdown: {flag} must name an executable, got {tool!r}")
    text = SRC.read_text()
    if WHOLE_OLD not in text or any(c not in text for c in CALLS.values()):
        sys.exit("sass_breakdown: decode_mma.cu no longer has the lines this script patches / finds")
    src_lines = text.split("\n")
    call_line = {k: src_lines.index(next(l for l in src_lines if v in l)) + 1 for k, v in CALLS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        # The patched copy keeps every line number; its quoted includes resolve through -I.
        patched = Path(tmp) / "decode_mma_whole.cu"
        patched.write_text(text.replace(WHOLE_OLD, WHOLE_NEW))
        cubin = Path(tmp) / "k.cubin"
        subprocess.run([args.nvcc, "-cubin", "-o", str(cubin), str(patched), "-DHEADQ_WITH_CUDA",
                        f"-I{SRC.parent}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}",
                        "--expt-relaxed-constexpr", "-O3", "-lineinfo", "-std=c++17",
                        "-gencode=arch=compute_90,code=sm_90"], check=True)
        inner = parse(subprocess.run([args.nvdisasm, "-g", "-c", str(cubin)], check=True,
                                     capture_output=True, text=True).stdout)
        outer = parse(subprocess.run([args.nvdisasm, "-gi", "-c", str(cubin)], check=True,
                                     capture_output=True, text=True).stdout)
    name = patched.name
    files = {name: src_lines,
             "device_common.cuh": (SRC.parent / "device_common.cuh").read_text().split("\n")}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {"command": "python benchmarks/sass_breakdown.py " + " ".join(sys.argv[1:]),
              "machine": f"no GPU; nvcc: {tool_version(args.nvcc)}; nvdisasm: {tool_version(args.nvdisasm)}",
              "source": f"csrc/cuda/decode_mma.cu at {commit or 'unknown commit'}, sm_90, -O3",
              "kernel": "decode_mma_kernel<128, 1, 4> (fixed), whole sub-tiles", "calls": {}}
    # Out-of-line code after the kernel's last EXIT (the shuffles' convergence fallbacks) never
    # runs on the path counted here.
    last_exit = max(a for a, (_, op) in inner.items() if op == "EXIT")
    for call, line in call_line.items():
        addrs = [a for a, (loc, _) in outer.items() if loc == (name, line) and a < last_exit]
        ops = collections.Counter(inner[a][1] for a in addrs)
        by_line = collections.Counter(inner[a][0] for a in addrs)
        print(f"== {call} (line {line}): {len(addrs)} instructions per warp and sub-tile")
        print("   " + ", ".join(f"{o} {n}" for o, n in ops.most_common(16)))
        rows = []
        for (f, n), v in by_line.most_common(args.top):
            text_of = files.get(f)
            s = text_of[n - 1].strip() if text_of and 0 < n <= len(text_of) else ""
            fname = "decode_mma.cu" if f == name else f
            print(f"   {v:4d}  {fname}:{n}  {s[:88]}")
            rows.append({"count": v, "file": fname, "line": n, "source": s})
        result["calls"][call] = {"line": line, "instructions": len(addrs),
                                 "opcodes": dict(ops.most_common()), "top_lines": rows}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
