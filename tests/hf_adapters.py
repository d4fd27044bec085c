"""HuggingFace attention oracles: tiny ``transformers`` models with random weights, their
weights converted to our fused layout, and captured reference runs.

Nothing is downloaded: every model is built from a config. Each ``Oracle`` names one
attention layer inside a one-layer (GPT-2: three-layer) HF model, the module whose input is
the attention's hidden states (``attn``), the dense projection whose output is the attention
output (``out``: output projection + bias, before any residual or LayerNorm), the matching
``AttentionConfig`` and the full weights for ``Attention.load_weights``.

References are captured with forward hooks while the *whole* HF model runs, so masks,
position ids, rotary tables, ALiBi tensors and caches are exactly what the model itself
builds (``Trace``). The tests then feed the captured hidden states to our layer and compare
with the captured outputs and the HF ``past_key_values``.

All config-name differences between ``transformers`` versions live in the "version adapter"
section below (pinned: transformers==5.17.0 in the ``test`` extra).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import transformers

from tp_runtime.config import AttentionConfig, AttentionMaskType, PositionEmbeddingType, RotaryScalingType

# ---------------------------------------------------------------------------------------------
# Version adapter: the only place that knows how config names and cache objects differ
# between transformers 4.x and 5.x.
# ---------------------------------------------------------------------------------------------
TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
_V5 = TRANSFORMERS_VERSION >= (5, 0)


def rope_kwargs(
    *,
    theta: float = 10000.0,
    partial: float = 1.0,
    scaling: str | None = None,
    factor: float = 1.0,
    neox_names: bool = False,
) -> dict:
    """Config kwargs for a rotary embedding (base ``theta``, rotary fraction ``partial``,
    ``scaling`` in {None, "linear", "dynamic"})."""
    if _V5:
        # Always explicit: GPT-NeoX defaults partial_rotary_factor to 0.25, others to 1.0.
        params = {"rope_type": scaling or "default", "rope_theta": theta, "partial_rotary_factor": partial}
        if scaling:
            params["factor"] = factor
        return {"rope_parameters": params}
    kw = {"rotary_emb_base": theta, "rotary_pct": partial} if neox_names else {"rope_theta": theta}
    if scaling:
        kw["rope_scaling"] = {"type": scaling, "rope_type": scaling, "factor": factor}
    return kw


def cache_kv(cache, layer_idx: int, *, cross: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[B, KV, S, D]`` of one layer of an HF cache (DynamicCache or
    EncoderDecoderCache; ``cross`` picks the cross-attention half)."""
    if hasattr(cache, "self_attention_cache"):
        cache = cache.cross_attention_cache if cross else cache.self_attention_cache
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def _build(model_cls, config, attn_implementation: str = "eager"):
    model = model_cls._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Weight conversion to our fused [Q | K | V] layout
# ---------------------------------------------------------------------------------------------
def deinterleave_qkv(t: torch.Tensor, num_heads: int, head_size: int) -> torch.Tensor:
    """Head-interleaved fused QKV (BLOOM, GPT-NeoX: rows ``[h0: q k v | h1: q k v | ...]``) ->
    ``[Q | K | V]``. Works for a weight ``[3·H·D, hidden]`` or a bias ``[3·H·D]``."""
    tail = t.shape[1:]
    return t.reshape(num_heads, 3, head_size, *tail).transpose(0, 1).reshape(3 * num_heads * head_size, *tail)


def fuse(*parts: torch.Tensor | None) -> torch.Tensor | None:
    """Separate Q, K, V projections -> the fused tensor (None if they have no bias)."""
    if any(p is None for p in parts):
        return None
    return torch.cat([p.detach() for p in parts], dim=0)


