"""Position embeddings inside attention: ALiBi slopes, RoPE angles and rotation, T5 buckets.

One function per piece of arithmetic; the reference backend, the CUDA backend's host side and
the tests all call these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import AttentionConfig, PositionEmbeddingType, RotaryScalingType


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes of all ``num_heads`` heads (BLOOM's formula), fp32 ``[H]``.

    ``c = 2^floor(log2 H)``; head ``h < c``: ``2^(-8(h+1)/c)``; else ``2^(-4(2(h-c)+1)/c)``.
    Callers slice the result with ``sharding.slice_heads``; never compute per-rank slopes directly.
    """
    c = 2 ** math.floor(math.log2(num_heads))
    h = torch.arange(num_heads, dtype=torch.float64)
    exponent = torch.where(h < c, -8.0 * (h + 1) / c, -4.0 * (2 * (h - c) + 1) / c)
    return torch.pow(2.0, exponent).to(torch.float32)


@dataclass(frozen=True)
class RopeSpec:
    """What the prepare step needs to rotate Q and K."""

    style: PositionEmbeddingType  # rope_gptj or rope_gpt_neox
    rotary_dim: int
    base: float
    scaling: RotaryScalingType
    factor: float
    max_positions: int

    @classmethod
    def from_config(cls, config: AttentionConfig) -> RopeSpec | None:
        if not config.position_embedding.is_rope:
            return None
        return cls(
            config.position_embedding,
            config.rotary_dim,
            float(config.rotary_base),
            config.rotary_scaling,
            float(config.rotary_scaling_factor),
            config.max_position_embeddings,
        )

    def base_for_length(self, seq_len: torch.Tensor) -> torch.Tensor:
        """Per-sequence rotary base (fp64). Dynamic NTK grows it once ``seq_len > max_positions``:
        ``base · ((f·n/M) − (f − 1))^(rot/(rot − 2))``."""
        n = seq_len.to(torch.float64)
        base = torch.full_like(n, self.base)
        if self.scaling is RotaryScalingType.dynamic:
            f, m, rot = self.factor, self.max_positions, self.rotary_dim
            grown = self.base * ((f * n / m) - (f - 1)) ** (rot / (rot - 2))
            base = torch.where(n > m, grown, base)
        return base

    def inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """``seq_len [N]`` -> fp64 inverse frequencies ``[N, rot/2]``: ``1 / base^(2i/rot)`` with each
        length's base (the CUDA prepare kernel reads the same table, per sequence)."""
        base = self.base_for_length(seq_len)[:, None]  # [N, 1]
        i = torch.arange(self.rotary_dim // 2, dtype=torch.float64, device=seq_len.device)[None, :]
        return 1.0 / base ** (2 * i / self.rotary_dim)

    def cos_sin(self, positions: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` (absolute, per token) and ``seq_len [T]`` (its sequence's length after
        this step, for dynamic scaling) -> ``cos, sin [T, rot/2]`` in fp32."""
        inv_freq = self.inv_freq(seq_len)  # [T, rot/2]
        t = positions.to(torch.float64)[:, None]
        if self.scaling is RotaryScalingType.linear:
            t = t / self.factor
        # HF computes inv_freq in fp32 then the angle in fp32; fp64 here is the more exact oracle.
        angle = (t * inv_freq).to(torch.float32)
        return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate the first ``rot`` channels of ``x [T, heads, D]`` (fp32 math, returns x's dtype).

    GPT-J pairs channels ``(2i, 2i+1)``; NeoX pairs ``(i, i + rot/2)``; both use angle ``i``.
    """
    rot = spec.rotary_dim
    xr = x[..., :rot].float()
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, rot/2]
    if spec.style is PositionEmbeddingType.rope_gptj:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def relative_bucket(rel: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of ``rel = k_pos − q_pos``: bidirectional for encoders, causal for decoders."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).to(rel.dtype) * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(rel.dtype)
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, n, large)
