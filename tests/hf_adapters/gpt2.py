"""GPT-2 oracles: self and cross attention scaled by the inverse layer index."""

from __future__ import annotations

import torch

from tp_runtime.config import AttentionConfig

from .common import Oracle, _build, randomize


def _conv1d(w: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; ours is ``[out, in]``."""
    return w.detach().t()


def gpt2(num_heads: int = 4, head_size: int = 16, layer: int = 2, seed: int = 8) -> dict[str, Oracle]:
    """GPT-2 with ``scale_attn_by_inverse_layer_idx`` (layer ``layer``: ``q_scaling = layer + 1``,
    for its self and cross attention alike) and ``add_cross_attention``. Returns ``{"self", "cross"}``."""
    from transformers import GPT2Config, GPT2Model

    hidden = num_heads * head_size
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=hidden,
        n_layer=layer + 1,
        n_head=num_heads,
        n_positions=64,
        scale_attn_by_inverse_layer_idx=True,
        add_cross_attention=True,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = _build(GPT2Model, cfg)
    randomize(model, seed)
    blk = model.h[layer]
    sa, ca = blk.attn, blk.crossattention
    common = dict(hidden_size=hidden, num_heads=num_heads, q_scaling=float(layer + 1))
    self_w = dict(
        qkv_weight=_conv1d(sa.c_attn.weight),
        qkv_bias=sa.c_attn.bias.detach(),
        dense_weight=_conv1d(sa.c_proj.weight),
        dense_bias=sa.c_proj.bias.detach(),
    )
    cross_w = dict(
        qkv_weight=torch.cat([_conv1d(ca.q_attn.weight), _conv1d(ca.c_attn.weight)]),
        qkv_bias=torch.cat([ca.q_attn.bias.detach(), ca.c_attn.bias.detach()]),
        dense_weight=_conv1d(ca.c_proj.weight),
        dense_bias=ca.c_proj.bias.detach(),
    )
    return {
        "self": Oracle("gpt2_self", model, sa, sa.c_proj, AttentionConfig(**common), self_w, layer_idx=layer),
        "cross": Oracle(
            "gpt2_cross",
            model,
            ca,
            ca.c_proj,
            AttentionConfig(**common, cross_attention=True),
            cross_w,
            kind="cross",
            layer_idx=layer,
            encoder_kwarg="encoder_hidden_states",
        ),
    }
