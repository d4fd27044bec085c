"""T5 oracles: relative-bias encoder and decoder self attention, and cross attention."""

from __future__ import annotations

import math

from tp_runtime.config import AttentionConfig, AttentionMaskType, PositionEmbeddingType

from .common import Oracle, _build, fuse, randomize


def t5(
    head_size: int = 8,
    num_heads: int = 8,
    d_model: int | None = None,
    num_buckets: int = 16,
    max_distance: int = 20,
    seed: int = 6,
) -> dict[str, Oracle]:
    """T5 (``d_kv·heads != d_model``: ``d_model`` defaults to ``6·head_size`` with 8 heads):
    encoder self attention (bidirectional buckets, our ``BertAttention``), decoder self attention
    (causal buckets), cross attention (EncDecAttention). No scaling: ``q_scaling = 1/√D``.
    Returns ``{"encoder", "decoder", "cross"}`` sharing one model."""
    from transformers import T5Config, T5Model

    d_kv, d_model = head_size, d_model or 6 * head_size

    cfg = T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        dropout_rate=0.0,
        feed_forward_proj="relu",
    )
    model = _build(T5Model, cfg)
    randomize(model, seed)
    common = dict(
        hidden_size=d_model,
        num_heads=num_heads,
        head_size=d_kv,
        q_scaling=1.0 / math.sqrt(d_kv),
        qkv_bias=False,
        dense_bias=False,
        relative_num_buckets=num_buckets,
        relative_max_distance=max_distance,
    )

    def weights(a, table: bool):
        w = dict(qkv_weight=fuse(a.q.weight, a.k.weight, a.v.weight), dense_weight=a.o.weight.detach())
        if table:
            w["relative_table"] = a.relative_attention_bias.weight.detach().t().contiguous()  # [H, buckets]
        return w

    enc = model.encoder.block[0].layer[0].SelfAttention
    dec = model.decoder.block[0].layer[0].SelfAttention
    cross = model.decoder.block[0].layer[1].EncDecAttention
    rel = PositionEmbeddingType.relative
    return {
        "encoder": Oracle(
            "t5_encoder",
            model,
            enc,
            enc.o,
            AttentionConfig(**common, position_embedding=rel, mask_type=AttentionMaskType.padding),
            weights(enc, True),
            kind="encoder",
        ),
        "decoder": Oracle(
            "t5_decoder",
            model,
            dec,
            dec.o,
            AttentionConfig(**common, position_embedding=rel, mask_type=AttentionMaskType.causal),
            weights(dec, True),
        ),
        "cross": Oracle(
            "t5_cross",
            model,
            cross,
            cross.o,
            AttentionConfig(**common, cross_attention=True),
            weights(cross, False),
            kind="cross",
            encoder_kwarg="key_value_states",
        ),
    }
