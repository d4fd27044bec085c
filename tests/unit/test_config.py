"""AttentionConfig validation and derived numbers; head/tp combinations through sharding.head_layout.

Every invalid combination must raise ``ValueError`` whose message names the offending field.
"""

from __future__ import annotations

import math

import pytest
import torch

from tp_runtime.config import (
    AttentionConfig,
    AttentionMaskType,
    KVCacheDType,
    PositionEmbeddingType,
    RotaryScalingType,
)
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention, BertAttention
from tp_runtime.sharding import head_layout

BASE = dict(hidden_size=64, num_heads=8)


def cfg(**kw):
    return AttentionConfig(**{**BASE, **kw})


INVALID = [
    # (overrides, field named in the message)
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=-64), "hidden_size"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=3), "hidden_size"),  # 64 % 3 without an explicit head_size
    (dict(num_heads=8.0), "num_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=-2), "num_kv_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),  # 8 % 3
    (dict(num_kv_heads=16), "num_kv_heads"),  # more KV heads than query heads
    (dict(num_kv_heads=2.0), "num_kv_heads"),
    pytest.param(dict(num_kv_heads=True), "num_kv_heads"),
    (dict(head_size=0), "head_size"),
    (dict(head_size=-8), "head_size"),
    (dict(head_size=8.5), "head_size"),
    pytest.param(dict(head_size=True), "head_size"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2.0), "num_layers"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(dtype=torch.int8), "dtype"),
    (dict(q_scaling=0.0), "q_scaling"),
    (dict(q_scaling=-1.0), "q_scaling"),
    (dict(q_scaling=float("nan")), "q_scaling"),
    (dict(q_scaling=float("inf")), "q_scaling"),
    pytest.param(dict(q_scaling="1.0"), "q_scaling"),
    pytest.param(dict(q_scaling=None), "q_scaling"),
    (dict(position_embedding="rope"), "position_embedding"),
    (dict(position_embedding=None), "position_embedding"),
    (dict(mask_type="sliding"), "mask_type"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
    (dict(rotary_scaling="yarn", position_embedding="rope_gptj"), "rotary_scaling"),
    # RoPE
    (dict(position_embedding="rope_gptj", rotary_pct=0.0), "rotary_pct"),
    (dict(position_embedding="rope_gpt_neox", rotary_pct=1.5), "rotary_pct"),
    (dict(position_embedding="rope_gpt_neox", rotary_pct=-0.25), "rotary_pct"),
    (dict(position_embedding="rope_gpt_neox", rotary_pct=float("nan")), "rotary_pct"),
    (dict(position_embedding="rope_gptj", rotary_pct=0.1), "rotary_pct"),  # int(8 * 0.1) = 0
    (dict(position_embedding="rope_gptj", rotary_pct=0.375), "rotary_pct"),  # int(8 * 0.375) = 3, odd
    (dict(position_embedding="rope_gptj", rotary_base=0.0), "rotary_base"),
    (dict(position_embedding="rope_gptj", rotary_base=-10000.0), "rotary_base"),
    (dict(position_embedding="rope_gptj", rotary_base=float("nan")), "rotary_base"),
    (dict(position_embedding="rope_gptj", rotary_scaling="linear"), "rotary_scaling_factor"),  # factor 1.0
    (dict(position_embedding="rope_gptj", rotary_scaling="linear", rotary_scaling_factor=0.5), "rotary_scaling_factor"),
    (
        dict(position_embedding="rope_gptj", rotary_scaling="dynamic", rotary_scaling_factor=float("nan")),
        "rotary_scaling_factor",
    ),
    (
        dict(position_embedding="rope_gptj", rotary_scaling="dynamic", rotary_scaling_factor=2.0, rotary_pct=0.25),
        "rotary_pct",
    ),
    (dict(position_embedding="alibi", rotary_scaling="linear", rotary_scaling_factor=2.0), "rotary_scaling"),
    (
        dict(position_embedding="learned_absolute", rotary_scaling="dynamic", rotary_scaling_factor=2.0),
        "rotary_scaling",
    ),
    # relative
    (dict(position_embedding="relative", relative_num_buckets=1), "relative_num_buckets"),
    (dict(position_embedding="relative", relative_max_distance=0), "relative_max_distance"),
    # cross attention takes no position embedding
    (dict(cross_attention=True, position_embedding="rope_gptj"), "position_embedding"),
    (dict(cross_attention=True, position_embedding="alibi"), "position_embedding"),
    (dict(cross_attention=True, position_embedding="alibi_with_scale"), "position_embedding"),
    (dict(cross_attention=True, position_embedding="relative", relative_table=True), "position_embedding"),
    # FP8 projections need half-precision activations
    (dict(quant_mode="fp8_qdq", dtype=torch.float32), "quant_mode"),
]


