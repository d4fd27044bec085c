"""The Hopper (sm_90a) context kernel against the reference backend, by the kernel accuracy rule
(tests/gpu/conftest.py): fresh random inputs, NaN-poisoned outputs and unused cache entries, odd
lengths, head sizes 64/128/256, GQA/MQA, causal, padding and bidirectional (ChatGLM) masks, cached
pasts, contiguous and paged caches, ALiBi, T5 relative tables (implicit buckets and explicit
biases), the LSE. Each test also checks that the Hopper kernel, not the mma.sync fallback, served
the call, and with how many CTAs. Skipped unless the GPU is sm_90.

(tests/gpu/test_context.py runs on this kernel too wherever it serves the case.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU (sm_90)"
)

from tp_runtime.backends import cuda_context_hopper  # noqa: E402
from tp_runtime.backends.base import AttentionSpec  # noqa: E402
from tp_runtime.batch.kv_cache import CacheLayout  # noqa: E402
from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.config import AttentionMaskType  # noqa: E402
from tp_runtime.position import alibi_slopes  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16

# the kernel's bias parameter per test bias: T5 buckets and explicit biases are both a table
KERNEL_BIAS = {"none": "none", "alibi": "alibi", "t5": "table", "explicit": "table"}


@dataclass(frozen=True)
class Case:
    """One call of the context kernel: every sequence of a step, fresh inputs."""

    name: str
    dtype: torch.dtype
    d: int  # head size
    h: int  # query heads
    kv: int  # KV heads (h: MHA, < h: GQA, 1: MQA)
    mask: str  # causal | padding | bidirectional
    new: tuple[int, ...]  # new tokens per sequence
    past: tuple[int, ...] | None = None  # cached tokens per sequence (None: none)
    page: int | None = None  # tokens per page of a paged cache; None: contiguous
    bias: str = "none"  # none | alibi | t5 (implicit buckets) | explicit ([H, Q, K] table)
    # T5: (num_buckets, max_distance); the buckets are bidirectional unless the mask is causal
    t5: tuple[int, int] = (32, 128)


# fmt: off
CASES = [
    Case("f16-d128-causal-odd", F16, 128, 4, 4, "causal", (1, 63, 129, 1000)),
    Case("bf16-d128-causal-gqa", BF16, 128, 8, 2, "causal", (1000, 129, 1)),
    Case("f16-d64-causal-mqa", F16, 64, 4, 1, "causal", (63, 1000, 1)),
    Case("bf16-d64-causal", BF16, 64, 2, 2, "causal", (129, 7, 300)),
    Case("f16-d128-padding", F16, 128, 4, 2, "padding", (1, 63, 129, 1000)),
    Case("bf16-d64-padding-mqa", BF16, 64, 4, 1, "padding", (1000, 65)),
    Case("bf16-d128-causal-past", BF16, 128, 4, 2, "causal", (97, 1, 300), (50, 1000, 3)),
    Case("f16-d64-padding-past", F16, 64, 2, 2, "padding", (33, 200), (129, 0)),
    Case("bf16-d128-causal-4097", BF16, 128, 2, 1, "causal", (4097,)),
    # paged: 16 pages per key block, a page per block (64: two), a block inside a larger page
    Case("bf16-d128-causal-paged16-past", BF16, 128, 4, 2, "causal", (97, 1, 300), (50, 1000, 3), 16),
    Case("f16-d64-causal-paged8-gqa", F16, 64, 8, 2, "causal", (1000, 129, 1), None, 8),
    Case("f16-d128-padding-paged64", F16, 128, 4, 4, "padding", (1, 63, 129, 1000), None, 64),
    Case("bf16-d128-causal-paged32-gqa-past", BF16, 128, 8, 2, "causal", (300, 33, 1), (0, 97, 64), 32),
    Case("bf16-d64-causal-paged256-past", BF16, 64, 2, 1, "causal", (200, 33), (129, 300), 256),
    # ALiBi (the padding case also sees keys after the query: positive k - q)
    Case("f16-d128-causal-alibi-past", F16, 128, 8, 8, "causal", (1, 300, 129), (0, 70, 1000), None, "alibi"),
    Case("bf16-d64-padding-alibi-gqa-paged", BF16, 64, 4, 2, "padding", (63, 1000), (5, 0), 16, "alibi"),
    # D 256
    Case("f16-d256-causal-odd", F16, 256, 2, 2, "causal", (1, 63, 129, 700)),
    Case("bf16-d256-padding-gqa", BF16, 256, 4, 2, "padding", (300, 7, 1)),
    Case("f16-d256-causal-mqa-past", F16, 256, 4, 1, "causal", (97, 1, 200), (50, 600, 3)),
    Case("bf16-d256-padding-past", BF16, 256, 2, 2, "padding", (33, 200), (129, 0)),
    Case("bf16-d256-causal-paged16-past", BF16, 256, 4, 2, "causal", (97, 1, 300), (50, 700, 3), 16),
    Case("f16-d256-padding-paged64-gqa", F16, 256, 4, 2, "padding", (1, 63, 129, 500), None, 64),
    Case("bf16-d256-causal-paged256-past", BF16, 256, 2, 1, "causal", (200, 33), (129, 300), 256),
    Case("f16-d256-causal-alibi-past", F16, 256, 4, 4, "causal", (1, 300, 129), (0, 70, 500), None, "alibi"),
    Case("bf16-d256-padding-alibi-paged16", BF16, 256, 2, 2, "padding", (63, 400), (5, 0), 16, "alibi"),
    # bidirectional (ChatGLM): the last key of a sequence is hidden from its earlier queries; one-token
    # sequences (with and without a past) are their own last key
    Case("f16-d64-bidir-odd", F16, 64, 4, 4, "bidirectional", (1, 63, 129, 1000)),
    Case("bf16-d64-bidir-mqa-paged64-past", BF16, 64, 4, 1, "bidirectional", (33, 1, 200), (129, 40, 0), 64),
    Case("bf16-d128-bidir-gqa-past", BF16, 128, 8, 2, "bidirectional", (97, 1, 300), (50, 1000, 3)),
    Case("f16-d128-bidir-paged16", F16, 128, 4, 4, "bidirectional", (1000, 7, 1), None, 16),
    Case("f16-d256-bidir-past", F16, 256, 2, 2, "bidirectional", (200, 1, 33), (129, 0, 7)),
    Case("bf16-d256-bidir-gqa-paged256", BF16, 256, 4, 2, "bidirectional", (1, 300), (60, 0), 256),
    # n_keys a whole number of key blocks (128; 64 at D 256): the block holding the last key is the
    # last full one, masked only for the bidirectional column (n_open one key earlier)
    Case("f16-d64-bidir-whole-blocks", F16, 64, 2, 2, "bidirectional", (128, 256), (0, 0)),
    Case("bf16-d128-bidir-whole-blocks-past", BF16, 128, 4, 2, "bidirectional", (200, 1), (56, 383)),
    Case("f16-d256-bidir-whole-blocks-paged32", F16, 256, 2, 1, "bidirectional", (64, 100), (0, 28), 32),
    # T5 implicit buckets: causal masks take one-sided buckets, the others two-sided; distances past
    # max_distance (and, with few buckets, nearer ones) share the last buckets
    Case("f16-d64-causal-t5", F16, 64, 4, 4, "causal", (1, 63, 129, 1000), None, None, "t5"),
    Case("bf16-d64-padding-t5-gqa-paged16-past", BF16, 64, 4, 2, "padding", (300, 7, 1), (0, 90, 33), 16, "t5",
         (16, 40)),
    Case("f16-d128-causal-t5-past", F16, 128, 4, 2, "causal", (97, 1, 300), (50, 1000, 3), None, "t5"),
    Case("bf16-d128-padding-t5", BF16, 128, 4, 4, "padding", (1, 63, 129, 700), None, None, "t5", (8, 20)),
    Case("f16-d128-causal-t5-paged64-mqa", F16, 128, 4, 1, "causal", (500, 33), (3, 200), 64, "t5", (16, 40)),
    Case("bf16-d128-bidir-t5-past", BF16, 128, 2, 2, "bidirectional", (65, 200), (40, 0), None, "t5"),
    Case("bf16-d256-causal-t5-past", BF16, 256, 2, 2, "causal", (97, 1, 200), (50, 600, 3), None, "t5", (8, 20)),
    Case("f16-d256-padding-t5-paged16", F16, 256, 4, 2, "padding", (300, 7, 1), None, 16, "t5"),
    # explicit relative bias [H, >= query positions, >= keys], by absolute positions (past included)
    Case("bf16-d128-causal-explicit-past", BF16, 128, 4, 2, "causal", (97, 1, 300), (50, 600, 3), None, "explicit"),
    Case("f16-d128-padding-explicit-paged16", F16, 128, 4, 4, "padding", (1, 63, 129, 500), None, 16, "explicit"),
    Case("f16-d256-padding-explicit-gqa-past", F16, 256, 4, 2, "padding", (33, 200), (129, 0), None, "explicit"),
    Case("bf16-d256-causal-explicit-paged64", BF16, 256, 2, 2, "causal", (300, 1, 64), (0, 100, 7), 64, "explicit"),
]
# fmt: on

# the variants the cases and the bidirectional-mask test launch (precompiled together by
# tests/gpu/conftest.py)
_HOPPER = dict.fromkeys(
    [(c.dtype, c.d, c.mask, KERNEL_BIAS[c.bias]) for c in CASES]
    + [(F16, d, "bidirectional", "none") for d in (64, 128, 256)]
)
KERNEL_VARIANTS = [
    ("context_hopper", {"dtype": dt, "head_size": d, "mask": mask, "bias": bias}) for dt, d, mask, bias in _HOPPER
]


def _fallback(dtype, d, layout, max_new, cache="auto"):
    from tp_runtime.backends.cuda_context import tile_shape

    v = {"dtype": dtype, "head_size": d, "mask": "causal", "bias": "none", "layout": layout, "cache": cache}
    return ("context", {**v, **tile_shape(d, causal=True, max_new_len=max_new)})


# the fallback tests
KERNEL_VARIANTS += [_fallback(F16, 128, "contiguous", 1000), _fallback(F16, 64, "paged", 100)]
KERNEL_VARIANTS += [_fallback(BF16, 128, "contiguous", 300, cache) for cache in ("int8", "fp8")]


@pytest.fixture
def hopper_launches(monkeypatch):
    """The grid and the gather flag of every launch of the Hopper kernel (the fallback must not take a
    case silently, and small pages must take the path ``gathers`` chose)."""
    from tp_runtime.backends import cuda_context_hopper as ch

    grids = []
    real = ch.launch

    def spy(kernel, grid, block, args, *rest, **kw):
        grids.append((tuple(grid), int(args[-1])))  # the grid, and the kernel's `gather` flag (last)
        return real(kernel, grid, block, args, *rest, **kw)

    monkeypatch.setattr(ch, "launch", spy)
    return grids


def _spec(case: Case, step: Step, gen: torch.Generator) -> AttentionSpec:
    kw = {}
    if case.bias == "alibi":
        kw["alibi_slopes"] = (alibi_slopes(case.h) * 1.5).cuda()  # BLOOM's slopes, scaled: non-trivial
    elif case.bias == "t5":
        buckets, max_distance = case.t5
        table = torch.randn(case.h, buckets, generator=gen) * 2  # T5-sized biases: they move the softmax
        kw.update(relative_table=table.cuda(), num_buckets=buckets, max_distance=max_distance)
    elif case.bias == "explicit":
        q_max = k_max = max(step.total_lens)  # larger than needed: the kernel must use the table's strides
        kw["relative_bias"] = (torch.randn(case.h, q_max + 3, k_max + 2, generator=gen) * 2).cuda()
    return AttentionSpec(mask=AttentionMaskType(case.mask), softmax_scale=1.0 / math.sqrt(case.d), **kw)


def _run(case: Case, gpu, seed: int):
    from tp_runtime.backends import cuda_common, cuda_context

    gen = torch.Generator().manual_seed(seed)
    n = len(case.new)
    slots = tuple(torch.randperm(n + 2, generator=gen)[:n].tolist())
    step = Step(new_lens=list(case.new), past_lens=case.past and list(case.past), slots=slots, device="cuda")
    spec = _spec(case, step, gen)
    kv = gpu.make_kv(
        layout="contiguous" if case.page is None else "paged", cache_dtype="auto", dtype=case.dtype,
        kv_heads=case.kv, head_size=case.d, slots=slots, lengths=step.total_lens, block_size=case.page or 16,
    )  # fmt: skip
    q = (torch.randn(step.num_tokens, case.h, case.d, device="cuda") * 1.5).to(case.dtype)
    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, tuple(range(step.num_seqs)), out, lse)
    torch.cuda.synchronize()
    return out, lse, q, kv, step, spec


def _items(case: Case, step: Step) -> int:
    """Work items (query tile, head) of the case's launch."""
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.backends.cuda_plan import context_tiles

    rows = ch.block_m(case.d, KERNEL_BIAS[case.bias])  # (D 64 with a bias: 2 consumer warpgroups, not 3)
    tiles = context_tiles(step, tuple(range(step.num_seqs)), rows, case.mask == "causal", False)
    return tiles.shape[0] * case.h


