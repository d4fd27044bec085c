"""The decode kernel (kernels/decode_attention.cu via backends/cuda_decode.py) against the reference.

Oracle: the reference backend in fp32 on the same (rounded, quantized) cache, with the kernel
accuracy rule (tests/gpu/conftest.py ``check_attention``: error at most twice torch's own error in
the activation dtype plus one unit at the largest output). Metamorphic checks: paged equals
contiguous bit for bit, every forced split count equals the single-split result up to rounding.
Outputs start as NaN, unused cache entries are poisoned (NaN / 0x7F / 127), inputs are fresh random.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("cupy")

from tp_runtime.backends import cuda_decode, cuda_plan  # noqa: E402
from tp_runtime.backends.base import AttentionSpec  # noqa: E402
from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.config import AttentionMaskType  # noqa: E402
from tp_runtime.position import alibi_slopes  # noqa: E402

DEV = "cuda"
NAN = float("nan")
HALF = (torch.float16, torch.bfloat16)
HEAD_SIZES = (64, 80, 96, 128, 256)
# (H_r, KV_r): groups 1, 4, 8; 3 (a padded head per block); 12 (one block of 16 with 4 padded heads
# at D <= 128, two chunks of 8 at D 256); 16 (the MMA's 16 rows, two Oᵀ n-tiles); MQA with 32 query
# heads on one KV head (one block of two 16-head warp sets; four chunks of 8 at D 256)
HEADS = {
    "mha": (8, 8),
    "gqa4": (8, 2),
    "mqa8": (8, 1),
    "gqa3": (12, 4),
    "g12": (12, 1),
    "g16": (32, 2),
    "mqa32": (32, 1),
}
# 8-bit caches on every head layout and path: mma with 8-bit fragments (D <= 128, any group; D 80
# has an odd last Oᵀ tile), CUDA cores (D 256); paged for the first three
QUANT_CASES = {
    "d128-gqa4": (128, (8, 2)),
    "d128-mqa8": (128, (8, 1)),
    "d64-mha": (64, (4, 4)),
    "d128-mha": (128, (4, 4)),
    "d128-g12": (128, (12, 1)),
    "d128-mqa32": (128, (32, 1)),
    "d80-g16": (80, (16, 1)),
    "d64-mqa32": (64, (32, 1)),
    "d96-gqa3": (96, (12, 4)),
    "d64-gqa4": (64, (8, 2)),
    "d80-gqa4": (80, (8, 2)),
    "d256": (256, (8, 2)),
}
QUANT_PAGED = ("d128-gqa4", "d128-mqa8", "d64-mha", "d128-mqa32")
ODD = (1, 7, 97, 1025)  # keys per sequence (past + 1)


def _v(dtype, cache, layout, d, group):
    return (
        "decode",
        dict(dtype=dtype, cache=cache, layout=layout, head_size=d, heads=cuda_decode.heads_per_block(group, d)),
    )


# Every variant a test below launches: compiled once, in parallel, by tests/gpu/conftest.py.
KERNEL_VARIANTS = (
    [_v(dt, "auto", "contiguous", d, h // kv) for dt in HALF for d in HEAD_SIZES for h, kv in HEADS.values()]
    + [_v(dt, "auto", "paged", d, g) for dt in HALF for d in (64, 128) for g in (1, 4, 8, 32)]
    + [
        _v(dt, c, lay, d, h // kv)
        for dt in HALF
        for c in ("int8", "fp8")
        for name, (d, (h, kv)) in QUANT_CASES.items()
        for lay in (("contiguous", "paged") if name in QUANT_PAGED else ("contiguous",))
    ]
)


def spec_for(d, **kw):
    kw.setdefault("mask", AttentionMaskType.causal)
    return AttentionSpec(softmax_scale=1.0 / math.sqrt(d), **kw)


def setup(
    gpu, *, lengths, h_r=8, kv_r=2, d=128, dtype=torch.float16, layout="contiguous", cache_dtype="auto", block=16
):
    """Generation step with ``lengths[i]`` keys per sequence (past = length − 1), its cache and q."""
    n = len(lengths)
    slots = tuple(int(s) for s in torch.randperm(n + 2)[:n])
    step = Step(new_lens=(1,) * n, past_lens=tuple(x - 1 for x in lengths), slots=slots, device=DEV)
    kv = gpu.make_kv(
        layout=layout,
        cache_dtype=cache_dtype,
        dtype=dtype,
        kv_heads=kv_r,
        head_size=d,
        slots=slots,
        lengths=lengths,
        block_size=block,
    )
    q = torch.randn(n, h_r, d, device=DEV).to(dtype)
    return step, kv, q


def run(q, kv, step, spec, ids=None, splits=None):
    out = torch.full_like(q, NAN)
    lse = torch.full(q.shape[:2], NAN, dtype=torch.float32, device=q.device)
    ids = list(range(step.num_seqs)) if ids is None else ids
    cuda_decode.decode(q, kv, step, ids, spec, out, lse, splits)
    torch.cuda.synchronize()
    return out, lse


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("d", HEAD_SIZES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_matches_reference(gpu, dtype, d, heads):
    torch.manual_seed(d)
    h_r, kv_r = HEADS[heads]
    step, kv, q = setup(gpu, lengths=ODD, h_r=h_r, kv_r=kv_r, d=d, dtype=dtype)
    spec = spec_for(d)
    out, lse = run(q, kv, step, spec)
    gpu.check_attention(out, lse, q, kv, step, spec, what=f"{dtype} D={d} {heads}")


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (32, 1)], ids=["mha", "gqa4", "mqa32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_paged_equals_contiguous(gpu, dtype, d, heads, block):
    torch.manual_seed(block + d)
    h_r, kv_r = heads
    lengths = (3, 97, 1025, 130)
    step, kv_p, q = setup(gpu, lengths=lengths, h_r=h_r, kv_r=kv_r, d=d, dtype=dtype, layout="paged", block=block)
    spec = spec_for(d)
    out_p, lse_p = run(q, kv_p, step, spec)
    gpu.check_attention(out_p, lse_p, q, kv_p, step, spec, what=f"paged P={block}")
    # the same K/V in a contiguous cache: the kernel does the same arithmetic, so equal bit for bit
    kv_c = gpu.make_kv(
        layout="contiguous",
        cache_dtype="auto",
        dtype=dtype,
        kv_heads=kv_r,
        head_size=d,
        slots=step.slots,
        lengths=lengths,
    )
    for i, (slot, n) in enumerate(zip(step.slots, lengths, strict=True)):
        from tp_runtime.backends.reference import read_kv

        k, v = read_kv(kv_p, step, i, n)
        kv_c.data[slot, 0, :, :n] = k.transpose(0, 1).to(dtype)
        kv_c.data[slot, 1, :, :n] = v.transpose(0, 1).to(dtype)
    for splits in (1, 3):
        out_c, lse_c = run(q, kv_c, step, spec, splits=splits)
        out_p, lse_p = run(q, kv_p, step, spec, splits=splits)
        assert torch.equal(out_c, out_p) and torch.equal(lse_c, lse_p), f"paged != contiguous (splits={splits})"


@pytest.mark.parametrize(
    "case,layout",
    [(c, "contiguous") for c in QUANT_CASES] + [(c, "paged") for c in QUANT_PAGED],
)
@pytest.mark.parametrize("cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_quantized_cache(gpu, dtype, case, cache_dtype, layout):
    """int8/fp8 against the reference, which dequantizes exactly (stored · dequant_scale in fp32);
    odd lengths cut 64-key tiles anywhere, forced splits merge partial tiles."""
    torch.manual_seed(7)
    d, (h_r, kv_r) = QUANT_CASES[case]
    step, kv, q = setup(
        gpu, lengths=(1, 7, 97, 1025, 300), h_r=h_r, kv_r=kv_r, d=d, dtype=dtype, layout=layout, cache_dtype=cache_dtype
    )
    spec = spec_for(d)
    for splits in (None, 4, 7):
        out, lse = run(q, kv, step, spec, splits=splits)
        gpu.check_attention(out, lse, q, kv, step, spec, what=f"{cache_dtype} {layout} splits={splits}")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_beam_indirection(gpu, layout):
    """Beam b·W + j reads cached position t < past from beam cache_indirection[b, j, t]."""
    torch.manual_seed(3)
    batch, width, d, h_r, kv_r = 2, 3, 128, 8, 2
    past = (50, 301)  # per batch entry; its beams share the length
    slots = tuple(b * width + j for b in range(batch) for j in range(width))
    lengths = tuple(past[b] + 1 for b in range(batch) for _ in range(width))
    s_max = max(lengths) + 3
    ind = torch.randint(0, width, (batch, width, s_max), dtype=torch.int32)
    step = Step(
        new_lens=(1,) * len(slots),
        past_lens=tuple(n - 1 for n in lengths),
        slots=slots,
        beam_width=width,
        cache_indirection=ind,
        device=DEV,
    )
    kv = gpu.make_kv(
        layout=layout, cache_dtype="auto", dtype=torch.float16, kv_heads=kv_r, head_size=d, slots=slots, lengths=lengths
    )
    q = torch.randn(len(slots), h_r, d, device=DEV).half()
    spec = spec_for(d)
    for splits in (1, 2):
        out, lse = run(q, kv, step, spec, splits=splits)
        gpu.check_attention(out, lse, q, kv, step, spec, what=f"beams {layout} splits={splits}")
    # the indirection matters: without it the answer differs
    plain = Step(new_lens=step.new_lens, past_lens=step.past_lens, slots=slots, device=DEV)
    out_plain, _ = run(q, kv, plain, spec)
    assert not torch.allclose(out_plain.float(), out.float(), atol=1e-2)


@pytest.mark.parametrize("heads", [(8, 2), (32, 1)], ids=["gqa4", "mqa32"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_forced_splits_equal_single(gpu, layout, heads):
    """gqa4: up to 16 splits one merge in the kernel; more: the two-level merge (groups of 16, the
    last one partial). mqa32 (32-head blocks): decode_merge_kernel, up to MAX_SPLITS (512)."""
    torch.manual_seed(11)
    lengths = (4097, 700, 33, 1)
    step, kv, q = setup(gpu, lengths=lengths, layout=layout, h_r=heads[0], kv_r=heads[1])
    spec = spec_for(128)
    ref_out, ref_lse = run(q, kv, step, spec, splits=1)
    gpu.check_attention(ref_out, ref_lse, q, kv, step, spec, what="splits=1")
    ulp = torch.finfo(q.dtype).eps * ref_out.float().abs().max().item()
    for splits in [2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64, 130, 512]:
        out, lse = run(q, kv, step, spec, splits=splits)
        diff = (out.float() - ref_out.float()).abs().max().item()
        assert diff <= ulp, f"splits={splits}: output differs from splits=1 by {diff:.2e} (> {ulp:.2e})"
        assert torch.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5), f"splits={splits}: lse differs"


@pytest.mark.parametrize(
    "heads,cache_dtype",
    [((8, 8), "auto"), ((8, 2), "auto"), ((8, 1), "auto"), ((8, 2), "int8"), ((8, 1), "fp8"), ((32, 1), "auto")]
    + [((32, 1), "int8")],
    ids=["mha", "gqa4", "mqa8", "gqa4-int8", "mqa8-fp8", "mqa32", "mqa32-int8"],
)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_long_single_sequence(gpu, heads, cache_dtype, layout):
    """32k keys: the heuristic splits (multi-block); paged with P=16 and one split also exercises the
    block table read from global memory (2048 entries > the shared-memory slice)."""
    torch.manual_seed(5)
    h_r, kv_r = heads
    step, kv, q = setup(gpu, lengths=(32768,), h_r=h_r, kv_r=kv_r, layout=layout, cache_dtype=cache_dtype)
    spec = spec_for(128)
    out, lse = run(q, kv, step, spec)
    gpu.check_attention(out, lse, q, kv, step, spec, what=f"32k {layout}")
    one, lse1 = run(q, kv, step, spec, splits=1)
    gpu.check_attention(one, lse1, q, kv, step, spec, what=f"32k {layout} splits=1")


@pytest.mark.parametrize(
    "heads,cache_dtype",
    [((8, 8), "auto"), ((8, 2), "auto"), ((8, 2), "int8"), ((8, 1), "fp8"), ((32, 1), "auto"), ((32, 1), "fp8")],
    ids=["mha", "gqa4", "gqa4-int8", "mqa8-fp8", "mqa32", "mqa32-fp8"],
)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_alibi(gpu, dtype, heads, cache_dtype):
    torch.manual_seed(13)
    step, kv, q = setup(gpu, lengths=ODD, h_r=heads[0], kv_r=heads[1], dtype=dtype, cache_dtype=cache_dtype)
    h = heads[0]
    slopes = alibi_slopes(3 * h)[h : 2 * h].to(DEV)  # a rank's slice of a non-power-of-two head count
    spec = spec_for(128, alibi_slopes=slopes)
    for splits in (None, 3):
        out, lse = run(q, kv, step, spec, splits=splits)
        gpu.check_attention(out, lse, q, kv, step, spec, what=f"alibi splits={splits}")


@pytest.mark.parametrize("heads", [(8, 2), (32, 1)], ids=["gqa4", "mqa32"])
@pytest.mark.parametrize(
    "mask", [AttentionMaskType.causal, AttentionMaskType.bidirectional, AttentionMaskType.padding], ids=str
)
def test_relative_implicit(gpu, mask, heads):
    """T5 buckets: causal (one-sided) for decoders, bidirectional otherwise (32 heads: the bias of
    head rows g and g + 8 of a 16-head block)."""
    torch.manual_seed(17)
    step, kv, q = setup(gpu, lengths=ODD, h_r=heads[0], kv_r=heads[1])
    table = torch.randn(heads[0], 32, device=DEV)
    spec = spec_for(128, mask=mask, relative_table=table, num_buckets=32, max_distance=128)
    for splits in (None, 2):
        out, lse = run(q, kv, step, spec, splits=splits)
        gpu.check_attention(out, lse, q, kv, step, spec, what=f"relative {mask} splits={splits}")


def test_relative_explicit(gpu):
    torch.manual_seed(19)
    step, kv, q = setup(gpu, lengths=(5, 97, 300), h_r=8, kv_r=8, d=64)
    bias = torch.randn(8, 301, 310, device=DEV)
    spec = spec_for(64, relative_bias=bias)
    out, lse = run(q, kv, step, spec)
    gpu.check_attention(out, lse, q, kv, step, spec, what="explicit relative bias")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_cross_attention(gpu, layout):
    """Keys are the encoder's (no causal mask); an empty encoder gives zeros and lse -inf."""
    torch.manual_seed(23)
    enc = (0, 1, 7, 300)
    n = len(enc)
    slots = (3, 0, 2, 1)
    step = Step(new_lens=(1,) * n, past_lens=(0, 3, 5, 9), slots=slots, encoder_lens=enc, device=DEV)
    kv = gpu.make_kv(
        layout=layout, cache_dtype="auto", dtype=torch.bfloat16, kv_heads=2, head_size=128, slots=slots, lengths=enc
    )
    q = torch.randn(n, 8, 128, device=DEV).bfloat16()
    spec = spec_for(128, mask=AttentionMaskType.padding, cross=True)
    for splits in (None, 2):
        out, lse = run(q, kv, step, spec, splits=splits)
        gpu.check_attention(out, lse, q, kv, step, spec, what=f"cross {layout} splits={splits}")
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_writes_only_served_rows(gpu):
    torch.manual_seed(29)
    step, kv, q = setup(gpu, lengths=(40, 7, 97, 12))
    spec = spec_for(128)
    out, lse = run(q, kv, step, spec, ids=[2, 0])
    gpu.check_attention(out, lse, q, kv, step, spec, ids=[2, 0])
    assert torch.isnan(out[[1, 3]]).all() and torch.isnan(lse[[1, 3]]).all()


