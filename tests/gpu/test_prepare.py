"""The fused CUDA prepare kernel (bias, RoPE, cache write, quantization) against the reference.

Both backends run on the same fresh random inputs and on identical NaN-poisoned caches. The
kernel follows the reference's arithmetic step by step (bias add rounded to the activation type,
fp64 angles, fp32 rotation without FMA contraction), so results agree to the last unit of the
dtype: only the fp32 cos/sin of the two libraries may differ by an ulp.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.config import PositionEmbeddingType, RotaryScalingType  # noqa: E402
from tp_runtime.position import RopeSpec  # noqa: E402
from tp_runtime.sharding import HeadLayout  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16
GPTJ, NEOX = PositionEmbeddingType.rope_gptj, PositionEmbeddingType.rope_gpt_neox
NONE, LINEAR, DYNAMIC = RotaryScalingType.none, RotaryScalingType.linear, RotaryScalingType.dynamic

# (id, dtype, D, H, KV, rope (style, rot, scaling, factor) or None, layout ("none": no cache), cache, bias)
# fmt: off
CASES = [
    ("f16-neox-full-contiguous", F16, 128, 4, 2, (NEOX, 128, NONE, 1.0), "contiguous", "auto", True),
    ("bf16-gptj-linear-paged", BF16, 64, 4, 4, (GPTJ, 64, LINEAR, 2.0), "paged", "auto", True),
    ("f16-neox-quarter-dynamic-int8", F16, 80, 2, 1, (NEOX, 20, DYNAMIC, 2.0), "contiguous", "int8", False),
    ("bf16-gptj-half-dynamic-fp8-paged", BF16, 128, 4, 4, (GPTJ, 64, DYNAMIC, 3.0), "paged", "fp8", True),
    ("f16-no-rope-no-cache", F16, 96, 3, 3, None, "none", "auto", True),
    ("bf16-no-rope-int8-paged", BF16, 64, 8, 2, None, "paged", "int8", True),
    ("bf16-neox-fp8-contiguous", BF16, 256, 2, 2, (NEOX, 256, NONE, 1.0), "contiguous", "fp8", False),
]
# fmt: on


def _rope(r):
    if r is None:
        return None
    style, rot, scaling, factor = r
    return RopeSpec(style, rot, 10000.0, scaling, factor, 64)  # max_positions 64: dynamic NTK kicks in


def _variant(dtype, rope, layout, cache):
    from tp_runtime.backends.cuda_prepare import variant

    class _KV:  # the two fields variant() reads
        def __init__(self):
            from tp_runtime.batch.kv_cache import CacheLayout
            from tp_runtime.config import KVCacheDType

            self.cache_dtype, self.cache_layout = KVCacheDType(cache), CacheLayout(layout)

    return variant(dtype, _rope(rope), None if layout == "none" else _KV())


KERNEL_VARIANTS = [("prepare", _variant(c[1], c[5], c[6], c[7])) for c in CASES]


def _ulp_close(got, ref, dtype, what):
    """|got − ref| <= one unit in the last place of the dtype at ref (NaN only where ref is NaN)."""
    got, ref = got.float(), ref.float()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN pattern differs (unwritten or stray write)"
    ok = ~torch.isnan(ref)
    eps = torch.finfo(dtype).eps
    tol = eps * ref[ok].abs() + torch.finfo(dtype).tiny
    diff = (got[ok] - ref[ok]).abs()
    bad = diff > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ by more than 1 ulp (max {diff.max().item():.3e})"
    return int((diff > 0).sum())


# New tokens per sequence: a mixed step (a few hundred tokens: few blocks per token) and a decode
# step (one token each: the launcher splits each token's heads over many blocks, the last group
# partly empty where the head count is not a multiple of the group).
STEPS = {"mixed": [1, 7, 97, 300], "decode": [1, 1, 1, 1]}


@pytest.mark.parametrize("new_kind", STEPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prepare_kernel(case, new_kind, gpu, poison_outputs):
    from tp_runtime.backends import cuda_prepare as cuda
    from tp_runtime.backends import reference
    from tp_runtime.batch.kv_cache import LayerKV

    name, dtype, d, h, kv_h, rope_t, layout, cache, with_bias = case
    seed = int(torch.randint(2**31 - 1, ()))
    torch.manual_seed(seed)
    new, past = STEPS[new_kind], [0, 5, 100, 3000]
    slots = (2, 0, 4, 1)
    step = Step(new_lens=new, past_lens=past, slots=slots, device="cuda")
    hl = HeadLayout(num_heads=h, num_kv_heads=kv_h, tp_size=1, tp_rank=0)
    width = (h + 2 * kv_h) * d
    qkv = (torch.randn(step.num_tokens, width, device="cuda") * 2).to(dtype)
    bias = (torch.randn(width, device="cuda") * 0.5).to(dtype) if with_bias else None
    rope = _rope(rope_t)
    kv_ref = kv_got = None
    if layout != "none":
        base = gpu.make_kv(
            layout=layout,
            cache_dtype=cache,
            dtype=dtype,
            kv_heads=kv_h,
            head_size=d,
            slots=slots,
            lengths=step.past_lens,
            capacity=step.total_lens,
            block_size=32,
        )
        kv_ref = base
        kv_got = LayerKV(base.cache_layout, base.data.clone(), base.cache_dtype, base.dequant_scale, base.block_table)
    common = dict(head_layout=hl, head_size=d, rope=rope)
    q_ref = reference.prepare(qkv, bias, step, kv=kv_ref, **common)
    q = cuda.prepare(qkv, bias, step, kv=kv_got, **common)
    torch.cuda.synchronize()
    what = f"{name} {new_kind} (seed {seed})"
    flips = _ulp_close(q, q_ref, dtype, f"{what} q")
    assert flips <= 1e-3 * q.numel(), f"{what}: {flips} one-ulp differences (cos/sin only)"
    if kv_got is None:
        return
    got, ref = kv_got.data, kv_ref.data
    if cache == "int8":
        diff = (got.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"{what}: int8 cache differs"
    elif cache == "fp8":
        g, r = got.float(), ref.float()
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{what}: fp8 cache NaN pattern differs"
        ok = ~torch.isnan(r)
        assert ((g[ok] - r[ok]).abs() <= 0.125 * r[ok].abs() + 2.0**-9).all(), f"{what}: fp8 cache differs"
    else:
        _ulp_close(got, ref, dtype, f"{what} cache")
