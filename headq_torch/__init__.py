"""HeadQ KV-cache quantisation for PyTorch and HuggingFace transformers.

Keys: a low-bit per-channel base code plus a low-rank side code on a per-head query basis,
added back as a logit correction. Values: an A²-weighted value policy. See the README.
"""

from . import ops, reference
from .ops import (
    corrected_logits,
    decode_attention,
    dequantize_keys,
    dequantize_side,
    dequantize_values,
    quantize_keys,
    quantize_values,
    side_code,
)
from .storage import StorageReport, storage_report

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
    "side_code",
    "dequantize_side",
    "corrected_logits",
    "decode_attention",
    "storage_report",
    "StorageReport",
]
