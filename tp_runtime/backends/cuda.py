"""The CUDA backend: the operations of ``reference.py`` (same signatures) as CuPy RawKernel launches.

``prepare`` is one fused kernel (``kernels/prepare.cu``: bias, RoPE, cache write with int8/fp8
quantization, Q/K/V out). ``attend`` splits the step (``route``): generation-phase sequences go
to the decode kernel (``cuda_decode.decode``, when that module exists), everything else to the
FlashAttention-2-style context kernel (``kernels/context_attention.cu``). Activations are fp16 or
bf16; fp32 raises (use ``backend='reference'``). Kernels run on torch's current stream with raw
device pointers and typed scalars. Per-step metadata (the context tile map, key counts, RoPE
frequencies) is built once per step through ``step.memo`` and reused by every layer.

Public: ``name``, ``prepare``, ``attend``, ``route``, ``prepare_variant``, ``context_variant``,
``CONTEXT_TILES``, ``CONTEXT_TILES_WIDE``, ``context_tiles``, ``layer_variants``, ``precompile_layers``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from ..config import KVCacheDType
from ..position import RopeSpec
from ..sharding import HeadLayout
from . import cuda_decode, cuda_fp8
from .base import AttentionSpec, key_lengths
from .compile import get_kernel
from .cuda_common import (
    bias_table,
    cache_geometry,
    check_activation,
    f32,
    f64,
    i32,
    i64,
    launch,
    ptr,
    sm_count,
)

name = "cuda"

# Tile shapes of the context kernel: (warps per block, m-tiles of 16 query rows per warp, keys per
# K/V tile); a block covers 16·warps·m_tiles query rows. The one place they are chosen (measured,
# kernels/NOTES_context.md); compile.FAMILIES checks that they fit the register file.
#   CONTEXT_TILES        per head size, the default (128 rows, 2 blocks per SM)
#   CONTEXT_TILES_WIDE   256 rows per block: each K/V tile loaded once for twice the rows; faster
#                        for D 128 on non-causal attention and on long causal prefill
#                        (max new length >= WIDE_CAUSAL_MIN_LEN), slower on shorter causal work
CONTEXT_TILES = {64: (4, 2, 64), 80: (4, 2, 64), 96: (4, 2, 64), 128: (4, 2, 64), 256: (4, 1, 32)}
CONTEXT_TILES_WIDE = {128: (8, 2, 64)}
WIDE_CAUSAL_MIN_LEN = 8192


def context_tiles(head_size: int, *, causal: bool = True, max_new_len: int = 0) -> dict:
    """Tile template parameters of the context kernel for ``head_size`` and the step's shape."""
    if head_size not in CONTEXT_TILES:
        raise NotImplementedError(
            f"head_size={head_size}: the CUDA context kernel supports head sizes {sorted(CONTEXT_TILES)}; "
            "use backend='reference'"
        )
    w, mt, bn = CONTEXT_TILES[head_size]
    if head_size in CONTEXT_TILES_WIDE and (not causal or max_new_len >= WIDE_CAUSAL_MIN_LEN):
        w, mt, bn = CONTEXT_TILES_WIDE[head_size]
    return {"warps": w, "m_tiles": mt, "block_n": bn}


_PREPARE_THREADS = 256


