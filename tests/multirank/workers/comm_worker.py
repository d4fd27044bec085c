"""Every collective of the TP communicator that init() picks (MpiComm on CPU, NcclComm on CUDA).

usage: comm_worker.py BARRIER_DIR [TP_SIZE]     (default: the whole world)
Expected values come from rank numbers: every rank regenerates every rank's input from its seed.
"""

import sys
import time
from pathlib import Path

import torch

import tp_runtime
from tp_runtime.distributed.comm import MpiComm, NcclComm

SHAPES = [(1,), (7, 13), (3, 5, 1025)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def rank_input(rank: int, shape: tuple[int, ...], dtype: torch.dtype, integers: bool) -> torch.Tensor:
    """Rank ``rank``'s tensor (on the CPU). Integers in [-8, 8] + rank have exact sums in every dtype."""
    g = torch.Generator().manual_seed(1009 * rank + len(shape))
    if integers:
        return (torch.randint(-8, 9, shape, generator=g) + rank).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def main() -> None:
    barrier_dir = Path(sys.argv[1])
    world = tp_runtime.init(tp_size=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    comm, dev, n = world.tp_comm, world.device, world.tp_size
    assert isinstance(comm, NcclComm if dev.type == "cuda" else MpiComm), type(comm)
    assert (comm.rank, comm.size) == (world.tp_rank, world.tp_size)

    for shape in SHAPES:
        for dtype in FLOATS + [torch.int32, torch.int64]:
            # all_reduce, exact: small integers.
            mine = rank_input(comm.rank, shape, dtype, integers=True).to(dev)
            out = comm.all_reduce(mine)
            assert out is mine, "all_reduce must work in place"
            expected = sum(rank_input(r, shape, torch.float64, integers=True) for r in range(n)).to(dtype)
            assert torch.equal(out.cpu(), expected), (shape, dtype)

        for dtype in FLOATS:
            # all_reduce, random values: within n roundings of the exact (float64) sum.
            inputs = [rank_input(r, shape, dtype, integers=False) for r in range(n)]
            mine = inputs[comm.rank].to(dev, copy=True)  # a copy: the in-place collectives must not change inputs
            comm.all_reduce(mine)
            exact = sum(t.double() for t in inputs)
            bound = n * torch.finfo(dtype).eps * sum(t.double().abs() for t in inputs) + 1e-30
            assert ((mine.cpu().double() - exact).abs() <= bound).all(), (shape, dtype)

            # all_gather: every rank's tensor, bit for bit, in rank order.
            gathered = comm.all_gather(inputs[comm.rank].to(dev))
            assert gathered.shape == (n, *shape) and gathered.dtype == dtype
            assert torch.equal(gathered.cpu(), torch.stack(inputs)), (shape, dtype)

            # broadcast from every root, in place.
            for root in range(n):
                mine = inputs[comm.rank].to(dev, copy=True)
                out = comm.broadcast(mine, root=root)
                assert out is mine, "broadcast must work in place"
                assert torch.equal(mine.cpu(), inputs[root]), (shape, dtype, root)

    # barrier: ranks arrive at different times; nobody leaves before everyone has arrived.
    time.sleep(0.3 * comm.rank)
    (barrier_dir / f"dp{world.dp_rank}-tp{comm.rank}").touch()
    comm.barrier()
    missing = [r for r in range(n) if not (barrier_dir / f"dp{world.dp_rank}-tp{r}").exists()]
    assert not missing, f"left the barrier before ranks {missing} arrived"

    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
