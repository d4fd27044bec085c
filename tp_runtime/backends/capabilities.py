"""What each CUDA kernel family can do: one table, read by the compile table, the launchers and the
backend's check of a layer's description (so a layer the CUDA backend cannot serve fails when it is
built, naming the unsupported field, instead of at its first step).

Head sizes are compile-time template parameters (registers and shared-memory tiles are sized by
them): these are the head sizes of the models served (64: GPT-2/BERT/BLOOM-7B; 80/96: Falcon-ish and
Phi; 128: Llama, BLOOM-176B; 256: Gemma-style). Activations are fp16 or bf16 (``mma.sync`` m16n8k16
operands; fp32 layers stay on the reference backend). sm_80 is the oldest architecture because the
kernels use bf16 tensor-core MMAs and ``cp.async``; the FP8 activation quantizer feeds
``torch._scaled_mm``, which needs FP8 matrix units (sm_89).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch.kv_cache import CacheLayout
from ..config import KVCacheDType

HALF_DTYPES = (torch.float16, torch.bfloat16)
HEAD_SIZES = (64, 80, 96, 128, 256)
ALL_CACHE_DTYPES = tuple(KVCacheDType)
ALL_CACHE_LAYOUTS = tuple(CacheLayout)


@dataclass(frozen=True)
class Capability:
    """What one kernel family serves; ``head_sizes`` empty: any (the family has no head-size parameter)."""

    dtypes: tuple[torch.dtype, ...]
    head_sizes: tuple[int, ...] = ()
    cache_dtypes: tuple[KVCacheDType, ...] = ALL_CACHE_DTYPES
    cache_layouts: tuple[CacheLayout, ...] = ALL_CACHE_LAYOUTS
    min_capability: tuple[int, int] = (8, 0)

    def problem(self, *, dtype=None, head_size=None, cache_dtype=None, cache_layout=None, capability=None):
        """Why a request is outside this capability (a message naming the field), or None."""
        if dtype is not None and dtype not in self.dtypes:
            return f"dtype={dtype} (supported: {list(self.dtypes)})"
        if head_size is not None and self.head_sizes and head_size not in self.head_sizes:
            return f"head_size={head_size} (supported: {list(self.head_sizes)})"
        if cache_dtype is not None and cache_dtype not in self.cache_dtypes:
            return f"kv_cache_dtype={cache_dtype.value} (supported: {[c.value for c in self.cache_dtypes]})"
        if cache_layout is not None and cache_layout not in self.cache_layouts:
            return f"cache layout {cache_layout.value} (supported: {[c.value for c in self.cache_layouts]})"
        if capability is not None and tuple(capability) < self.min_capability:
            major, minor = self.min_capability
            return f"compute capability {capability[0]}.{capability[1]} (needs >= {major}.{minor})"
        return None


CAPABILITIES: dict[str, Capability] = {
    # bias + RoPE + K/V cache write: elementwise, any even head size
    "prepare": Capability(dtypes=HALF_DTYPES),
    "context": Capability(dtypes=HALF_DTYPES, head_sizes=HEAD_SIZES),
    # the sm_90a context kernel (wgmma + TMA, kernels/context_hopper.cu), chosen on Hopper where it
    # serves the case; the rest (D 80/96, cross attention, int8/fp8 caches, pages of fewer than
    # HOPPER_CONTEXT_MIN_PAGE tokens, beams) stays on "context": HOPPER_CONTEXT_* say which
    "context_hopper": Capability(
        dtypes=HALF_DTYPES,
        head_sizes=(64, 128, 256),
        cache_dtypes=(KVCacheDType.auto,),
        cache_layouts=(CacheLayout.contiguous, CacheLayout.paged),
        min_capability=(9, 0),
    ),
    "decode": Capability(dtypes=HALF_DTYPES, head_sizes=HEAD_SIZES),
    "fp8_quantize": Capability(dtypes=HALF_DTYPES, min_capability=(8, 9)),
}


# What the Hopper context kernel serves beyond its Capability row (the launcher checks these per step).
HOPPER_CONTEXT_MASKS = ("causal", "padding", "bidirectional")  # every mask of AttentionMaskType
HOPPER_CONTEXT_BIASES = ("none", "alibi", "table")  # every bias the CUDA kernels add (score_bias_kind)
HOPPER_CONTEXT_MIN_PAGE = 8  # paged: one TMA box per page must cover whole 1024-byte swizzle atoms (8 rows)


def check(family: str, **request) -> None:
    """Raise ``NotImplementedError`` naming what ``family`` does not serve (and the way out)."""
    why = CAPABILITIES[family].problem(**request)
    if why is not None:
        raise NotImplementedError(f"the CUDA {family} kernel does not serve {why}; use backend='reference'")
