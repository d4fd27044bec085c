"""Launcher of the FP8 activation quantizer (``kernels/fp8_quant.cu``) used by the FP8 projections.

``quantize(x, static_scale)`` returns what ``tp_runtime.layers.fp8`` computes with torch ops
(``scale_from_amax`` and ``quantize_fp8``), bit for bit, in two passes over ``x`` instead of six
or seven elementwise kernels: at prefill sizes those passes cost about as much as the FP8 GEMM
saves (BENCHMARKS.md, FP8 projections).
"""

from __future__ import annotations

import torch

from .capabilities import HALF_DTYPES
from .compile import get_kernel
from .cuda_common import i32, i64, launch, ptr, sm_count

_THREADS = 256  # kQuantThreads in the kernel
_BLOCKS_PER_SM = 8


def fp8_quantize(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (fp16/bf16, CUDA, any shape) -> (``x_q`` float8_e4m3fn of ``x``'s shape, ``scale`` fp32 [1]).

    ``static_scale``: a positive fp32 [1] tensor on ``x``'s device (calibrated), or None for the
    dynamic scale ``amax · fp32(1/448)`` (1 when ``x`` is all zeros).
    """
    if not x.is_cuda or x.dtype not in HALF_DTYPES:
        raise TypeError(f"x: expected a float16 or bfloat16 CUDA tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    dev, n = x.device, x.numel()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    scale = torch.empty(1, dtype=torch.float32, device=dev)
    aligned = i32(x.data_ptr() % 16 == 0)
    blocks = max(1, min(-(-n // (8 * _THREADS)), sm_count(dev) * _BLOCKS_PER_SM))
    amax = None
    if static_scale is None:
        amax = torch.zeros(1, dtype=torch.int32, device=dev)  # the kernel's atomicMax starts from 0
        launch(get_kernel("fp8_amax", dtype=x.dtype), (blocks,), (_THREADS,), (ptr(x), i64(n), aligned, ptr(amax)), dev)
    args = (ptr(x), i64(n), aligned, ptr(static_scale), ptr(amax), ptr(out), ptr(scale))
    launch(get_kernel("fp8_quantize", dtype=x.dtype), (blocks,), (_THREADS,), args, dev)
    return out, scale


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    per_channel: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``reference.fp8_matmul`` on the FP8 matrix units: ``xq [M, K]``, ``weight [N, K]`` e4m3."""
    if not per_channel:
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
    # Row-wise scaling wants one scale per row of A and per column of B, and returns bf16.
    s_a = x_scale.expand(xq.shape[0], 1).contiguous()
    y = torch._scaled_mm(xq, weight.t(), scale_a=s_a, scale_b=weight_scale.reshape(1, -1), out_dtype=torch.bfloat16)
    return y.to(out_dtype)


def variants(dtype: torch.dtype) -> list[tuple[str, dict]]:
    """The kernel variants an FP8 projection with activations of ``dtype`` launches (for precompile)."""
    return [("fp8_amax", {"dtype": dtype}), ("fp8_quantize", {"dtype": dtype})]
