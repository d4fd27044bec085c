"""Falcon (7B layout): multi-query (fused ``[Q | K | V]`` with one KV head) or multi-head
(head-interleaved) attention, NeoX rotary or ALiBi (``alibi_with_scale``), parallel attention with
one shared LayerNorm or sequential blocks, gelu MLP, tied head. ``new_decoder_architecture``
(Falcon-40B/180B's grouped QKV and two norms) is not supported."""

from __future__ import annotations

from ..config import PositionEmbeddingType
from .decoder import DecoderNames
from .hf_config import eos_ids, field, rope
from .mapping import QkvLayout
from .spec import Activation, Block, ModelConfig, Norm

ARCHITECTURES = ("FalconForCausalLM",)


def names(d: dict) -> DecoderNames:
    return DecoderNames(
        base_prefix="transformer.",
        embed="transformer.word_embeddings.weight",
        final_norm="transformer.ln_f",
        lm_head="lm_head.weight",
        layer="transformer.h.{i}.",
        ln1="input_layernorm",
        ln2=None if d.get("parallel_attn", True) else "post_attention_layernorm",
        qkv_layout=QkvLayout.fused if d.get("multi_query", True) else QkvLayout.interleaved,
        qkv=("self_attention.query_key_value",),
        dense="self_attention.dense",
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
    )


def config(d: dict) -> ModelConfig:
    if d.get("new_decoder_architecture"):
        raise ValueError("config.json: Falcon new_decoder_architecture=true (40B/180B layout) is not supported")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    if field(d, "activation", default="gelu") != "gelu":
        raise ValueError(f"config.json: Falcon activation {d['activation']!r} not supported (supported: ['gelu'])")
    alibi, bias = bool(d.get("alibi", False)), bool(d.get("bias", False))
    pe = PositionEmbeddingType.alibi_with_scale if alibi else PositionEmbeddingType.rope_gpt_neox
    return ModelConfig(
        family="falcon",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=1 if d.get("multi_query", True) else heads,
        head_size=hidden // heads,
        intermediate_size=field(d, "ffn_hidden_size", default=4 * hidden),
        norm=Norm.layernorm,
        norm_eps=field(d, "layer_norm_epsilon", default=1e-5),
        activation=Activation.gelu,
        block=Block.parallel_shared_norm if d.get("parallel_attn", True) else Block.sequential,
        position_embedding=pe,
        max_position_embeddings=field(d, "max_position_embeddings", default=2048),
        **({} if alibi else rope(d)),
        qkv_bias=bias,
        dense_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(d.get("tie_word_embeddings", True)),
        eos_token_ids=eos_ids(d),
    )