def _check(case: Case, gpu, hopper_launches, what: str):
    """Run the case on fresh inputs (the seed is in any failure message), check that the Hopper kernel
    served it in one launch and its outputs against the reference; returns that launch's (grid,
    gather flag), the step and q."""
    seed = int(torch.randint(2**31 - 1, ()))
    torch.manual_seed(seed)
    out, lse, q, kv, step, spec = _run(case, gpu, seed)
    assert len(hopper_launches) == 1, f"{case.name}: the Hopper kernel did not serve this case (capability table)"
    err, pt_err = gpu.check_attention(out, lse, q, kv, step, spec, what=f"{what} {case.name} (seed {seed})")
    print(f"{what} {case.name}: max err {err:.2e} (torch {case.dtype} {pt_err:.2e})")
    return hopper_launches[0], step, q


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_context_hopper(case, gpu, poison_outputs, hopper_launches):
    from tp_runtime.backends import cuda_common
    from tp_runtime.backends import cuda_context_hopper as ch

    ((ctas, _, _), gather), step, q = _check(case, gpu, hopper_launches, "hopper")
    items = _items(case, step)
    layout = CacheLayout.contiguous if case.page is None else CacheLayout.paged
    assert gather == ch.gathers(layout, case.page or 0, case.d), f"{case.name}: gather flag {gather}"
    if ch.persistent(case.d, case.mask == "causal"):  # causal D 128: at most one CTA per SM
        assert 1 <= ctas <= min(items, cuda_common.sm_count(q.device)), f"{case.name}: {ctas} CTAs, {items} items"
    else:  # one CTA per work item
        assert ctas == items, f"{case.name}: {ctas} CTAs for {items} work items"


