"""Command line: ``headq calibrate ...`` (and ``headq eval ...`` when
:mod:`headq_torch.evaluation` provides ``add_eval_parser``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "load_model"]


def load_model(model: str, gguf_file: Optional[str] = None):
    """``'smollm2'`` (the packaged GGUF model) or a local path / hub name (with ``gguf_file``
    for a GGUF checkpoint). Returns ``(model, tokenizer)`` in eval mode on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.lower() == "smollm2":
        from .data import load_smollm2
        return load_smollm2()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
    m.eval()
    return m, tok


def _read_text(text: str) -> str:
    if text == "packaged":
        from .data import calibration_eval_split
        return calibration_eval_split()[0]
    p = Path(text)
    if not p.is_file():
        raise SystemExit(f"headq calibrate: --text {text!r} is neither 'packaged' nor a file")
    return p.read_text(encoding="utf-8")


def _calibrate(args) -> int:
    from .calibration import calibrate

    model, tok = load_model(args.model, args.gguf_file)
    text = _read_text(args.text)
    cal = calibrate(model, tok, text, rank=args.rank, n_tokens=args.tokens, method=args.method,
                    chunk_len=args.chunk_len, progress=not args.quiet, seed=args.seed)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    print(f"wrote {out}: {cal}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calibration import METHODS

    p = argparse.ArgumentParser(prog="headq", description="HeadQ KV-cache quantisation")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="learn the query bases of a model, write a .safetensors")
    c.add_argument("--model", required=True, help="model path or hub name, or 'smollm2'")
    c.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    c.add_argument("--text", default="packaged",
                   help="calibration text file, or 'packaged' (the packaged news articles' "
                        "calibration split)")
    c.add_argument("--rank", type=int, default=8)
    c.add_argument("--tokens", type=int, default=8192)
    c.add_argument("--method", choices=METHODS, default="pca")
    c.add_argument("--chunk-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="output calibration file (.safetensors)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_calibrate)
    # `headq eval` lives in headq_torch.evaluation (another module); added when present
    if importlib.util.find_spec(f"{__package__}.evaluation") is not None:
        evaluation = importlib.import_module(f"{__package__}.evaluation")
        if hasattr(evaluation, "add_eval_parser"):
            evaluation.add_eval_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        # sub-commands return an exit status or their result (run_eval returns its dict)
        return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
    except (ValueError, OSError) as e:  # bad arguments or files (CalibrationError included)
        print(f"headq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