def _conv1d(w: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; ours is ``[out, in]``."""
    return w.detach().t()


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with O(1)-scale random values, so attention scores are O(1)
    (HF's 0.02 init makes attention nearly uniform and hides position-embedding bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            if "relative_attention_bias" in name:
                std = 1.0
            elif type(_owner(model, name)).__name__ == "Conv1D":
                std = 1.0 / math.sqrt(p.shape[0])
            else:
                std = 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        else:  # norm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
@dataclass
class Oracle:
    name: str
    model: torch.nn.Module  # the whole tiny HF model (eval mode, fp32)
    attn: torch.nn.Module  # its input (args[0] or kwargs["hidden_states"]) is the attention input
    out: torch.nn.Module  # its output is the attention output after the dense projection (+ bias)
    config: AttentionConfig  # ours, global (unsharded) numbers
    weights: dict  # full weights: qkv_weight, dense_weight, qkv_bias, dense_bias, relative_table
    kind: str = "causal"  # causal (decoder self attention), encoder (BertAttention), cross
    layer_idx: int = 0  # HF layer index (for its cache)
    encoder_kwarg: str | None = None  # cross: the forward kwarg holding the encoder states
    uses_position_ids: bool = False  # whether the model takes position_ids (left padding needs them)
    max_len: int = 64


def bloom(num_heads: int = 12, head_size: int = 8, seed: int = 0) -> Oracle:
    """BLOOM: ALiBi, head-interleaved fused QKV, biases."""
    from transformers import BloomConfig, BloomModel

    hidden = num_heads * head_size
    cfg = BloomConfig(
        vocab_size=64, hidden_size=hidden, n_layer=1, n_head=num_heads, hidden_dropout=0.0, attention_dropout=0.0
    )
    model = _build(BloomModel, cfg)
    randomize(model, seed)
    a = model.h[0].self_attention
    w = dict(
        qkv_weight=deinterleave_qkv(a.query_key_value.weight.detach(), num_heads, head_size),
        qkv_bias=deinterleave_qkv(a.query_key_value.bias.detach(), num_heads, head_size),
        dense_weight=a.dense.weight.detach(),
        dense_bias=a.dense.bias.detach(),
    )
    ours = AttentionConfig(hidden_size=hidden, num_heads=num_heads, position_embedding=PositionEmbeddingType.alibi)
    return Oracle(f"bloom{num_heads}", model, a, a.dense, ours, w)


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


def gpt_neox(rotary_pct: float = 0.25, num_heads: int = 8, head_size: int = 16, seed: int = 3) -> Oracle:
    """GPT-NeoX: partial NeoX rotary, head-interleaved fused QKV, biases."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    hidden = num_heads * head_size
    cfg = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attention_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **rope_kwargs(partial=rotary_pct, neox_names=True),
    )
    model = _build(GPTNeoXModel, cfg)
    randomize(model, seed)
    a = model.layers[0].attention
    w = dict(
        qkv_weight=deinterleave_qkv(a.query_key_value.weight.detach(), num_heads, head_size),
        qkv_bias=deinterleave_qkv(a.query_key_value.bias.detach(), num_heads, head_size),
        dense_weight=a.dense.weight.detach(),
        dense_bias=a.dense.bias.detach(),
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        rotary_pct=rotary_pct,
        max_position_embeddings=64,
    )
    return Oracle(f"gpt_neox{int(rotary_pct * 100)}", model, a, a.dense, ours, w, uses_position_ids=True)


