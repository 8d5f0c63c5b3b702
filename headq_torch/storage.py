"""Storage accounting: bits per cached element, every scale, zero, side code and basis counted."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

from .config import GROUP_SIZES, KEY_BITS, SIDE_BITS, VALUE_BITS

__all__ = ["StorageReport", "storage_report"]


@dataclass(frozen=True)
class StorageReport:
    """Storage of one cache configuration at a given context length, per KV head per layer.

    ``key_bits_per_token`` and ``value_bits_per_token`` are averages over the ``context_len``
    tokens, including the dense recent window, scales/zeros, side code, kept (A²) tokens and the
    basis amortised over the context. ``bits_per_element`` is over the cached elements that are
    stored (``2*D`` per token for a K+V cache).
    """

    context_len: int
    head_dim: int
    dense_tokens: int
    key_bits_per_token: float
    value_bits_per_token: float
    key_bits_per_element: float
    value_bits_per_element: float
    bits_per_element: float
    compression_vs_fp16: float
    bytes_per_token_all_layers: float

    def as_dict(self) -> dict:
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate(head_dim, context_len, key_bits, value_bits, group_size, value_group_size, rank,
              side_bits, residual_length, value_keep_frac, dense_bits, basis_bits, num_kv_heads,
              num_layers) -> None:
    """Raise ``ValueError`` naming the first argument the cache (and the ops) would not accept:
    the report of a configuration that cannot exist is a silent wrong answer."""
    def fail(name, value, expected):
        raise ValueError(f"storage_report: {name}={value!r} is not supported; expected {expected}")

    if not _is_int(context_len) or context_len <= 0:
        raise ValueError(f"storage_report: context_len must be positive (an integer), "
                         f"got {context_len!r}")
    if not _is_int(head_dim) or head_dim <= 0 or head_dim % 8:
        raise ValueError(f"storage_report: head_dim must be positive and a multiple of 8, "
                         f"got {head_dim!r}")
    if key_bits not in KEY_BITS or not _is_int(key_bits):
        fail("key_bits", key_bits, f"one of {KEY_BITS} (16 = dense keys)")
    if value_bits not in VALUE_BITS or not _is_int(value_bits):
        fail("value_bits", value_bits, f"one of {VALUE_BITS} (16 = dense values)")
    if group_size not in GROUP_SIZES or not _is_int(group_size):
        fail("group_size", group_size, f"one of {GROUP_SIZES} tokens")
    if value_group_size not in GROUP_SIZES or not _is_int(value_group_size):
        fail("value_group_size", value_group_size, f"one of {GROUP_SIZES} channels")
    if value_bits < 16 and head_dim % value_group_size:
        fail("value_group_size", value_group_size, f"a divisor of head_dim={head_dim}")
    if not _is_int(rank) or not 0 <= rank <= head_dim:
        fail("rank", rank, f"an integer in [0, head_dim={head_dim}] (0 = no side code)")
    if rank and key_bits == 16:
        fail("rank", rank, "0 with key_bits=16 (the side code corrects quantised keys)")
    if rank and (side_bits not in SIDE_BITS or not _is_int(side_bits)):
        fail("side_bits", side_bits, f"one of {SIDE_BITS}")
    if rank and (rank * side_bits) % 8:
        fail("rank", rank, f"a rank with rank*side_bits a multiple of 8 (side_bits={side_bits})")
    if not _is_int(residual_length) or residual_length < 0:
        fail("residual_length", residual_length, "an integer >= 0")
    if not isinstance(value_keep_frac, numbers.Real) or not 0.0 <= value_keep_frac <= 1.0:
        raise ValueError(f"storage_report: value_keep_frac must be in [0, 1], "
                         f"got {value_keep_frac!r}")
    for name, v in (("dense_bits", dense_bits), ("basis_bits", basis_bits),
                    ("num_kv_heads", num_kv_heads), ("num_layers", num_layers)):
        if not _is_int(v) or v <= 0:
            fail(name, v, "a positive integer")


def _dense_tokens(context_len: int, group_size: int, residual_length: int) -> int:
    if context_len <= residual_length:
        return context_len
    return residual_length + (context_len - residual_length) % group_size


def storage_report(head_dim: int, context_len: int, key_bits: int = 2, value_bits: int = 16,
                   group_size: int = 64, value_group_size: int = 64, rank: int = 0,
                   side_bits: int = 8, residual_length: int = 0, value_keep_frac: float = 0.0,
                   dense_bits: int = 16, basis_bits: int = 32, num_kv_heads: int = 1,
                   num_layers: int = 1) -> StorageReport:
    """Bits per element of a HeadQ cache holding ``context_len`` tokens.

    Args:
        head_dim: ``D``.
        context_len: tokens in the cache (the dense window and the bases are amortised over it).
        key_bits: 2, 3, 4, 8, or 16 for dense keys.
        value_bits: 2, 3, 4, 8, or 16 for dense values.
        group_size: key group (tokens); one fp16 scale and zero per channel per group.
        value_group_size: value group (channels); one fp16 scale and zero per group per token.
        rank: side-code rank ``r`` (0: no side code, no basis).
        side_bits: bits per side-code element; one fp16 scale per token.
        residual_length: dense recent tokens kept beyond the incomplete group.
        value_keep_frac: fraction of quantised tokens whose values are also kept at full
            precision by the A² policy (an fp16 delta of ``D`` elements and an int32 index each).
        dense_bits: bits per element of the dense window (16 for fp16/bf16 caches).
        basis_bits: bits per basis element (bases are stored as float32).
    """
    _validate(head_dim, context_len, key_bits, value_bits, group_size, value_group_size, rank,
              side_bits, residual_length, value_keep_frac, dense_bits, basis_bits, num_kv_heads,
              num_layers)
    D = head_dim
    n = context_len
    quantise_keys = key_bits < 16
    n_dense = _dense_tokens(n, group_size, residual_length) if quantise_keys else n
    n_quant = n - n_dense
    scale_zero = 2 * 16

    if quantise_keys:
        key_quant = D * key_bits + D * scale_zero / group_size
        if rank:
            key_quant += rank * side_bits + 16
        key_total = n_quant * key_quant + n_dense * D * dense_bits
        if rank:
            key_total += D * rank * basis_bits
    else:
        key_total = n * D * dense_bits

    if value_bits < 16:
        val_quant = D * value_bits + (D // value_group_size) * scale_zero
        val_total = n_quant * val_quant + n_dense * D * dense_bits
        val_total += round(value_keep_frac * n_quant) * (D * dense_bits + 32)
    else:
        val_total = n * D * dense_bits

    kb = key_total / n
    vb = val_total / n
    bpe = (kb + vb) / (2 * D)
    return StorageReport(
        context_len=n,
        head_dim=D,
        dense_tokens=n_dense,
        key_bits_per_token=kb,
        value_bits_per_token=vb,
        key_bits_per_element=kb / D,
        value_bits_per_element=vb / D,
        bits_per_element=bpe,
        compression_vs_fp16=16.0 / bpe,
        bytes_per_token_all_layers=(kb + vb) / 8 * num_kv_heads * num_layers,
    )