def test_through_cuda_attend(gpu, poison_outputs):
    """A mixed step through the CUDA backend: the generation sequences take the decode kernel."""
    from tp_runtime.backends import cuda

    torch.manual_seed(31)
    new, past = (1, 5, 1), (63, 0, 200)
    step = Step(new_lens=new, past_lens=past, device=DEV)
    lengths = tuple(p + n for p, n in zip(past, new, strict=True))
    kv = gpu.make_kv(
        layout="paged",
        cache_dtype="auto",
        dtype=torch.float16,
        kv_heads=2,
        head_size=128,
        slots=step.slots,
        lengths=lengths,
    )
    q = torch.randn(step.num_tokens, 8, 128, device=DEV).half()
    spec = spec_for(128)
    assert cuda_plan.route(step, cross=False).decode_ids == (0, 2)
    out, lse = cuda.attend(q, kv, step, spec)
    gpu.check_attention(out, lse, q, kv, step, spec)


def test_rejects_unsupported(gpu):
    step, kv, q = setup(gpu, lengths=(5,), h_r=2, kv_r=2, d=48)
    with pytest.raises(NotImplementedError, match="head_size=48"):
        run(q, kv, step, spec_for(48))
    step, kv, q = setup(gpu, lengths=(5,), h_r=2, kv_r=2, d=64)
    with pytest.raises(ValueError, match="splits"):
        run(q, kv, step, spec_for(64), splits=0)
