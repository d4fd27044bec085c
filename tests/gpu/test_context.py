"""The CUDA context (prefill) kernel against the reference backend, by the kernel accuracy rule.

Every case draws fresh random inputs, poisons unused cache entries and the outputs, and covers a
grid of dtypes, head sizes, GQA/MQA, masks, position biases, cache layouts and cache dtypes, odd
lengths (1, 7, 97, 1025, 4097) and batches mixing lengths and cached pasts.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tp_runtime.backends.base import AttentionSpec  # noqa: E402
from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.config import AttentionMaskType  # noqa: E402
from tp_runtime.position import alibi_slopes  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16

# (id, dtype, D, H, KV, mask, bias, layout, cache, new_lens, past_lens, encoder_lens, block_size)
# mask "cross" = cross attention (keys = encoder_lens, no causal mask);
# bias: none | alibi | relative (implicit T5 buckets) | explicit ([H, Q, K] table)
# fmt: off
CASES = [
    ("f16-d128-odd-lengths", F16, 128, 4, 4, "causal", "none", "contiguous", "auto", [1, 7, 97, 1025], None, None, 16),
    ("bf16-d128-4097", BF16, 128, 2, 2, "causal", "none", "contiguous", "auto", [4097], None, None, 16),
    ("bf16-d128-gqa-paged-past", BF16, 128, 8, 2, "causal", "none", "paged", "auto",
     [97, 1, 300, 64, 7], [0, 50, 1000, 129, 3], None, 16),
    ("f16-d64-mqa-paged-long", F16, 64, 4, 1, "causal", "none", "paged", "auto", [1025, 33], [0, 700], None, 64),
    ("bf16-d64-padding", BF16, 64, 4, 4, "padding", "none", "contiguous", "auto", [7, 129, 1], None, None, 16),
    ("f16-d80-alibi-past", F16, 80, 6, 6, "causal", "alibi", "contiguous", "auto", [200, 33, 1], [0, 100, 9], None, 16),
    ("bf16-d96-gqa-past", BF16, 96, 4, 2, "causal", "none", "contiguous", "auto", [97, 250], [3, 0], None, 16),
    ("f16-d256", F16, 256, 2, 2, "causal", "none", "contiguous", "auto", [130, 7], [0, 5], None, 16),
    ("bf16-d256-explicit-paged", BF16, 256, 2, 1, "padding", "explicit", "paged", "auto", [40, 9], None, None, 32),
    ("f16-d128-bidirectional", F16, 128, 4, 4, "bidirectional", "none", "contiguous", "auto",
     [50, 129, 1], None, None, 16),
    ("f16-d64-t5-encoder", F16, 64, 4, 4, "padding", "relative", "contiguous", "auto", [77, 7], None, None, 16),
    ("bf16-d64-t5-decoder-past", BF16, 64, 4, 4, "causal", "relative", "paged", "auto", [5, 40], [20, 0], None, 8),
    ("f16-d128-int8", F16, 128, 4, 2, "causal", "none", "contiguous", "int8", [97, 300], [10, 0], None, 16),
    ("bf16-d128-fp8-paged", BF16, 128, 4, 4, "causal", "none", "paged", "fp8", [1025, 33], [0, 70], None, 16),
    ("bf16-d80-alibi-int8-paged", BF16, 80, 4, 4, "causal", "alibi", "paged", "int8", [61, 2], [0, 30], None, 16),
    ("f16-d96-bidirectional-fp8", F16, 96, 2, 2, "bidirectional", "none", "contiguous", "fp8", [33], None, None, 16),
    ("f16-d64-cross", F16, 64, 4, 2, "cross", "none", "contiguous", "auto", [7, 1, 20], [0, 3, 0], [33, 0, 97], 16),
    ("bf16-d128-cross-paged-int8", BF16, 128, 4, 4, "cross", "none", "paged", "int8", [3, 1], [0, 0], [100, 5], 16),
]
# fmt: on


def _variant(dtype, d, mask, bias, layout, cache, new_lens=(1,)):
    from tp_runtime.backends.cuda_context import tile_shape

    return {
        **tile_shape(d, causal=mask == "causal", max_new_len=max(new_lens)),
        "dtype": dtype,
        "head_size": d,
        "mask": "padding" if mask == "cross" else mask,
        "bias": {"none": "none", "alibi": "alibi", "relative": "table", "explicit": "table"}[bias],
        "layout": layout,
        "cache": cache,
    }


KERNEL_VARIANTS = [("context", _variant(c[1], c[2], c[5], c[6], c[7], c[8], c[9])) for c in CASES]

# every tile shape the tables may pick (and the alternatives the benchmark sweeps) computes the same function
TILE_SHAPES = [
    (128, (4, 2, 64)), (128, (8, 2, 64)), (128, (8, 1, 64)), (128, (4, 2, 32)), (128, (8, 1, 128)),
    (64, (4, 2, 64)), (64, (8, 1, 128)), (64, (8, 2, 64)), (96, (8, 2, 64)), (256, (4, 1, 64)),
]  # fmt: skip


def _forced(d, cfg, dtype):
    w, mt, bn = cfg
    v = _variant(dtype, d, "causal", "none", "paged", "auto")
    return {**v, "warps": w, "m_tiles": mt, "block_n": bn}


KERNEL_VARIANTS += [("context", _forced(d, cfg, F16 if i % 2 else BF16)) for i, (d, cfg) in enumerate(TILE_SHAPES)]


def _spec(mask, bias, h, d, step, gen):
    cross = mask == "cross"
    mask_type = AttentionMaskType.padding if cross else AttentionMaskType(mask)
    kw = {}
    if bias == "alibi":
        kw["alibi_slopes"] = (alibi_slopes(h * 2)[::2] * 1.5).contiguous().cuda()  # non-trivial slopes
    elif bias == "relative":
        kw.update(relative_table=torch.randn(h, 32, generator=gen).cuda(), num_buckets=32, max_distance=128)
    elif bias == "explicit":
        q_max, k_max = max(step.total_lens) + 3, max(step.total_lens) + 2
        kw["relative_bias"] = torch.randn(h, q_max, k_max, generator=gen).cuda()
    return AttentionSpec(mask=mask_type, softmax_scale=1.0 / math.sqrt(d), cross=cross, **kw)


def context_all(q, kv, step, spec):
    """Every sequence of the step through the context kernel (one-token queries included), into
    outputs from the launchers' allocator (NaN-poisoned under ``poison_outputs``)."""
    from tp_runtime.backends import cuda_common, cuda_context

    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, tuple(range(step.num_seqs)), out, lse)
    return out, lse


