"""GPT-J oracle: rotary on adjacent channel pairs, no biases."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType

from .common import Oracle, _build, fuse, randomize


def gptj(num_heads: int = 4, head_size: int = 16, rotary_dim: int = 8, seed: int = 4) -> Oracle:
    """GPT-J: rotary on adjacent pairs of the first ``rotary_dim`` channels, no biases."""
    from transformers import GPTJConfig, GPTJModel

    hidden = num_heads * head_size
    cfg = GPTJConfig(
        vocab_size=64,
        n_embd=hidden,
        n_layer=1,
        n_head=num_heads,
        rotary_dim=rotary_dim,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = _build(GPTJModel, cfg)
    randomize(model, seed)
    a = model.h[0].attn
    w = dict(
        qkv_weight=fuse(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), dense_weight=a.out_proj.weight.detach()
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        position_embedding=PositionEmbeddingType.rope_gptj,
        rotary_pct=rotary_dim / head_size,
        qkv_bias=False,
        dense_bias=False,
        max_position_embeddings=64,
    )
    return Oracle("gptj", model, a, a.out_proj, ours, w, uses_position_ids=True)
