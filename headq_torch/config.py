"""Cache settings, their validation, and what a calibration needs to know about a model config.

Everything here is plain Python: no ops, no transformers import at module level.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass

__all__ = [
    "KEY_BITS",
    "VALUE_BITS",
    "SIDE_BITS",
    "GROUP_SIZES",
    "VALUE_POLICIES",
    "HeadQSettings",
    "text_config",
    "model_geometry",
    "model_name",
    "config_fingerprint",
    "layer_kinds",
]

KEY_BITS = (2, 3, 4, 8, 16)      # 16 = dense keys
VALUE_BITS = (2, 3, 4, 8, 16)    # 16 = dense values
SIDE_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
VALUE_POLICIES = ("uniform", "a2")

# Layer types (``config.layer_types``) that the HeadQ cache quantises. Every other attention type
# (``sliding_attention``, ``chunked_attention``, ...) is kept in transformers' own dense layer:
# a sliding layer holds at most ``sliding_window`` tokens, so quantising it saves little, and its
# eviction rule does not fit a grouped, append-only packed store.
QUANTISED_LAYER_TYPES = ("full_attention",)


def _fail(arg: str, value, expected: str) -> None:
    raise ValueError(f"HeadQCache: {arg}={value!r} is not supported; expected {expected}")


@dataclass(frozen=True)
class HeadQSettings:
    """The knobs of a HeadQ cache (see :class:`headq_torch.cache.HeadQCache`)."""

    key_bits: int = 2
    value_bits: int = 16
    group_size: int = 64
    value_group_size: int = 64
    residual_length: int = 0
    side_bits: int = 8
    center: bool = False
    sign: float = 1.0
    value_policy: str = "uniform"
    value_keep_frac: float = 0.0

    def validate(self, head_dim: int, rank: int | None) -> None:
        """Raise ``ValueError`` naming the first bad argument."""
        for name in ("key_bits", "value_bits", "group_size", "value_group_size", "side_bits",
                     "residual_length"):
            v = getattr(self, name)
            # 2.0 or True compare equal to allowed ints but are not: reject them by type
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                _fail(name, v, "an integer")
        if not isinstance(self.center, (bool, numbers.Integral)) or self.center not in (0, 1):
            _fail("center", self.center, "a bool")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):
            _fail("rank", rank, "an integer")
        if self.key_bits not in KEY_BITS:
            _fail("key_bits", self.key_bits, f"one of {KEY_BITS} (16 = dense keys)")
        if self.value_bits not in VALUE_BITS:
            _fail("value_bits", self.value_bits, f"one of {VALUE_BITS} (16 = dense values)")
        if self.group_size not in GROUP_SIZES:
            _fail("group_size", self.group_size, f"one of {GROUP_SIZES} tokens")
        if self.value_group_size not in GROUP_SIZES:
            _fail("value_group_size", self.value_group_size, f"one of {GROUP_SIZES} channels")
        if self.value_bits < 16 and head_dim % self.value_group_size:
            _fail("value_group_size", self.value_group_size,
                  f"a divisor of head_dim={head_dim} (values are grouped along the head dim)")
        if head_dim % 8:
            raise ValueError(f"HeadQCache: head_dim={head_dim} must be a multiple of 8")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            _fail("residual_length", self.residual_length, "an integer >= 0")
        if self.side_bits not in SIDE_BITS:
            _fail("side_bits", self.side_bits, f"one of {SIDE_BITS}")
        if self.sign not in (1.0, -1.0):
            _fail("sign", self.sign, "+1.0 (HeadQ) or -1.0 (the wrong-sign control)")
        if self.value_policy not in VALUE_POLICIES:
            _fail("value_policy", self.value_policy, f"one of {VALUE_POLICIES}")
        if not 0.0 <= float(self.value_keep_frac) <= 1.0:
            _fail("value_keep_frac", self.value_keep_frac, "a fraction in [0, 1]")
        if self.value_policy == "a2" and self.value_bits == 16:
            _fail("value_policy", self.value_policy,
                  "'uniform' when value_bits=16 (the A² policy keeps quantised values)")
        if self.value_policy == "uniform" and self.value_keep_frac > 0:
            _fail("value_keep_frac", self.value_keep_frac, "0 with value_policy='uniform'")
        if rank is not None:
            if not 1 <= rank <= head_dim:
                _fail("rank", rank, f"an integer in [1, head_dim={head_dim}]")
            if (rank * self.side_bits) % 8:
                _fail("rank", rank, f"a rank with rank*side_bits a multiple of 8 "
                                    f"(side_bits={self.side_bits})")

    def as_dict(self) -> dict:
        return asdict(self)


def text_config(config):
    """The decoder text config of ``config`` (itself for plain causal LMs)."""
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def model_geometry(config) -> tuple[int, int, int, int]:
    """``(num_layers, num_attention_heads, num_kv_heads, head_dim)`` of a transformers config."""
    tc = text_config(config)
    n_layers = int(tc.num_hidden_layers)
    n_heads = int(tc.num_attention_heads)
    n_kv = int(getattr(tc, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    return n_layers, n_heads, n_kv, int(head_dim)


def layer_kinds(config) -> list[str]:
    """Per layer: ``'headq'`` for a quantised full-attention layer, ``'sliding'`` for a
    sliding-window layer kept dense, ``'dense'`` for any other type kept dense."""
    tc = text_config(config)
    n_layers = int(tc.num_hidden_layers)
    types = getattr(tc, "layer_types", None)
    if types is None:
        sliding = getattr(tc, "sliding_window", None) is not None and getattr(
            tc, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * n_layers
    out = []
    for t in list(types)[:n_layers]:
        if t in QUANTISED_LAYER_TYPES:
            out.append("headq")
        elif t == "sliding_attention":
            out.append("sliding")
        else:
            out.append("dense")
    return out


def model_name(config) -> str:
    """A readable model name: ``config.name_or_path`` or the architecture."""
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if name:
        return str(name)
    archs = getattr(config, "architectures", None)
    return str(archs[0]) if archs else str(getattr(config, "model_type", "unknown"))


_FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "hidden_size", "vocab_size",
                     "rope_theta", "max_position_embeddings", "layer_types", "sliding_window",
                     "intermediate_size")


def config_fingerprint(config) -> str:
    """A short hash of the shape-defining fields of the text config (not the weights): two
    checkpoints of one architecture and size share it, another architecture or size does not."""
    tc = text_config(config)
    fields = {}
    for k in _FINGERPRINT_KEYS:
        v = getattr(tc, k, None)
        if k == "rope_theta" and v is None:
            rp = getattr(tc, "rope_parameters", None) or {}
            v = rp.get("rope_theta") if isinstance(rp, dict) else None
        if k == "head_dim" and v is None:
            v = model_geometry(tc)[3]
        fields[k] = list(v) if isinstance(v, (list, tuple)) else v
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
