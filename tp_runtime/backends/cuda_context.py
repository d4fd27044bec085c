"""Launcher of ``kernels/context_attention.cu``: FlashAttention-2-style context (prefill) attention
over packed variable-length sequences, each on top of its cached past.

``context(q, kv, step, spec, ids, out, lse)`` serves the sequences ``ids`` of the step (on Hopper
GPUs through ``cuda_context_hopper`` where that kernel serves the case), writing
``out [T, H_r, D]`` and ``lse [T, H_r]`` at their token rows only; it is exact for one-token
queries too. The tile map comes from the step's plan (``cuda_plan.context_tiles``).
"""

from __future__ import annotations

import math

import torch

from ..batch.kv_cache import LayerKV
from ..batch.step import Step
from .base import AttentionSpec
from .capabilities import HEAD_SIZES, check
from .compile import get_kernel
from .cuda_common import NO_BIAS_TABLE, bias_table, cache_geometry, check_reach, checked_alibi, f32, i32, launch, ptr
from .cuda_context_hopper import context_hopper, serves
from .cuda_plan import context_tiles, route

# Tile shapes: (warps per block, m-tiles of 16 query rows per warp, keys per K/V tile); a block covers
# 16·warps·m_tiles query rows. The one place they are chosen (measured, kernels/NOTES_context.md);
# compile.FAMILIES checks that they fit the register file.
#   TILES        per head size, the default (128 rows, 2 blocks per SM)
#   TILES_WIDE   256 rows per block: each K/V tile loaded once for twice the rows; faster for D 128 on
#                non-causal attention and on long causal prefill (max new length >= WIDE_CAUSAL_MIN_LEN),
#                slower on shorter causal work
TILES = {64: (4, 2, 64), 80: (4, 2, 64), 96: (4, 2, 64), 128: (4, 2, 64), 256: (4, 1, 32)}
TILES_WIDE = {128: (8, 2, 64)}
WIDE_CAUSAL_MIN_LEN = 8192
assert set(TILES) == set(HEAD_SIZES), "every head size the context kernel serves needs a tile shape"


def tile_shape(head_size: int, *, causal: bool = True, max_new_len: int = 0) -> dict:
    """Tile template parameters of the context kernel for ``head_size`` and the step's shape."""
    check("context", head_size=head_size)
    w, mt, bn = TILES[head_size]
    if head_size in TILES_WIDE and (not causal or max_new_len >= WIDE_CAUSAL_MIN_LEN):
        w, mt, bn = TILES_WIDE[head_size]
    return {"warps": w, "m_tiles": mt, "block_n": bn}


def score_bias_kind(spec: AttentionSpec) -> str:
    """The kernel's bias parameter: none, ALiBi, or a table (T5 buckets expanded, or explicit)."""
    biases = [spec.alibi_slopes is not None, spec.relative_table is not None, spec.relative_bias is not None]
    if sum(biases) > 1:
        raise NotImplementedError(
            "the CUDA attention kernels add one position bias (ALiBi, a relative bucket table or an explicit "
            "relative bias), got several; use backend='reference'"
        )
    return "alibi" if biases[0] else ("table" if biases[1] or biases[2] else "none")


def variant(dtype: torch.dtype, head_size: int, mask: str, bias: str, kv: LayerKV, max_new_len: int = 0) -> dict:
    """Template parameters of the context kernel (compile.FAMILIES["context"]); ``mask`` is the
    kernel's (cross attention reads every encoder key: padding)."""
    return {
        "dtype": dtype,
        "head_size": head_size,
        "mask": mask,
        "bias": bias,
        "layout": kv.cache_layout.value,
        "cache": kv.cache_dtype.value,
        **tile_shape(head_size, causal=mask == "causal", max_new_len=max_new_len),
    }


def _args(q, out, lse, kv, geometry, tiles, step, n_keys_dev, h_r, scale_log2, v_scale, alibi, table):
    """The context kernel's parameters, in the order of ``tp::context_attention_kernel``."""
    # fmt: off
    return (
        ptr(q), i32(q.stride(0)),                 # q [T, H, D], token stride
        ptr(out), i32(out.stride(0)),             # out [T, H, D], token stride
        ptr(lse),                                  # lse [T, H] fp32
        ptr(kv.data), ptr(geometry.block_table), i32(geometry.table_stride),  # cache; paged: table
        i32(geometry.length), i32(geometry.log2_length),  # S_max (contiguous) | P and log2(P) (paged)
        ptr(tiles),                                # [num_tiles, 2] (sequence, first query row)
        ptr(step.cu_seqlens), ptr(step.past), ptr(n_keys_dev), ptr(step.slot),  # per sequence
        i32(h_r), i32(kv.num_kv_heads),
        f32(scale_log2), f32(v_scale),            # softmax_scale·log2(e)·k_dequant; v_dequant
        ptr(alibi),                                # [H] fp32 slopes or null
        *table.args(),                             # relative bias table (BiasTable)
    )
    # fmt: on


def context(q, kv: LayerKV, step: Step, spec: AttentionSpec, ids: tuple[int, ...], out, lse) -> None:
    """Context attention of the sequences ``ids`` (see the module docstring)."""
    t, h_r, d = q.shape
    ids = tuple(ids)
    if step.beam_width > 1 and any(step.past_lens[i] > 0 for i in ids):
        raise NotImplementedError(
            "beam search with a cached past in the context phase (a context chunk on top of beams) is not "
            "implemented on the CUDA backend; use backend='reference' "
            "(generation steps with beams go to the decode kernel)"
        )
    kv_r = kv.num_kv_heads
    if h_r % kv_r:
        raise ValueError(f"q: {h_r} query heads are not a multiple of the cache's {kv_r} KV heads")
    geometry = cache_geometry(kv, kv_r, d, q.dtype)
    plan = route(step, spec.cross)
    check_reach(kv, geometry, plan.max_keys, plan.max_slot)
    mask = "padding" if spec.cross else spec.mask.value
    bias = score_bias_kind(spec)
    table = bias_table(spec, step, ids, plan.n_keys) if bias == "table" else NO_BIAS_TABLE
    if serves(q, out, kv, step, spec, mask, bias, table):  # Hopper GPUs: the sm_90a kernel where it serves the case
        context_hopper(q, kv, step, spec, ids, mask, bias, out, lse, table)
        return
    # the step's routed context sequences: their longest length is planned; any other set is measured
    longest = plan.context_max_new if ids == plan.context_ids else max(step.new_lens[i] for i in ids)
    params = variant(q.dtype, d, mask, bias, kv, longest)
    kernel = get_kernel("context", **params)
    block_m = 16 * params["warps"] * params["m_tiles"]
    tiles = context_tiles(step, ids, block_m, mask == "causal", spec.cross)
    if tiles.shape[0] > 65535:
        raise NotImplementedError(f"{tiles.shape[0]} query tiles in one step: more than a launch's grid.y (65535)")
    alibi = checked_alibi(spec, h_r, q.device)
    dq = kv.dequant_scale if kv.cache_dtype.is_quantized else 1.0
    scale_log2 = spec.softmax_scale * math.log2(math.e) * dq
    args = _args(q, out, lse, kv, geometry, tiles, step, plan.n_keys_dev, h_r, scale_log2, dq, alibi, table)
    smem = (block_m + 4 * params["block_n"]) * (d + 8) * q.element_size()
    launch(kernel, (h_r, tiles.shape[0], 1), (32 * params["warps"], 1, 1), args, q.device, shared_mem=smem)
