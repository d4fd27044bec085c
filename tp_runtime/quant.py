"""Arithmetic of the 8-bit number formats, one function each, for every caller (layers, caches,
backends, tests).

Two scale conventions, named apart because they are opposite:
  * KV caches store ``x · quant_scale`` and read ``stored · dequant_scale`` (``dequant_scale =
    1 / quant_scale``, one per layer): ``quantize_kv`` / ``dequantize_kv``, int8 or fp8.
  * FP8 projections store ``e4m3(x / scale)`` and read ``stored · scale``, with ``scale`` mapping
    the tensor's amax onto the largest e4m3 value: ``scale_from_amax`` / ``quantize_e4m3``.
"""

from __future__ import annotations

import torch

from .config import KVCacheDType

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


def quantize_kv(x: torch.Tensor, quant_scale: float, cache_dtype: KVCacheDType) -> torch.Tensor:
    """Activations -> cache storage, ``x · quant_scale`` rounded (fp32 math)."""
    y = x.float() * quant_scale
    if cache_dtype is KVCacheDType.int8:
        return y.round().clamp(-128, 127).to(torch.int8)
    if cache_dtype is KVCacheDType.fp8:
        return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    raise ValueError(f"quantize_kv: cache_dtype must be int8 or fp8, got {cache_dtype}")


def dequantize_kv(q: torch.Tensor, dequant_scale: float) -> torch.Tensor:
    """Cache storage -> fp32, ``stored · dequant_scale``."""
    return q.float() * dequant_scale


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale mapping ``amax`` onto the largest e4m3 value (1 for an all-zero tensor).

    Defined as ``amax · fp32(1/448)``, not ``amax / 448``: torch divides by a scalar as a multiply
    by its reciprocal on CUDA but divides on the CPU (one ulp apart at times); the product is the
    same on every device, and in the quantizer kernel."""
    amax = amax.float()
    return torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clip(x / scale, ±448))`` (fp32 division, round to nearest even, NaN kept)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
