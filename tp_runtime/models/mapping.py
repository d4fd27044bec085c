"""Checkpoint tensors -> this rank's shards, in one place: HF layouts (separate, fused or
head-interleaved Q/K/V; separate gate/up; GPT-2's transposed ``Conv1D``) mapped to ours.

Ours: a QKV shard is ``[Q_r | K_r | V_r]`` (``sharding.qkv_rows`` of the fused ``[Q | K | V]``), a
gated MLP's up shard ``[gate_r | up_r]`` (``sharding.gate_up_rows``), a column shard the rank's
output rows, a row shard its input columns. The ranges all come from ``sharding``; here they are
only turned into slice reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..sharding import HeadLayout, even_range, fused_qkv_ranges, qkv_ranges
from .checkpoint import Checkpoint


class QkvLayout(str, Enum):
    separate = "separate"  # three projections q, k, v
    fused = "fused"  # one projection, rows [Q | K | V]
    interleaved = "interleaved"  # one projection, rows per head [q_h k_h v_h] (BLOOM, GPT-NeoX, Falcon MHA)


@dataclass(frozen=True)
class Source:
    """Where one projection lives: its tensor name without ``.weight``/``.bias``; ``conv1d``: stored
    ``[in, out]`` (GPT-2), else ``[out, in]``."""

    name: str
    conv1d: bool = False


def deinterleave_qkv(t: torch.Tensor, num_heads: int, head_size: int) -> torch.Tensor:
    """Head-interleaved rows ``[h0: q k v | h1: q k v | ...]`` of ``num_heads`` heads -> ``[Q | K | V]``.
    A weight ``[3·H·D, hidden]`` or a bias ``[3·H·D]``; a rank's run of heads or a whole tensor alike."""
    tail = t.shape[1:]
    return t.reshape(num_heads, 3, head_size, *tail).transpose(0, 1).reshape(3 * num_heads * head_size, *tail)


def _rows(ckpt: Checkpoint, src: Source, shape: tuple[int, int], rows: range, dtype) -> torch.Tensor:
    """Output rows ``rows`` of a weight whose ``[out, in]`` shape is ``shape``: ``[len(rows), in]``."""
    if src.conv1d:
        return ckpt.read(src.name + ".weight", shape[::-1], cols=rows, dtype=dtype).t().contiguous()
    return ckpt.read(src.name + ".weight", shape, rows=rows, dtype=dtype)


def _bias(ckpt: Checkpoint, src: Source, size: int, rows: range, dtype) -> torch.Tensor:
    return ckpt.read(src.name + ".bias", (size,), rows=rows, dtype=dtype)


def read_column(ckpt: Checkpoint, src: Source, shape: tuple[int, int], rows: range, *, bias: bool, dtype):
    """Column-parallel shard: rows ``rows`` of the weight (and bias)."""
    return _rows(ckpt, src, shape, rows, dtype), _bias(ckpt, src, shape[0], rows, dtype) if bias else None


def read_row(ckpt: Checkpoint, src: Source, shape: tuple[int, int], tp_size: int, tp_rank: int, *, bias: bool, dtype):
    """Row-parallel shard: the rank's input columns of the weight, and the whole bias."""
    cols = even_range(shape[1], tp_size, tp_rank, f"{src.name} in_features")
    if src.conv1d:
        w = ckpt.read(src.name + ".weight", shape[::-1], rows=cols, dtype=dtype).t().contiguous()
    else:
        w = ckpt.read(src.name + ".weight", shape, cols=cols, dtype=dtype)
    return w, _bias(ckpt, src, shape[0], range(shape[0]), dtype) if bias else None


def read_replicated(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """A small tensor every rank keeps whole (norm scales and shifts)."""
    return ckpt.read(name, shape, dtype=dtype)


def read_qkv(
    ckpt: Checkpoint,
    layout: QkvLayout,
    sources: tuple[Source, ...],
    heads: HeadLayout,
    head_size: int,
    hidden: int,
    *,
    bias: bool,
    dtype,
):
    """The rank's ``[Q_r | K_r | V_r]`` weight ``[(H_r + 2·KV_r)·D, hidden]`` (and bias) from any layout."""
    H, KV, D = heads.num_heads, heads.num_kv_heads, head_size
    q, k, v = qkv_ranges(heads, D)
    if layout is QkvLayout.separate:
        parts = [
            read_column(ckpt, src, (n * D, hidden), r, bias=bias, dtype=dtype)
            for src, n, r in zip(sources, (H, KV, KV), (q, k, v), strict=True)
        ]
        return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts]) if bias else None
    (src,) = sources
    total = (H + 2 * KV) * D
    if layout is QkvLayout.fused:
        parts = [read_column(ckpt, src, (total, hidden), r, bias=bias, dtype=dtype) for r in fused_qkv_ranges(heads, D)]
        return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts]) if bias else None
    if KV != H:
        raise ValueError(f"{src.name}: a head-interleaved QKV needs num_kv_heads == num_heads, got {KV} and {H}")
    # Interleaved: the rank's heads are one contiguous run of 3·D rows each, [h: q k v] -> [Q_r | K_r | V_r].
    run = range(heads.q_heads.start * 3 * D, heads.q_heads.stop * 3 * D)
    w, b = read_column(ckpt, src, (total, hidden), run, bias=bias, dtype=dtype)
    h_r = heads.num_heads_per_rank
    return deinterleave_qkv(w, h_r, D), deinterleave_qkv(b, h_r, D) if bias else None


def read_gate_up(
    ckpt: Checkpoint,
    gate: Source,
    up: Source,
    intermediate: int,
    hidden: int,
    tp_size: int,
    tp_rank: int,
    *,
    bias: bool,
    dtype,
):
    """The rank's ``[gate_r | up_r]`` weight ``[2·I_r, hidden]`` (and bias) from separate gate and up projections."""
    r = even_range(intermediate, tp_size, tp_rank, "intermediate_size")
    parts = [read_column(ckpt, src, (intermediate, hidden), r, bias=bias, dtype=dtype) for src in (gate, up)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts]) if bias else None
