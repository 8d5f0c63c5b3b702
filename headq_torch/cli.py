"""Command line: ``headq calibrate ...``, ``headq generate ...`` (and ``headq eval ...`` when
:mod:`headq_torch.evaluation` provides ``add_eval_parser``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
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
                    chunk_len=args.chunk_len, progress=not args.quiet, seed=args.seed,
                    key_bits=args.key_bits, group_size=args.group_size)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    print(f"wrote {out}: {cal}")
    return 0


def _greedy(model, ids, cache, gen: dict):
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # past_key_values= works in every supported transformers; newer ones prefer cache=
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        return model.generate(ids, past_key_values=cache, **gen)


def _generate(args) -> int:
    """Greedy generation from a prompt with a HeadQ cache (and, with ``--compare``, with
    transformers' DynamicCache): the text, the cache's bytes against the dense cache's."""
    import torch
    from transformers import DynamicCache

    from . import attention
    from .cache import HeadQCache
    from .calibration import Calibration, calibrate
    from .config import model_geometry

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible")
    model, tok = load_model(args.model, args.gguf_file)
    model.to(args.device)
    if args.calibration:
        cal = Calibration.load(args.calibration, expected_config=model.config)
    elif args.calib_tokens > 0:
        cal = calibrate(model, tok, _read_text("packaged"), rank=args.rank,
                        n_tokens=args.calib_tokens, progress=not args.quiet)
    else:
        cal = None  # the plain base quantiser
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(args.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
               attention_mask=torch.ones_like(ids))
    kw = dict(key_bits=args.key_bits, value_bits=args.value_bits, group_size=args.group_size,
              residual_length=args.residual_length)
    if args.value_group_size is not None:
        kw["value_group_size"] = args.value_group_size
    else:  # 64 channels where the head dim allows it (the fused kernel's default format)
        head_dim = model_geometry(model.config)[3]
        kw["value_group_size"] = 64 if head_dim % 64 == 0 else head_dim
    if args.value_policy == "a2":
        kw.update(value_policy="a2", value_keep_frac=args.value_keep_frac)
    rows = []
    if args.compare:
        dense = DynamicCache(config=model.config)
        out = _greedy(model, ids, dense, gen)
        nbytes = sum(t.numel() * t.element_size() for layer in dense.layers
                     for t in (layer.keys, layer.values) if t is not None)
        rows.append(("DynamicCache", out, nbytes, None))
    attention.enable(model)
    try:
        cache = HeadQCache(model.config, cal, **kw)
        out = _greedy(model, ids, cache, gen)
    finally:
        attention.disable(model)
    rep = cache.storage_report()
    rows.append((f"HeadQCache (keys {args.key_bits}-bit, values {args.value_bits}-bit"
                 f"{', A²' if args.value_policy == 'a2' else ''}"
                 f"{', rank ' + str(cal.rank) if cal is not None else ', no calibration'})",
                 out, cache.memory_bytes(), rep))
    for name, out, nbytes, rep in rows:
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"== {name}: {out.shape[1]} tokens, cache {nbytes / 1e6:.3f} MB"
              + (f" ({rep.bits_per_element:.2f} bits per cached element"
                 f"{', the query basis included' if cal is not None else ''})" if rep else ""))
        print(text)
    if args.compare:
        same = torch.equal(rows[0][1], rows[1][1])
        print(f"== same tokens as DynamicCache: {same}")
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
    c.add_argument("--key-bits", type=int, default=2,
                   help="base key bits the 'residual' basis is fitted to (the cache's)")
    c.add_argument("--group-size", type=int, default=64,
                   help="base key group size (tokens) the 'residual' basis is fitted to")
    c.add_argument("--chunk-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="output calibration file (.safetensors)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_calibrate)
    g = sub.add_parser("generate", help="greedy generation from a prompt with a HeadQ cache")
    g.add_argument("--model", default="smollm2", help="model path or hub name, or 'smollm2'")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--no-chat", dest="chat", action="store_false",
                   help="tokenise the prompt as is (default: the tokenizer's chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--calibration", default=None,
                   help="calibration file from `headq calibrate` (default: calibrate now on "
                        "--calib-tokens tokens of the packaged text)")
    g.add_argument("--calib-tokens", type=int, default=2048,
                   help="tokens to calibrate on when no --calibration is given (0: no side "
                        "code, the plain base quantiser)")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--key-bits", type=int, default=2)
    g.add_argument("--value-bits", type=int, default=16)
    g.add_argument("--group-size", type=int, default=32)
    g.add_argument("--value-group-size", type=int, default=None,
                   help="channels per value group (default: 64, or the head dim if 64 does "
                        "not divide it)")
    g.add_argument("--residual-length", type=int, default=0)
    g.add_argument("--value-policy", choices=["uniform", "a2"], default="uniform")
    g.add_argument("--value-keep-frac", type=float, default=0.03)
    g.add_argument("--device", default="cpu")
    g.add_argument("--compare", action="store_true",
                   help="also generate with transformers' DynamicCache and compare")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
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
