"""Llama oracle: GQA, NeoX rotary, optional linear / dynamic (NTK) scaling."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType, RotaryScalingType

from .common import Oracle, _build, fuse, randomize, rope_kwargs


def llama(
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_size: int = 16,
    *,
    scaling: str | None = None,
    factor: float = 2.0,
    max_positions: int = 64,
    bias: bool = True,
    seed: int = 5,
) -> Oracle:
    """Llama: GQA, NeoX rotary, optional linear / dynamic (NTK) scaling."""
    from transformers import LlamaConfig, LlamaModel

    hidden = num_heads * head_size
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_size,
        max_position_embeddings=max_positions,
        attention_bias=bias,
        **rope_kwargs(scaling=scaling, factor=factor),
    )
    model = _build(LlamaModel, cfg)
    randomize(model, seed)
    a = model.layers[0].self_attn
    w = dict(
        qkv_weight=fuse(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
        qkv_bias=fuse(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
        dense_weight=a.o_proj.weight.detach(),
        dense_bias=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        max_position_embeddings=max_positions,
        rotary_scaling=RotaryScalingType(scaling or "none"),
        rotary_scaling_factor=factor if scaling else 1.0,
        qkv_bias=bias,
        dense_bias=bias,
    )
    name = "llama" + (f"_{scaling}" if scaling else "") + f"_h{num_heads}kv{num_kv_heads}"
    return Oracle(name, model, a, a.o_proj, ours, w, uses_position_ids=True)
