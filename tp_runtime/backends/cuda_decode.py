"""Generation-phase attention on the GPU: the launcher of ``kernels/decode_attention.cu``.

``decode(q, kv, step, seq_ids, spec, out, lse, splits)`` serves sequences with one query token
(``step.is_generation(i)``, or any one-token query of cross attention) against their cached keys:
sequence ``i`` sees keys ``0 .. past_i`` (self attention: its new token was written by
``prepare``) or ``0 .. encoder_len_i − 1`` (cross). It writes ``out [T, H_r, D]`` (q's dtype) and
``lse [T, H_r]`` (fp32, natural log, ``-inf`` with no keys) at those sequences' token rows only.
``cuda.attend`` calls it with the step plan's decode sequences; see ``backends/base.py`` for the
semantics it shares with ``reference``.

One thread block per (head chunk, key split, KV head, sequence) serves the query heads of its KV
head together, so K/V are read once. ``splits`` (None: ``cuda_plan.choose_splits``) cuts each
sequence's keys into that many chunks, merged by log-sum-exp: in the same launch by the last
block of each (sequence, KV head, head chunk) to finish, or, for blocks of 16 or more heads, by a
second launch (``decode_merge_kernel``, a block per head and sequence); any split count gives the
single-split result up to rounding.
"""

from __future__ import annotations

import math

import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from .base import AttentionSpec
from .capabilities import check
from .compile import get_kernel
from .cuda_common import (
    NO_BIAS_TABLE,
    bias_table,
    cache_geometry,
    check_activation,
    check_reach,
    checked_alibi,
    f32,
    i32,
    i64,
    launch,
    ptr,
)
from .cuda_context import score_bias_kind
from .cuda_plan import BUSY_TARGET_BLOCKS_PER_SM, MAX_SPLITS, TARGET_BLOCKS_PER_SM, decode_work, route

THREADS = 128  # decode::kThreads
PIPE_BYTES = 48 * 1024  # decode::kPipeBytes: the K/V pipeline's shared memory (the kernel traps on less)
TABLE_CAP = 1024  # paged: block-table entries of a split kept in shared memory (else read from global)
MAX_HEADS_PER_BLOCK = 32  # on the tensor-core path (D <= 128): 2 head sets of the MMA's 16 rows
MAX_HEADS_PER_BLOCK_CUDA_CORES = 8  # D 256
MERGE_GROUP = 16  # decode::kMergeGroup: splits per first-level merge (two levels past 16 splits)
# Blocks of this many heads or more leave the split merge to decode_merge_kernel, a launch of its own
# with a block per (head, sequence): their in-kernel merge reads S x heads x D partials in one block.
SEPARATE_MERGE_HEADS = 16


def heads_per_block(group: int, head_size: int) -> int:
    """Query heads one block serves from its KV head (read once for all of them): the group rounded
    up to a power of two, at most 32 for D <= 128 (tensor cores: 16 heads fill the MMA's rows, 32 are
    two head sets of warps on the same tile) and 8 for D 256 (a group of 64 runs as 2 chunks of 32;
    padded heads compute nothing that is stored)."""
    cap = MAX_HEADS_PER_BLOCK if head_size <= 128 else MAX_HEADS_PER_BLOCK_CUDA_CORES
    return min(cap, 1 << (group - 1).bit_length())


def separate_merge(group: int, head_size: int, splits: int) -> bool:
    """Whether a launch of ``splits`` key splits is merged by ``decode_merge_kernel`` (after it)
    rather than inside the decode kernel by its last-arriving blocks."""
    return splits > 1 and heads_per_block(group, head_size) >= SEPARATE_MERGE_HEADS


def merge_variant(dtype: torch.dtype, head_size: int) -> dict:
    """Template parameters of the separate split merge (compile.FAMILIES["decode_merge"])."""
    return {"dtype": dtype, "head_size": head_size}


