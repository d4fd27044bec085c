"""torch.nn.Module habits: moving a built layer is refused with the way out, weights are checked by
argument name, layers print what they hold, caches on another device and CUDA without CUDA are
refused in one line, head sizes are judged by the field that is wrong."""

from __future__ import annotations

import pytest
import torch

from tp_runtime import Attention, AttentionConfig, ColumnLinear, KVCache, NoComm, RowLinear, Step
from tp_runtime.backends.capabilities import check

CFG = AttentionConfig(hidden_size=64, num_heads=4, num_kv_heads=2, position_embedding="rope_gpt_neox")


def _layer() -> Attention:
    layer = Attention(CFG, comm=NoComm())
    g = torch.Generator().manual_seed(0)
    layer.load_weights(
        qkv_weight=torch.randn(CFG.qkv_size, 64, generator=g),
        dense_weight=torch.randn(64, 64, generator=g),
        qkv_bias=torch.zeros(CFG.qkv_size),
        dense_bias=torch.zeros(64),
    )
    return layer


@pytest.mark.parametrize("move", [lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("meta")])
def test_moving_a_built_layer_is_refused_with_the_way_out(move):
    for module in (_layer(), ColumnLinear(8, 16, comm=NoComm()), RowLinear(16, 8, comm=NoComm())):
        before = [(k, v.dtype, v.device, v.data_ptr()) for k, v in module.state_dict().items()]
        with pytest.raises(NotImplementedError, match="build a new one with device=... and the dtype"):
            move(module)
        assert [(k, v.dtype, v.device, v.data_ptr()) for k, v in module.state_dict().items()] == before


def test_a_move_that_changes_nothing_is_allowed():
    layer = _layer()
    assert layer.to("cpu") is layer and layer.float() is layer


def test_load_weights_names_the_argument():
    layer = _layer()
    rows = CFG.qkv_size
    with pytest.raises(ValueError, match=rf"^qkv_weight: expected shape \({rows}, 64\), got \(64, {rows}\)$"):
        layer.load_weights(qkv_weight=torch.zeros(64, rows), dense_weight=torch.zeros(64, 64),
                           qkv_bias=torch.zeros(rows), dense_bias=torch.zeros(64))  # fmt: skip
    with pytest.raises(ValueError, match=r"^dense_bias: expected shape \(64,\), got \(63,\)$"):
        layer.load_weights(qkv_weight=torch.zeros(rows, 64), dense_weight=torch.zeros(64, 64),
                           qkv_bias=torch.zeros(rows), dense_bias=torch.zeros(63))  # fmt: skip
    with pytest.raises(ValueError, match=r"^dense_weight: expected a floating-point tensor, got dtype torch.int64$"):
        layer.load_weights(qkv_weight=torch.zeros(rows, 64), dense_weight=torch.zeros(64, 64, dtype=torch.long),
                           qkv_bias=torch.zeros(rows), dense_bias=torch.zeros(64))  # fmt: skip


def test_repr_says_what_the_layer_holds():
    text = repr(_layer())
    assert "heads=4 of 4, kv_heads=2 of 2, head_size=16" in text and "backend=reference" in text, text
    assert "in_features=64, out_features=64, local_weight=(64, 64), bias=True" in text, text


def test_kv_cache_on_another_device_is_refused_at_first_use():
    layer = _layer()
    cache = KVCache(config=CFG, head_layout=layer.head_layout, num_layers=1, max_batch=1, max_seq_len=8, device="meta")
    with pytest.raises(ValueError, match=r"^kv_cache: expected a cache on the layer's device cpu, got meta$"):
        layer(torch.zeros(3, 64), Step(new_lens=[3]), cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match=r"^device: expected a device torch can use, got cuda but torch sees no CUDA"):
        Attention(CFG, comm=NoComm(), device="cuda")


def test_odd_head_size_with_rope_blames_head_size():
    with pytest.raises(ValueError, match=r"^AttentionConfig.head_size=63: rope_gpt_neox rotates pairs"):
        AttentionConfig(hidden_size=63, num_heads=1, position_embedding="rope_gpt_neox")
    with pytest.raises(ValueError, match=r"^AttentionConfig.rotary_pct=0.5: int\(head_size \* rotary_pct\)=31"):
        AttentionConfig(hidden_size=62, num_heads=1, position_embedding="rope_gpt_neox", rotary_pct=0.5)


@pytest.mark.parametrize("family", ["context", "decode"])
def test_unsupported_head_size_is_the_same_error_on_prefill_and_decode(family):
    with pytest.raises(NotImplementedError, match=r"head_size=72 \(supported: \[64, 80, 96, 128, 256\]\)"):
        check(family, dtype=torch.float16, head_size=72)
