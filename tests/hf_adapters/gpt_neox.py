"""GPT-NeoX oracle: partial NeoX rotary, head-interleaved fused QKV, biases."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType

from .common import Oracle, _build, deinterleave_qkv, randomize, rope_kwargs


def gpt_neox(rotary_pct: float = 0.25, num_heads: int = 8, head_size: int = 16, seed: int = 3) -> Oracle:
    """GPT-NeoX: partial NeoX rotary, head-interleaved fused QKV, biases."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    hidden = num_heads * head_size
    cfg = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attention_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **rope_kwargs(partial=rotary_pct, neox_names=True),
    )
    model = _build(GPTNeoXModel, cfg)
    randomize(model, seed)
    a = model.layers[0].attention
    w = dict(
        qkv_weight=deinterleave_qkv(a.query_key_value.weight.detach(), num_heads, head_size),
        qkv_bias=deinterleave_qkv(a.query_key_value.bias.detach(), num_heads, head_size),
        dense_weight=a.dense.weight.detach(),
        dense_bias=a.dense.bias.detach(),
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        rotary_pct=rotary_pct,
        max_position_embeddings=64,
    )
    return Oracle(f"gpt_neox{int(rotary_pct * 100)}", model, a, a.dense, ours, w, uses_position_ids=True)
