"""FP8 quantize-dequantize projections (TensorRT-LLM's ``FP8Linear`` / ``FP8RowLinear``).

Weights are stored as float8 e4m3 with a per-tensor (or per-output-channel) fp32 scale;
activations are quantized on the fly with a per-tensor scale, static (from calibration) or
dynamic (current amax). ``x ≈ x_q · s`` with ``x_q = e4m3(clip(x / s, ±448))`` and
``s = amax · fp32(1/448)`` (``quant.py``). The activation quantizer and the GEMM are backend
operations: on the CUDA backend a fused quantizer kernel and ``torch._scaled_mm`` (FP8 matrix units,
fp32 accumulation), on the reference backend the same math in torch, emulated exactly (dequantize,
then an fp32 GEMM), so the semantics are testable on the CPU.

Scales that must agree across ranks do: a per-tensor weight scale comes from the full
(unsharded) weight, a per-channel one from the full row; ColumnLinear's dynamic input scale
sees the same input on every rank. RowLinear's dynamic input scale is per rank (each rank
quantizes its own slice; partial sums are dequantized before the all-reduce).
"""

from __future__ import annotations

import math

import torch

from ..backends import get_backend
from ..config import Fp8ActivationScaling, Fp8WeightScaling
from ..quant import quantize_e4m3, scale_from_amax
from .linear import ColumnLinear, RowLinear


def check_scale(name: str, scale) -> torch.Tensor:
    """A user-given scale: a positive, finite number (or 1-element tensor)."""
    value = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite scale > 0, got {scale!r}")
    return torch.tensor([float(value)], dtype=torch.float32)


class _Fp8Mixin:
    """Storage and GEMM of an FP8 layer; the sharding comes from the Column/Row base class."""

    def _init_fp8(self, weight_scaling, activation_scaling, backend) -> None:
        self.weight_scaling = Fp8WeightScaling(weight_scaling)
        self.activation_scaling = Fp8ActivationScaling(activation_scaling)
        n, k = self.weight.shape
        dev = self.weight.device
        self.weight = torch.nn.Parameter(torch.empty(n, k, dtype=torch.float8_e4m3fn, device=dev), requires_grad=False)
        n_scales = n if self.weight_scaling is Fp8WeightScaling.per_channel else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=dev))
        self.register_buffer("input_scale", None)
        # an Attention layer passes its own backend; a projection built alone picks the device's default
        self.backend = get_backend(None, dev, self.dtype) if backend is None else backend
        self.backend.check_fp8_weight(n, k)

    def set_input_scale(self, scale) -> None:
        """Static activation scale (from calibration); required when activation_scaling is static."""
        if self.activation_scaling is not Fp8ActivationScaling.static:
            raise ValueError("input_scale: only for activation_scaling='static', this layer scales dynamically")
        self.input_scale = check_scale("input_scale", scale).to(self.weight.device)

    def check_weights(self, weight, bias=None, *, names=("weight", "bias")) -> None:
        super().check_weights(weight, bias, names=names)
        if not torch.isfinite(weight).all():
            raise ValueError(f"{names[0]}: contains NaN or Inf, cannot compute an FP8 scale")

    def store_weight(self, full: torch.Tensor | None, local: torch.Tensor) -> None:
        if full is None:
            raise ValueError(
                "weight: FP8 layers load from the full weight (load_weights), not a sliced shard: "
                "their scales come from the full tensor's amax"
            )
        if self.weight_scaling is Fp8WeightScaling.per_tensor:
            scale = scale_from_amax(full.abs().amax()).reshape(1)
        else:
            scale = scale_from_amax(self.full_row_amax(full, local))
        scale = scale.to(self.weight.device)
        self.weight_scale.copy_(scale)
        self.weight.copy_(quantize_e4m3(local.to(self.weight.device), scale[:, None]))

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[..., in_local] -> [..., out_local], the bias (if any) added in the layer's dtype. ``out``:
        the result is copied there (the scaled FP8 GEMM has no output argument; the copy is the one
        the all-reduce would make of it otherwise)."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        s_x = None
        if self.activation_scaling is Fp8ActivationScaling.static:
            if self.input_scale is None:
                raise ValueError(
                    "input_scale: a static-scaled FP8 layer needs set_input_scale() (or load_weights input_scale=)"
                )
            s_x = self.input_scale
        xq, s_x = self.backend.fp8_quantize(x2, s_x)
        per_channel = self.weight_scaling is Fp8WeightScaling.per_channel
        y = self.backend.fp8_matmul(
            xq, s_x, self.weight, self.weight_scale, per_channel=per_channel, out_dtype=self.dtype
        )
        y = (y if bias is None else y + bias).reshape(*lead, -1)
        return y if out is None else out.copy_(y)


class FP8ColumnLinear(_Fp8Mixin, ColumnLinear):
    def __init__(self, *args, weight_scaling="per_tensor", activation_scaling="dynamic", backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(weight_scaling, activation_scaling, backend)

    def full_row_amax(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return local.abs().amax(dim=1)  # a column shard holds whole rows


class FP8RowLinear(_Fp8Mixin, RowLinear):
    def __init__(self, *args, weight_scaling="per_tensor", activation_scaling="dynamic", backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(weight_scaling, activation_scaling, backend)

    def full_row_amax(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return full.abs().amax(dim=1)  # over the whole row, so every rank uses the same scale