def _check_case(case, gpu):
    name, dtype, d, h, kv_h, mask, bias, layout, cache, new, past, enc, block = case
    seed = int(torch.randint(2**31 - 1, ()))  # fresh inputs every run; the seed is in any failure message
    gen = torch.Generator().manual_seed(seed)
    n = len(new)
    slots = tuple(torch.randperm(n + 2, generator=gen)[:n].tolist())  # scattered slots
    step = Step(new_lens=new, past_lens=past, slots=slots, encoder_lens=enc, device="cuda")
    spec = _spec(mask, bias, h, d, step, gen)
    lengths = step.encoder_lens if spec.cross else step.total_lens
    kv = gpu.make_kv(
        layout=layout,
        cache_dtype=cache,
        dtype=dtype,
        kv_heads=kv_h,
        head_size=d,
        slots=slots,
        lengths=lengths,
        block_size=block,
    )
    q = (torch.randn(step.num_tokens, h, d, device="cuda") * 1.5).to(dtype)
    out, lse = context_all(q, kv, step, spec)
    torch.cuda.synchronize()
    err, pt_err = gpu.check_attention(out, lse, q, kv, step, spec, what=f"{name} (seed {seed})")
    print(f"{name}: max err {err:.2e} (torch {dtype} {pt_err:.2e})")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_context_kernel(case, gpu, poison_outputs):
    """On Hopper GPUs the sm_90a kernel serves the cases it can (tests/gpu/test_context_hopper.py)."""
    _check_case(case, gpu)


def _hopper_serves(case) -> bool:
    """Whether the Hopper kernel takes this case on an sm_90 GPU (its capability row and page minimum)."""
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.backends.capabilities import HOPPER_CONTEXT_MIN_PAGE
    from tp_runtime.batch.kv_cache import CacheLayout
    from tp_runtime.config import KVCacheDType

    _, dtype, d, _, _, mask, bias, layout, cache, *_, block = case
    if mask == "cross" or (layout == "paged" and block < HOPPER_CONTEXT_MIN_PAGE):
        return False
    kernel_bias = {"none": "none", "alibi": "alibi", "relative": "table", "explicit": "table"}[bias]
    return ch.variant(dtype, d, mask, kernel_bias, KVCacheDType(cache), CacheLayout(layout)) is not None


