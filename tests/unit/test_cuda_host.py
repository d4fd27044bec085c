"""Host-side logic of the CUDA backend that needs no GPU: which kernel serves which sequence,
tile and split choices, the variants it asks the compile table for, and its argument checks.
(The kernels themselves are checked in tests/gpu; their variants compile in launch/check_kernels.)"""

from __future__ import annotations

import pytest
import torch

from tp_runtime.backends import compile as kc  # CuPy is imported lazily: these run without it
from tp_runtime.backends import cuda, cuda_context, cuda_decode, cuda_plan, cuda_prepare
from tp_runtime.backends.cuda_common import check_activation
from tp_runtime.batch.step import Step
from tp_runtime.resources import kernels_dir


def test_route_sends_generation_tokens_to_decode():
    step = Step(new_lens=[5, 1, 1, 3], past_lens=[0, 7, 0, 2])  # context, generation, 1-token prompt, chunk
    plan = cuda_plan.route(step, cross=False)
    assert (plan.context_ids, plan.decode_ids) == ((0, 2, 3), (1,))
    assert plan.n_keys == (5, 8, 1, 5) and plan.n_keys_dev.tolist() == [5, 8, 1, 5] and plan.max_keys == 8
    assert plan.max_slot == 3 and plan.context_max_new == 5
    assert cuda_plan.route(step, cross=False) is plan  # planned once per step, reused by every layer
    cross = Step(new_lens=[5, 1, 1, 3], past_lens=[0, 7, 0, 2], encoder_lens=[4, 6, 2, 9])
    plan = cuda_plan.route(cross, cross=True)
    assert (plan.context_ids, plan.decode_ids) == ((0, 3), (1, 2))  # cross: every one-token query decodes
    assert plan.n_keys == (4, 6, 2, 9) and plan.n_keys_dev.tolist() == [4, 6, 2, 9]


