"""The Hopper (sm_90a) context kernel against the reference backend, by the kernel accuracy rule
(tests/gpu/conftest.py): fresh random inputs, NaN-poisoned outputs and unused cache entries, odd
lengths, GQA/MQA, causal and padding masks, cached pasts, the LSE. Each test also checks that the
Hopper kernel, not the mma.sync fallback, served the call. Skipped unless the GPU is sm_90.

(tests/gpu/test_context.py runs on this kernel too wherever it serves the case.)
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU (sm_90)"
)

from tp_runtime.backends.base import AttentionSpec  # noqa: E402
from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.config import AttentionMaskType  # noqa: E402
from tp_runtime.position import alibi_slopes  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16

# (id, dtype, D, H, KV, mask, new_lens, past_lens, page size: None = contiguous cache; ALiBi?)
# fmt: off
CASES = [
    ("f16-d128-causal-odd", F16, 128, 4, 4, "causal", [1, 63, 129, 1000], None, None),
    ("bf16-d128-causal-gqa", BF16, 128, 8, 2, "causal", [1000, 129, 1], None, None),
    ("f16-d64-causal-mqa", F16, 64, 4, 1, "causal", [63, 1000, 1], None, None),
    ("bf16-d64-causal", BF16, 64, 2, 2, "causal", [129, 7, 300], None, None),
    ("f16-d128-padding", F16, 128, 4, 2, "padding", [1, 63, 129, 1000], None, None),
    ("bf16-d64-padding-mqa", BF16, 64, 4, 1, "padding", [1000, 65], None, None),
    ("bf16-d128-causal-past", BF16, 128, 4, 2, "causal", [97, 1, 300], [50, 1000, 3], None),
    ("f16-d64-padding-past", F16, 64, 2, 2, "padding", [33, 200], [129, 0], None),
    ("bf16-d128-causal-4097", BF16, 128, 2, 1, "causal", [4097], None, None),
    # paged: 16 pages per key block, a page per block (64: two), a block inside a larger page
    ("bf16-d128-causal-paged16-past", BF16, 128, 4, 2, "causal", [97, 1, 300], [50, 1000, 3], 16),
    ("f16-d64-causal-paged8-gqa", F16, 64, 8, 2, "causal", [1000, 129, 1], None, 8),
    ("f16-d128-padding-paged64", F16, 128, 4, 4, "padding", [1, 63, 129, 1000], None, 64),
    ("bf16-d64-causal-paged256-past", BF16, 64, 2, 1, "causal", [200, 33], [129, 300], 256),
    # ALiBi (the padding case also sees keys after the query: positive k - q)
    ("f16-d128-causal-alibi-past", F16, 128, 8, 8, "causal", [1, 300, 129], [0, 70, 1000], None, True),
    ("bf16-d64-padding-alibi-gqa-paged", BF16, 64, 4, 2, "padding", [63, 1000], [5, 0], 16, True),
]
CASES = [c if len(c) == 10 else (*c, False) for c in CASES]
# fmt: on

# the variants the cases launch (precompiled together by tests/gpu/conftest.py)
KERNEL_VARIANTS = list(
    {
        (c[1], c[2], c[5], c[9]): (
            "context_hopper",
            {"dtype": c[1], "head_size": c[2], "mask": c[5], "bias": "alibi" if c[9] else "none"},
        )
        for c in CASES
    }.values()
)


def _fallback(dtype, d, layout, max_new):
    from tp_runtime.backends.cuda_context import tile_shape

    v = {"dtype": dtype, "head_size": d, "mask": "causal", "bias": "none", "layout": layout, "cache": "auto"}
    return ("context", {**v, **tile_shape(d, causal=True, max_new_len=max_new)})


KERNEL_VARIANTS += [_fallback(F16, 128, "contiguous", 1000), _fallback(F16, 64, "paged", 100)]  # the fallback tests


@pytest.fixture
def hopper_calls(monkeypatch):
    """Count the calls the Hopper kernel serves (the fallback must not take them silently)."""
    from tp_runtime.backends import cuda_context

    calls = []
    real = cuda_context.context_hopper

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(cuda_context, "context_hopper", spy)
    return calls


def _run(case, gpu, seed):
    from tp_runtime.backends import cuda_common, cuda_context

    name, dtype, d, h, kv_h, mask, new, past, page, alibi = case
    gen = torch.Generator().manual_seed(seed)
    n = len(new)
    slots = tuple(torch.randperm(n + 2, generator=gen)[:n].tolist())
    step = Step(new_lens=new, past_lens=past, slots=slots, device="cuda")
    slopes = (alibi_slopes(h) * 1.5).cuda() if alibi else None  # BLOOM's slopes, scaled: non-trivial
    spec = AttentionSpec(mask=AttentionMaskType(mask), softmax_scale=1.0 / math.sqrt(d), alibi_slopes=slopes)
    kv = gpu.make_kv(
        layout="contiguous" if page is None else "paged", cache_dtype="auto", dtype=dtype, kv_heads=kv_h,
        head_size=d, slots=slots, lengths=step.total_lens, block_size=page or 16,
    )  # fmt: skip
    q = (torch.randn(step.num_tokens, h, d, device="cuda") * 1.5).to(dtype)
    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, tuple(range(step.num_seqs)), out, lse)
    torch.cuda.synchronize()
    return out, lse, q, kv, step, spec


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_context_hopper(case, gpu, poison_outputs, hopper_calls):
    seed = int(torch.randint(2**31 - 1, ()))  # fresh inputs every run; the seed is in any failure message
    torch.manual_seed(seed)
    out, lse, q, kv, step, spec = _run(case, gpu, seed)
    assert hopper_calls, f"{case[0]}: the Hopper kernel did not serve this case (capability table / serves())"
    err, pt_err = gpu.check_attention(out, lse, q, kv, step, spec, what=f"hopper {case[0]} (seed {seed})")
    print(f"hopper {case[0]}: max err {err:.2e} (torch {case[1]} {pt_err:.2e})")


# cases for a persistent grid of 3 CTAs, each serving many (tile, head) items of unequal work in
# turn: the K/V ring, the Q buffer's phases and the ping-pong turns run on across items (D 128; D 64
# has one item per CTA)
FEW_CTA_CASES = [c for c in CASES if c[2] == 128]


@pytest.mark.parametrize("case", FEW_CTA_CASES, ids=[c[0] for c in FEW_CTA_CASES])
def test_context_hopper_few_ctas(case, gpu, poison_outputs, hopper_calls, monkeypatch):
    from tp_runtime.backends import cuda_context_hopper as ch

    monkeypatch.setattr(ch, "MAX_CTAS", 3)
    seed = int(torch.randint(2**31 - 1, ()))
    torch.manual_seed(seed)
    out, lse, q, kv, step, spec = _run(case, gpu, seed)
    assert hopper_calls
    err, _ = gpu.check_attention(out, lse, q, kv, step, spec, what=f"hopper 3 CTAs {case[0]} (seed {seed})")
    print(f"hopper 3 CTAs {case[0]}: max err {err:.2e}")


def test_switch_forces_the_fallback(gpu, poison_outputs, hopper_calls, monkeypatch):
    """TP_RUNTIME_HOPPER_CONTEXT=0: the mma.sync kernel serves the same case, within the same rule."""
    monkeypatch.setenv("TP_RUNTIME_HOPPER_CONTEXT", "0")
    out, lse, q, kv, step, spec = _run(CASES[0], gpu, 1234)
    assert not hopper_calls
    gpu.check_attention(out, lse, q, kv, step, spec, what="fallback (TP_RUNTIME_HOPPER_CONTEXT=0)")


def test_unserved_case_stays_on_the_fallback(gpu, poison_outputs, hopper_calls):
    """Pages of fewer than 8 tokens are not served by the Hopper kernel: mma.sync takes them, correctly."""
    from tp_runtime.backends import cuda_common, cuda_context

    step = Step(new_lens=[100, 7], device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=0.125)
    kv = gpu.make_kv(
        layout="paged", cache_dtype="auto", dtype=F16, kv_heads=2, head_size=64, slots=step.slots,
        lengths=step.total_lens, block_size=4,
    )  # fmt: skip
    q = torch.randn(step.num_tokens, 2, 64, device="cuda").to(F16)
    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, (0, 1), out, lse)
    torch.cuda.synchronize()
    assert not hopper_calls
    gpu.check_attention(out, lse, q, kv, step, spec, what="4-token pages on the fallback")
