"""MPT oracle: ALiBi with power-of-two heads, no biases."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType

from .common import Oracle, _build, randomize


def mpt(num_heads: int = 8, head_size: int = 8, seed: int = 1) -> Oracle:
    """MPT: ALiBi (power-of-two heads: its slopes equal BLOOM's then), no biases."""
    from transformers import MptConfig, MptModel

    hidden = num_heads * head_size
    cfg = MptConfig(
        vocab_size=64,
        d_model=hidden,
        n_heads=num_heads,
        n_layers=1,
        max_seq_len=64,
        attn_config={"alibi": True, "attn_pdrop": 0, "alibi_bias_max": 8},
        resid_pdrop=0.0,
        emb_pdrop=0.0,
    )
    model = _build(MptModel, cfg)
    randomize(model, seed)
    a = model.blocks[0].attn
    w = dict(qkv_weight=a.Wqkv.weight.detach(), dense_weight=a.out_proj.weight.detach())
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        position_embedding=PositionEmbeddingType.alibi,
        qkv_bias=False,
        dense_bias=False,
    )
    return Oracle("mpt", model, a, a.out_proj, ours, w)
