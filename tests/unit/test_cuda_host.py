"""Host-side logic of the CUDA backend that needs no GPU: which kernel serves which sequence,
tile and split choices, the variants it asks the compile table for, and its argument checks.
(The kernels themselves are checked in tests/gpu; their variants compile in launch/check_kernels.)"""

from __future__ import annotations

import pytest
import torch

from tp_runtime.backends import compile as kc  # CuPy is imported lazily: these run without it
from tp_runtime.backends import cuda, cuda_decode
from tp_runtime.backends.base import AttentionSpec
from tp_runtime.backends.cuda_common import check_activation
from tp_runtime.config import AttentionMaskType
from tp_runtime.step import Step


def test_route_sends_generation_tokens_to_decode():
    step = Step(new_lens=[5, 1, 1, 3], past_lens=[0, 7, 0, 2])  # context, generation, 1-token prompt, chunk
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1.0)
    assert cuda.route(step, spec) == ([0, 2, 3], [1])
    assert cuda.route(step, spec, decode_available=False) == ([0, 1, 2, 3], [])
    cross = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1.0, cross=True)
    assert cuda.route(step, cross) == ([0, 3], [1, 2])  # cross: every one-token query decodes


def test_split_heuristic():
    resident = 132 * 4
    assert cuda_decode.choose_splits(resident, 32768, resident) == 1  # the GPU is already full
    assert cuda_decode.choose_splits(8, 300, resident) == 1  # too few keys to split
    s = cuda_decode.choose_splits(8, 32768, resident)
    assert 1 < s <= min(resident // 8, 32768 // cuda_decode.MIN_KEYS_PER_SPLIT, cuda_decode.MAX_SPLITS)
    assert [cuda_decode.heads_per_block(g) for g in (1, 2, 3, 4, 8, 32)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal,max_new", [(True, 512), (True, 16384), (False, 512)])
def test_context_tiles_are_in_the_compile_table(head_size, causal, max_new):
    tiles = cuda.context_tiles(head_size, causal=causal, max_new_len=max_new)
    params = dict(dtype=torch.float16, head_size=head_size, mask="causal", bias="none", layout="paged", cache="int8")
    kc._resolve("context", {**params, **tiles})  # raises NotImplementedError if the table lacks it


def test_unsupported_variants_list_what_is_supported():
    with pytest.raises(NotImplementedError, match="supported head_size values"):
        kc._resolve("decode", dict(dtype="float16", cache="auto", layout="paged", head_size=72, heads=4))
    with pytest.raises(NotImplementedError, match="head sizes"):
        cuda.context_tiles(72)
    with pytest.raises(NotImplementedError, match="supported families"):
        kc.get_kernel("triton_attention")


def test_activation_checks_name_the_fix():
    with pytest.raises(TypeError, match="backend='reference'"):
        check_activation(torch.randn(2, 2), "qkv")
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_activation(torch.randn(2, 2).half(), "qkv")
