"""GPT-2: learned positions, LayerNorm, gelu_new MLP, fused ``[Q | K | V]`` in ``Conv1D`` ([in, out])
projections, optional ``scale_attn_by_inverse_layer_idx``, tied head."""

from __future__ import annotations

from .decoder import DecoderNames
from .hf_config import eos_ids, field
from .mapping import QkvLayout
from .spec import Activation, ModelConfig, Norm

ARCHITECTURES = ("GPT2LMHeadModel",)

NAMES = DecoderNames(
    base_prefix="transformer.",
    embed="transformer.wte.weight",
    positions="transformer.wpe.weight",
    final_norm="transformer.ln_f",
    lm_head="lm_head.weight",
    layer="transformer.h.{i}.",
    ln1="ln_1",
    ln2="ln_2",
    qkv_layout=QkvLayout.fused,
    qkv=("attn.c_attn",),
    dense="attn.c_proj",
    up="mlp.c_fc",
    down="mlp.c_proj",
    conv1d=True,
)

_ACTIVATIONS = {
    "gelu_new": Activation.gelu_tanh,
    "gelu_pytorch_tanh": Activation.gelu_tanh,
    "gelu": Activation.gelu,
    "relu": Activation.relu,
}


def config(d: dict) -> ModelConfig:
    hidden, heads = d["n_embd"], d["n_head"]
    act = d.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: activation_function {act!r} not supported (supported: {sorted(_ACTIVATIONS)})")
    if not d.get("scale_attn_weights", True):
        raise ValueError("config.json: scale_attn_weights=false (unscaled attention) is not supported")
    return ModelConfig(
        family="gpt2",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_size=hidden // heads,
        intermediate_size=field(d, "n_inner", default=4 * hidden),
        norm=Norm.layernorm,
        norm_eps=field(d, "layer_norm_epsilon", default=1e-5),
        activation=_ACTIVATIONS[act],
        max_position_embeddings=d["n_positions"],
        learned_positions=True,
        qkv_bias=True,
        dense_bias=True,
        mlp_bias=True,
        inverse_layer_scaling=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
        tied_embeddings=bool(d.get("tie_word_embeddings", True)),
        eos_token_ids=eos_ids(d),
    )