HOPPER_SERVED = [c for c in CASES if _hopper_serves(c)]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="elsewhere test_context_kernel runs these cases on the mma.sync kernel already",
)
@pytest.mark.parametrize("case", HOPPER_SERVED, ids=[c[0] for c in HOPPER_SERVED])
def test_context_kernel_on_mma_sync(case, gpu, poison_outputs, monkeypatch):
    """On a Hopper GPU, the cases the sm_90a kernel takes over, on the mma.sync kernel (the fallback,
    and the kernel of sm_80/sm_89 GPUs): its D 256, bidirectional, T5 and explicit-bias paths stay
    tested on the GPUs we run."""
    monkeypatch.setenv("TP_RUNTIME_HOPPER_CONTEXT", "0")
    _check_case(case, gpu)


@pytest.mark.parametrize("i", range(len(TILE_SHAPES)), ids=[f"d{d}-{w}x{mt}x{bn}" for d, (w, mt, bn) in TILE_SHAPES])
def test_tile_shapes(i, gpu, poison_outputs, monkeypatch):
    from tp_runtime.backends import cuda_context

    d, cfg = TILE_SHAPES[i]
    dtype = F16 if i % 2 else BF16
    monkeypatch.setenv("TP_RUNTIME_HOPPER_CONTEXT", "0")  # tile shapes are the mma.sync kernel's (on Hopper too)
    monkeypatch.setitem(cuda_context.TILES, d, cfg)
    monkeypatch.setattr(cuda_context, "TILES_WIDE", {})
    step = Step(new_lens=[300, 1, 77, 520], past_lens=[0, 40, 600, 3], slots=(3, 0, 1, 2), device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1 / math.sqrt(d))
    kv = gpu.make_kv(
        layout="paged", cache_dtype="auto", dtype=dtype, kv_heads=2, head_size=d, slots=step.slots,
        lengths=step.total_lens, block_size=16,
    )  # fmt: skip
    q = torch.randn(step.num_tokens, 4, d, device="cuda").to(dtype)
    out, lse = context_all(q, kv, step, spec)
    torch.cuda.synchronize()
    gpu.check_attention(out, lse, q, kv, step, spec, what=f"D {d} tiles {cfg}")


def test_context_repeatable_and_layer_reuse(gpu):
    """Two layers of one step reuse the step's plan (nothing new is planned); results are bitwise
    repeatable."""
    step = Step(new_lens=[333, 64], past_lens=[0, 17], device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=0.125)
    kv = gpu.make_kv(
        layout="contiguous",
        cache_dtype="auto",
        dtype=F16,
        kv_heads=4,
        head_size=128,
        slots=step.slots,
        lengths=step.total_lens,
    )
    q = torch.randn(step.num_tokens, 4, 128, device="cuda").to(F16)
    a, la = context_all(q, kv, step, spec)
    planned = dict(step.plans)
    b, lb = context_all(q, kv, step, spec)
    assert step.plans == planned, "the second layer must reuse the step's plan"
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_fp32_raises():
    from tp_runtime.backends import cuda

    step = Step(new_lens=[3], device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=0.125)
    with pytest.raises(TypeError, match="backend='reference'"):
        cuda.attend(torch.randn(3, 2, 64, device="cuda"), None, step, spec)


def test_beam_context_with_past_raises(gpu):
    ind = torch.zeros(1, 2, 16, dtype=torch.int32)
    step = Step(new_lens=[2, 2], past_lens=[3, 3], beam_width=2, cache_indirection=ind, device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=0.125)
    kv = gpu.make_kv(
        layout="contiguous",
        cache_dtype="auto",
        dtype=F16,
        kv_heads=2,
        head_size=64,
        slots=step.slots,
        lengths=step.total_lens,
    )
    with pytest.raises(NotImplementedError, match="beam"):
        context_all(torch.randn(4, 2, 64, device="cuda").to(F16), kv, step, spec)


def test_attend_mixed_step_with_decode(gpu, poison_outputs):
    """The whole attend (context kernel + decode kernel) on an in-flight batch."""
    from tp_runtime.backends import cuda

    step = Step(new_lens=[1, 97, 1, 1, 40], past_lens=[500, 0, 33, 4096, 7], slots=(4, 0, 2, 1, 3), device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1 / math.sqrt(128))
    kv = gpu.make_kv(
        layout="paged",
        cache_dtype="auto",
        dtype=BF16,
        kv_heads=2,
        head_size=128,
        slots=step.slots,
        lengths=step.total_lens,
        block_size=32,
    )
    q = torch.randn(step.num_tokens, 8, 128, device="cuda").to(BF16)
    out, lse = cuda.attend(q, kv, step, spec)
    torch.cuda.synchronize()
    gpu.check_attention(out, lse, q, kv, step, spec, what="mixed step")


KERNEL_VARIANTS += [
    ("context", _variant(F16, 128, "causal", "none", "contiguous", "auto")),
    ("context", _variant(BF16, 128, "causal", "none", "paged", "auto")),
]