def _new(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests replace it with a NaN-filled allocator, so an
    element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---- prepare -----------------------------------------------------------------------------------
def prepare_variant(dtype: torch.dtype, rope: RopeSpec | None, kv: LayerKV | None) -> dict:
    """Template parameters of the prepare kernel for these inputs (see compile.FAMILIES)."""
    rope_kind = "none"
    if rope is not None:
        rope_kind = "gptj" if rope.style.value == "rope_gptj" else "neox"
    return {
        "dtype": dtype,
        "cache": "auto" if kv is None else kv.kind.value,
        "layout": "none" if kv is None else kv.layout.value,
        "rope": rope_kind,
    }


def _rope_inv_freq(step: Step, rope: RopeSpec) -> torch.Tensor:
    """``[B, rot/2]`` fp64 inverse frequencies per sequence (dynamic NTK: per-sequence base), the
    reference's own table (``RopeSpec.inv_freq``), built once per step."""
    lengths = lambda: torch.tensor(step.total_lens, dtype=torch.float64, device=step.device)  # noqa: E731
    return step.memo(("cuda.rope_inv_freq", rope), lambda: rope.inv_freq(lengths()).contiguous())


def prepare_heads_per_block(tokens: int, heads: int, head_size: int, sms: int) -> int:
    """Heads one prepare block takes: all of a token's when the tokens give every SM ~8 blocks,
    else fewer, so that decode steps spread over the GPU, but at least a thread's pair each."""
    groups = max(1, min(heads, -(-8 * sms // max(tokens, 1))))
    at_least = max(1, _PREPARE_THREADS // (head_size // 2))
    return min(heads, max(at_least, -(-heads // groups)))


def _prepare_args(qkv, bias, q, k, v, kv, geometry, step, inv_freq, pos_div, h_r, kv_r, d, rot, hpb):
    """The prepare kernel's parameters, in the order of ``tp::prepare_kernel`` (kernels/prepare.cu)."""
    cache_len, log2_len, table, bt_stride = geometry
    # fmt: off
    return (
        ptr(qkv), ptr(bias),                      # qkv [T, (H+2KV)·D], bias [(H+2KV)·D] or null
        ptr(q), ptr(k), ptr(v),                  # q [T, H, D]; k, v [T, KV, D]
        ptr(None if kv is None else kv.data),      # the layer's cache (or null: write nothing)
        ptr(table), i32(bt_stride),               # paged: block table and its row stride
        i32(cache_len), i32(log2_len),            # S_max (contiguous) | P and log2(P) (paged)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    t = qkv.shape[0]
    dev = qkv.device
    q = _new((t, h_r, d), qkv.dtype, dev)
    k = _new((t, kv_r, d), qkv.dtype, dev)
    v = _new((t, kv_r, d), qkv.dtype, dev)
    if t == 0:
        return q, k, v
    geometry = (0, 0, None, 0)
    if kv is not None:
        geometry = cache_geometry(kv, kv_r, d, qkv.dtype)
        if kv.layout is CacheLayout.contiguous:
            if max(step.total_lens) > geometry[0]:
                raise ValueError(
                    f"kv: a sequence needs {max(step.total_lens)} positions, the cache holds {geometry[0]}"
                )
            if max(step.slots) >= kv.data.shape[0]:
                raise ValueError(f"kv: slot {max(step.slots)} is outside the cache's {kv.data.shape[0]} rows")
    rot, inv_freq, pos_div = 0, None, 1.0
    if rope is not None:
        rot = rope.rotary_dim
        inv_freq = _rope_inv_freq(step, rope)
        if rope.scaling.value == "linear":
            pos_div = rope.factor
    kernel = get_kernel("prepare", **prepare_variant(qkv.dtype, rope, kv))
    heads = h_r + 2 * kv_r
    hpb = prepare_heads_per_block(t, heads, d, sm_count(dev))
    args = _prepare_args(qkv, bias, q, k, v, kv, geometry, step, inv_freq, pos_div, h_r, kv_r, d, rot, hpb)
    # blocks (token, head group); dynamic shared memory: the token's cos and sin, rot/2 each (fp32)
    launch(kernel, (t, -(-heads // hpb), 1), (_PREPARE_THREADS, 1, 1), args, dev, shared_mem=4 * rot)
    return q, k, v


# ---- attend ------------------------------------------------------------------------------------
def _decode_fn():
    """The decode launcher; a function so that tests can send every sequence to the context kernel."""
    return cuda_decode.decode


def route(step: Step, spec: AttentionSpec, *, decode_available: bool | None = None) -> tuple[list[int], list[int]]:
    """Split the step's sequences: ``(context kernel ids, decode kernel ids)``.

    Decode takes generation-phase sequences (one new token on a cached past) and, for cross
    attention, every sequence with one new token; everything else (and everything, when a test
    disables the decode path) goes to the context kernel, which is exact for one-token queries too.
    """
    if decode_available is None:
        decode_available = _decode_fn() is not None
    ctx, dec = [], []
    for i in range(step.num_seqs):
        one = step.new_lens[i] == 1
        if decode_available and ((spec.cross and one) or step.is_generation(i)):
            dec.append(i)
        else:
            ctx.append(i)
    return ctx, dec


def attend(
    q: torch.Tensor, kv: LayerKV, step: Step, spec: AttentionSpec, *, decode_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_activation(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, head_size], got shape {tuple(q.shape)}")
    t, h_r, d = q.shape
    if t != step.num_tokens:
        raise ValueError(f"q: expected {step.num_tokens} tokens (the step's), got {t}")
    if q.stride(2) != 1 or q.stride(1) != d or q.stride(0) % 8 or q.data_ptr() % 16:
        q = q.contiguous()
    out = _new((t, h_r, d), q.dtype, q.device)
    lse = _new((t, h_r), torch.float32, q.device)
    if t == 0:
        return out, lse
    ctx_ids, dec_ids = route(step, spec)
    if dec_ids:
        _decode_fn()(q, kv, step, dec_ids, spec, out, lse, decode_splits)
    if ctx_ids:
        _context(q, kv, step, spec, ctx_ids, out, lse)
    return out, lse


def context_variant(dtype: torch.dtype, head_size: int, spec: AttentionSpec, kv: LayerKV, max_new_len: int = 0) -> dict:
    """Template parameters of the context kernel for these inputs (see compile.FAMILIES)."""
    biases = [spec.alibi_slopes is not None, spec.relative_table is not None, spec.relative_bias is not None]
    if sum(biases) > 1:
        raise NotImplementedError(
            "the CUDA context kernel adds one position bias (ALiBi, a relative bucket table or an explicit "
            "relative bias), got several; use backend='reference'"
        )
    bias = "alibi" if biases[0] else ("table" if biases[1] or biases[2] else "none")
    mask = "padding" if spec.cross else spec.mask.value
    layout, cache = kv.layout.value, kv.kind.value
    return {
        "dtype": dtype,
        "head_size": head_size,
        "mask": mask,
        "bias": bias,
        "layout": layout,
        "cache": cache,
        **context_tiles(head_size, causal=mask == "causal", max_new_len=max_new_len),
    }


def _tile_map(step: Step, ids: list[int], n_keys: tuple[int, ...], block_m: int, causal: bool) -> torch.Tensor:
    """``[num_tiles, 2]`` int32 (sequence, first query row), longest work first; once per step."""

    def build():
        tiles = []
        for i in ids:
            new, past = step.new_lens[i], step.past_lens[i]
            for m0 in range(0, new, block_m):
                keys = min(n_keys[i], past + min(m0 + block_m, new)) if causal else n_keys[i]
                tiles.append((keys, i, m0))
        tiles.sort(key=lambda x: -x[0])  # stable: equal work keeps sequence order
        return torch.tensor([[i, m0] for _, i, m0 in tiles], dtype=torch.int32).reshape(-1, 2).to(step.device)

    return step.memo(("cuda.context_tiles", block_m, causal, tuple(ids), n_keys), build)


def _context_args(q, out, lse, kv, geometry, tiles, step, n_keys_dev, h_r, scale_log2, v_scale, alibi, table):
    """The context kernel's parameters, in the order of ``tp::context_attention_kernel``."""
    cache_len, log2_len, block_table, bt_stride = geometry
    tab, tab_h, tab_q, tab_k, tab_off = table if table is not None else (None, 0, 0, 0, 0)
    # fmt: off
    return (
        ptr(q), i32(q.stride(0)),                 # q [T, H, D], token stride
        ptr(out), i32(out.stride(0)),             # out [T, H, D], token stride
        ptr(lse),                                  # lse [T, H] fp32
        ptr(kv.data), ptr(block_table), i32(bt_stride),  # cache; paged: block table, row stride
        i32(cache_len), i32(log2_len),            # S_max (contiguous) | P and log2(P) (paged)
        ptr(tiles),                                # [num_tiles, 2] (sequence, first query row)
        ptr(step.cu_seqlens), ptr(step.past), ptr(n_keys_dev), ptr(step.slot),  # per sequence
        i32(h_r), i32(kv.num_kv_heads),
        f32(scale_log2), f32(v_scale),            # softmax_scale·log2(e)·k_dequant; v_dequant
        ptr(alibi),                                # [H] fp32 slopes or null
        ptr(tab), i64(tab_h), i64(tab_q), i64(tab_k), i64(tab_off),  # BiasTable operand
    )
    # fmt: on


def _context(q, kv: LayerKV, step: Step, spec: AttentionSpec, ids: list[int], out, lse) -> None:
    t, h_r, d = q.shape
    if d not in CONTEXT_TILES:
        raise NotImplementedError(
            f"head_size={d}: the CUDA context kernel supports head sizes {sorted(CONTEXT_TILES)}; "
            "use backend='reference'"
        )
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
    n_keys = key_lengths(step, spec)
    if kv.layout is CacheLayout.contiguous:
        need = max(n_keys[i] for i in ids)
        if need > geometry[0]:
            raise ValueError(f"kv: a sequence reads {need} cached positions, the cache holds {geometry[0]}")
    variant = context_variant(q.dtype, d, spec, kv, max_new_len=max(step.new_lens[i] for i in ids))
    kernel = get_kernel("context", **variant)
    warps, m_tiles, block_n = variant["warps"], variant["m_tiles"], variant["block_n"]
    block_m = 16 * warps * m_tiles
    causal = variant["mask"] == "causal"
    tiles = _tile_map(step, ids, n_keys, block_m, causal)
    if spec.cross:
        n_keys_dev = step.encoder
    else:
        n_keys_dev = step.memo(
            "cuda.total_lens", lambda: torch.tensor(step.total_lens, dtype=torch.int32).to(step.device)
        )
    alibi = None
    if variant["bias"] == "alibi":
        alibi = spec.alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        if alibi.numel() != h_r:
            raise ValueError(f"alibi_slopes: expected {h_r} slopes (heads on this rank), got {alibi.numel()}")
    table = bias_table(spec, step, ids, n_keys) if variant["bias"] == "table" else None
    dq = kv.dequant_scale if kv.kind is not KVCacheDType.auto else 1.0
    scale_log2 = spec.softmax_scale * math.log2(math.e) * dq
    args = _context_args(q, out, lse, kv, geometry, tiles, step, n_keys_dev, h_r, scale_log2, dq, alibi, table)
    if tiles.shape[0] > 65535:
        raise NotImplementedError(f"{tiles.shape[0]} query tiles in one step: more than a launch's grid.y (65535)")
    smem = (block_m + 4 * block_n) * (d + 8) * q.element_size()
    launch(kernel, (h_r, tiles.shape[0], 1), (32 * warps, 1, 1), args, q.device, shared_mem=smem)


# ---- compiling ahead -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _CacheKind:
    """What the variant choosers read of a cache: its storage kind and layout (no data needed)."""

    kind: KVCacheDType
    layout: CacheLayout


def layer_variants(layer) -> list[tuple[str, dict]]:
    """Every kernel variant an ``Attention``/``BertAttention`` layer can launch on this backend:
    both cache layouts, both context tile shapes, the decode kernel for its head grouping."""
    from ..layers.attention import BertAttention  # the layer classes import this backend

    c = layer.config
    spec = layer._spec(None, cross=c.cross_attention, position_bias=None)
    if c.position_embedding.value == "relative" and not c.relative_table:
        spec = dataclasses.replace(spec, relative_bias=torch.empty(0))  # an explicit table, given per call
    bert = isinstance(layer, BertAttention)
    layouts = (CacheLayout.contiguous,) if bert else (CacheLayout.contiguous, CacheLayout.paged)
    group = layer.layout.group_size
    out: list[tuple[str, dict]] = []
    for layout in layouts:
        kv = _CacheKind(c.kv_cache_dtype, layout)
        if c.cross_attention:
            out += [("prepare", prepare_variant(c.dtype, None, kv)), ("prepare", prepare_variant(c.dtype, None, None))]
        else:
            out.append(("prepare", prepare_variant(c.dtype, layer.rope, kv)))
        for max_new in (0, WIDE_CAUSAL_MIN_LEN):
            out.append(("context", context_variant(c.dtype, c.head_size, spec, kv, max_new)))
        if not bert:
            out.append(("decode", cuda_decode.variant(c.dtype, kv, c.head_size, group)))
    if getattr(layer.qkv, "use_fp8_gemm", False):  # FP8 projections: their activation quantizer
        out += cuda_fp8.variants(c.dtype)
    return _unique(out)


def _unique(variants: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return list({(f, tuple(sorted((k, str(v)) for k, v in p.items()))): (f, p) for f, p in variants}.values())


def precompile_layers(layers, local_comm=None) -> None:
    """Compile every variant ``layers`` can launch before the first step. Under mpirun, pass the
    node-local communicator (``World.local_comm``): one rank per node compiles (in parallel
    processes), the others wait, then load the binaries from the disk cache. Collective over it."""
    from .compile import precompile

    wanted = [v for layer in layers if layer.backend.name == name for v in layer_variants(layer)]
    precompile(_unique(wanted), local_comm)
