"""BLOOM oracle: ALiBi, head-interleaved fused QKV, biases."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType

from .common import Oracle, _build, deinterleave_qkv, randomize


def bloom(num_heads: int = 12, head_size: int = 8, seed: int = 0) -> Oracle:
    """BLOOM: ALiBi, head-interleaved fused QKV, biases."""
    from transformers import BloomConfig, BloomModel

    hidden = num_heads * head_size
    cfg = BloomConfig(
        vocab_size=64, hidden_size=hidden, n_layer=1, n_head=num_heads, hidden_dropout=0.0, attention_dropout=0.0
    )
    model = _build(BloomModel, cfg)
    randomize(model, seed)
    a = model.h[0].self_attention
    w = dict(
        qkv_weight=deinterleave_qkv(a.query_key_value.weight.detach(), num_heads, head_size),
        qkv_bias=deinterleave_qkv(a.query_key_value.bias.detach(), num_heads, head_size),
        dense_weight=a.dense.weight.detach(),
        dense_bias=a.dense.bias.detach(),
    )
    ours = AttentionConfig(hidden_size=hidden, num_heads=num_heads, position_embedding=PositionEmbeddingType.alibi)
    return Oracle(f"bloom{num_heads}", model, a, a.dense, ours, w)
