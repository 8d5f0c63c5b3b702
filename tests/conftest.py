"""Shared fixtures: tiny random Llama / Qwen2 / Gemma 3 models built from configs, and the
packaged SmolLM2 (loaded once per session, calibrated on a slice of the packaged text)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers >= 5.2x renames generate/forward's `past_key_values` to `cache`; the tests use the
# old name, which both 5.17 and the latest 5.x accept
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")

TINY_KINDS = ("llama", "qwen2", "gemma3")


def _tiny_config(kind: str, **overrides):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                  initializer_range=0.02, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(num_hidden_layers=2, **common)
    if kind == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(num_hidden_layers=2, **common)
    if kind == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(num_hidden_layers=4, sliding_window=24,
                                layer_types=["sliding_attention", "full_attention",
                                             "sliding_attention", "full_attention"],
                                query_pre_attn_scalar=32, **common)
    raise ValueError(kind)


def make_tiny(kind: str, seed: int = 0, **overrides):
    """A tiny random causal LM of architecture ``kind`` (eval mode, float32, sdpa); keyword
    arguments override config fields (e.g. ``head_dim=64``, which the CUDA decode needs)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _tiny_config(kind, **overrides)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.config.name_or_path = f"tiny-{kind}"
    # Larger embeddings and output weights: random tiny models otherwise have near-tied greedy
    # choices (top-2 gaps ~1e-4), which no lossy cache can be expected to reproduce.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
        model.lm_head.weight.mul_(10.0)
    return model.eval()


@pytest.fixture
def tiny():
    """Factory: ``tiny('llama')`` -> a fresh tiny model (state restored: attention left as is)."""
    return make_tiny


def tiny_calibration(model, n_tokens: int = 192, rank: int = 8, method: str = "pca", seed=1):
    from headq_torch.calibration import calibrate

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=g)
    return calibrate(model, None, ids, rank=rank, n_tokens=n_tokens, method=method,
                     chunk_len=96, progress=False)


def save_tiny_folder(model, folder, unk: str = "w0"):
    """Save ``model`` with a word-level tokenizer of its vocabulary (``w0`` .. ``w{V-1}``, one
    word per token) into ``folder``: a local model folder for the command line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    if unk not in vocab:
        vocab[unk] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token=unk).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the packaged SmolLM2-135M-Instruct (fp32, CPU)."""
    from transformers.utils import logging as hf_logging

    from headq_torch.data import load_smollm2

    hf_logging.disable_progress_bar()
    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2):
    """Rank-8 query-PCA calibration on 512 tokens of the packaged calibration split."""
    from headq_torch.calibration import calibrate
    from headq_torch.data import calibration_eval_split

    model, tok = smollm2
    cal_text, _ = calibration_eval_split()
    return calibrate(model, tok, cal_text, rank=8, n_tokens=512, chunk_len=256, progress=False)


@pytest.fixture
def restore_attn():
    """Yields a list; every model appended to it gets its attention implementation restored."""
    models = []
    yield models
    from headq_torch.attention import disable

    for m in models:
        disable(m)
