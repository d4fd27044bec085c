"""ColumnLinear -> RowLinear on every rank equals the unsharded computation.

usage: linear_worker.py [TP_SIZE]
Each TP group gets its own input (seeded by its dp_rank), so groups that leaked into each
other's all-reduce would give wrong sums. Weights are the same full tensors on every rank.
"""

import sys

import torch

import tp_runtime
from tp_runtime import ColumnLinear, RowLinear

HIDDEN, TOKENS = 48, 9


def main() -> None:
    world = tp_runtime.init(tp_size=int(sys.argv[1]) if len(sys.argv) > 1 else None)
    dev, comm = world.device, world.tp_comm
    linear = torch.nn.functional.linear
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        w1 = torch.randn(4 * HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5
        b1 = torch.randn(4 * HIDDEN, generator=g)
        w2 = torch.randn(HIDDEN, 4 * HIDDEN, generator=g) / (4 * HIDDEN) ** 0.5
        b2 = torch.randn(HIDDEN, generator=g)
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + world.dp_rank))
        full = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
        x, w1, b1, w2, b2 = (t.to(dev) for t in full)

        col = ColumnLinear(HIDDEN, 4 * HIDDEN, comm=comm, dtype=dtype, device=dev)
        row = RowLinear(4 * HIDDEN, HIDDEN, comm=comm, dtype=dtype, device=dev)
        col.load_weights(w1, b1)
        row.load_weights(w2, b2)
        y = row(col(x))

        # Oracle: float64 on the CPU. Budget: twice torch's own unsharded error in this dtype,
        # plus one rounding at the output's scale for each rank's partial sum.
        x64, w1_64, b1_64, w2_64, b2_64 = (t.double() for t in full)
        exact = linear(linear(x64, w1_64, b1_64), w2_64, b2_64)
        plain_err = (linear(linear(x, w1, b1), w2, b2).cpu().double() - exact).abs().max().item()
        rounding = torch.finfo(dtype).eps / 2 * exact.abs().max().item()
        err = (y.cpu().double() - exact).abs().max().item()
        budget = 2 * plain_err + world.tp_size * rounding
        assert err <= budget, f"{dtype}: error {err:.3g} > {budget:.3g}"
        # Every rank of the group holds the same output, bit for bit.
        copies = comm.all_gather(y)
        assert all(torch.equal(c, copies[0]) for c in copies), f"{dtype}: ranks of group {world.dp_rank} differ"
    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
