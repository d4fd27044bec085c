"""BLOOM: ALiBi, a LayerNorm after the embeddings, head-interleaved fused QKV, gelu (tanh) MLP, tied head."""

from __future__ import annotations

from ..config import PositionEmbeddingType
from .decoder import DecoderNames
from .hf_config import eos_ids, field
from .mapping import QkvLayout
from .spec import Activation, ModelConfig, Norm

ARCHITECTURES = ("BloomForCausalLM",)

NAMES = DecoderNames(
    base_prefix="transformer.",
    embed="transformer.word_embeddings.weight",
    embed_norm="transformer.word_embeddings_layernorm",
    final_norm="transformer.ln_f",
    lm_head="lm_head.weight",
    layer="transformer.h.{i}.",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    qkv_layout=QkvLayout.interleaved,
    qkv=("self_attention.query_key_value",),
    dense="self_attention.dense",
    up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h",
)


def config(d: dict) -> ModelConfig:
    hidden, heads = field(d, "hidden_size", "n_embed"), field(d, "n_head", "num_attention_heads")
    if d.get("apply_residual_connection_post_layernorm"):
        raise ValueError("config.json: apply_residual_connection_post_layernorm=true is not supported")
    return ModelConfig(
        family="bloom",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=field(d, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_size=hidden // heads,
        intermediate_size=4 * hidden,
        norm=Norm.layernorm,
        norm_eps=field(d, "layer_norm_epsilon", default=1e-5),
        activation=Activation.gelu_tanh,
        position_embedding=PositionEmbeddingType.alibi,
        embedding_norm=True,
        qkv_bias=True,
        dense_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(d.get("tie_word_embeddings", True)),
        eos_token_ids=eos_ids(d),
    )
