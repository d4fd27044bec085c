"""Random full (unsharded) weights for an ``AttentionConfig``, shared by the unit tests."""

from __future__ import annotations

import math

import torch

from tp_runtime.config import AttentionConfig


def make_weights(c: AttentionConfig, seed: int) -> dict:
    """``Attention.load_weights`` arguments: O(1)-scale scores, biases only where the config has them."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "qkv_weight": torch.randn(c.qkv_size, c.hidden_size, generator=g) / math.sqrt(c.hidden_size),
        "dense_weight": torch.randn(c.hidden_size, c.num_heads * c.head_size, generator=g) / math.sqrt(c.hidden_size),
    }
    if c.qkv_bias:
        w["qkv_bias"] = torch.randn(c.qkv_size, generator=g) * 0.5
    if c.dense_bias:
        w["dense_bias"] = torch.randn(c.hidden_size, generator=g)
    if c.position_embedding.value == "relative" and c.relative_table:
        w["relative_table"] = torch.randn(c.num_heads, c.relative_num_buckets, generator=g)
    return w
