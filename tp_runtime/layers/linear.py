"""Tensor-parallel linear layers (Megatron style).

``ColumnLinear`` keeps a subset of the output rows of the full weight: no communication,
its output is this rank's slice. ``RowLinear`` keeps the matching input columns: a local
GEMM gives a partial sum, which is all-reduced over the group; the bias is added once, by
rank 0's GEMM (cuBLAS's bias epilogue; the FP8 layers add it after their scaled GEMM), so the
reduced sum carries it exactly once. Adding it after the reduce instead would cost every rank one
more kernel launch per layer and step; the two differ only in where one rounding falls. Where the
communicator fuses that epilogue (the custom CUDA all-reduce) the bias goes to the all-reduce, and
the GEMM writes its partial sums straight into the communicator's registered buffer (no copy-in).
Both allocate only their shard and load it from the full weight.
Subclasses (``layers/fp8.py``) change how the shard is stored and multiplied, not how it is chosen.
"""

from __future__ import annotations

import torch

from ..distributed.comm import Communicator
from ..sharding import even_range
from .placement import refuse_move


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A full weight or bias given by the user: a floating-point tensor of the ``expected`` shape."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


class _ShardedLinear(torch.nn.Module):
    """Shard bookkeeping shared by both layers: full shapes, the local weight, the bias."""

    def __init__(
        self, in_features: int, out_features: int, local_shape: tuple[int, int], bias_size: int | None, dtype, device
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.weight = torch.nn.Parameter(torch.empty(*local_shape, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            torch.nn.Parameter(torch.empty(bias_size, dtype=dtype, device=device), requires_grad=False)
            if bias_size is not None
            else None
        )

    def _apply(self, fn, recurse=True):
        refuse_move(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"local_weight={tuple(self.weight.shape)}, bias={self.bias is not None}, dtype={self.dtype}, "
            f"device={self.weight.device}"
        )

    def shard(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full ``weight [out, in]``."""
        raise NotImplementedError

    def shard_bias(self, bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def check_weights(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, names: tuple[str, str] = ("weight", "bias")
    ) -> None:
        """Raise ``ValueError`` unless ``load_weights(weight, bias)`` would succeed; changes nothing.
        ``names``: what the caller calls the two arguments, for the messages."""
        check_shape(names[0], weight, (self.out_features, self.in_features))
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"{names[1]}: layer built with bias={self.bias is not None}, got {'no' if bias is None else 'a'} bias"
            )
        if bias is not None:
            check_shape(names[1], bias, (self.out_features,))

    def load_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's shard from the full ``weight [out, in]`` and ``bias [out]``."""
        self.check_weights(weight, bias)
        self.store_weight(weight, self.shard(weight))
        if bias is not None:
            self.bias.copy_(self.shard_bias(bias))

    def check_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` unless ``load_shard(weight, bias)`` would succeed; changes nothing."""
        check_shape("weight (this rank's shard)", weight, tuple(self.weight.shape))
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"bias: layer built with bias={self.bias is not None}, got {'no' if bias is None else 'a'} bias"
            )
        if bias is not None:
            check_shape("bias (this rank's shard)", bias, tuple(self.bias.shape))

    @torch.no_grad()
    def load_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's shard as already sliced (a checkpoint reader's slice reads): ``weight`` of
        the local shape ``self.weight.shape``, ``bias`` of ``self.bias.shape`` (RowLinear: the whole bias)."""
        self.check_shard(weight, bias)
        self.store_weight(None, weight)
        if bias is not None:
            self.bias.copy_(bias)

    def store_weight(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Keep the local shard (FP8 layers quantize it here, with scales from ``full``; ``full`` is
        None when the shard arrives already sliced)."""
        del full
        self.weight.copy_(local)

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x · W_localᵀ (+ bias)``: [..., in_local] -> [..., out_local]. ``out`` (contiguous, that
        shape, no bias): the GEMM writes there and returns it (a communicator's registered buffer)."""
        if out is None:
            return torch.nn.functional.linear(x, self.weight, bias)
        if bias is not None:
            raise ValueError("matmul: out= takes no bias (the fused all-reduce adds it)")
        # [rows, in_local] x [in_local, out_local] straight into out's memory
        torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t(), out=out.view(-1, out.shape[-1]))
        return out


class ColumnLinear(_ShardedLinear):
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
        if rows is None:
            r = even_range(out_features, comm.size, comm.rank, "out_features")
            rows = torch.arange(r.start, r.stop)
        n = rows.numel()
        super().__init__(in_features, out_features, (n, in_features), n if bias else None, dtype, device)
        self.register_buffer("rows", rows.to(torch.long), persistent=False)

    def shard(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_select(0, self.rows.to(weight.device))

    def shard_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.index_select(0, self.rows.to(bias.device))

    def forward(self, x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:  # [..., in] -> [..., n_local]
        """``with_bias=False`` leaves the bias to a later fused step (attention's prepare kernel)."""
        y = self.matmul(x)
        return y + self.bias if with_bias and self.bias is not None else y


class RowLinear(_ShardedLinear):
    """``y = all_reduce(x_r · W[:, cols_r]ᵀ + [r == 0] · b)``: input is this rank's slice of the
    features; the bias enters once, through rank 0's GEMM, or through the all-reduce's fused
    epilogue where the communicator has one (the custom CUDA all-reduce)."""

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
        cols = even_range(in_features, comm.size, comm.rank, "in_features")
        super().__init__(
            in_features, out_features, (out_features, len(cols)), out_features if bias else None, dtype, device
        )
        self.comm, self.cols = comm, cols

    def shard(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[:, self.cols.start : self.cols.stop]

    def shard_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias  # whole on every rank; only rank 0's GEMM adds it

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_local] -> [..., out]
        if self.comm.fuses_epilogue:  # the all-reduce kernel adds the bias once, to the fp32 sum
            # The GEMM writes its partial sums straight into the communicator's registered buffer
            # where the message takes the custom path (no copy-in); None: a tensor of its own.
            buffer = self.comm.all_reduce_buffer((*x.shape[:-1], self.out_features), self.dtype)
            return self.comm.all_reduce(self.matmul(x, out=buffer).contiguous(), bias=self.bias)
        bias = self.bias if self.comm.rank == 0 else None
        return self.comm.all_reduce(self.matmul(x, bias).contiguous())
