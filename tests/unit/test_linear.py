"""ColumnLinear -> RowLinear under simulated tensor parallelism equals the unsharded layers.

Each simulated rank builds its shard from the same full weights; the oracle is the plain
unsharded computation (torch in the same dtype, and float64 for the error budget).
"""

from __future__ import annotations

import pytest
import torch
from simulated import ThreadComm, simulate

from tp_runtime import ColumnLinear, RowLinear
from tp_runtime.sharding import head_layout, qkv_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def full_pair(hidden: int, dtype: torch.dtype, seed: int = 0):
    """Full weights of hidden -> 4*hidden -> hidden, and an input; ~unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    inner = 4 * hidden
    w1 = torch.randn(inner, hidden, generator=g) / hidden**0.5
    b1 = torch.randn(inner, generator=g)
    w2 = torch.randn(hidden, inner, generator=g) / inner**0.5
    b2 = torch.randn(hidden, generator=g)
    x = torch.randn(7, hidden, generator=g)
    return [t.to(dtype) for t in (x, w1, b1, w2, b2)]


def unsharded(x, w1, b1, w2, b2):
    linear = torch.nn.functional.linear
    return linear(linear(x, w1, b1), w2, b2)


def assert_matches(got: torch.Tensor, fn, *inputs: torch.Tensor, partials: int = 1) -> None:
    """``got`` equals ``fn(*inputs)`` computed unsharded: in fp32 to 1e-6. In fp16/bf16, against
    float64: twice the error of torch's own computation in that dtype, plus one rounding (at the
    output's scale) for each of the ``partials`` partial sums that were rounded to the dtype."""
    plain = fn(*inputs).double()
    if got.dtype == torch.float32:
        assert (got.double() - plain).abs().max() <= 1e-6
    else:
        exact = fn(*(t.double() for t in inputs))
        rounding = torch.finfo(got.dtype).eps / 2 * exact.abs().max()
        assert (got.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + partials * rounding


def sharded(comm, x, w1, b1, w2, b2):
    hidden, inner = x.shape[1], w1.shape[0]
    col = ColumnLinear(hidden, inner, comm=comm, dtype=x.dtype)
    row = RowLinear(inner, hidden, comm=comm, dtype=x.dtype)
    col.load_weights(w1, b1)
    row.load_weights(w2, b2)
    h = col(x)
    return h, row(h)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_then_row_equals_unsharded(tp, dtype):
    x, w1, b1, w2, b2 = full_pair(24, dtype, seed=tp)
    outs = simulate(tp, lambda comm: sharded(comm, x, w1, b1, w2, b2))

    # Column: the ranks' outputs side by side are the full output (no communication).
    assert_matches(torch.cat([h for h, _ in outs], dim=1), torch.nn.functional.linear, x, w1, b1)
    # Row: every rank ends with the same full output (bias added once, by rank 0's GEMM).
    ys = [y for _, y in outs]
    assert all(torch.equal(y, ys[0]) for y in ys)
    assert_matches(ys[0], unsharded, x, w1, b1, w2, b2, partials=tp)


def test_column_with_qkv_rows_keeps_the_ranks_heads():
    H, KV, D, hidden, tp = 8, 2, 4, 16, 4
    g = torch.Generator().manual_seed(1)
    w = torch.randn((H + 2 * KV) * D, hidden, generator=g)
    b = torch.randn((H + 2 * KV) * D, generator=g)
    x = torch.randn(5, hidden, generator=g)
    full = torch.nn.functional.linear(x, w, b)

    def rank(comm):
        lay = head_layout(H, KV, comm.size, comm.rank)
        rows = qkv_rows(lay, D)
        col = ColumnLinear(hidden, w.shape[0], comm=comm, rows=rows)
        col.load_weights(w, b)
        return rows, col(x)

    for rows, out in simulate(tp, rank):
        assert (out - full[:, rows]).abs().max() <= 1e-6


@pytest.mark.parametrize("cls", [ColumnLinear, RowLinear])
def test_load_weights_checks_shapes(cls):
    def rank(comm):
        layer = cls(8, 16, comm=comm)
        with pytest.raises(ValueError, match=r"weight: expected shape \(16, 8\), got \(8, 16\)"):
            layer.load_weights(torch.zeros(8, 16), torch.zeros(16))
        with pytest.raises(ValueError, match=r"bias: expected shape \(16,\), got \(15,\)"):
            layer.load_weights(torch.zeros(16, 8), torch.zeros(15))
        with pytest.raises(ValueError, match="bias"):
            layer.load_weights(torch.zeros(16, 8))

    simulate(2, rank)


# The simulated group itself, which the tests above (and the attention tests) rely on.


@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64], ids=str)
def test_simulated_collectives(dtype):
    size = 4

    def value(rank):  # each rank's tensor, small integers: exact in every dtype
        return (torch.arange(6).reshape(2, 3) * (rank + 1) - rank).to(dtype)

    def rank(comm: ThreadComm):
        reduced = comm.all_reduce(value(comm.rank))
        gathered = comm.all_gather(value(comm.rank))
        broadcast = comm.broadcast(value(comm.rank), root=2)
        comm.barrier()
        return reduced, gathered, broadcast

    for reduced, gathered, broadcast in simulate(size, rank):
        assert torch.equal(reduced, sum(value(r).double() for r in range(size)).to(dtype))
        assert torch.equal(gathered, torch.stack([value(r) for r in range(size)]))
        assert torch.equal(broadcast, value(2))


def test_simulated_error_on_one_rank_is_raised_without_hanging():
    def rank(comm):
        if comm.rank == 1:
            raise KeyError("only rank 1")
        comm.all_reduce(torch.ones(3))  # would wait for rank 1 forever

    with pytest.raises(KeyError, match="only rank 1"):
        simulate(3, rank, timeout=30)


def test_simulated_collective_checks_tensors():
    def rank(comm):
        comm.all_reduce(torch.ones(4, 4).t())

    with pytest.raises(ValueError, match="contiguous"):
        simulate(2, rank)