def merge_counters(splits: int) -> int:
    """Arrival counters of one (sequence, KV head, head chunk): one, plus one per group of
    ``MERGE_GROUP`` splits when there is more than one group (the kernel's two-level merge)."""
    groups = -(-splits // MERGE_GROUP)
    return 1 if groups == 1 else groups + 1


def variant(dtype: torch.dtype, kv: LayerKV, head_size: int, group: int) -> dict:
    """Template parameters of the decode kernel (compile.FAMILIES["decode"])."""
    return {
        "dtype": dtype,
        "cache": kv.cache_dtype.value,
        "layout": kv.cache_layout.value,
        "head_size": head_size,
        "heads": heads_per_block(group, head_size),
    }


def tensor_cores(kv: LayerKV, head_size: int, group: int) -> bool:
    """Whether the variant runs on the kernel's tensor-core path (``Traits::kMma``): D <= 128 with
    grouped heads or an 8-bit cache."""
    return head_size <= 128 and (kv.cache_dtype.is_quantized or heads_per_block(group, head_size) >= 2)


def split_target(kv: LayerKV, head_size: int, group: int) -> int:
    """Blocks per SM the split count aims at (``cuda_plan``): more for paged caches and the
    tensor-core path, whose blocks each move fewer bytes per second."""
    busy = kv.cache_layout is CacheLayout.paged or tensor_cores(kv, head_size, group)
    return BUSY_TARGET_BLOCKS_PER_SM if busy else TARGET_BLOCKS_PER_SM


_occupancy_cache: dict = {}


def _occupancy(kernel, device: torch.device, smem: int) -> tuple[int, int]:
    """(SMs, blocks of ``kernel`` resident per SM by registers and shared memory): the GPU's wave."""
    key = (id(kernel), device.index, smem)
    if key not in _occupancy_cache:
        props = torch.cuda.get_device_properties(device)
        warp_regs = -(-max(kernel.num_regs, 1) * 32 // 256) * 256  # allocated per warp, 256 at a time
        by_regs = props.regs_per_multiprocessor // (warp_regs * THREADS // 32)
        by_smem = props.shared_memory_per_multiprocessor // (smem + 1024)  # 1 KB reserved per block
        _occupancy_cache[key] = (props.multi_processor_count, max(1, min(by_regs, by_smem, 16)))
    return _occupancy_cache[key]


_counters: dict = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters of the split merge, per (device, stream); the kernel leaves
    them zero, so they are allocated (and zeroed) only when a larger launch needs more."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def _check_ids(step: Step, seq_ids) -> tuple[int, ...]:
    ids = tuple(int(i) for i in seq_ids)
    bad = [i for i in ids if not 0 <= i < step.num_seqs]
    if bad:
        raise ValueError(f"seq_ids: {bad} are not sequences of this step (it has {step.num_seqs})")
    bad = [i for i in ids if step.new_lens[i] != 1]
    if bad:
        raise ValueError(f"seq_ids: sequences {bad} have more than one new token; decode serves one-token queries")
    return ids


def _params(q, out, lse, part_o, part_lse, counters, kv, geometry, step, seq_dev, spec_ops, shape, scales, cross):
    """The decode kernel's parameters, in the order of ``tp::decode_attention_kernel``."""
    alibi, table = spec_ops
    ind = step.cache_indirection if step.beam_width > 1 else None
    h_r, group, head_chunks, splits = shape
    qk_scale, v_scale = scales
    data = kv.data
    table_cap = TABLE_CAP if kv.cache_layout is CacheLayout.paged else 0
    # fmt: off
    return (
        ptr(q), ptr(out), ptr(lse),              # q, out [T, H_r, D]; lse [T, H_r] fp32
        ptr(part_o), ptr(part_lse),               # split workspace [n, H_r, S, D], [n, H_r, S] fp32
        ptr(counters),                             # [n, KV_r, head_chunks, merge_counters(S)] int32, zero
        ptr(data),                                 # the layer's cache
        i64(data.stride(0)), i64(data.stride(1)), i64(data.stride(2)),  # slot|block, K->V, KV head
        ptr(geometry.block_table), i32(geometry.table_stride),  # paged: block table, row stride
        i32(geometry.log2_length), i32(table_cap),  # paged: log2(P); table entries in shared memory
        ptr(seq_dev),                              # [n] int32 sequences to serve
        ptr(step.cu_seqlens), ptr(step.past), ptr(step.slot),  # per sequence: token row, q_pos, slot
        ptr(step.encoder if cross else None),      # cross: encoder lengths (keys); null: self
        ptr(ind), i32(step.beam_width),           # beams: [B/W, W, S_ind] int32 cache indirection
        i32(0 if ind is None else ind.shape[2]),
        ptr(alibi),                                # [H_r] fp32 effective ALiBi slopes, or null
        *table.args(),                             # relative bias table (BiasTable)
        i32(h_r), i32(group), i32(head_chunks), i32(splits),
        f32(qk_scale), f32(v_scale),              # softmax_scale·dequant·log2(e); dequant
    )
    # fmt: on


def decode(
    q: torch.Tensor,
    kv: LayerKV,
    step: Step,
    seq_ids,
    spec: AttentionSpec,
    out: torch.Tensor,
    lse: torch.Tensor,
    splits: int | None = None,
) -> None:
    """Attention of one-token queries (rows ``step.cu_seqlens[seq_ids]``) over their cached keys.

    ``q [T, H_r, D]`` fp16/bf16; ``seq_ids``: sequence indices; ``out``/``lse`` are written at those
    rows only; ``splits`` forces the key split count.
    """
    check_activation(q, "q")
    if q.dim() != 3 or not q.is_contiguous():
        raise ValueError(f"q: expected a contiguous [tokens, heads, head_size] tensor, got {tuple(q.shape)}")
    t, h_r, d = q.shape
    check("decode", head_size=d)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    if lse.shape != (t, h_r) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse: expected a contiguous float32 tensor of shape {(t, h_r)}")
    kv_r = kv.num_kv_heads
    if h_r % kv_r:
        raise ValueError(f"q: {h_r} query heads are not a multiple of the cache's {kv_r} KV heads")
    geometry = cache_geometry(kv, kv_r, d, q.dtype)
    plan = route(step, spec.cross)
    ids = seq_ids if seq_ids is plan.decode_ids else _check_ids(step, seq_ids)  # the plan's are valid
    n = len(ids)
    if n == 0:
        return
    if n > 65535:
        raise NotImplementedError(f"{n} sequences in one decode launch: more than a grid's z (65535)")
    if splits is not None and not 1 <= int(splits) <= MAX_SPLITS:
        raise ValueError(f"splits: expected 1..{MAX_SPLITS} or None, got {splits}")
    group = h_r // kv_r
    hpb = heads_per_block(group, d)
    head_chunks = -(-group // hpb)
    kernel = get_kernel("decode", **variant(q.dtype, kv, d, group))
    smem = PIPE_BYTES + (4 * TABLE_CAP if kv.cache_layout is CacheLayout.paged else 0)
    occupancy = _occupancy(kernel, q.device, smem)
    forced = None if splits is None else int(splits)
    work = decode_work(step, ids, spec.cross, n * kv_r * head_chunks, occupancy, forced, split_target(kv, d, group))
    check_reach(kv, geometry, work.max_keys, plan.max_slot)

    alibi = checked_alibi(spec, h_r, q.device)
    table = bias_table(spec, step, ids, plan.n_keys) if score_bias_kind(spec) == "table" else NO_BIAS_TABLE
    separate = separate_merge(group, d, work.splits)
    if work.splits > 1:
        part_o = torch.empty((n, h_r, work.splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n, h_r, work.splits), dtype=torch.float32, device=q.device)
        counters = None if separate else _split_counters(q.device, n * kv_r * head_chunks * merge_counters(work.splits))
    else:
        part_o = part_lse = counters = None
    dq = kv.dequant_scale if kv.cache_dtype.is_quantized else 1.0
    scales = (spec.softmax_scale * dq * math.log2(math.e), dq)
    args = _params(
        q, out, lse, part_o, part_lse, counters, kv, geometry, step, work.ids_dev, (alibi, table),
        (h_r, group, head_chunks, work.splits), scales, spec.cross,
    )  # fmt: skip
    launch(kernel, (head_chunks * work.splits, kv_r, n), (THREADS, 1, 1), args, q.device, shared_mem=smem)
    if separate:  # the decode kernel left the partials (counters null): merge them, a block per (head, sequence)
        merge = get_kernel("decode_merge", **merge_variant(q.dtype, d))
        merge_args = (
            ptr(part_o), ptr(part_lse), ptr(out), ptr(lse),  # [n, H_r, S, D], [n, H_r, S]; out, lse
            ptr(work.ids_dev), ptr(step.cu_seqlens), i32(h_r), i32(work.splits),
        )  # fmt: skip
        launch(merge, (h_r, n), (THREADS, 1, 1), merge_args, q.device)
