"""Shared helpers of the HF oracles: the transformers version adapter, weight conversion, random weights, ``Oracle``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import transformers

from tp_runtime.config import AttentionConfig
from tp_runtime.models.mapping import deinterleave_qkv as deinterleave_qkv  # re-exported: one mapping

# ---------------------------------------------------------------------------------------------
# Version adapter: the only place that knows how config names and cache objects differ
# between transformers 4.x and 5.x.
# ---------------------------------------------------------------------------------------------
TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
_V5 = TRANSFORMERS_VERSION >= (5, 0)


def rope_kwargs(
    *,
    theta: float = 10000.0,
    partial: float = 1.0,
    scaling: str | None = None,
    factor: float = 1.0,
    neox_names: bool = False,
) -> dict:
    """Config kwargs for a rotary embedding (base ``theta``, rotary fraction ``partial``,
    ``scaling`` in {None, "linear", "dynamic"})."""
    if _V5:
        # Always explicit: GPT-NeoX defaults partial_rotary_factor to 0.25, others to 1.0.
        params = {"rope_type": scaling or "default", "rope_theta": theta, "partial_rotary_factor": partial}
        if scaling:
            params["factor"] = factor
        return {"rope_parameters": params}
    kw = {"rotary_emb_base": theta, "rotary_pct": partial} if neox_names else {"rope_theta": theta}
    if scaling:
        kw["rope_scaling"] = {"type": scaling, "rope_type": scaling, "factor": factor}
    return kw


def cache_kv(cache, layer_idx: int, *, cross: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[B, KV, S, D]`` of one layer of an HF cache (DynamicCache or
    EncoderDecoderCache; ``cross`` picks the cross-attention half)."""
    if hasattr(cache, "self_attention_cache"):
        cache = cache.cross_attention_cache if cross else cache.self_attention_cache
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def _build(model_cls, config, attn_implementation: str = "eager"):
    model = model_cls._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Weight conversion to our fused [Q | K | V] layout (head-interleaved layouts: the runtime's own
# mapping, tp_runtime.models.mapping.deinterleave_qkv, re-exported here)
# ---------------------------------------------------------------------------------------------
def fuse(*parts: torch.Tensor | None) -> torch.Tensor | None:
    """Separate Q, K, V projections -> the fused tensor (None if they have no bias)."""
    if any(p is None for p in parts):
        return None
    return torch.cat([p.detach() for p in parts], dim=0)


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with O(1)-scale random values, so attention scores are O(1)
    (HF's 0.02 init makes attention nearly uniform and hides position-embedding bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            if "relative_attention_bias" in name:
                std = 1.0
            elif type(_owner(model, name)).__name__ == "Conv1D":
                std = 1.0 / math.sqrt(p.shape[0])
            else:
                std = 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        else:  # norm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
@dataclass
class Oracle:
    name: str
    model: torch.nn.Module  # the whole tiny HF model (eval mode, fp32)
    attn: torch.nn.Module  # its input (args[0] or kwargs["hidden_states"]) is the attention input
    out: torch.nn.Module  # its output is the attention output after the dense projection (+ bias)
    config: AttentionConfig  # ours, global (unsharded) numbers
    weights: dict  # full weights: qkv_weight, dense_weight, qkv_bias, dense_bias, relative_table
    kind: str = "causal"  # causal (decoder self attention), encoder (BertAttention), cross
    layer_idx: int = 0  # HF layer index (for its cache)
    encoder_kwarg: str | None = None  # cross: the forward kwarg holding the encoder states
    uses_position_ids: bool = False  # whether the model takes position_ids (left padding needs them)
    max_len: int = 64