# cases for a persistent grid of 3 CTAs, each serving many (tile, head) items of unequal work in
# turn: the K/V ring, the Q buffer's phases and the ping-pong turns run on across items (causal
# D 128 only: every other case launches one CTA per item)
FEW_CTA_CASES = [c for c in CASES if c.d == 128 and c.mask == "causal"]


@pytest.mark.parametrize("case", FEW_CTA_CASES, ids=[c.name for c in FEW_CTA_CASES])
def test_context_hopper_few_ctas(case, gpu, poison_outputs, hopper_launches, monkeypatch):
    from tp_runtime.backends import cuda_context_hopper as ch

    monkeypatch.setattr(ch, "MAX_CTAS", 3)
    ((ctas, _, _), _), step, _ = _check(case, gpu, hopper_launches, "hopper 3 CTAs")
    assert 1 <= ctas <= 3, f"{case.name}: {ctas} CTAs for {_items(case, step)} items"


# small pages at D <= 128 are gathered with cp.async (cuda_context_hopper.gathers); the TMA boxes
# that serve them otherwise (GATHER_MAX_PAGE 0) must stay correct too
BOX_CASES = [c for c in CASES if c.page is not None and cuda_context_hopper.gathers(CacheLayout.paged, c.page, c.d)]


@pytest.mark.parametrize("case", BOX_CASES, ids=[c.name for c in BOX_CASES])
def test_small_pages_on_tma_boxes(case, gpu, poison_outputs, hopper_launches, monkeypatch):
    from tp_runtime.backends import cuda_context_hopper as ch

    monkeypatch.setattr(ch, "GATHER_MAX_PAGE", 0)
    (_, gather), _, _ = _check(case, gpu, hopper_launches, "hopper TMA boxes")
    assert gather == 0, f"{case.name}: not on TMA boxes"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_bidirectional_hides_the_last_key(d, gpu, poison_outputs, hopper_launches):
    """Every query is steered towards its sequence's last key (a score ~3·sqrt(D) above the rest), so
    the output of a row that does not hide it is ~V of that key: only rows before the last position
    may hide it, and the case is checked to tell the two masks apart. One-token sequences, with and
    without a past, are their own last key."""
    from tp_runtime.backends import cuda_common, cuda_context, reference

    seed = int(torch.randint(2**31 - 1, ()))
    torch.manual_seed(seed)
    kv_h, group = 2, 2
    step = Step(new_lens=[40, 1, 1, 77], past_lens=[30, 0, 60, 0], slots=(2, 0, 3, 1), device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.bidirectional, softmax_scale=1.0 / math.sqrt(d))
    kv = gpu.make_kv(
        layout="contiguous", cache_dtype="auto", dtype=F16, kv_heads=kv_h, head_size=d, slots=step.slots,
        lengths=step.total_lens,
    )  # fmt: skip
    u = torch.randn(kv_h, d, device="cuda")  # the direction every query shares with the last keys
    for i, n in enumerate(step.total_lens):
        _, v = reference.read_kv(kv, step, i, n)
        slot = torch.tensor([step.slots[i]], device="cuda")
        reference.write_kv(kv, (3 * u)[None].to(F16), v[-1:].to(F16), slot, torch.tensor([n - 1], device="cuda"))
    q = (torch.randn(step.num_tokens, kv_h * group, d, device="cuda") * 0.5 + u.repeat_interleave(group, 0)).to(F16)
    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, tuple(range(step.num_seqs)), out, lse)
    torch.cuda.synchronize()
    assert len(hopper_launches) == 1, "the Hopper kernel did not serve the bidirectional mask"
    gpu.check_attention(out, lse, q, kv, step, spec, what=f"bidirectional D {d}, last key steered (seed {seed})")
    # the test's own premise: hiding the last key changes the rows before it (and only those)
    ref, _ = reference.attend(q.float(), kv, step, spec)
    padding, _ = reference.attend(q.float(), kv, step, AttentionSpec(AttentionMaskType.padding, spec.softmax_scale))
    hiding = torch.zeros(step.num_tokens, dtype=torch.bool)
    for i in range(step.num_seqs):
        rows = step.token_range(i)
        hiding[rows.start : rows.stop - 1] = True  # every new token but the sequence's last
    diff = (ref - padding).abs().amax(dim=(1, 2)).cpu()
    assert diff[hiding].min() > 0.5 and diff[~hiding].max() < 1e-4, (diff[hiding].min(), diff[~hiding].max())


