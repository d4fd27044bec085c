"""FP8 quantize-dequantize projections (TensorRT-LLM's ``FP8Linear`` / ``FP8RowLinear``).

Weights are stored as float8 e4m3 with a per-tensor (or per-output-channel) fp32 scale;
activations are quantized on the fly with a per-tensor scale, static (from calibration) or
dynamic (current amax). ``x ≈ x_q · s`` with ``x_q = e4m3(clip(x / s, ±448))`` and
``s = amax · fp32(1/448)``. The GEMM runs in FP8 with fp32 accumulation through
``torch._scaled_mm`` where the GPU has FP8 matrix units (sm_89+); elsewhere the same math is
emulated exactly (dequantize, then an fp32 GEMM), so the semantics are testable on the CPU.

Scales that must agree across ranks do: a per-tensor weight scale comes from the full
(unsharded) weight, a per-channel one from the full row; ColumnLinear's dynamic input scale
sees the same input on every rank. RowLinear's dynamic input scale is per rank (each rank
quantizes its own slice; partial sums are dequantized before the all-reduce).
"""

from __future__ import annotations

import math

import torch

from ..backends import cuda_fp8
from ..config import Fp8ActivationScaling, Fp8WeightScaling
from .linear import ColumnLinear, RowLinear

E4M3_MAX = 448.0


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale mapping ``amax`` onto the largest e4m3 value (1 for an all-zero tensor).

    Defined as ``amax · fp32(1/448)``, not ``amax / 448``: torch divides by a scalar as a multiply
    by its reciprocal on CUDA but divides on the CPU (one ulp apart at times); the product is the
    same on every device, and in the quantizer kernel."""
    amax = amax.float()
    return torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def check_scale(name: str, scale) -> torch.Tensor:
    """A user-given scale: a positive, finite number (or 1-element tensor)."""
    value = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite scale > 0, got {scale!r}")
    return torch.tensor([float(value)], dtype=torch.float32)


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 matrix units: CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _Fp8Mixin:
    """Storage and GEMM of an FP8 layer; the sharding comes from the Column/Row base class."""

    def _init_fp8(self, weight_scaling, activation_scaling) -> None:
        self.weight_scaling = Fp8WeightScaling(weight_scaling)
        self.activation_scaling = Fp8ActivationScaling(activation_scaling)
        n, k = self.weight.shape
        dev = self.weight.device
        self.weight = torch.nn.Parameter(torch.empty(n, k, dtype=torch.float8_e4m3fn, device=dev), requires_grad=False)
        n_scales = n if self.weight_scaling is Fp8WeightScaling.per_channel else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=dev))
        self.register_buffer("input_scale", None)
        self.use_fp8_gemm = fp8_gemm_supported(dev)
        if self.use_fp8_gemm and (n % 16 or k % 16):
            raise ValueError(f"FP8 GEMM: local weight shape {(n, k)} must have both sides divisible by 16")

    def set_input_scale(self, scale) -> None:
        """Static activation scale (from calibration); required when activation_scaling is static."""
        if self.activation_scaling is not Fp8ActivationScaling.static:
            raise ValueError("input_scale: only for activation_scaling='static', this layer scales dynamically")
        self.input_scale = check_scale("input_scale", scale).to(self.weight.device)

    def check_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().check_weights(weight, bias)
        if not torch.isfinite(weight).all():
            raise ValueError("weight: contains NaN or Inf, cannot compute an FP8 scale")

    def store_weight(self, full: torch.Tensor, local: torch.Tensor) -> None:
        if self.weight_scaling is Fp8WeightScaling.per_tensor:
            scale = scale_from_amax(full.abs().amax()).reshape(1)
        else:
            scale = scale_from_amax(self.full_row_amax(full, local))
        scale = scale.to(self.weight.device)
        self.weight_scale.copy_(scale)
        self.weight.copy_(quantize_fp8(local.to(self.weight.device), scale[:, None]))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[..., in_local] -> [..., out_local], the bias (if any) added in the layer's dtype."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.activation_scaling is Fp8ActivationScaling.static:
            if self.input_scale is None:
                raise ValueError(
                    "input_scale: a static-scaled FP8 layer needs set_input_scale() (or load_weights input_scale=)"
                )
            s_x = self.input_scale
        else:
            s_x = None
        if self.use_fp8_gemm:
            if cuda_fp8.supports(x2):  # the same numbers as the torch ops below, in two fused passes
                xq, s_x = cuda_fp8.quantize(x2, s_x)
            else:
                xq, s_x = self._quantize(x2, s_x)
            y = self._scaled_mm(xq, s_x)
        else:
            xq, s_x = self._quantize(x2, s_x)
            w = self.weight.float() * self.weight_scale[:, None]
            y = (xq.float() * s_x) @ w.t()
        y = y.to(self.dtype)
        return (y if bias is None else y + bias).reshape(*lead, -1)

    @staticmethod
    def _quantize(x2: torch.Tensor, s_x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The specification of the activation quantizer (``s_x`` None: dynamic, from amax)."""
        if s_x is None:
            s_x = scale_from_amax(x2.abs().amax()).reshape(1)
        return quantize_fp8(x2, s_x), s_x

    def _scaled_mm(self, xq: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        if self.weight_scaling is Fp8WeightScaling.per_tensor:
            return torch._scaled_mm(xq, self.weight.t(), scale_a=s_x, scale_b=self.weight_scale, out_dtype=self.dtype)
        # Row-wise scaling wants one scale per row of A and per column of B, output in bf16.
        s_a = s_x.expand(xq.shape[0], 1).contiguous()
        s_b = self.weight_scale.reshape(1, -1)
        return torch._scaled_mm(xq, self.weight.t(), scale_a=s_a, scale_b=s_b, out_dtype=torch.bfloat16)


class FP8ColumnLinear(_Fp8Mixin, ColumnLinear):
    def __init__(self, *args, weight_scaling="per_tensor", activation_scaling="dynamic", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(weight_scaling, activation_scaling)

    def full_row_amax(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return local.abs().amax(dim=1)  # a column shard holds whole rows


class FP8RowLinear(_Fp8Mixin, RowLinear):
    def __init__(self, *args, weight_scaling="per_tensor", activation_scaling="dynamic", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(weight_scaling, activation_scaling)

    def full_row_amax(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return full.abs().amax(dim=1)  # over the whole row, so every rank uses the same scale
