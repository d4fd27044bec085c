"""Llama, and the families that share its layout: Mistral (without a sliding window shorter than the
sequences) and Qwen2 (Q/K/V biases). RMSNorm, SwiGLU MLP, NeoX rotary, GQA, separate Q/K/V."""

from __future__ import annotations

from ..config import PositionEmbeddingType
from .decoder import DecoderNames
from .hf_config import eos_ids, field, rope
from .mapping import QkvLayout
from .spec import Activation, ModelConfig, Norm

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

NAMES = DecoderNames(
    base_prefix="model.",
    embed="model.embed_tokens.weight",
    final_norm="model.norm",
    lm_head="lm_head.weight",
    layer="model.layers.{i}.",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    qkv_layout=QkvLayout.separate,
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    dense="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)


def config(d: dict) -> ModelConfig:
    heads = d["num_attention_heads"]
    qwen2 = d.get("model_type") == "qwen2"
    act = field(d, "hidden_act", default="silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r}: the Llama family here uses silu (SwiGLU)")
    window = (d.get("sliding_window") if d.get("use_sliding_window") else None) if qwen2 else d.get("sliding_window")
    return ModelConfig(
        family="llama",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=field(d, "num_key_value_heads", default=heads),
        head_size=field(d, "head_dim", default=d["hidden_size"] // heads),
        intermediate_size=d["intermediate_size"],
        norm=Norm.rmsnorm,
        norm_eps=field(d, "rms_norm_eps", default=1e-6),
        activation=Activation.silu,
        gated_mlp=True,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        max_position_embeddings=field(d, "max_position_embeddings", default=2048),
        **rope(d),
        qkv_bias=True if qwen2 else bool(d.get("attention_bias", False)),
        dense_bias=False if qwen2 else bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        tied_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=window,
        eos_token_ids=eos_ids(d),
    )
