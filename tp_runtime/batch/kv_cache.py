"""Per-rank KV storage: contiguous and paged caches, int8/fp8 quantization.

Contiguous, per layer: ``[B, 2, KV_r, S_max, D]`` (K then V, same layout).
Paged, per layer: a pool ``[num_blocks, 2, KV_r, P, D]`` and, shared by every layer, an int32
block table ``[max_seqs, max_blocks_per_seq]`` whose row ``slot`` lists the sequence's blocks
(``-1`` where none is allocated). Token ``t`` of slot ``s`` lives in block
``table[s, t // P]`` at offset ``t % P``.

Quantized storage uses one per-tensor scale per layer (K and V alike):
store ``clip(round(x · quant_scale), −128, 127)`` (int8) or ``e4m3(clip(x · quant_scale, ±448))``
(fp8), read ``stored · dequant_scale`` with ``dequant_scale = 1 / quant_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from ..config import AttentionConfig, KVCacheDType
from ..devices import as_device
from ..sharding import HeadLayout
from .step import Step


class CacheLayout(str, Enum):
    contiguous = "contiguous"
    paged = "paged"


class CacheCapacityError(ValueError):
    """A step needs more cache than there is; raised before anything is written."""


class CacheStateError(ValueError):
    """A step would read cache positions its slot never received (a past longer than what was
    written, a freed slot used without ``reserve``); raised before anything is written."""


@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a cache: what the backends read and write."""

    cache_layout: CacheLayout
    data: torch.Tensor  # contiguous [B, 2, KV_r, S_max, D] | paged [N, 2, KV_r, P, D]
    cache_dtype: KVCacheDType
    dequant_scale: float  # 1.0 when not quantized
    block_table: torch.Tensor | None = None  # paged: [max_seqs, max_blocks_per_seq] int32

    @property
    def block_size(self) -> int:
        return self.data.shape[3]

    @property
    def quant_scale(self) -> float:
        return 1.0 / self.dequant_scale

    @property
    def num_kv_heads(self) -> int:
        return self.data.shape[2]

    def locate(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, offset)`` of tokens ``positions`` of sequences ``slots`` (same shape) in ``data``."""
        slots, positions = slots.long(), positions.long()
        if self.cache_layout is CacheLayout.contiguous:
            return slots, positions
        p = self.block_size
        return self.block_table.long()[slots, positions // p], positions % p


class _CacheBase:
    """What contiguous and paged caches share: dtype, scales, per-layer views, and the slot life cycle.

    Slot life cycle, the same on both caches: ``reserve(step)`` makes room for the step's sequences
    (and starts a sequence on a freed slot), the layers write the step, ``free(slot)`` ends the
    sequence (its positions are forgotten). The cache tracks on the host how many positions of each
    slot were written (``written``). ``check_step(step)`` raises before any write if the step does
    not fit (``CacheCapacityError``) or would read what the slot does not hold (``CacheStateError``:
    a past longer than what was written, a freed slot not reserved again); ``check_step_once`` does
    so once per step for all layers, and records what the step writes.
    """

    num_slots: int

    def _init_slots(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.written = np.zeros(num_slots, dtype=np.int64)  # positions written per slot (host)
        self.freed = np.zeros(num_slots, dtype=bool)  # freed and not reserved since
        self._slot_epoch = 0  # bumped by reserve, free, set_written (see ``epoch``)

    @property
    def epoch(self) -> int:
        """Moves with every change of the slots' state other than a step's writes (reserve, free,
        set_written, and a paged cache's blocks changing hands by any route): a replayed graph re-runs
        its cache checks only when this moves. Both terms only grow, so their sum moves when either does."""
        return self._slot_epoch + self.version

    def reserve(self, step: Step, lengths: tuple[int, ...] | None = None) -> None:
        """Make room for every sequence of ``step`` to reach its length after the step (all or
        nothing); a freed slot starts a new sequence here."""
        self.reserve_slots(step.slots, step.total_lens if lengths is None else lengths)

    def reserve_slots(self, slots, lengths) -> None:
        """``reserve`` by slot: make room for ``lengths`` tokens in ``slots`` (all or nothing)."""
        slots = tuple(int(x) for x in slots)
        self._check_slots(slots)
        self._grow(dict(zip(slots, (int(n) for n in lengths), strict=True)))
        self.freed[list(slots)] = False
        self._slot_epoch += 1

    def free(self, slot: int) -> None:
        """End the sequence in ``slot``: its positions are forgotten (and a paged slot's blocks go back
        to the pool); a step on it needs ``reserve`` first."""
        self._check_slots((slot,))
        self._release(slot)
        self.written[slot] = 0
        self.freed[slot] = True
        self._slot_epoch += 1

    def set_written(self, slots, lengths) -> None:
        """Declare that ``slots`` hold ``lengths`` positions written by other means than a step (a
        restored cache, a benchmark filling ``data`` directly)."""
        slots = tuple(int(x) for x in slots)
        self._check_slots(slots)
        self.written[list(slots)] = np.asarray(lengths, dtype=np.int64)
        self._slot_epoch += 1

    def slot_fingerprint(self, slots) -> int:
        """One word for the state of ``slots`` (their blocks on a paged cache, how many positions each
        holds, whether it was freed), to check across ranks before a step: a rank whose cache state
        differs would otherwise fail its own checks alone while the others wait in a collective."""
        idx = np.asarray(slots, dtype=np.int64)
        inside = (idx >= 0) & (idx < self.num_slots)  # a slot outside the cache is refused after the check
        at = np.where(inside, idx, 0)
        held = (tuple(np.where(inside, self.written[at], -1).tolist()), tuple((self.freed[at] & inside).tolist()))
        return hash((held, self._blocks_fingerprint(slots)))  # ints and bools only: the same hash on every rank

    def _check_slots(self, slots) -> None:
        bad = [x for x in slots if not 0 <= x < self.num_slots]
        if bad:
            raise CacheCapacityError(f"slot {bad[0]}: the cache has {self.num_slots} slots")

    def check_step(self, step: Step, lengths: tuple[int, ...] | None = None, past: tuple[int, ...] | None = None):
        """Raise before any write unless every sequence fits (``lengths``, default its length after the
        step) and its slot holds its ``past`` positions (default ``step.past_lens``)."""
        lengths = step.total_lens if lengths is None else lengths
        past = step.past_lens if past is None else past
        self._check_slots(step.slots)
        self._check_capacity(step, lengths)
        slots = np.asarray(step.slots, dtype=np.int64)
        freed = self.freed[slots]
        if freed.any():
            slot = int(slots[freed.argmax()])
            raise CacheStateError(f"slot {slot} was freed: call reserve(step) to start a new sequence there")
        held = self.written[slots]
        if step.beam_width > 1:  # a beam reads its past through the indirection: from any beam of its entry
            w = step.beam_width
            held = np.array([self.written[(x // w) * w : (x // w + 1) * w].max() for x in step.slots])
        short = np.asarray(past, dtype=np.int64) > held
        if short.any():
            i = int(short.argmax())
            raise CacheStateError(
                f"slot {step.slots[i]}: the step says past_lens={past[i]}, the slot holds {int(held[i])} written "
                "positions (a new sequence starts at past 0; a freed slot forgets its positions)"
            )

    def check_step_once(self, step: Step, lengths: tuple[int, ...] | None = None, past=None) -> None:
        """``check_step`` once per step and cache (every layer of the step shares it), then record the
        positions the step writes."""
        lengths = step.total_lens if lengths is None else lengths
        key = (id(self), self.version, lengths)
        if key in step.checked:
            return
        self.check_step(step, lengths, past)
        slots = list(step.slots)
        self.written[slots] = np.maximum(self.written[slots], np.asarray(lengths, dtype=np.int64))
        step.checked.add(key)

    def check_read_once(self, step: Step, lengths: tuple[int, ...], what: str) -> None:
        """Raise ``CacheStateError`` unless each slot of ``step`` holds ``lengths`` written positions (a
        step that only reads the cache: cross attention after its first decoder step)."""
        key = (id(self), self.version, lengths, "read")
        if key in step.checked:
            return
        self._check_slots(step.slots)
        held = self.written[np.asarray(step.slots, dtype=np.int64)]
        short = np.asarray(lengths, dtype=np.int64) > held
        if short.any():
            i = int(short.argmax())
            raise CacheStateError(
                f"slot {step.slots[i]}: {what} reads {lengths[i]} positions, the slot holds {int(held[i])}"
            )
        step.checked.add(key)

    def __init__(self, config: AttentionConfig, layout: HeadLayout, num_layers: int, scales, device):
        self.config, self.head_layout, self.num_layers = config, layout, num_layers
        self.cache_dtype = config.kv_cache_dtype
        self.storage_dtype = self.cache_dtype.storage_dtype(config.dtype)
        self.device = as_device(device)
        self.dequant_scales = self._scales(scales, num_layers)

    def _scales(self, scales, num_layers: int) -> tuple[float, ...]:
        if not self.cache_dtype.is_quantized:
            if scales is not None:
                raise ValueError(f"scales: only for int8/fp8 caches, kv_cache_dtype is {self.cache_dtype.value}")
            return (1.0,) * num_layers
        if scales is None:
            raise ValueError(
                f"scales: a {self.cache_dtype.value} cache needs per-layer dequant scales (amax / qmax), got None"
            )
        values = [float(scales)] * num_layers if isinstance(scales, (int, float)) else [float(s) for s in scales]
        if len(values) != num_layers:
            raise ValueError(f"scales: expected {num_layers} per-layer scales, got {len(values)}")
        bad = [s for s in values if not (math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"scales: every dequant scale must be finite and > 0, got {bad}")
        return tuple(values)

    def _shape_tail(self) -> tuple[int, int]:
        return self.head_layout.num_kv_heads_per_rank, self.config.head_size


class KVCache(_CacheBase):
    """Contiguous per-rank cache for all layers: ``[num_layers, B, 2, KV_r, S_max, D]``."""

    cache_layout = CacheLayout.contiguous

    def __init__(
        self,
        *,
        config: AttentionConfig,
        head_layout: HeadLayout,
        num_layers: int,
        max_batch: int,
        max_seq_len: int,
        scales=None,
        device="cpu",
    ):
        super().__init__(config, head_layout, num_layers, scales, device)
        kv_r, d = self._shape_tail()
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self._init_slots(max_batch)
        self.data = torch.zeros(
            num_layers, max_batch, 2, kv_r, max_seq_len, d, dtype=self.storage_dtype, device=self.device
        )

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.cache_layout, self.data[i], self.cache_dtype, self.dequant_scales[i])

    version = 0  # capacity never changes

    def capacities(self, slots) -> np.ndarray:
        """Tokens each of ``slots`` can hold now (0 for a slot the cache lacks): the vectorized form
        of ``check_step``'s test, for callers (``ReplayState``, for replayed graphs) whose Python time
        per step is GPU idle time; they call ``check_step`` for its message only when this says no."""
        s = np.asarray(slots, dtype=np.int64)
        return np.where((s >= 0) & (s < self.max_batch), self.max_seq_len, 0)

    def _check_capacity(self, step: Step, lengths: tuple[int, ...]) -> None:
        self._check_lengths(zip(step.slots, lengths, strict=True))

    def _check_lengths(self, slot_lengths) -> None:
        for slot, n in slot_lengths:
            if n > self.max_seq_len:
                raise CacheCapacityError(
                    f"slot {slot}: needs {n} cached tokens, the cache holds max_seq_len={self.max_seq_len}"
                )

    def _grow(self, lengths: dict[int, int]) -> None:
        self._check_lengths(lengths.items())

    def _release(self, slot: int) -> None:
        """A contiguous slot keeps its rows; only the bookkeeping forgets them."""

    def _blocks_fingerprint(self, slots) -> int:
        return 0  # a contiguous slot is its row


class BlockAllocator:
    """Hands out fixed-size blocks to sequences; a sequence grows block by block.

    Host-side bookkeeping plus the device block table. ``reserve`` is all-or-nothing: when the
    pool cannot cover the request it raises ``CacheCapacityError`` and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id first
        self.owned: dict[int, list[int]] = {}
        self.max_seqs, self.max_blocks_per_seq = max_seqs, max_blocks_per_seq
        self.table = torch.full((max_seqs, max_blocks_per_seq), -1, dtype=torch.int32, device=device)
        self.version = 0  # bumped whenever a block changes hands

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, slot: int, length: int) -> int:
        return max(-(-length // self.block_size) - len(self.owned.get(slot, ())), 0)

    def reserve(self, lengths: dict[int, int]) -> None:
        """Make every ``slot`` able to hold ``length`` tokens (all slots or none)."""
        need = 0
        for slot, length in lengths.items():
            if not 0 <= slot < self.max_seqs:
                raise CacheCapacityError(f"slot {slot}: the paged cache has {self.max_seqs} sequence slots")
            if -(-length // self.block_size) > self.max_blocks_per_seq:
                raise CacheCapacityError(
                    f"slot {slot}: {length} tokens need more than max_blocks_per_seq={self.max_blocks_per_seq} blocks"
                )
            need += self.blocks_needed(slot, length)
        if need > self.num_free:
            raise CacheCapacityError(
                f"paged KV cache exhausted: the step needs {need} more blocks of {self.block_size} tokens, "
                f"{self.num_free} of {self.num_blocks} are free"
            )
        changed = False
        for slot, length in lengths.items():
            blocks = self.owned.setdefault(slot, [])
            for _ in range(self.blocks_needed(slot, length)):
                blocks.append(self.free_blocks.pop())
                changed = True
        if changed:
            self._sync_table()

    def free(self, slot: int) -> None:
        """Return a finished sequence's blocks to the pool."""
        self.free_blocks.extend(reversed(self.owned.pop(slot, [])))
        self._sync_table()

    def capacity(self, slot: int) -> int:
        return len(self.owned.get(slot, ())) * self.block_size

    def _sync_table(self) -> None:
        self.version += 1
        host = torch.full((self.max_seqs, self.max_blocks_per_seq), -1, dtype=torch.int32)
        for slot, blocks in self.owned.items():
            host[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.table.copy_(host)


class PagedKVCache(_CacheBase):
    """Paged per-rank cache: per layer a pool ``[num_blocks, 2, KV_r, P, D]``, one shared block table."""

    cache_layout = CacheLayout.paged

    def __init__(
        self,
        *,
        config: AttentionConfig,
        head_layout: HeadLayout,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        scales=None,
        device="cpu",
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {block_size}")
        super().__init__(config, head_layout, num_layers, scales, device)
        kv_r, d = self._shape_tail()
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size, max_seqs, max_blocks_per_seq, self.device)
        self._init_slots(max_seqs)
        self.data = torch.zeros(
            num_layers, num_blocks, 2, kv_r, block_size, d, dtype=self.storage_dtype, device=self.device
        )

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.cache_layout, self.data[i], self.cache_dtype, self.dequant_scales[i], self.allocator.table)

    @property
    def version(self) -> int:
        return self.allocator.version

    def _grow(self, lengths: dict[int, int]) -> None:
        self.allocator.reserve(lengths)

    def _release(self, slot: int) -> None:
        self.allocator.free(slot)

    def _blocks_fingerprint(self, slots) -> int:
        owned = self.allocator.owned
        return hash(tuple(tuple(owned.get(x, ())) for x in slots))

    def capacities(self, slots) -> np.ndarray:
        """Tokens each of ``slots`` can hold with the blocks it owns now (see ``KVCache.capacities``)."""
        return np.array([self.allocator.capacity(int(s)) for s in slots], dtype=np.int64)

    def _check_capacity(self, step: Step, lengths: tuple[int, ...]) -> None:
        for slot, n in zip(step.slots, lengths, strict=True):
            if n > self.allocator.capacity(slot):
                raise CacheCapacityError(
                    f"slot {slot}: needs {n} cached tokens, {self.allocator.capacity(slot)} reserved "
                    "(call PagedKVCache.reserve(step) before the step)"
                )
