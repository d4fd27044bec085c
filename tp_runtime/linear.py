"""Tensor-parallel linear layers (Megatron style).

``ColumnLinear`` keeps a subset of the output rows of the full weight: no communication,
its output is this rank's slice. ``RowLinear`` keeps the matching input columns: a local
GEMM gives a partial sum, which is all-reduced over the group; the bias is added once,
after the reduce. Both allocate only their shard and load it from the full weight.
"""

from __future__ import annotations

import torch

from .comm import Communicator
from .sharding import even_range


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


class ColumnLinear(torch.nn.Module):
    """``y_r = x · W[rows]ᵀ + b[rows]`` where ``rows`` are this rank's output rows.

    ``rows`` defaults to the rank's even contiguous share of ``out_features``; the fused
    QKV projection passes ``sharding.qkv_rows`` instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        comm: Communicator,
        bias: bool = True,
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if rows is None:
            r = even_range(out_features, comm.size, comm.rank, "out_features")
            rows = torch.arange(r.start, r.stop)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("rows", rows.to(torch.long), persistent=False)
        n = rows.numel()
        self.weight = torch.nn.Parameter(torch.empty(n, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            torch.nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @torch.no_grad()
    def load_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's rows from the full ``weight [out, in]`` and ``bias [out]``."""
        _check_shape("weight", weight, (self.out_features, self.in_features))
        rows = self.rows.to(weight.device)
        self.weight.copy_(weight.index_select(0, rows))
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias: layer built with bias={self.bias is not None}, got {'no' if bias is None else 'a'} bias")
        if bias is not None:
            _check_shape("bias", bias, (self.out_features,))
            self.bias.copy_(bias.index_select(0, rows.to(bias.device)))

    def forward(self, x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:  # [..., in] -> [..., n_local]
        """``with_bias=False`` leaves the bias to a later fused step (attention's prepare kernel)."""
        return torch.nn.functional.linear(x, self.weight, self.bias if with_bias else None)


class RowLinear(torch.nn.Module):
    """``y = all_reduce(x_r · W[:, cols_r]ᵀ) + b``: input is this rank's slice of the features."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        comm: Communicator,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.comm = comm
        self.cols = even_range(in_features, comm.size, comm.rank, "in_features")
        self.in_features, self.out_features = in_features, out_features
        n = len(self.cols)
        self.weight = torch.nn.Parameter(torch.empty(out_features, n, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @torch.no_grad()
    def load_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's columns from the full ``weight [out, in]``; the full ``bias [out]``."""
        _check_shape("weight", weight, (self.out_features, self.in_features))
        self.weight.copy_(weight[:, self.cols.start : self.cols.stop])
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias: layer built with bias={self.bias is not None}, got {'no' if bias is None else 'a'} bias")
        if bias is not None:
            _check_shape("bias", bias, (self.out_features,))
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_local] -> [..., out]
        y = torch.nn.functional.linear(x, self.weight).contiguous()
        y = self.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