@pytest.mark.parametrize("overrides,field", INVALID)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        cfg(**overrides)
    assert f"AttentionConfig.{field}=" in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "num_buckets,max_distance,causal", [(32, 8, False), (32, 4, False), (32, 16, True), (16, 1, True)]
)
def test_relative_max_distance_must_exceed_exact_buckets(num_buckets, max_distance, causal):
    """T5 buckets divide by log(max_distance / max_exact): max_distance <= max_exact (num_buckets/4 for
    encoders, /2 for decoders) gives inf/negative buckets that silently index the table from the end."""
    with pytest.raises(ValueError) as info:
        cfg(
            position_embedding="relative",
            relative_num_buckets=num_buckets,
            relative_max_distance=max_distance,
            mask_type="causal" if causal else "bidirectional",
        )
    assert "AttentionConfig.relative_max_distance=" in str(info.value)


def test_valid_config_normalises_and_derives():
    c = cfg(
        hidden_size=96,
        num_heads=6,
        num_kv_heads=2,
        position_embedding="rope_gpt_neox",
        rotary_pct=0.5,
        rotary_scaling="dynamic",
        rotary_scaling_factor=2.0,
        mask_type="causal",
        kv_cache_dtype="int8",
    )
    assert c.position_embedding is PositionEmbeddingType.rope_gpt_neox
    assert c.rotary_scaling is RotaryScalingType.dynamic
    assert c.mask_type is AttentionMaskType.causal
    assert c.kv_cache_dtype is KVCacheDType.int8
    assert c.head_size == 96 // 6
    assert c.rotary_dim == int(16 * 0.5)
    assert c.qkv_size == (6 + 2 * 2) * 16
    assert cfg().num_kv_heads == 8


def test_explicit_head_size_t5_style():
    c = AttentionConfig(hidden_size=40, num_heads=3, head_size=16, position_embedding="relative", q_scaling=1 / 4.0)
    assert c.head_size == 16 and c.qkv_size == 9 * 16
    assert c.softmax_scale == pytest.approx(1.0)  # T5: q_scaling = 1/√D means no scaling


