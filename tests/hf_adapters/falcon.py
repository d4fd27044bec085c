"""Falcon oracles: multi-query attention with NeoX rotary or ALiBi (SDPA)."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, PositionEmbeddingType

from .common import Oracle, _build, randomize, rope_kwargs


def falcon(*, alibi: bool, num_heads: int = 8, head_size: int = 8, seed: int = 2) -> Oracle:
    """Falcon-7B style: multi-query (one KV head), fused ``[Q | K | V]``, no biases.

    ``alibi=False``: NeoX rotary (rotate-half over the whole head). ``alibi=True``: Falcon adds
    the bias before scaling, ``(Q·Kᵀ + alibi) / √D`` -> ``alibi_with_scale``. Falcon rounds its
    slopes to bf16: with power-of-two heads they are powers of two, so exact.

    The SDPA path is used for ALiBi: in transformers 5.17 ``FalconModel`` folds ``alibi / √D``
    into the attention mask and the eager ``FalconAttention`` adds ``alibi`` to the scores
    again, counting it twice; SDPA applies it once (verified by test_falcon_eager_alibi_quirk).
    """
    from transformers import FalconConfig, FalconModel

    hidden = num_heads * head_size
    cfg = FalconConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        multi_query=True,
        new_decoder_architecture=False,
        alibi=alibi,
        bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=64,
        **rope_kwargs(),
    )
    model = _build(FalconModel, cfg, "sdpa" if alibi else "eager")
    randomize(model, seed)
    a = model.h[0].self_attention
    w = dict(qkv_weight=a.query_key_value.weight.detach(), dense_weight=a.dense.weight.detach())
    pe = PositionEmbeddingType.alibi_with_scale if alibi else PositionEmbeddingType.rope_gpt_neox
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=1,
        position_embedding=pe,
        qkv_bias=False,
        dense_bias=False,
        max_position_embeddings=64,
    )
    return Oracle("falcon_alibi" if alibi else "falcon_mqa", model, a, a.dense, ours, w, uses_position_ids=not alibi)
