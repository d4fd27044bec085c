"""The backend interface shared by ``reference`` (torch) and ``cuda`` (RawKernels).

A backend is a module-like object with two operations, same arguments on every backend:

``prepare(qkv, bias, step, *, head_layout, head_size, rope, kv) -> (q, k, v)``
    ``qkv [T, (H_r + 2·KV_r)·D]`` (the local QKV GEMM output without bias), ``bias`` its
    ``[(H_r + 2·KV_r)·D]`` bias or None. Adds the bias, rotates Q and K (``rope``: a
    ``position.RopeSpec`` or None) at ``step.positions``, and writes K/V into ``kv`` (a
    ``kv_cache.LayerKV``, quantizing for int8/fp8) at each token's position; ``kv=None`` writes
    nothing. Returns ``q [T, H_r, D]``, ``k, v [T, KV_r, D]`` in the activation dtype.

``attend(q, kv, step, spec, *, decode_splits=None) -> (out, lse)``
    ``q [T, H_r, D]``; every key/value comes from ``kv``: for self attention sequence ``i``
    sees cached positions ``0 .. past_i + new_i − 1`` (its new tokens were written by
    ``prepare``), for cross attention ``0 .. encoder_len_i − 1``. Returns ``out [T, H_r, D]``
    (q's dtype) and the log-sum-exp of each query row ``lse [T, H_r]`` (fp32; ``-inf`` for a fully
    masked row, whose output is zero). ``decode_splits`` forces how many key splits the decode
    kernel uses (None: heuristic); it never changes the result beyond rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionMaskType


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
