"""GPU test support: one parallel precompile of every kernel variant the collected tests name, and
helpers (fixture ``gpu``) to build poisoned caches and apply the kernel accuracy rule.

Skipping: tests/conftest.py marks every test here ``gpu`` and skips it where torch or CuPy cannot
use CUDA (the CPU CI machine); the test modules also ``importorskip`` CuPy.

Accuracy rule: ``max|kernel − ref| <= 2·max|torch_same_dtype − ref| + floor``, where ``ref`` is the
reference backend in fp32 on the same (already rounded) inputs and ``torch_same_dtype`` is the
plain torch computation with the matrix products in the activation dtype (softmax in fp32), as
FlashAttention's own tests do; ``floor`` is one unit of the dtype at the largest output.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

NAN = float("nan")
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full fp32 (torch's default, made explicit)


@pytest.fixture(scope="session", autouse=True)
def _precompile_kernels(request):
    """Compile every ``KERNEL_VARIANTS`` entry of the collected GPU test modules at once, in
    parallel worker processes (fills CuPy's disk cache; the tests then only load)."""
    if not torch.cuda.is_available():
        return
    try:
        import cupy  # noqa: F401
    except ImportError:
        return
    from tp_runtime.backends.compile import precompile

    wanted, seen = [], set()
    for item in request.session.items:
        mod = getattr(item, "module", None)
        if mod is None or mod.__name__ in seen:
            continue
        seen.add(mod.__name__)
        wanted += list(getattr(mod, "KERNEL_VARIANTS", ()))
    if wanted:
        t0 = time.perf_counter()
        precompile(wanted)
        print(f"\n[gpu] precompiled {len(wanted)} kernel variants in {time.perf_counter() - t0:.1f} s")


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make the CUDA backend allocate its outputs filled with NaN."""
    from tp_runtime.backends import cuda_common

    def nan_alloc(shape, dtype, device):
        return torch.full(shape, NAN, dtype=dtype, device=device)

    monkeypatch.setattr(cuda_common, "new", nan_alloc)


# ---- caches ----------------------------------------------------------------------------------
def poisoned(shape, storage: torch.dtype, device) -> torch.Tensor:
    """A tensor of unusable values: NaN where the type has one (fp8: 0x7F), int8: 127."""
    if storage == torch.float8_e4m3fn:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    if storage == torch.int8:
        return torch.full(shape, 127, dtype=torch.int8, device=device)
    return torch.full(shape, NAN, dtype=storage, device=device)


def make_kv(
    *,
    layout: str,
    cache_dtype: str,
    dtype: torch.dtype,
    kv_heads: int,
    head_size: int,
    slots: tuple[int, ...],
    lengths: tuple[int, ...],
    block_size: int = 16,
    device="cuda",
    scale: float = 3.0,
    capacity: tuple[int, ...] | None = None,
):
    """A ``LayerKV`` whose positions ``0..lengths[i]-1`` of ``slots[i]`` hold fresh random K/V
    (quantized for int8/fp8 with amax ``scale``) and whose every other entry is poisoned. Room is
    made for ``capacity[i]`` positions (default ``lengths``)."""
    from tp_runtime.backends.reference import write_kv
    from tp_runtime.batch.kv_cache import CacheLayout, LayerKV
    from tp_runtime.config import KVCacheDType

    kv_dtype = KVCacheDType(cache_dtype)
    storage = kv_dtype.storage_dtype(dtype)
    dequant = 1.0
    if kv_dtype is KVCacheDType.int8:
        dequant = scale / 127.0
    elif kv_dtype is KVCacheDType.fp8:
        dequant = scale / 448.0
    n_rows = max(slots) + 2
    capacity = tuple(max(c, n) for c, n in zip(capacity or lengths, lengths, strict=True))
    if layout == "contiguous":
        s_max = max(max(capacity), 1) + 5
        data = poisoned((n_rows, 2, kv_heads, s_max, head_size), storage, device)
        kv = LayerKV(CacheLayout.contiguous, data, kv_dtype, dequant)
    else:
        need = [-(-n // block_size) for n in capacity]
        n_blocks = sum(need) + 3
        perm = torch.randperm(n_blocks).tolist()
        table = torch.full((n_rows, max(max(need), 1) + 1), -1, dtype=torch.int32)
        at = 0
        for slot, k in zip(slots, need, strict=True):
            table[slot, :k] = torch.tensor(perm[at : at + k], dtype=torch.int32)
            at += k
        data = poisoned((n_blocks, 2, kv_heads, block_size, head_size), storage, device)
        kv = LayerKV(CacheLayout.paged, data, kv_dtype, dequant, table.to(device))
    total = sum(lengths)
    if total:
        k = (torch.randn(total, kv_heads, head_size, device=device) * scale / 3).to(dtype)
        v = (torch.randn(total, kv_heads, head_size, device=device) * scale / 3).to(dtype)
        slot_of = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)).to(device)
        pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
        write_kv(kv, k, v, slot_of, pos)
    return kv


# ---- the accuracy rule -------------------------------------------------------------------------
def torch_same_dtype(q, kv, step, spec, ids):
    """Plain torch attention with both products in q's dtype (softmax in fp32): the error budget."""
    from tp_runtime.backends.base import key_lengths
    from tp_runtime.backends.reference import read_kv, score_bias, visible

    dt = q.dtype
    out = torch.zeros_like(q)
    group = q.shape[1] // kv.num_kv_heads
    for i in ids:
        n = key_lengths(step, spec)[i]
        rows = step.token_range(i)
        if n == 0:
            continue
        k, v = read_kv(kv, step, i, n)
        k = k.to(dt).repeat_interleave(group, 1)
        v = v.to(dt).repeat_interleave(group, 1)
        q_pos = torch.arange(step.past_lens[i], step.total_lens[i], device=q.device)
        k_pos = torch.arange(n, device=q.device)
        s = torch.einsum("qhd,khd->hqk", q[rows.start : rows.stop], k).float() * spec.softmax_scale
        s = s + score_bias(spec, q_pos, k_pos, q.shape[1])
        s = s.masked_fill(~visible(spec, q_pos, k_pos)[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(dt)
        out[rows.start : rows.stop] = torch.einsum("hqk,khd->qhd", p, v)
    return out


def check_attention(out, lse, q, kv, step, spec, ids=None, what=""):
    """Assert the accuracy rule on the rows of sequences ``ids`` (default all); returns the errors."""
    from tp_runtime.backends import reference

    ids = list(range(step.num_seqs)) if ids is None else ids
    rows = torch.cat([torch.arange(step.token_range(i).start, step.token_range(i).stop) for i in ids]).to(q.device)
    ref, ref_lse = reference.attend(q.float(), kv, step, spec)
    pt = torch_same_dtype(q, kv, step, spec, ids)
    got = out.float()[rows]
    ref, pt, ref_lse, got_lse = ref[rows], pt.float()[rows], ref_lse[rows], lse[rows]
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (unwritten or poisoned read)"
    err = (got - ref).abs().max().item()
    pt_err = (pt - ref).abs().max().item()
    eps = torch.finfo(q.dtype).eps
    floor = eps * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * pt_err + floor, (
        f"{what}: max error {err:.3e} > 2 x torch {q.dtype} error {pt_err:.3e} + {floor:.1e}"
    )
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(inf_ref, torch.isinf(got_lse)), f"{what}: -inf lse rows differ"
    assert (got_lse[inf_ref] < 0).all()
    if (~inf_ref).any():
        d_lse = (got_lse[~inf_ref] - ref_lse[~inf_ref]).abs()
        tol = 1e-3 + 1e-4 * ref_lse[~inf_ref].abs()
        assert (d_lse <= tol).all(), f"{what}: lse error {d_lse.max().item():.3e}"
    if inf_ref.any():
        assert (got[inf_ref] == 0).all(), f"{what}: fully masked rows must be zeros"
    return err, pt_err


@pytest.fixture
def gpu():
    """Helpers for the GPU tests (a namespace: make_kv, check_attention, torch_same_dtype)."""
    return SimpleNamespace(
        make_kv=make_kv, check_attention=check_attention, torch_same_dtype=torch_same_dtype, poisoned=poisoned
    )
