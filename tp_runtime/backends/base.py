"""What layers and backends exchange: plain, frozen data, no layer objects.

A layer builds an ``AttentionDesc`` once, at construction: everything it will ask of the backend
(head layout, head size, dtypes, position embedding, mask, cache kind). A backend checks it
(``check``), lists the kernel variants it implies (``variants``, for compiling ahead) and plans
each step from it. Per call, the layer passes an ``AttentionSpec`` (how scores are formed) and the
step. Every backend (``reference``, ``cuda``) has these operations, same arguments:

``prepare(qkv, bias, step, *, head_layout, head_size, rope, kv) -> q``
    ``qkv [T, (H_r + 2·KV_r)·D]`` (the local QKV GEMM output without bias), ``bias`` its
    ``[(H_r + 2·KV_r)·D]`` bias or None. Adds the bias, rotates Q and K (``rope``: a
    ``position.RopeSpec`` or None) at ``step.positions``, and writes K/V into ``kv`` (a
    ``kv_cache.LayerKV``, quantizing for int8/fp8) at each token's position; ``kv=None`` writes
    nothing. Returns ``q [T, H_r, D]`` in the activation dtype.

``attend(q, kv, step, spec, *, decode_splits=None) -> (out, lse)``
    ``q [T, H_r, D]``; every key/value comes from ``kv``: for self attention sequence ``i``
    sees cached positions ``0 .. past_i + new_i − 1`` (its new tokens were written by
    ``prepare``), for cross attention ``0 .. encoder_len_i − 1``. Returns ``out [T, H_r, D]``
    (q's dtype) and the log-sum-exp of each query row ``lse [T, H_r]`` (fp32; ``-inf`` for a fully
    masked row, whose output is zero). ``decode_splits`` forces how many key splits the decode
    kernel uses (None: heuristic); it never changes the result beyond rounding.

``fp8_quantize(x, static_scale) -> (x_q, scale)`` and ``fp8_matmul(x_q, x_scale, weight, weight_scale,
*, per_channel, out_dtype) -> y``
    The FP8 projections' activation quantizer and GEMM (see ``layers/fp8.py`` for the scales).

``check(desc)``, ``variants(desc)``, ``precompile(descs, local_comm)``
    Whether the backend serves a layer (raises naming the field), which kernel variants it can
    launch, and compiling those ahead of the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..batch.kv_cache import CacheLayout
from ..config import AttentionMaskType, KVCacheDType
from ..position import RopeSpec
from ..sharding import HeadLayout


class ScoreBias(str, Enum):
    """The additive score bias a layer's scores carry (at most one)."""

    none = "none"
    alibi = "alibi"  # slope·(k − q), slopes per head
    relative_table = "relative_table"  # T5 buckets of k − q looked up in the layer's [H_r, buckets] table
    relative_explicit = "relative_explicit"  # an explicit [H_r, Q, K] bias given with every call


@dataclass(frozen=True, kw_only=True)
class AttentionDesc:
    """What one attention layer will ask of its backend, fixed at the layer's construction."""

    head_layout: HeadLayout
    head_size: int
    dtype: torch.dtype  # activations
    mask: AttentionMaskType
    rope: RopeSpec | None
    bias: ScoreBias
    cache_dtype: KVCacheDType
    cross: bool  # keys and values are the encoder's (written once, read by every decoder step)
    keeps_cache: bool  # False: an encoder layer, attending within the step only (no decode phase)
    fp8_projections: bool  # the QKV and dense projections quantize their activations to FP8

    @property
    def cache_layouts(self) -> tuple[CacheLayout, ...]:
        """Cache layouts the layer may be given: an encoder keeps its step's K/V contiguous."""
        return (CacheLayout.contiguous, CacheLayout.paged) if self.keeps_cache else (CacheLayout.contiguous,)


@dataclass(frozen=True)
class AttentionSpec:
    """How scores are formed and masked (per rank, per call)."""

    mask: AttentionMaskType
    softmax_scale: float  # scores = Q·Kᵀ · softmax_scale
    alibi_slopes: torch.Tensor | None = None  # [H_r] fp32, bias slope·(k − q) added to the scaled scores
    relative_table: torch.Tensor | None = None  # [H_r, num_buckets] fp32 (implicit T5 buckets)
    relative_bias: torch.Tensor | None = None  # [H_r, Q_max, K_max] fp32, explicit, by absolute positions
    num_buckets: int = 0
    max_distance: int = 0
    cross: bool = False  # keys are the encoder's: no causal mask, limited by encoder_lens

    @property
    def bidirectional_buckets(self) -> bool:
        """T5 buckets are bidirectional in encoders, causal (one-sided) in decoders."""
        return self.mask is not AttentionMaskType.causal


def key_lengths(step, spec: AttentionSpec) -> tuple[int, ...]:
    """Keys each sequence attends to in this step."""
    if spec.cross:
        return step.require_encoder_lens("cross attention")
    return step.total_lens
