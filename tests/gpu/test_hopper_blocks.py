"""Each Hopper building block of kernels/hopper.cuh alone, bit-exact against torch
(kernels/hopper_tests.cu): a wrong wgmma descriptor, swizzle or tensor map shows up here, named,
before it hides inside the context kernel. Skipped unless the GPU is compute capability 9.x.

Bit-exact: the matrix inputs are small integers (exact in fp16 and bf16) so every product and
partial sum is exact in fp32 whatever the summation order; a mismatch is a layout error, and the
message gives the max error and the first mismatching index (row, column).
"""

from __future__ import annotations

import pytest
import torch

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU (sm_90)"
)

from tp_runtime.backends.compile import kernel_options  # noqa: E402
from tp_runtime.resources import kernels_dir  # noqa: E402

CPP = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
DTYPES = [torch.float16, torch.bfloat16]
SS_SHAPES = [(64, 64), (128, 128), (128, 64), (64, 128)]  # (N, D)
RS_SHAPES = [(64, 64), (128, 64), (128, 128)]  # (N, K)
QKPV_HEADS = [64, 128]  # D of the S -> P -> P·V chain (BN 128, as in the context kernel)
_functions: dict = {}


def _expressions() -> list[str]:
    """Every instantiation the tests run (hopper_tests.cu instantiates the same set explicitly)."""
    out = []
    for t in CPP.values():
        out += [f"tp::hopper_tests::wgmma_ss_kernel<{t}, {n}, {d}>" for n, d in SS_SHAPES]
        out += [f"tp::hopper_tests::wgmma_rs_kernel<{t}, {n}, {k}>" for n, k in RS_SHAPES]
        out.append(f"tp::hopper_tests::tma_load_kernel<{t}>")
        out += [f"tp::hopper_tests::qk_pv_kernel<{t}, {d}, 128>" for d in QKPV_HEADS]
        out.append(f"tp::hopper_tests::tma_load_3d_kernel<{t}>")
    return out


def _kernel(expr: str):
    """One NVRTC compile of hopper_tests.cu for all the tests (sm_90a), then a lookup."""
    if not _functions:
        code = (kernels_dir() / "hopper_tests.cu").read_text()
        exprs = _expressions()
        module = cupy.RawModule(code=code, options=kernel_options("sm_90a"), name_expressions=exprs)
        _functions.update({e: module.get_function(e) for e in exprs})
    return _functions[expr]


def _run(kernel, args, smem: int) -> None:
    smem += 1024  # the kernels align their tiles to 1024 bytes inside the allocation (hopper.cuh align_smem)
    kernel.max_dynamic_shared_size_bytes = smem
    torch.cuda.synchronize()  # inputs written by torch, then the kernel on CuPy's stream
    kernel((1,), (128,), args, shared_mem=smem)
    cupy.cuda.Device().synchronize()


def _ptr(t: torch.Tensor):
    return cupy.uint64(t.data_ptr())


def _ints(*shape, dtype, lo=-3, hi=4) -> torch.Tensor:
    return torch.randint(lo, hi, shape, device="cuda").to(dtype)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = (got.float() - want.float()).abs()
    bad = diff.isnan() | (diff > 0)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, max error {diff.nan_to_num(1e30).max():.4g}, "
            f"first at {first}: got {got[first].item()}, want {want[first].item()}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("n,d", SS_SHAPES)
