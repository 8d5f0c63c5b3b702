"""HeadQ KV-cache quantisation for PyTorch and HuggingFace transformers.

Keys: a low-bit per-channel base code plus a low-rank side code on a per-head query basis,
added back as a logit correction. Values: an A²-weighted value policy. See the README.
"""

from . import ops, reference
from .ops import (
    a2_weights,
    corrected_logits,
    decode_attention,
    dequantize_keys,
    dequantize_side,
    dequantize_values,
    quantize_keys,
    quantize_kv,
    quantize_values,
    reconstruct_keys,
    side_code,
)
from .storage import StorageReport, storage_report

__version__ = "0.1.0"

# The transformers-facing parts import transformers; load them on first use.
_LAZY = {
    "HeadQCache": ("cache", "HeadQCache"),
    "GraphDecoder": ("graph", "GraphDecoder"),
    "Calibration": ("calibration", "Calibration"),
    "calibrate": ("calibration", "calibrate"),
    "enable": ("attention", "enable"),
    "disable": ("attention", "disable"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ops",
    "reference",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
    "side_code",
    "quantize_kv",
    "dequantize_side",
    "reconstruct_keys",
    "corrected_logits",
    "decode_attention",
    "a2_weights",
    "storage_report",
    "StorageReport",
    "HeadQCache",
    "GraphDecoder",
    "Calibration",
    "calibrate",
    "enable",
    "disable",
]
