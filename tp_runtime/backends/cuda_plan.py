"""The CUDA backend's plan of a step: what its launchers derive from a step once, for every layer.

FlashInfer's plan-once / run-per-layer shape. Every piece here depends on the step and on a few
launch-wide choices (cross attention or not, the tile height, the decode grid), never on a layer's
weights, so the first layer of a step builds it and every later layer finds it in ``step.plans``
under a frozen key that names exactly what it depends on:

  ``Route``             which kernel serves which sequence; the keys each sequence reads
  ``context_tiles``     the context kernel's work list of query tiles
  ``DecodeWork``        the decode kernel's sequence list on the device and its key-split count
  ``rope_inv_freq``     per-sequence RoPE inverse frequencies (dynamic NTK: a base per sequence)
  ``relative_buckets``  the T5 bucket of each distance k − q

Capacity is checked once per step by the caches themselves (``KVCache.check_step_once``); a launch
only compares the plan's ``max_keys`` with its cache's length, which keeps a contiguous cache from
being read or written out of bounds when a launcher is called directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ..batch.step import Step
from ..position import RopeSpec, relative_bucket

MIN_KEYS_PER_SPLIT = 256  # fewer keys per split: more blocks than work (kernels/NOTES_decode.md, split sweep)
TARGET_BLOCKS_PER_SM = 2  # split blocks per SM worth filling: the sweep's best for one 32k sequence (NOTES)
# Blocks that move fewer bytes per second each want more of them per SM: a paged cache (tile loads
# wait on block-table reads: GQA B 16 L 8k ran at 0.85x contiguous with 2 blocks per SM, 0.98-0.99x
# with 3) and the tensor-core path (8-16 heads or 8-bit conversion per byte: GQA B 16 0.95 of copy at
# 2 per SM, B 64 0.99 at 4; int8 GQA 0.72 at 2). MHA on CUDA cores keeps 2 (its sweep's best).
BUSY_TARGET_BLOCKS_PER_SM = 3
MAX_SPLITS = 512  # the decode kernel's merge keeps heads x splits weights in its pipeline's shared memory


@dataclass(frozen=True)
class Route:
    """Which kernel serves which sequence of the step."""

    context_ids: tuple[int, ...]  # prefill, chunks on a cached past, one-token prompts
    decode_ids: tuple[int, ...]  # generation phase (cross attention: every one-token query)
    n_keys: tuple[int, ...]  # keys per sequence: past + new (self) or the encoder length (cross)
    n_keys_dev: torch.Tensor  # [B] int32, the same on the device
    max_keys: int  # over every sequence
    max_slot: int  # the highest cache slot the step touches
    context_max_new: int  # the longest new length among context_ids (0 when there are none)


@dataclass(frozen=True)
class _RouteKey:
    cross: bool


def route(step: Step, cross: bool) -> Route:
    """Generation-phase sequences go to the decode kernel; every other one to the context kernel,
    which is exact for one-token queries too."""

    def build() -> Route:
        context, decode = [], []
        for i in range(step.num_seqs):
            one_token = step.new_lens[i] == 1
            (decode if (cross and one_token) or step.is_generation(i) else context).append(i)
        n_keys = step.require_encoder_lens("cross attention") if cross else step.total_lens
        n_keys_dev = step.encoder if cross else step.seq_total
        longest = max((step.new_lens[i] for i in context), default=0)
        return Route(tuple(context), tuple(decode), n_keys, n_keys_dev, max(n_keys), max(step.slots), longest)

    return step.plan(_RouteKey(cross), build)


@dataclass(frozen=True)
class _TilesKey:
    ids: tuple[int, ...]
    block_m: int
    causal: bool
    cross: bool


def context_tiles(step: Step, ids: tuple[int, ...], block_m: int, causal: bool, cross: bool) -> torch.Tensor:
    """``[num_tiles, 2]`` int32 (sequence, first query row) of ``block_m`` query rows each, longest
    work first (a causal tile's keys end at its last row), so the longest tiles start in the first wave."""

    def build() -> torch.Tensor:
        n_keys = route(step, cross).n_keys
        tiles = []
        for i in ids:
            new, past = step.new_lens[i], step.past_lens[i]
            for m0 in range(0, new, block_m):
                keys = min(n_keys[i], past + min(m0 + block_m, new)) if causal else n_keys[i]
                tiles.append((keys, i, m0))
        tiles.sort(key=lambda x: -x[0])  # stable: equal work keeps sequence order
        return torch.tensor([[i, m0] for _, i, m0 in tiles], dtype=torch.int32).reshape(-1, 2).to(step.device)

    return step.plan(_TilesKey(ids, block_m, causal, cross), build)


def choose_splits(blocks: int, max_keys: int, sms: int, per_sm: int, target: int = TARGET_BLOCKS_PER_SM) -> int:
    """Key splits per sequence by wave efficiency.

    ``blocks``: sequences x KV heads x head chunks of one split; ``sms`` x ``per_sm`` blocks of the
    variant are resident at once. A split count ``s`` puts ``blocks * s`` blocks on the GPU, so the
    busiest SM runs ``load = ceil(blocks * s / sms)`` of them; its use is ``blocks * s / (sms * max(load,
    target))``: the share of ``target`` (~2) blocks per SM it fills, or, past that, the share of its
    whole waves. The smallest ``s`` of the best use wins (fewer partials to merge), among counts
    that stay within one resident wave and keep ``MIN_KEYS_PER_SPLIT`` keys per split. One 32k
    sequence with 8 KV heads on 132 SMs gets 33 splits of ~1k keys (2 blocks per SM), a batch that
    fills the SMs already gets 1.
    """
    for name, value in (("blocks", blocks), ("sms", sms), ("per_sm", per_sm), ("target", target)):
        if value < 1:
            raise ValueError(f"choose_splits: {name} must be >= 1, got {value}")
    cap = min(MAX_SPLITS, max_keys // MIN_KEYS_PER_SPLIT, sms * per_sm // blocks)
    if cap <= 1:
        return 1
    target = min(target, per_sm)

    def use(s: int) -> Fraction:
        total = blocks * s
        return Fraction(total, sms * max(-(-total // sms), target))

    best = max(use(s) for s in range(1, cap + 1))
    return next(s for s in range(1, cap + 1) if use(s) == best)


@dataclass(frozen=True)
class DecodeWork:
    """What the decode kernel serves in this step, and how."""

    ids_dev: torch.Tensor  # [n] int32 sequences served
    max_keys: int  # the most keys one of them reads
    splits: int  # key splits per sequence (merged in the same launch)


@dataclass(frozen=True)
class _DecodeKey:
    ids: tuple[int, ...]
    cross: bool
    blocks_per_split: int  # sequences x KV heads x head chunks
    occupancy: tuple[int, int]  # (SMs, blocks of this decode variant resident per SM)
    forced_splits: int | None
    target: int  # blocks per SM the split count aims at


def decode_work(
    step: Step,
    ids: tuple[int, ...],
    cross: bool,
    blocks_per_split: int,
    occupancy: tuple[int, int],
    forced_splits: int | None,
    target: int,
) -> DecodeWork:
    def build() -> DecodeWork:
        n_keys = route(step, cross).n_keys
        max_keys = max(n_keys[i] for i in ids)
        splits = forced_splits
        if splits is None:
            splits = choose_splits(blocks_per_split, max_keys, *occupancy, target)
        ids_dev = torch.tensor(ids, dtype=torch.int32).to(step.device)
        return DecodeWork(ids_dev, max_keys, splits)

    return step.plan(_DecodeKey(ids, cross, blocks_per_split, occupancy, forced_splits, target), build)


@dataclass(frozen=True)
class _RopeKey:
    rope: RopeSpec


def rope_inv_freq(step: Step, rope: RopeSpec) -> torch.Tensor:
    """``[B, rot/2]`` fp64 inverse frequencies per sequence: the reference's own table
    (``RopeSpec.inv_freq``), with each sequence's length after the step (dynamic NTK)."""

    def build() -> torch.Tensor:
        lengths = torch.tensor(step.total_lens, dtype=torch.float64, device=step.device)
        return rope.inv_freq(lengths).contiguous()

    return step.plan(_RopeKey(rope), build)


@dataclass(frozen=True)
class _BucketsKey:
    q_max: int
    k_max: int
    bidirectional: bool
    num_buckets: int
    max_distance: int


def relative_buckets(
    step: Step, q_max: int, k_max: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """``[q_max + k_max − 1]`` int64: the T5 bucket of each distance ``k − q`` from ``−(q_max − 1)`` to
    ``k_max − 1`` (the reference's bucket function itself)."""

    def build() -> torch.Tensor:
        rel = torch.arange(-(q_max - 1), k_max, dtype=torch.long)
        b = relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        return b.to(step.device)

    return step.plan(_BucketsKey(q_max, k_max, bidirectional, num_buckets, max_distance), build)