def test_prepare_head_groups():
    """Prefill: one block takes all of a token's heads; decode: a token's heads spread over blocks of
    at least one channel pair per thread; the groups always cover every head."""
    sms = 132
    assert cuda_prepare.heads_per_block(16384, 336, 128, sms) == 336
    assert cuda_prepare.heads_per_block(1, 336, 128, sms) == 4  # 256 threads / 64 pairs per head
    assert cuda_prepare.heads_per_block(1, 3, 128, sms) == 3
    for tokens in (1, 2, 7, 64, 100, 256, 1056, 5000):
        for heads, d in ((336, 128), (96, 128), (66, 64), (9, 96), (3, 256)):
            hpb = cuda_prepare.heads_per_block(tokens, heads, d, sms)
            groups = -(-heads // hpb)
            assert 1 <= hpb <= heads and (groups - 1) * hpb < heads
            assert hpb >= min(heads, 256 // (d // 2))  # a block has about one pair per thread, or all heads
            assert tokens * groups <= max(tokens, 8 * sms) + tokens  # no more blocks than ~8 per SM


def test_split_heuristic():
    """Wave efficiency on an H200 (132 SMs) and other SM counts (kernels/NOTES_decode.md, split sweep)."""
    sms = 132
    assert cuda_plan.choose_splits(sms * 4, 32768, sms, 4) == 1  # the GPU is already full
    assert cuda_plan.choose_splits(2048, 4096, sms, 4) == 1
    assert cuda_plan.choose_splits(8, 300, sms, 4) == 1  # too few keys to split
    assert cuda_plan.choose_splits(8, 2048, sms, 4) == 2048 // cuda_plan.MIN_KEYS_PER_SPLIT  # short: keys cap it
    # one 32k sequence: ~2 blocks per SM of ~1k keys each (GQA 8 KV heads; MHA 32 heads)
    assert cuda_plan.choose_splits(8, 32768, sms, 4) == 33
    assert cuda_plan.choose_splits(8, 32768, sms, 3) == 33  # fewer resident blocks: same target
    assert cuda_plan.choose_splits(32, 32768, sms, 4) == 8
    # a batch between one and two blocks per SM: splitting cannot fill the waves better
    assert cuda_plan.choose_splits(200, 32768, sms, 4) == 1
    assert cuda_plan.choose_splits(128, 8192, sms, 4) == 2  # 256 blocks, 97% of 2 per SM
    assert cuda_plan.choose_splits(1, 1 << 20, sms, 16) == 2 * sms  # MQA-like single block: 2 per SM
    assert cuda_plan.choose_splits(1, 1 << 20, 1000, 4) == cuda_plan.MAX_SPLITS
    # paged caches and the tensor-core path aim at 3 blocks per SM: GQA B 16 L 8k (128 blocks) 3 splits;
    # 32 blocks (e.g. MQA 64/1 B 16: 2 chunks of 32 heads) 12; one 32k GQA sequence 66 (4 whole per SM)
    assert cuda_plan.choose_splits(128, 8192, sms, 4, cuda_plan.BUSY_TARGET_BLOCKS_PER_SM) == 3
    assert cuda_plan.choose_splits(8, 32768, sms, 4, 3) == 66
    assert cuda_plan.choose_splits(32, 8192, sms, 3, 3) == 12
    assert cuda_plan.choose_splits(32, 8192, sms, 3) == 8  # contiguous: 2 per SM
    assert cuda_plan.choose_splits(128, 8192, sms, 2, 3) == 2  # the target never exceeds what is resident
    for n_sms in (1, 7, 80, 108, 132, 144):
        for per_sm in (1, 2, 3, 4, 8):
            for blocks in (1, 3, 8, 32, 100, 264, 1000):
                for keys in (1, 255, 512, 4096, 32768, 1 << 17):
                    s = cuda_plan.choose_splits(blocks, keys, n_sms, per_sm)
                    assert 1 <= s <= cuda_plan.MAX_SPLITS
                    if s > 1:  # never more than one resident wave, never splits under the key minimum
                        assert blocks * s <= n_sms * per_sm
                        assert keys // s >= cuda_plan.MIN_KEYS_PER_SPLIT
                        # more blocks per SM than the target only where that fills whole waves better
                        target = min(cuda_plan.TARGET_BLOCKS_PER_SM, per_sm)
                        load = -(-blocks * s // n_sms)
                        within = min(n_sms * target // blocks, keys // cuda_plan.MIN_KEYS_PER_SPLIT)
                        assert load <= target or s * target / load > within
    with pytest.raises(ValueError, match="sms"):
        cuda_plan.choose_splits(8, 32768, 0, 4)
    assert [cuda_decode.heads_per_block(g, 128) for g in (1, 3, 8, 12, 16, 24, 32, 71)] == [1, 4, 8, 16, 16, 32, 32, 32]
    assert [cuda_decode.heads_per_block(g, 256) for g in (1, 3, 8, 16, 32)] == [1, 4, 8, 8, 8]  # CUDA cores
    # the two-level split merge: one counter up to MERGE_GROUP splits, then one per group and the top one
    assert [cuda_decode.merge_counters(s) for s in (1, 16, 17, 33, 512)] == [1, 1, 3, 4, 33]
    # every head count the launcher picks is in the compile table; 16 and 32 heads only on tensor cores
    for d in (64, 80, 96, 128, 256):
        for g in (1, 2, 3, 8, 12, 32, 71):
            params = dict(dtype="float16", cache="int8", layout="paged", head_size=d)
            kc._resolve("decode", dict(params, heads=cuda_decode.heads_per_block(g, d)))
    with pytest.raises(NotImplementedError, match="need D <= 128"):
        kc._resolve("decode", dict(dtype="float16", cache="auto", layout="contiguous", head_size=256, heads=16))


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal,max_new", [(True, 512), (True, 16384), (False, 512)])
def test_context_tiles_are_in_the_compile_table(head_size, causal, max_new):
    tiles = cuda_context.tile_shape(head_size, causal=causal, max_new_len=max_new)
    params = dict(dtype=torch.float16, head_size=head_size, mask="causal", bias="none", layout="paged", cache="int8")
    kc._resolve("context", {**params, **tiles})  # raises NotImplementedError if the table lacks it


def test_separate_merge_for_blocks_of_16_heads_or_more():
    """16/32-head blocks (MQA 32/1, groups of 16) merge their splits by decode_merge_kernel; smaller
    blocks, one split or D 256 (8 heads per block at most) keep the in-kernel merge."""
    assert cuda_decode.separate_merge(32, 128, 2) and cuda_decode.separate_merge(16, 80, 512)
    assert not cuda_decode.separate_merge(32, 128, 1)
    assert not cuda_decode.separate_merge(8, 128, 64) and not cuda_decode.separate_merge(64, 256, 8)
    _, _, expr = kc._resolve("decode_merge", cuda_decode.merge_variant(torch.bfloat16, 80))
    assert expr == "tp::decode_merge_kernel<__nv_bfloat16, 80>"
    # the kernel's weight array holds MAX_SPLITS splits
    source = (kernels_dir() / "decode_attention.cu").read_text()
    assert f"constexpr int kMaxSplits = {cuda_plan.MAX_SPLITS};" in source


def test_unsupported_variants_list_what_is_supported():
    with pytest.raises(NotImplementedError, match="supported head_size values"):
        kc._resolve("decode", dict(dtype="float16", cache="auto", layout="paged", head_size=72, heads=4))
    with pytest.raises(NotImplementedError, match="head_size=72"):
        cuda_context.tile_shape(72)
    with pytest.raises(NotImplementedError, match="supported families"):
        kc.get_kernel("triton_attention")


def test_activation_checks_name_the_fix():
    with pytest.raises(TypeError, match="backend='reference'"):
        check_activation(torch.randn(2, 2), "qkv")
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_activation(torch.randn(2, 2).half(), "qkv")


@pytest.mark.parametrize(
    "kw",
    [
        dict(position_embedding="rope_gpt_neox", num_kv_heads=2),
        dict(position_embedding="alibi", kv_cache_dtype="int8"),
        dict(position_embedding="relative", mask_type="causal", kv_cache_dtype="fp8"),
        dict(position_embedding="relative", mask_type="causal", relative_table=False),
        dict(cross_attention=True),
    ],
)
def test_layer_variants_are_in_the_compile_table(kw):
    """What precompile asks for: every variant the layer can launch, each one the table supports."""
    from tp_runtime.config import AttentionConfig
    from tp_runtime.distributed.comm import NoComm
    from tp_runtime.layers.attention import Attention, BertAttention

    cfg = AttentionConfig(hidden_size=1024, num_heads=8, dtype=torch.bfloat16, **kw)
    layers = [Attention(cfg, comm=NoComm(), backend="reference")]
    if not cfg.cross_attention and not cfg.position_embedding.is_rope and not cfg.kv_cache_dtype.is_quantized:
        layers.append(BertAttention(AttentionConfig(**{**cfg.__dict__, "mask_type": "padding"}), comm=NoComm()))
    for layer in layers:
        variants = cuda.variants(layer.desc)
        families = {f for f, _ in variants}
        assert "prepare" in families and "context" in families
        assert ("decode" in families) == (not isinstance(layer, BertAttention))
        for family, params in variants:
            kc._resolve(family, params)


def test_hopper_context_kernel_choice(monkeypatch):
    """The sm_90a context kernel: on compute capability 9.x unless switched off; a Llama layer asks
    for its variant on Hopper only. (Which shapes it serves: tests/unit/test_hopper_context_selection.py.)"""
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.config import AttentionConfig
    from tp_runtime.distributed.comm import NoComm
    from tp_runtime.layers.attention import Attention

    assert ch.hopper_gpu((9, 0)) and not ch.hopper_gpu((8, 0)) and not ch.hopper_gpu((10, 0))
    monkeypatch.setenv(ch.ENV, "0")
    assert not ch.hopper_gpu((9, 0))
    monkeypatch.delenv(ch.ENV)
    cfg = AttentionConfig(hidden_size=1024, num_heads=8, dtype=torch.float16, num_kv_heads=2)
    desc = Attention(cfg, comm=NoComm(), backend="reference").desc
    on_hopper = [p for f, p in cuda.variants(desc, hopper=True) if f == "context_hopper"]
    assert on_hopper == [{"dtype": torch.float16, "head_size": 128, "mask": "causal", "bias": "none"}]
    assert not [f for f, _ in cuda.variants(desc) if f == "context_hopper"]


def test_hopper_context_grid_and_shared_memory(monkeypatch):
    """D 128 causal: a persistent grid of at most one CTA per SM (fewer under MAX_CTAS, one per item
    under ONE_ITEM_PER_CTA); full masks and D 64/256: one CTA per item. Every variant fits the 227 KB
    of an H100/H200 SM; the shapes follow HopperConsumers (kernels/context_hopper.cu)."""
    from tp_runtime.backends import cuda_context_hopper as ch

    assert ch.grid_ctas(128, True, 4096, 132) == 132 and ch.grid_ctas(128, True, 7, 132) == 7
    assert ch.grid_ctas(128, False, 4096, 132) == 4096
    assert ch.grid_ctas(64, True, 4096, 132) == 4096 and ch.grid_ctas(256, True, 4096, 132) == 4096
    monkeypatch.setattr(ch, "MAX_CTAS", 3)
    assert ch.grid_ctas(128, True, 4096, 132) == 3 and ch.grid_ctas(128, True, 2, 132) == 2
    monkeypatch.setattr(ch, "ONE_ITEM_PER_CTA", True)
    assert ch.grid_ctas(128, True, 4096, 132) == 4096
    monkeypatch.setattr(ch, "ONE_ITEM_PER_CTA", False)
    monkeypatch.setattr(ch, "MAX_CTAS", None)
    # key positions shifted across a persistent CTA's items stay in int32, else one CTA per item
    assert ch.grid_ctas(128, True, 4096, 132, max_keys=16384) == 132
    assert ch.grid_ctas(128, True, 8192 * 64, 132, max_keys=2**20) == 8192 * 64
    for d in (64, 128, 256):
        for bias in ("none", "alibi", "table"):
            assert ch.shared_bytes(d, bias) <= 227 * 1024, (d, bias)
    assert (ch.consumers(64), ch.consumers(64, "alibi"), ch.consumers(64, "table")) == (3, 2, 2)
    assert (ch.consumers(128), ch.consumers(256)) == (2, 2)
    assert (ch.block_n(64), ch.block_n(128), ch.block_n(256)) == (128, 128, 64)
    assert ch.shared_bytes(256) == (2 * 64 + 4 * 64) * 256 * 2 + 128 + 1024  # Q tiles double as O staging
    # K/V loads: the cp.async gather for small pages at D <= 128, TMA boxes otherwise
    from tp_runtime.batch.kv_cache import CacheLayout

    paged, contiguous = CacheLayout.paged, CacheLayout.contiguous
    assert ch.gathers(paged, 16, 128) and ch.gathers(paged, 8, 64) and ch.gathers(paged, 32, 128)
    assert not ch.gathers(paged, 64, 128) and not ch.gathers(paged, 16, 256) and not ch.gathers(contiguous, 16, 64)


def test_hopper_table_argument():
    """The HopperTable kernel parameter: 32 bytes, the fields at the kernel struct's offsets, and
    tables whose offsets overflow int32 left to the fallback."""
    import numpy as np

    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.backends.cuda_common import NO_BIAS_TABLE, BiasTable

    table = torch.zeros(3, 40)
    arg = ch.table_arg(BiasTable(table, 40, -1, 1, 19), 0.125)
    assert arg.shape == (1,) and arg.dtype.itemsize == 32
    raw = arg.view(np.uint8)
    assert int(raw[:8].view(np.uint64)[0]) == table.data_ptr()
    assert raw[8:24].view(np.int32).tolist() == [40, -1, 1, 19] and raw[24:28].view(np.float32)[0] == 8.0
    assert ch.table_arg(NO_BIAS_TABLE, 0.5).view(np.uint8)[24:28].view(np.float32)[0] == 2.0
    assert ch.table_fits(BiasTable(table, 40, -1, 1, 19)) and ch.table_fits(NO_BIAS_TABLE)
    assert not ch.table_fits(BiasTable(table, 2**31, 1, 1, 0))


def test_tensor_map_arguments_are_checked_before_the_driver():
    """cuda_tma.tiled_map rejects what TMA cannot do with a message, before importing cuda.bindings."""
    from tp_runtime.backends.cuda_tma import tiled_map

    with pytest.raises(ValueError, match="innermost at most 64"):
        tiled_map(0, torch.float16, (128, 10), (256,), (128, 10))  # 256-byte box row > 128-byte swizzle
    with pytest.raises(ValueError, match="multiples of 16"):
        tiled_map(0, torch.bfloat16, (64, 10), (120,), (64, 10))
    with pytest.raises(ValueError, match="rank-1 strides"):
        tiled_map(0, torch.float16, (64, 10, 3), (128,), (64, 10, 1))
    with pytest.raises(ValueError, match="not supported"):
        tiled_map(0, torch.float32, (64, 10), (256,), (32, 10))
