"""Which heads a rank owns, and slicing full (unsharded) weights to a rank's shard.

This module is the only place that does head/rank arithmetic. Everything else (the QKV
and dense weights, ALiBi slopes, relative-attention tables, KV caches) asks it.
Rule (GQA/MQA included):
  - ``num_heads % tp_size == 0``; rank ``r`` owns query heads ``[r*H/tp, (r+1)*H/tp)``.
  - ``KV >= tp``: ``KV % tp == 0``; rank ``r`` owns KV heads ``[r*KV/tp, (r+1)*KV/tp)``.
  - ``KV < tp``: ``tp % KV == 0``; rank ``r`` holds the single KV head ``r // (tp/KV)``
    (each KV head replicated on ``tp/KV`` consecutive ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadLayout:
    """Global and per-rank head counts of one tensor-parallel rank."""

    num_heads: int
    num_kv_heads: int
    tp_size: int
    tp_rank: int

    @property
    def num_heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def num_kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.tp_size, 1)

    @property
    def q_head_start(self) -> int:
        return self.tp_rank * self.num_heads_per_rank

    @property
    def kv_head_start(self) -> int:
        if self.num_kv_heads >= self.tp_size:
            return self.tp_rank * self.num_kv_heads_per_rank
        return self.tp_rank // (self.tp_size // self.num_kv_heads)

    @property
    def q_heads(self) -> range:
        return range(self.q_head_start, self.q_head_start + self.num_heads_per_rank)

    @property
    def kv_heads(self) -> range:
        return range(self.kv_head_start, self.kv_head_start + self.num_kv_heads_per_rank)

    @property
    def group_size(self) -> int:
        """Query heads per KV head inside a rank: local head h reads KV head h // group."""
        return self.num_heads_per_rank // self.num_kv_heads_per_rank


def head_layout(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadLayout:
    """Validate a head/tp combination and return the rank's layout."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("tp_size", tp_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
    if num_heads % tp_size:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by tp_size={tp_size}: "
            "each rank must own num_heads / tp_size query heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}: "
            "each KV head must serve the same number of query heads"
        )
    if num_kv_heads >= tp_size and num_kv_heads % tp_size:
        raise ValueError(f"num_kv_heads={num_kv_heads} >= tp_size={tp_size} requires num_kv_heads % tp_size == 0")
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} < tp_size={tp_size} requires tp_size % num_kv_heads == 0 "
            "(each KV head replicated on tp_size / num_kv_heads ranks)"
        )
    return HeadLayout(num_heads, num_kv_heads, tp_size, tp_rank)


def even_range(total: int, tp_size: int, tp_rank: int, what: str = "features") -> range:
    """The rank's contiguous, equal share of ``total`` (column/row-parallel linear layers)."""
    if total % tp_size:
        raise ValueError(f"{what}={total} is not divisible by tp_size={tp_size}")
    n = total // tp_size
    return range(tp_rank * n, (tp_rank + 1) * n)


def ceil_range(total: int, tp_size: int, tp_rank: int) -> range:
    """The rank's share of ``total`` rows split in chunks of ``ceil(total / tp_size)`` (the last ones
    shorter, possibly empty): vocabulary-parallel embeddings and LM heads, whose sizes rarely divide."""
    chunk = -(-total // tp_size)
    return range(min(tp_rank * chunk, total), min((tp_rank + 1) * chunk, total))


def qkv_ranges(layout: HeadLayout, head_size: int) -> tuple[range, range, range]:
    """The rank's rows inside each of the Q ``[H·D]``, K and V ``[KV·D]`` blocks (offsets within the block)."""
    D = head_size
    q = range(layout.q_heads.start * D, layout.q_heads.stop * D)
    kv = range(layout.kv_heads.start * D, layout.kv_heads.stop * D)
    return q, kv, kv


def fused_qkv_ranges(layout: HeadLayout, head_size: int) -> tuple[range, range, range]:
    """The rank's rows of the fused ``[Q | K | V]`` weight ``[(H + 2KV)·D, hidden]``, one range per block."""
    H, KV, D = layout.num_heads, layout.num_kv_heads, head_size
    q, k, v = qkv_ranges(layout, head_size)
    k_at, v_at = H * D, (H + KV) * D  # where the K and V blocks start
    return q, range(k_at + k.start, k_at + k.stop), range(v_at + v.start, v_at + v.stop)


def qkv_rows(layout: HeadLayout, head_size: int) -> torch.Tensor:
    """Row indices of the fused ``[Q | K | V]`` weight kept by this rank, as ``[Q_r | K_r | V_r]``."""
    return torch.cat([torch.arange(r.start, r.stop) for r in fused_qkv_ranges(layout, head_size)])


def gate_up_rows(intermediate_size: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Row indices of a fused ``[gate | up]`` weight ``[2·I, hidden]`` kept by this rank: ``[gate_r | up_r]``."""
    r = even_range(intermediate_size, tp_size, tp_rank, "intermediate_size")
    local = torch.arange(r.start, r.stop)
    return torch.cat([local, intermediate_size + local])


def slice_heads(full: torch.Tensor, layout: HeadLayout, dim: int = 0) -> torch.Tensor:
    """Per-query-head tensor (ALiBi slopes, relative tables) -> this rank's heads along ``dim``."""
    if full.shape[dim] != layout.num_heads:
        raise ValueError(
            f"per-head tensor: expected {layout.num_heads} heads along dim {dim}, got shape {tuple(full.shape)}"
        )
    return full.narrow(dim, layout.q_head_start, layout.num_heads_per_rank)
