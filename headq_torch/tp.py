"""Tensor parallelism: which KV heads this process holds.

transformers' tensor parallelism (``from_pretrained(path, tp_plan="auto")``, one process per
device under ``torchrun``) shards ``q_proj`` / ``k_proj`` / ``v_proj`` column-wise and ``o_proj``
row-wise. Each rank's attention then sees a contiguous block of the KV heads: rank ``r`` of
``w`` holds heads ``[r·H/w, (r+1)·H/w)`` (the query heads that read them come with them, so
grouped-query attention keeps its ``Hq / H`` ratio). The HeadQ cache of that rank stores the
packed cache of these heads only and needs the calibration bases of these heads only.

A *shard* is ``(rank, world_size)``; ``(0, 1)`` is the whole model.

:func:`tp_shard` derives the shard of the current process from a model config: the config
``from_pretrained(..., tp_plan=...)`` returns carries ``config.distributed_config`` (``tp_size``,
``tp_plan``); together with an initialised ``torch.distributed`` this gives the TP rank
(``global_rank % tp_size``: transformers' device mesh puts ``tp`` innermost).
"""

from __future__ import annotations

import numbers
from typing import Optional

__all__ = ["tp_shard", "resolve_shard", "check_shard", "head_slice"]

# Projections whose column-wise sharding splits the KV heads (as transformers'
# ``get_kv_heads_per_rank``).
_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")
_COLWISE = ("colwise", "colwise_rep", "local_colwise", "packed_colwise")


def check_shard(shard, num_kv_heads: int, what: str = "shard") -> tuple[int, int]:
    """Validate ``shard=(rank, world_size)`` for a model with ``num_kv_heads`` KV heads; returns
    it as a tuple of ints. Raises ``ValueError`` for a malformed shard, a rank outside
    ``[0, world_size)`` or a world size that does not divide the heads."""
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in shard)):
        raise ValueError(f"{what}={shard!r}: expected (rank, world_size), two integers")
    rank, world = int(shard[0]), int(shard[1])
    if world < 1:
        raise ValueError(f"{what}={shard!r}: world_size must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"{what}={shard!r}: rank must be in [0, world_size={world})")
    if num_kv_heads % world:
        raise ValueError(f"{what}={shard!r}: {num_kv_heads} KV heads cannot be split evenly over "
                         f"{world} tensor-parallel ranks")
    return rank, world


def head_slice(shard: tuple[int, int], num_kv_heads: int) -> slice:
    """The KV heads of ``shard`` (a contiguous block, as transformers' column-wise sharding)."""
    rank, world = shard
    h = num_kv_heads // world
    return slice(rank * h, (rank + 1) * h)


def _shards_kv_heads(config, tp_plan) -> bool:
    """Whether the TP plan shards the key projection column-wise (splits the KV heads)."""
    from .config import text_config

    plan = {}
    for c in (text_config(config), config):
        base = getattr(c, "base_model_tp_plan", None)
        if isinstance(base, dict):
            plan.update(base)
    if isinstance(tp_plan, dict):
        plan.update(tp_plan)
    if not plan:
        # no plan known: assume transformers' default for decoders (k_proj column-wise)
        return True
    return any(key.rsplit(".", 1)[-1] in _KEY_PROJECTIONS and style in _COLWISE
               for key, style in plan.items())


def tp_shard(config) -> Optional[tuple[int, int]]:
    """``(tp_rank, tp_size)`` of this process when ``config`` belongs to a model that
    transformers loaded with tensor parallelism (``config.distributed_config.tp_size > 1``, its
    plan shards the key projection) and ``torch.distributed`` is initialised; else None."""
    dc = None
    for c in (config, getattr(config, "get_text_config", lambda **k: None)(decoder=True)):
        dc = getattr(c, "distributed_config", None) if c is not None else None
        if dc is not None:
            break
    if dc is None:
        return None
    tp_size = dc.get("tp_size") if isinstance(dc, dict) else getattr(dc, "tp_size", None)
    tp_plan = dc.get("tp_plan") if isinstance(dc, dict) else getattr(dc, "tp_plan", None)
    if not tp_size or int(tp_size) <= 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not _shards_kv_heads(config, tp_plan):
        return None
    tp_size = int(tp_size)
    return dist.get_rank() % tp_size, tp_size


def resolve_shard(shard, config, num_kv_heads: int, what: str = "shard") -> tuple[int, int]:
    """The shard to use: ``"auto"`` -> :func:`tp_shard` of ``config`` (``(0, 1)`` without TP),
    ``None`` -> ``(0, 1)``, ``(rank, world_size)`` -> itself, validated."""
    if isinstance(shard, str):
        if shard != "auto":
            raise ValueError(f"{what}={shard!r}: expected 'auto', None or (rank, world_size)")
        shard = tp_shard(config) if config is not None else None
    if shard is None:
        return 0, 1
    return check_shard(shard, num_kv_heads, what)
