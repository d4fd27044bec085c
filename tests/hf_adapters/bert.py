"""BERT oracle: ``BertSelfAttention`` with a padding mask."""

from __future__ import annotations

from tp_runtime.config import AttentionConfig, AttentionMaskType

from .common import Oracle, _build, fuse, randomize


def bert(num_heads: int = 4, head_size: int = 16, seed: int = 7) -> Oracle:
    """BERT: ``BertSelfAttention`` + ``BertSelfOutput.dense`` (not its LayerNorm), padding mask."""
    from transformers import BertConfig, BertModel

    hidden = num_heads * head_size
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    model = _build(BertModel, cfg)
    randomize(model, seed)
    att = model.encoder.layer[0].attention
    s = att.self
    w = dict(
        qkv_weight=fuse(s.query.weight, s.key.weight, s.value.weight),
        qkv_bias=fuse(s.query.bias, s.key.bias, s.value.bias),
        dense_weight=att.output.dense.weight.detach(),
        dense_bias=att.output.dense.bias.detach(),
    )
    ours = AttentionConfig(hidden_size=hidden, num_heads=num_heads, mask_type=AttentionMaskType.padding)
    return Oracle("bert", model, s, att.output.dense, ours, w, kind="encoder")
