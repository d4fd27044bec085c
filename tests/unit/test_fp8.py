"""FP8 qdq projections: the emulation against a straightforward torch reference, sharding, bad scales."""

import math

import pytest
import torch

from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.fp8 import FP8ColumnLinear, FP8RowLinear


class _PartialComm(NoComm):
    """Rank ``rank`` of ``size`` whose all-reduce is left to the test (partial sums are summed there)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def _reference_qdq(x, w, *, per_channel, input_scale=None):
    """Independent oracle: quantize both operands to e4m3 and multiply the dequantized values in fp64."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    inv = 1 / fmax  # scales are amax * fp32(1/448), the same on every device (fp8.scale_from_amax)
    s_w = (w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()) * inv
    s_x = torch.tensor(input_scale) if input_scale is not None else x.abs().amax() * inv
    wq = torch.clamp(w.float() / s_w, -fmax, fmax).to(torch.float8_e4m3fn).double() * s_w.double()
    xq = torch.clamp(x.float() / s_x, -fmax, fmax).to(torch.float8_e4m3fn).double() * s_x.double()
    return xq @ wq.t()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_column_emulation_matches_reference(per_channel, dtype):
    torch.manual_seed(1)
    w, x = torch.randn(48, 32), torch.randn(5, 3, 32) * 3
    layer = FP8ColumnLinear(
        32, 48, comm=NoComm(), bias=False, dtype=dtype, weight_scaling="per_channel" if per_channel else "per_tensor"
    )
    layer.load_weights(w.to(dtype))
    got = layer(x.to(dtype))
    ref = _reference_qdq(x.to(dtype).float().reshape(-1, 32), w.to(dtype).float(), per_channel=per_channel)
    # Only the final rounding to the activation dtype separates the two (fp32 vs fp64 sums aside).
    torch.testing.assert_close(got.reshape(-1, 48).double(), ref.to(dtype).double(), rtol=1e-2, atol=1e-3)
    assert got.shape == (5, 3, 48) and got.dtype == dtype


def test_static_scale_tp_equals_tp1():
    """With static input scales, quantization is elementwise, so tp=N sums to tp=1 up to fp32 rounding."""
    torch.manual_seed(2)
    w, x = torch.randn(32, 64), torch.randn(7, 64)
    dt = torch.bfloat16

    def run(rank, size):
        layer = FP8RowLinear(64, 32, comm=_PartialComm(rank, size), bias=False, dtype=dt, activation_scaling="static")
        layer.load_weights(w.to(dt))
        layer.set_input_scale(0.01)
        cols = layer.cols
        return layer.matmul(x.to(dt)[:, cols.start : cols.stop]).float()

    full = run(0, 1)
    for size in (2, 4):
        parts = sum(run(r, size) for r in range(size))
        torch.testing.assert_close(parts, full, rtol=2e-2, atol=2e-2)
    assert (full - run(0, 2)).abs().max() > 0.1  # a single rank's partial is not the whole sum


@pytest.mark.parametrize("size", [1, 2, 3])
def test_row_bias_enters_the_sum_once(size):
    """The bias is added by rank 0 only (before the all-reduce): summed over ranks it appears once."""
    torch.manual_seed(4)
    w, b, x = torch.randn(24, 48), torch.randn(24) * 4, torch.randn(5, 48)
    dt = torch.bfloat16

    def run(rank, bias):
        layer = FP8RowLinear(48, 24, comm=_PartialComm(rank, size), bias=bias is not None, dtype=dt,
                             activation_scaling="static")  # fmt: skip
        layer.load_weights(w.to(dt), None if bias is None else bias.to(dt))
        layer.set_input_scale(0.02)
        cols = layer.cols
        return layer(x.to(dt)[:, cols.start : cols.stop]).float()  # NoComm: this rank's partial sum

    with_bias = sum(run(r, b) for r in range(size))
    without = sum(run(r, None) for r in range(size))
    torch.testing.assert_close(with_bias - without, b.to(dt).float().expand(5, -1), rtol=2e-2, atol=6e-2)


def test_row_weight_scale_same_on_every_rank():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    scales = []
    for rank in range(4):
        layer = FP8RowLinear(
            64, 16, comm=_PartialComm(rank, 4), bias=False, dtype=torch.float16, weight_scaling="per_channel"
        )
        layer.load_weights(w.half())
        scales.append(layer.weight_scale.clone())
    expected = w.half().float().abs().amax(dim=1) * (1 / 448)
    for s in scales:
        torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_scales_rejected(bad):
    layer = FP8ColumnLinear(16, 16, comm=NoComm(), dtype=torch.float16, activation_scaling="static")
    with pytest.raises(ValueError, match="input_scale"):
        layer.set_input_scale(bad)


def test_static_scale_required_and_dynamic_rejects_it():
    layer = FP8ColumnLinear(16, 16, comm=NoComm(), dtype=torch.float16, activation_scaling="static", bias=False)
    layer.load_weights(torch.randn(16, 16).half())
    with pytest.raises(ValueError, match="input_scale"):
        layer(torch.randn(2, 16).half())
    dyn = FP8ColumnLinear(16, 16, comm=NoComm(), dtype=torch.float16)
    with pytest.raises(ValueError, match="static"):
        dyn.set_input_scale(1.0)


def test_nonfinite_weight_rejected():
    layer = FP8ColumnLinear(16, 16, comm=NoComm(), dtype=torch.float16, bias=False)
    w = torch.randn(16, 16).half()
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="weight"):
        layer.load_weights(w)


def test_config_rejects_fp8_with_fp32():
    with pytest.raises(ValueError, match="quant_mode"):
        AttentionConfig(hidden_size=64, num_heads=4, quant_mode="fp8_qdq")
    with pytest.raises(ValueError, match="fp8_weight_scaling"):
        AttentionConfig(
            hidden_size=64, num_heads=4, dtype=torch.float16, quant_mode="fp8_qdq", fp8_weight_scaling="per_row"
        )
