"""Launcher of ``kernels/context_hopper.cu``: the sm_90a context (prefill) kernel (wgmma + TMA +
warp specialisation), chosen by ``cuda_context.context`` on Hopper GPUs for the cases
``capabilities.CAPABILITIES["context_hopper"]`` and ``HOPPER_CONTEXT_*`` list; every other case
stays on the ``mma.sync`` kernel. ``TP_RUNTIME_HOPPER_CONTEXT=0`` keeps everything there.

Same interface and semantics as ``cuda_context.context`` for the cases it serves: ``out [T, H_r,
D]`` and ``lse [T, H_r]`` written at the rows of the sequences ``ids``, from a contiguous cache or
a paged one (pages of at least ``HOPPER_CONTEXT_MIN_PAGE`` tokens: one tensor map over the page
pool, one TMA box per page, the page from the block table in the kernel; small pages at D <= 128
are gathered with cp.async instead, ``gathers``). The tensor maps of q and of the cache are
encoded per call (``cuda_tma.tiled_map``; a cache of them is a next step).

Shapes per head size (``HopperConsumers`` in the kernel; budgets in kernels/NOTES_context.md):
consumer warpgroups of 64 query rows (3 at D 64 without a position bias, else 2), keys per K/V
block (128, 64 at D 256), a persistent grid for causal masks at D 128 only.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from .base import AttentionSpec
from .capabilities import CAPABILITIES, HOPPER_CONTEXT_BIASES, HOPPER_CONTEXT_MASKS, HOPPER_CONTEXT_MIN_PAGE
from .compile import get_kernel
from .cuda_common import NO_BIAS_TABLE, BiasTable, checked_alibi, f32, i32, launch, ptr, sm_count
from .cuda_plan import context_tiles, route
from .cuda_tma import tiled_map

ENV = "TP_RUNTIME_HOPPER_CONTEXT"


def consumers(head_size: int, bias: str = "none") -> int:
    """Consumer warpgroups of 64 query rows per CTA (``HopperConsumers::kCount``): 3 at D 64, whose
    softmax outlasts its GEMMs, unless a position bias (ALiBi, table) needs the registers; else 2."""
    return 3 if head_size == 64 and bias == "none" else 2


def block_m(head_size: int, bias: str = "none") -> int:
    """Query rows per CTA."""
    return 64 * consumers(head_size, bias)


def block_n(head_size: int) -> int:
    """Keys per K/V block (``HopperConsumers::kBN``): 128, 64 at D 256 (shared memory)."""
    return 64 if head_size == 256 else 128


def threads(head_size: int, bias: str = "none") -> int:
    """Threads per CTA: the producer warpgroup and the consumers."""
    return 128 * (consumers(head_size, bias) + 1)


def own_staging(head_size: int) -> bool:
    """Whether the epilogue stages O in a tile of its own (``HopperConsumers::kOwnStaging``; at
    D 256 it reuses the consumer's Q tile: no room for another)."""
    return head_size != 256


def persistent(head_size: int, causal: bool = True) -> bool:
    """Whether the launch is a persistent grid (CTAs looping over work items): causal masks at D 128,
    the only variants that can loop (``HopperConsumers::kPersistent``) and the only case where it
    paid (kernels/NOTES_context.md: a full mask's tiles are uniform, and one CTA per item measured
    faster there: 556-652 vs 519-627 TFLOP/s)."""
    return head_size == 128 and causal


# Paged caches with pages of at most GATHER_MAX_PAGE tokens and heads of at most GATHER_MAX_HEAD
# are loaded by the producer warpgroup with cp.async (the kernel's gather) instead of one TMA box
# per page. Measured on the H200 (bf16, S 4k causal, 16-token pages, kernels/NOTES_context.md):
# paged / contiguous 0.86 with the gather vs 0.64 with boxes at D 64, 0.62 vs 0.54 at D 128, but
# 0.61 vs 0.70 at D 256 (its 64-key blocks give the gather half the rows per pass), so D 256 keeps
# the boxes.
GATHER_MAX_PAGE = 32
GATHER_MAX_HEAD = 128


def gathers(cache_layout: CacheLayout, page: int, head_size: int) -> bool:
    """Whether the kernel loads K/V with the cp.async gather (small pages) instead of TMA boxes."""
    return cache_layout is CacheLayout.paged and page <= GATHER_MAX_PAGE and head_size <= GATHER_MAX_HEAD


# CTAs of a persistent launch at most, per SM (1: the kernel's shared memory allows one CTA per SM).
# Tests set it lower (``MAX_CTAS``) to make each CTA serve many items; the bench sets
# ``ONE_ITEM_PER_CTA`` to time a grid of one CTA per item (same item order) in the same run.
MAX_CTAS: int | None = None
ONE_ITEM_PER_CTA = False


def grid_ctas(head_size: int, causal: bool, items: int, sms: int, max_keys: int = 0) -> int:
    """CTAs of the launch for ``items`` work items (query tiles × heads) on ``sms`` SMs; ``max_keys``:
    the most keys of any sequence. A persistent CTA's key positions run on across its items (the
    kernel shifts them by its K/V ring position) in int32: a launch where they could reach 2^31
    (about a million tokens in one step) gets one CTA per item instead."""
    if not persistent(head_size, causal) or ONE_ITEM_PER_CTA:
        return items
    ctas = max(1, min(items, sms, MAX_CTAS or sms))
    rounds = -(-items // ctas)
    if rounds * (max_keys + block_n(head_size)) + max_keys >= 2**31:
        return items
    return ctas


def enabled() -> bool:
    """False when ``TP_RUNTIME_HOPPER_CONTEXT=0`` forces the ``mma.sync`` kernel."""
    return os.environ.get("TP_RUNTIME_HOPPER_CONTEXT", "1") != "0"


def shared_bytes(head_size: int, bias: str = "none") -> int:
    """Dynamic shared memory: Q (block_m rows), 2 stages of K and V (block_n rows), the epilogue's
    O staging where it has its own tile (block_m rows), 10 mbarriers (128 bytes kept), and 1024
    bytes to align the tiles (the start of dynamic shared memory is aligned less)."""
    rows = block_m(head_size, bias) * (2 if own_staging(head_size) else 1) + 4 * block_n(head_size)
    return rows * head_size * 2 + 128 + 1024


# The kernel's HopperTable operand (passed by value): the table's address, its three element
# strides and offset as int32 (the kernel's offsets are 32-bit: tables of 2^31 elements or more stay on mma.sync) and
# 1 / softmax_scale (the kernel adds entries to raw scores).
_TABLE_ARG = np.dtype(
    {
        "names": ["table", "head", "q", "k", "offset", "raw_scale"],
        "formats": [np.uint64, np.int32, np.int32, np.int32, np.int32, np.float32],
        "offsets": [0, 8, 12, 16, 20, 24],
        "itemsize": 32,
    }
)


def table_fits(table: BiasTable) -> bool:
    """Whether every offset the kernel forms into ``table`` fits its int32 arithmetic."""
    if table.table is None:
        return True
    fields = (table.table.numel(), table.head_stride, table.q_stride, table.k_stride, table.offset)
    return all(abs(x) < 2**31 for x in fields)


def table_arg(table: BiasTable, softmax_scale: float) -> np.ndarray:
    """The ``HopperTable`` kernel parameter: a size-one numpy array, which CuPy passes by value."""
    arg = np.zeros(1, dtype=_TABLE_ARG)
    if table.table is not None:
        arg[0] = (table.table.data_ptr(), table.head_stride, table.q_stride, table.k_stride, table.offset, 0.0)
    arg["raw_scale"] = 1.0 / softmax_scale
    return arg.view(np.dtype((np.void, _TABLE_ARG.itemsize)))


def hopper_gpu(capability: tuple[int, int]) -> bool:
    """Whether the Hopper kernel may run on a GPU of this compute capability (and is not switched off)."""
    return enabled() and tuple(capability)[0] == 9  # sm_90a code runs on compute capability 9.x only


def variant(dtype: torch.dtype, head_size: int, mask: str, bias: str, cache_dtype, cache_layout) -> dict | None:
    """The ``context_hopper`` compile-table variant serving this layer shape, or None (mma.sync)."""
    cap = CAPABILITIES["context_hopper"]
    if mask not in HOPPER_CONTEXT_MASKS or bias not in HOPPER_CONTEXT_BIASES:
        return None
    if cap.problem(dtype=dtype, head_size=head_size, cache_dtype=cache_dtype, cache_layout=cache_layout):
        return None
    return {"dtype": dtype, "head_size": head_size, "mask": mask, "bias": bias}


def serves(
    q: torch.Tensor,
    out: torch.Tensor,
    kv: LayerKV,
    step: Step,
    spec: AttentionSpec,
    mask: str,
    bias: str,
    table: BiasTable = NO_BIAS_TABLE,
) -> bool:
    """Whether the Hopper kernel serves this call (else the ``mma.sync`` kernel does); ``table``: the
    relative-bias table of a ``bias == "table"`` call."""
    if q.device.type != "cuda" or spec.cross or step.beam_width > 1:
        return False
    if not table_fits(table):
        return False
    if not spec.softmax_scale > 0:  # the kernel keeps the running max in raw-score units
        return False
    if not hopper_gpu(torch.cuda.get_device_capability(q.device)):
        return False
    if variant(q.dtype, q.shape[2], mask, bias, kv.cache_dtype, kv.cache_layout) is None:
        return False
    if kv.cache_layout is CacheLayout.paged and kv.block_size < HOPPER_CONTEXT_MIN_PAGE:
        return False
    # q: TMA needs 16-byte aligned base addresses and byte strides, D contiguous; out: the
    # epilogue's 16-byte stores need the same
    return all(_rows_16b(x) for x in (q, out))


def _rows_16b(x: torch.Tensor) -> bool:
    """``x [T, H, D]``: D and heads contiguous, token rows and the base 16-byte aligned."""
    d, e = x.shape[2], x.element_size()
    return x.stride(2) == 1 and x.stride(1) == d and (x.stride(0) * e) % 16 == 0 and x.data_ptr() % 16 == 0


def context_hopper(
    q,
    kv: LayerKV,
    step: Step,
    spec: AttentionSpec,
    ids: tuple[int, ...],
    mask: str,
    bias: str,
    out,
    lse,
    table: BiasTable = NO_BIAS_TABLE,
):
    """Context attention of the sequences ``ids`` on the Hopper kernel (``serves`` said yes)."""
    if bias == "table" and table.table is None:
        raise ValueError("context_hopper: bias 'table' needs the relative-bias table (cuda_common.bias_table)")
    t, h_r, d = q.shape
    kv_r = kv.num_kv_heads
    plan = route(step, spec.cross)
    causal = mask == "causal"
    tiles = context_tiles(step, ids, block_m(d, bias), causal, spec.cross)
    items = tiles.shape[0] * h_r  # work items: (query tile, head), heaviest tiles first
    if items == 0:
        return
    e = q.element_size()
    # q [T, H, D] as {D, H, T}; box: 64 elements of one head for 64 tokens
    map_q = tiled_map(q.data_ptr(), q.dtype, (d, h_r, t), (d * e, q.stride(0) * e), (64, 1, 64))
    # contiguous cache [B, 2, KV, S_max, D] as {D, S_max, B·2·KV}, box: 64 elements of block_n
    # positions; paged pool [N, 2, KV, P, D] as {D, P, N·2·KV}, box: 64 elements of min(P, block_n)
    # positions (the kernel loads a block of block_n keys page by page)
    rows, _, _, length, _ = kv.data.shape
    paged = kv.cache_layout is CacheLayout.paged
    bn = block_n(d)
    kv_box = min(length, bn) if paged else bn
    map_kv = tiled_map(
        kv.data.data_ptr(), q.dtype, (d, length, rows * 2 * kv_r), (d * e, length * d * e), (64, kv_box, 1)
    )
    block_table = kv.block_table if paged else None
    table_stride = block_table.stride(0) if block_table is not None else 0
    kernel = get_kernel("context_hopper", dtype=q.dtype, head_size=d, mask=mask, bias=bias)
    alibi = checked_alibi(spec, h_r, q.device)
    scale_log2 = spec.softmax_scale * math.log2(math.e)
    # fmt: off
    args = (
        map_q, map_kv,                                # tensor maps, by value
        ptr(out), i32(out.stride(0)), ptr(lse),       # out [T, H, D] token stride; lse [T, H]
        ptr(tiles),                                   # [num_tiles, 2] (sequence, first query row)
        ptr(step.cu_seqlens), ptr(step.past), ptr(plan.n_keys_dev), ptr(step.slot),
        ptr(block_table), i32(table_stride),          # paged: block table [max_seqs, *] int32; else null
        i32(kv_box), i32(length.bit_length() - 1 if paged else 0),  # rows per K/V box; paged: log2(P)
        i32(tiles.shape[0]), i32(h_r), i32(kv_r), f32(scale_log2),
        ptr(alibi),                                   # [H] fp32 slopes or null
        table_arg(table, spec.softmax_scale),         # HopperTable, by value (unused without a table bias)
        ptr(kv.data), i32(gathers(kv.cache_layout, length, d)),  # the pool, for the cp.async gather of small pages
    )
    # fmt: on
    grid = (grid_ctas(d, causal, items, sm_count(q.device), plan.max_keys), 1, 1)
    launch(kernel, grid, (threads(d, bias), 1, 1), args, q.device, shared_mem=shared_bytes(d, bias))
