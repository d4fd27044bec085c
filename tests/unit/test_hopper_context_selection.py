"""Which context calls the Hopper (sm_90a) kernel takes, decided on the host (no GPU): the variant
per layer shape, the persistent grid, the compile table behind them and the variants a layer asks
for on a Hopper GPU. The kernel serves fp16/bf16, head sizes 64, 128 and 256, causal, padding and
bidirectional (ChatGLM) masks, no bias, ALiBi or a relative table (T5 buckets or an explicit bias,
both the kernel's "table"), contiguous and paged fp16/bf16 caches; the rest stays on mma.sync.
(The kernel's results: tests/gpu/test_context_hopper.py.)"""

from __future__ import annotations

import pytest
import torch

from tp_runtime.backends import compile as kc  # CuPy is imported lazily: these run without it
from tp_runtime.backends import cuda
from tp_runtime.backends import cuda_context_hopper as ch
from tp_runtime.batch.kv_cache import CacheLayout
from tp_runtime.config import KVCacheDType

HALF = (torch.float16, torch.bfloat16)
LAYOUTS = (CacheLayout.contiguous, CacheLayout.paged)
MASKS = ("causal", "padding", "bidirectional")
BIASES = ("none", "alibi", "table")


@pytest.mark.parametrize("d", [64, 128, 256])
def test_served_shapes_have_a_compiled_variant(d):
    """Every dtype × mask × bias at a served head size, on either cache layout (the layout is a kernel
    argument: one variant serves both), names a variant the compile table builds for sm_90a."""
    for dtype in HALF:
        for mask in MASKS:
            for bias in BIASES:
                want = {"dtype": dtype, "head_size": d, "mask": mask, "bias": bias}
                for layout in LAYOUTS:
                    assert ch.variant(dtype, d, mask, bias, KVCacheDType.auto, layout) == want, (want, layout)
                kc._resolve("context_hopper", want)
    assert kc.FAMILIES["context_hopper"].arch == "sm_90a"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unserved_shapes_stay_on_mma_sync(layout):
    """D 80/96 and int8/fp8 caches: no Hopper variant (the mma.sync kernel serves them)."""
    auto = KVCacheDType.auto
    for mask in MASKS:
        for bias in BIASES:
            for d in (80, 96):
                assert ch.variant(torch.float16, d, mask, bias, auto, layout) is None, (d, mask, bias)
            for cache in (KVCacheDType.int8, KVCacheDType.fp8):
                for d in (64, 128, 256):
                    assert ch.variant(torch.bfloat16, d, mask, bias, cache, layout) is None, (cache, d, mask, bias)


def test_persistent_grid_only_for_causal_d128():
    """Causal D 128 loops over work items on at most one CTA per SM; D 128 full masks, D 64 and D 256
    launch one CTA per item."""
    assert ch.persistent(128, True)
    assert not ch.persistent(128, False)
    for d in (64, 256):
        assert not ch.persistent(d, True) and not ch.persistent(d, False), d


def test_every_head_size_fits_an_sm():
    """Shared memory and threads per CTA within an H100/H200 SM (227 KB, 1024 threads)."""
    for d in (64, 128, 256):
        assert ch.shared_bytes(d) <= 227 * 1024, d
        assert ch.threads(d) <= 1024 and ch.threads(d) % 128 == 0, d


@pytest.mark.parametrize(
    "kw, mask, bias",
    [
        (dict(mask_type="bidirectional", position_embedding="rope_gptj"), "bidirectional", "none"),  # ChatGLM
        (dict(position_embedding="relative", mask_type="causal"), "causal", "table"),  # T5 decoder
        (dict(position_embedding="relative", mask_type="causal", relative_table=False), "causal", "table"),
        (dict(position_embedding="alibi", head_size=256, hidden_size=2048), "causal", "alibi"),
        (dict(head_size=256, hidden_size=2048, num_kv_heads=1), "causal", "none"),
    ],
)
def test_layer_asks_for_the_hopper_variant_on_hopper(kw, mask, bias):
    """cuda.variants: on a Hopper GPU a layer the kernel serves lists its variant for precompiling
    (elsewhere not)."""
    from tp_runtime.config import AttentionConfig
    from tp_runtime.distributed.comm import NoComm
    from tp_runtime.layers.attention import Attention

    cfg = AttentionConfig(**{"hidden_size": 1024, "num_heads": 8, "dtype": torch.float16, **kw})
    desc = Attention(cfg, comm=NoComm(), backend="reference").desc
    on_hopper = [p for f, p in cuda.variants(desc, hopper=True) if f == "context_hopper"]
    assert on_hopper == [{"dtype": torch.float16, "head_size": desc.head_size, "mask": mask, "bias": bias}]
    assert not [f for f, _ in cuda.variants(desc) if f == "context_hopper"]


def test_quantized_cache_layer_asks_for_no_hopper_variant():
    from tp_runtime.config import AttentionConfig
    from tp_runtime.distributed.comm import NoComm
    from tp_runtime.layers.attention import Attention

    for cache in ("int8", "fp8"):
        cfg = AttentionConfig(hidden_size=1024, num_heads=8, dtype=torch.bfloat16, kv_cache_dtype=cache)
        desc = Attention(cfg, comm=NoComm(), backend="reference").desc
        assert not [f for f, _ in cuda.variants(desc, hopper=True) if f == "context_hopper"], cache
