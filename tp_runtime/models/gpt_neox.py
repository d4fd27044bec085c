"""GPT-NeoX (Pythia): partial NeoX rotary, head-interleaved fused QKV, LayerNorm, gelu MLP, parallel
residual (``use_parallel_residual``) or sequential, untied head."""

from __future__ import annotations

from ..config import PositionEmbeddingType
from .decoder import DecoderNames
from .hf_config import eos_ids, field, rope
from .mapping import QkvLayout
from .spec import Activation, Block, ModelConfig, Norm

ARCHITECTURES = ("GPTNeoXForCausalLM",)

NAMES = DecoderNames(
    base_prefix="gpt_neox.",
    embed="gpt_neox.embed_in.weight",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out.weight",
    layer="gpt_neox.layers.{i}.",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    qkv_layout=QkvLayout.interleaved,
    qkv=("attention.query_key_value",),
    dense="attention.dense",
    up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h",
)

_ACTIVATIONS = {"gelu": Activation.gelu, "gelu_new": Activation.gelu_tanh, "relu": Activation.relu}


def config(d: dict) -> ModelConfig:
    heads, act = d["num_attention_heads"], field(d, "hidden_act", default="gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} not supported (supported: {sorted(_ACTIVATIONS)})")
    bias = bool(d.get("attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_size=d["hidden_size"] // heads,
        intermediate_size=d["intermediate_size"],
        norm=Norm.layernorm,
        norm_eps=field(d, "layer_norm_eps", default=1e-5),
        activation=_ACTIVATIONS[act],
        block=Block.parallel if d.get("use_parallel_residual", True) else Block.sequential,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        max_position_embeddings=field(d, "max_position_embeddings", default=2048),
        **rope(d, default_pct=0.25),
        qkv_bias=bias,
        dense_bias=bias,
        mlp_bias=True,
        tied_embeddings=bool(d.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids(d),
    )
