"""Launcher of ``kernels/prepare.cu``: QKV bias, RoPE and the K/V cache write (with int8/fp8
quantization) in one kernel, Q out. See ``backends/base.py`` for the semantics it shares with
``reference.prepare``.
"""

from __future__ import annotations

import torch

from ..batch.kv_cache import LayerKV
from ..batch.step import Step
from ..position import RopeSpec
from ..sharding import HeadLayout
from . import cuda_common
from .compile import get_kernel
from .cuda_common import NO_CACHE, cache_geometry, check_activation, check_reach, f32, f64, i32, launch, ptr, sm_count
from .cuda_plan import rope_inv_freq, route

THREADS = 256


def variant(dtype: torch.dtype, rope: RopeSpec | None, kv: LayerKV | None) -> dict:
    """Template parameters of the prepare kernel for these inputs (see compile.FAMILIES)."""
    rope_kind = "none"
    if rope is not None:
        rope_kind = "gptj" if rope.style.value == "rope_gptj" else "neox"
    return {
        "dtype": dtype,
        "cache": "auto" if kv is None else kv.cache_dtype.value,
        "layout": "none" if kv is None else kv.cache_layout.value,
        "rope": rope_kind,
    }


def heads_per_block(tokens: int, heads: int, head_size: int, sms: int) -> int:
    """Heads one prepare block takes: all of a token's when the tokens give every SM ~8 blocks,
    else fewer, so that decode steps spread over the GPU, but at least a thread's pair each."""
    groups = max(1, min(heads, -(-8 * sms // max(tokens, 1))))
    at_least = max(1, THREADS // (head_size // 2))
    return min(heads, max(at_least, -(-heads // groups)))


def _args(qkv, bias, q, kv, geometry, step, inv_freq, pos_div, h_r, kv_r, d, rot, hpb):
    """The prepare kernel's parameters, in the order of ``tp::prepare_kernel`` (kernels/prepare.cu)."""
    # fmt: off
    return (
        ptr(qkv), ptr(bias),                      # qkv [T, (H+2KV)·D], bias [(H+2KV)·D] or null
        ptr(q), ptr(None), ptr(None),            # q [T, H, D]; k, v out: null (the cache has them)
        ptr(None if kv is None else kv.data),      # the layer's cache (or null: write nothing)
        ptr(geometry.block_table), i32(geometry.table_stride),  # paged: block table, row stride
        i32(geometry.length), i32(geometry.log2_length),  # S_max (contiguous) | P and log2(P) (paged)
        ptr(step.positions), ptr(step.token_seq), ptr(step.slot),  # [T], [T], [B] int32
        ptr(inv_freq), f64(pos_div),              # RoPE: [B, rot/2] fp64 1/base^(2i/rot); linear factor
        i32(qkv.shape[0]), i32(h_r), i32(kv_r), i32(d), i32(rot),
        i32(qkv.stride(0)),                        # qkv row stride (elements)
        i32(hpb),                                  # heads per block (grid.y blocks per token)
        f32(1.0 if kv is None else kv.quant_scale),  # int8/fp8: store x·quant_scale
    )
    # fmt: on


def prepare(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    step: Step,
    *,
    head_layout: HeadLayout,
    head_size: int,
    rope: RopeSpec | None,
    kv: LayerKV | None,
) -> torch.Tensor:
    check_activation(qkv, "qkv")
    h_r, kv_r, d = head_layout.num_heads_per_rank, head_layout.num_kv_heads_per_rank, head_size
    width = (h_r + 2 * kv_r) * d
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv: expected a row-contiguous [tokens, {width}] tensor, got shape {tuple(qkv.shape)}")
    if qkv.shape[0] != step.num_tokens:
        raise ValueError(f"qkv: expected {step.num_tokens} tokens (the step's), got {qkv.shape[0]}")
    if d % 2:
        raise NotImplementedError(
            f"head_size={d}: the CUDA prepare kernel needs an even head size; use backend='reference'"
        )
    if bias is not None:
        if bias.numel() != width:
            raise ValueError(f"bias: expected {width} elements, got {bias.numel()}")
        bias = bias.reshape(width).to(device=qkv.device, dtype=qkv.dtype).contiguous()
    t, dev = qkv.shape[0], qkv.device
    q = cuda_common.new((t, h_r, d), qkv.dtype, dev)
    if t == 0:
        return q
    geometry = NO_CACHE
    if kv is not None:
        geometry = cache_geometry(kv, kv_r, d, qkv.dtype)
        plan = route(step, cross=False)
        check_reach(kv, geometry, plan.max_keys, plan.max_slot)
    rot, inv_freq, pos_div = 0, None, 1.0
    if rope is not None:
        rot = rope.rotary_dim
        inv_freq = rope_inv_freq(step, rope)
        if rope.scaling.value == "linear":
            pos_div = rope.factor
    kernel = get_kernel("prepare", **variant(qkv.dtype, rope, kv))
    heads = h_r + 2 * kv_r
    hpb = heads_per_block(t, heads, d, sm_count(dev))
    args = _args(qkv, bias, q, kv, geometry, step, inv_freq, pos_div, h_r, kv_r, d, rot, hpb)
    # blocks (token, head group); dynamic shared memory: the token's cos and sin, rot/2 each (fp32)
    launch(kernel, (t, -(-heads // hpb), 1), (THREADS, 1, 1), args, dev, shared_mem=4 * rot)
    return q