@pytest.mark.parametrize("q_scaling", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("layer_scaling", [False, True])
@pytest.mark.parametrize("num_layers", [1, 5])
def test_softmax_scale(q_scaling, layer_scaling, num_layers):
    c = cfg(q_scaling=q_scaling, apply_query_key_layer_scaling=layer_scaling, num_layers=num_layers)
    d = 64 // 8
    want_q = q_scaling * (num_layers if layer_scaling else 1)
    assert c.effective_q_scaling == pytest.approx(want_q)
    assert c.softmax_scale == pytest.approx(1.0 / (want_q * math.sqrt(d)))


def test_rotary_dim_zero_without_rope():
    assert cfg(position_embedding="alibi").rotary_dim == 0


def test_config_is_frozen():
    c = cfg()
    with pytest.raises(AttributeError):
        c.num_heads = 4


# ---- head / tensor-parallel combinations (sharding.head_layout) ------------------------------


def _rule(h, kv, tp):
    """The GQA/MQA head rules (tp_runtime/sharding.py), written out: None if valid, else the fields the error names."""
    if h % tp:
        return ("num_heads=", "tp_size=")
    if h % kv:
        return ("num_heads=", "num_kv_heads=")
    if kv >= tp and kv % tp:
        return ("num_kv_heads=", "tp_size=")
    if kv < tp and tp % kv:
        return ("num_kv_heads=", "tp_size=")
    return None


COMBOS = [
    (h, kv, tp) for h in (1, 4, 6, 8, 12, 24, 40, 112) for kv in range(1, 13) for tp in (1, 2, 3, 4, 8) if kv <= h
]


@pytest.mark.parametrize("h,kv,tp", COMBOS)
def test_head_layout_rule(h, kv, tp):
    fields = _rule(h, kv, tp)
    if fields is not None:
        for rank in range(tp):
            with pytest.raises(ValueError) as info:
                head_layout(h, kv, tp, rank)
            msg = str(info.value)
            assert all(f in msg for f in fields), msg
        return
    owners = {}
    for rank in range(tp):
        lay = head_layout(h, kv, tp, rank)
        assert lay.num_heads_per_rank == h // tp
        assert list(lay.q_heads) == list(range(rank * h // tp, (rank + 1) * h // tp))
        if kv >= tp:
            assert list(lay.kv_heads) == list(range(rank * kv // tp, (rank + 1) * kv // tp))
        else:
            assert list(lay.kv_heads) == [rank // (tp // kv)]
        # every local query head reads the KV head its global head reads at tp=1
        for local, global_h in enumerate(lay.q_heads):
            kv_local = local // lay.group_size
            assert lay.kv_heads[kv_local] == global_h // (h // kv)
        for kv_h in lay.kv_heads:
            owners.setdefault(kv_h, []).append(rank)
    assert sorted(owners) == list(range(kv))
    assert all(len(r) == max(tp // kv, 1) for r in owners.values())


@pytest.mark.parametrize(
    "h,kv,tp,rank,needle",
    [
        (8, 8, 4, 4, "tp_rank"),
        (8, 8, 4, -1, "tp_rank"),
        (8, 8, 0, 0, "tp_size"),
        (0, 1, 1, 0, "num_heads"),
        (8, 0, 1, 0, "num_kv_heads"),
        (8, 8, 2.0, 0, "tp_size"),
    ],
)
def test_head_layout_bad_arguments(h, kv, tp, rank, needle):
    with pytest.raises(ValueError, match=needle):
        head_layout(h, kv, tp, rank)


class _RankComm(NoComm):
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


@pytest.mark.parametrize(
    "h,kv,tp,fields",
    [
        (12, 12, 8, ("num_heads=", "tp_size=")),  # TRT-LLM's ceil division took this and produced garbage
        (24, 6, 4, ("num_kv_heads=", "tp_size=")),
        (24, 3, 4, ("num_kv_heads=", "tp_size=")),
    ],
)
def test_layer_rejects_bad_head_tp_combination(h, kv, tp, fields):
    c = AttentionConfig(hidden_size=h * 4, num_heads=h, num_kv_heads=kv)
    for rank in range(tp):
        with pytest.raises(ValueError) as info:
            Attention(c, comm=_RankComm(rank, tp))
        assert all(f in str(info.value) for f in fields), str(info.value)


def test_layer_mode_checks_name_the_field():
    with pytest.raises(ValueError, match="mask_type"):
        Attention(cfg(mask_type="padding"), comm=NoComm())
    with pytest.raises(ValueError, match="mask_type"):
        BertAttention(cfg(mask_type="causal"), comm=NoComm())
    with pytest.raises(ValueError, match="RoPE"):
        BertAttention(cfg(mask_type="padding", position_embedding="rope_gptj"), comm=NoComm())
    with pytest.raises(ValueError, match="backend"):
        Attention(cfg(), comm=NoComm(), backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' needs a CUDA device"):
        Attention(cfg(), comm=NoComm(), backend="cuda")
