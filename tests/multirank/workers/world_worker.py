"""World fields, repeated init, torch.distributed over the same groups, and the rank-0-only log.

usage: world_worker.py [TP_SIZE]     (default: the whole world)
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from mpi4py import MPI

import tp_runtime
from tp_runtime.distributed.world import cuda_unusable_reason

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "launch"))
from benchlib import init_torch_distributed  # noqa: E402


def main() -> None:
    tp_size = int(sys.argv[1]) if len(sys.argv) > 1 else None
    world = tp_runtime.init(tp_size=tp_size)
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    tp = tp_size or size
    assert (world.rank, world.size, world.tp_size) == (rank, size, tp)
    # One node: the shared-memory split holds every rank.
    assert (world.local_rank, world.local_size) == (rank, size)
    assert (world.tp_rank, world.dp_rank, world.dp_size) == (rank % tp, rank // tp, size // tp)
    assert world.tp_comm.size == tp and world.tp_comm.rank == rank % tp
    expected_device = torch.device("cpu") if cuda_unusable_reason() else torch.device("cuda", rank)
    assert world.device == expected_device, (world.device, expected_device)

    assert tp_runtime.init() is world and tp_runtime.init(tp_size=tp) is world
    try:
        tp_runtime.init(tp_size=tp * 2)
    except RuntimeError as exc:
        assert f"tp_size={tp * 2}" in str(exc), exc
    else:
        raise AssertionError("init with another tp_size did not raise")

    # torch.distributed over the same ranks (the benchmarks' baseline), in this rank's TP group.
    group = init_torch_distributed(world)
    t = torch.full((3,), float(rank), device=world.device)
    dist.all_reduce(t, group=group)
    first = world.dp_rank * tp
    assert t.tolist() == [float(sum(range(first, first + tp)))] * 3, t
    dist.destroy_process_group()

    world.log.info(f"log line from rank {rank}")
    world.log_all.info("log_all line")
    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