def test_switch_forces_the_fallback(gpu, poison_outputs, hopper_launches, monkeypatch):
    """TP_RUNTIME_HOPPER_CONTEXT=0: the mma.sync kernel serves the same case, within the same rule."""
    monkeypatch.setenv("TP_RUNTIME_HOPPER_CONTEXT", "0")
    out, lse, q, kv, step, spec = _run(CASES[0], gpu, 1234)
    assert not hopper_launches
    gpu.check_attention(out, lse, q, kv, step, spec, what="fallback (TP_RUNTIME_HOPPER_CONTEXT=0)")


def _fallback_call(gpu, *, d, dtype, layout, cache, block_size, new_lens, past_lens=None):
    from tp_runtime.backends import cuda_common, cuda_context

    step = Step(new_lens=new_lens, past_lens=past_lens, device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1.0 / math.sqrt(d))
    kv = gpu.make_kv(
        layout=layout, cache_dtype=cache, dtype=dtype, kv_heads=2, head_size=d, slots=step.slots,
        lengths=step.total_lens, block_size=block_size,
    )  # fmt: skip
    q = torch.randn(step.num_tokens, 4, d, device="cuda").to(dtype)
    out = cuda_common.new(q.shape, q.dtype, q.device)
    lse = cuda_common.new(q.shape[:2], torch.float32, q.device)
    cuda_context.context(q, kv, step, spec, tuple(range(step.num_seqs)), out, lse)
    torch.cuda.synchronize()
    return out, lse, q, kv, step, spec


def test_unserved_case_stays_on_the_fallback(gpu, poison_outputs, hopper_launches):
    """Pages of fewer than 8 tokens are not served by the Hopper kernel: mma.sync takes them, correctly."""
    call = _fallback_call(gpu, d=64, dtype=F16, layout="paged", cache="auto", block_size=4, new_lens=[100, 7])
    assert not hopper_launches
    gpu.check_attention(*call, what="4-token pages on the fallback")


@pytest.mark.parametrize("cache", ["int8", "fp8"])
def test_quantized_cache_stays_on_the_fallback(cache, gpu, poison_outputs, hopper_launches):
    """int8/fp8 caches (a head size, mask and layout the Hopper kernel serves otherwise) go to mma.sync."""
    call = _fallback_call(
        gpu, d=128, dtype=BF16, layout="contiguous", cache=cache, block_size=16, new_lens=[300, 1], past_lens=[7, 40]
    )
    assert not hopper_launches
    gpu.check_attention(*call, what=f"{cache} cache on the fallback")