def gptj(num_heads: int = 4, head_size: int = 16, rotary_dim: int = 8, seed: int = 4) -> Oracle:
    """GPT-J: rotary on adjacent pairs of the first ``rotary_dim`` channels, no biases."""
    from transformers import GPTJConfig, GPTJModel

    hidden = num_heads * head_size
    cfg = GPTJConfig(
        vocab_size=64,
        n_embd=hidden,
        n_layer=1,
        n_head=num_heads,
        rotary_dim=rotary_dim,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = _build(GPTJModel, cfg)
    randomize(model, seed)
    a = model.h[0].attn
    w = dict(
        qkv_weight=fuse(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), dense_weight=a.out_proj.weight.detach()
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        position_embedding=PositionEmbeddingType.rope_gptj,
        rotary_pct=rotary_dim / head_size,
        qkv_bias=False,
        dense_bias=False,
        max_position_embeddings=64,
    )
    return Oracle("gptj", model, a, a.out_proj, ours, w, uses_position_ids=True)


def llama(
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_size: int = 16,
    *,
    scaling: str | None = None,
    factor: float = 2.0,
    max_positions: int = 64,
    bias: bool = True,
    seed: int = 5,
) -> Oracle:
    """Llama: GQA, NeoX rotary, optional linear / dynamic (NTK) scaling."""
    from transformers import LlamaConfig, LlamaModel

    hidden = num_heads * head_size
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_size,
        max_position_embeddings=max_positions,
        attention_bias=bias,
        **rope_kwargs(scaling=scaling, factor=factor),
    )
    model = _build(LlamaModel, cfg)
    randomize(model, seed)
    a = model.layers[0].self_attn
    w = dict(
        qkv_weight=fuse(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
        qkv_bias=fuse(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
        dense_weight=a.o_proj.weight.detach(),
        dense_bias=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
    )
    ours = AttentionConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        position_embedding=PositionEmbeddingType.rope_gpt_neox,
        max_position_embeddings=max_positions,
        rotary_scaling=RotaryScalingType(scaling or "none"),
        rotary_scaling_factor=factor if scaling else 1.0,
        qkv_bias=bias,
        dense_bias=bias,
    )
    name = "llama" + (f"_{scaling}" if scaling else "") + f"_h{num_heads}kv{num_kv_heads}"
    return Oracle(name, model, a, a.o_proj, ours, w, uses_position_ids=True)


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


# ---------------------------------------------------------------------------------------------
# Captured reference runs
# ---------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One forward of the attention layer inside the HF model."""

    hidden: torch.Tensor  # [B, S, hidden] the attention's input
    out: torch.Tensor  # [B, S, hidden] its output after the dense projection
    encoder: torch.Tensor | None = None  # cross attention: [B, S_enc, hidden] the encoder states


@dataclass
class Trace:
    """Calls of each captured oracle (by name) and cache snapshots ``(keys, values)`` after
    each model call (by oracle name; cross attention: its cross cache)."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    caches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [B, S_total] 1 = real token (left padding), if any


@contextlib.contextmanager
def capture(*oracles: Oracle):
    """Record every call of each oracle's attention: ``{name: [Call, ...]}``."""
    calls: dict[str, list[Call]] = {o.name: [] for o in oracles}
    pending: dict[str, dict] = {}
    handles = []
    for o in oracles:

        def pre(module, args, kwargs, o=o):
            hidden = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get(o.encoder_kwarg) if o.encoder_kwarg else None
            pending[o.name] = dict(
                hidden=hidden.detach().clone(), encoder=None if enc is None else enc.detach().clone()
            )

        def post(module, args, output, o=o):
            p = pending.pop(o.name)
            calls[o.name].append(Call(hidden=p["hidden"], out=output.detach().clone(), encoder=p["encoder"]))

        handles.append(o.attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(o.out.register_forward_hook(post))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _snapshot(cache, oracles: list[Oracle], caches: dict) -> None:
    for o in oracles:
        k, v = cache_kv(cache, o.layer_idx, cross=o.kind == "cross")
        caches.setdefault(o.name, []).append((k.detach().clone(), v.detach().clone()))


def random_ids(batch: int, length: int, seed: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_decoder(
    oracles: list[Oracle],
    ids: torch.Tensor,
    splits: list[int],
    *,
    mask: torch.Tensor | None = None,
    extra: dict | None = None,
) -> Trace:
    """Run a decoder-only HF model (``oracles`` share it) over ``ids [B, L]`` in calls of
    ``splits`` tokens with ``use_cache=True`` (e.g. ``[prompt, 1, 1, ...]``: prefill then
    decode). ``mask [B, L]`` (left padding): passed as ``attention_mask`` (grown per call), and
    position ids counting real tokens where the model takes them. ``extra``: kwargs for every
    call (GPT-2's ``encoder_hidden_states`` / ``encoder_attention_mask``)."""
    model = oracles[0].model
    assert sum(splits) == ids.shape[1], (splits, ids.shape)
    trace = Trace(mask=mask)
    pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, start = None, 0
    with capture(*oracles) as calls:
        for n in splits:
            kw = dict(extra or {})
            if mask is not None:
                kw["attention_mask"] = mask[:, : start + n]
                if oracles[0].uses_position_ids:
                    kw["position_ids"] = pos[:, start : start + n]
            res = model(input_ids=ids[:, start : start + n], past_key_values=cache, use_cache=True, **kw)
            cache = res.past_key_values
            _snapshot(cache, oracles, trace.caches)
            start += n
    trace.calls = calls
    return trace


@torch.no_grad()
def run_t5(
    oracles: dict[str, Oracle], enc_ids: torch.Tensor, enc_mask: torch.Tensor, dec_ids: torch.Tensor, splits: list[int]
) -> Trace:
    """T5: encode ``enc_ids`` (right padding ``enc_mask``), then run the decoder over ``dec_ids`` in
    ``splits`` (prefix, then one token per step) with the cache."""
    model = oracles["encoder"].model
    trace = Trace()
    dec = [oracles["decoder"], oracles["cross"]]
    cache, enc_out, start = None, None, 0
    with capture(*oracles.values()) as calls:
        for n in splits:
            kw = dict(
                attention_mask=enc_mask,
                decoder_input_ids=dec_ids[:, start : start + n],
                past_key_values=cache,
                use_cache=True,
            )
            if enc_out is None:
                res = model(input_ids=enc_ids, **kw)
                enc_out = (res.encoder_last_hidden_state,)
            else:
                res = model(encoder_outputs=enc_out, **kw)
            cache = res.past_key_values
            _snapshot(cache, dec, trace.caches)
            start += n
    trace.calls = calls
    return trace


@torch.no_grad()
def run_encoder(oracle: Oracle, ids: torch.Tensor, mask: torch.Tensor) -> Trace:
    """BERT: one encoder pass over right-padded ``ids`` with ``attention_mask=mask``."""
    with capture(oracle) as calls:
        oracle.model(input_ids=ids, attention_mask=mask)
    return Trace(calls=calls, mask=mask)