def test_wgmma_ss_q_kt(dtype, n, d):
    """S [64, N] = Q [64, D] · K [N, D]ᵀ, both K-major from 128B-swizzled shared memory."""
    q, k = _ints(64, d, dtype=dtype), _ints(n, d, dtype=dtype)
    s = torch.full((64, n), float("nan"), device="cuda")
    kern = _kernel(f"tp::hopper_tests::wgmma_ss_kernel<{CPP[dtype]}, {n}, {d}>")
    _run(kern, (_ptr(q), _ptr(k), _ptr(s)), (64 + n) * d * 2)
    _assert_same(s, q.float() @ k.float().T, f"wgmma SS m64n{n}k16 x{d // 16} ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("n,k", RS_SHAPES)
def test_wgmma_rs_p_v(dtype, n, k):
    """O [64, N] = P [64, K] · V [K, N]: P from registers, V row-major read MN-major (transposed B)."""
    p, v = _ints(64, k, dtype=dtype), _ints(k, n, dtype=dtype)
    o = torch.full((64, n), float("nan"), device="cuda")
    kern = _kernel(f"tp::hopper_tests::wgmma_rs_kernel<{CPP[dtype]}, {n}, {k}>")
    _run(kern, (_ptr(p), _ptr(v), _ptr(o)), k * n * 2)
    _assert_same(o, p.float() @ v.float(), f"wgmma RS m64n{n}k16 x{k // 16}, B MN-major ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "rows,cols,box_rows,c0,c1",
    [(300, 192, 64, 64, 17), (100, 128, 128, 0, 0), (70, 64, 64, 0, 40)],  # the last box leaves the tensor
)
def test_tma_load_swizzled_tile(dtype, rows, cols, box_rows, c0, c1):
    """One TMA load of a {64, box_rows} box at (c0, c1) of a [rows, cols] tensor into 128B-swizzled
    shared memory, completing on an mbarrier; zeros where the box leaves the tensor."""
    from tp_runtime.backends.cuda_tma import tiled_map

    x = torch.randn(rows, cols, device="cuda").to(dtype)
    e = x.element_size()
    tmap = tiled_map(x.data_ptr(), dtype, (cols, rows), (cols * e,), (64, box_rows))
    out = torch.full((box_rows, 64), float("nan"), device="cuda", dtype=dtype)
    kern = _kernel(f"tp::hopper_tests::tma_load_kernel<{CPP[dtype]}>")
    _run(kern, (tmap, cupy.int32(box_rows), cupy.int32(c0), cupy.int32(c1), _ptr(out)), box_rows * 128 + 8)
    want = torch.zeros(box_rows, 64, device="cuda", dtype=dtype)
    part = x[c1 : c1 + box_rows, c0 : c0 + 64]
    want[: part.shape[0], : part.shape[1]] = part
    _assert_same(out, want, f"TMA load box (64, {box_rows}) at ({c0}, {c1}) of [{rows}, {cols}] ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("d", QKPV_HEADS)
def test_s_fragments_feed_p_v(dtype, d):
    """O = (Q·Kᵀ)·V with S kept in registers and re-packed as the A operand (the context kernel's
    P path without the softmax). Inputs in {-1, 0, 1}: |S| <= D is exact in fp16 and bf16."""
    q, k, v = (_ints(r, d, dtype=dtype, lo=-1, hi=2) for r in (64, 128, 128))
    o = torch.full((64, d), float("nan"), device="cuda")
    kern = _kernel(f"tp::hopper_tests::qk_pv_kernel<{CPP[dtype]}, {d}, 128>")
    _run(kern, (_ptr(q), _ptr(k), _ptr(v), _ptr(o)), (64 + 2 * 128) * d * 2)
    _assert_same(o, (q.float() @ k.float().T) @ v.float(), f"S -> P -> P·V chain, D {d} ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("tokens,heads,d,c0,c1,c2", [(100, 3, 128, 64, 2, 40), (50, 2, 64, 0, 1, 0)])
def test_tma_load_3d_q_box(dtype, tokens, heads, d, c0, c1, c2):
    """The context kernel's Q load: a {64, 1, 64} box of a {D, heads, tokens} map of q [T, H, D];
    rows past the last token are zeros."""
    from tp_runtime.backends.cuda_tma import tiled_map

    x = torch.randn(tokens, heads, d, device="cuda").to(dtype)
    e = x.element_size()
    tmap = tiled_map(x.data_ptr(), dtype, (d, heads, tokens), (d * e, heads * d * e), (64, 1, 64))
    out = torch.full((64, 64), float("nan"), device="cuda", dtype=dtype)
    kern = _kernel(f"tp::hopper_tests::tma_load_3d_kernel<{CPP[dtype]}>")
    args = (tmap, cupy.int32(64), cupy.int32(c0), cupy.int32(c1), cupy.int32(c2), _ptr(out))
    _run(kern, args, 64 * 128 + 8)
    want = torch.zeros(64, 64, device="cuda", dtype=dtype)
    part = x[c2 : c2 + 64, c1, c0 : c0 + 64]
    want[: part.shape[0]] = part
    _assert_same(out, want, f"TMA 3-D box (64, 1, 64) at ({c0}, {c1}, {c2}) of q [{tokens}, {heads}, {d}] ({dtype})")
