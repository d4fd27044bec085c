"""A tensor-parallel group simulated in one process: one thread per rank.

    outputs = simulate(tp_size, lambda comm: layer_for(comm)(x))

runs the function once per rank, each with a ``ThreadComm`` whose collectives really
combine the ranks' tensors (the threads meet at a barrier), and returns the per-rank
results in rank order. It checks tensors like the real communicators do (dtype,
contiguity), so a layer that passes here fails on MPI/NCCL only for transport reasons.

All-reduce sums in rank order, half types in float32 rounded once (as ``MpiComm`` does),
so every rank gets the bit-identical result. If any rank raises, the others are released
(broken barrier) and ``simulate`` raises that rank's exception itself; a rank that skips a
collective the others enter makes them fail after ``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from tp_runtime.distributed.comm import Communicator, check_root, check_tensor

R = TypeVar("R")


class _Group:
    def __init__(self, size: int, timeout: float):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadComm(Communicator):
    """One rank of a simulated group; see the module docstring."""

    def __init__(self, group: _Group, rank: int):
        self._group = group
        self.rank = rank
        self.size = group.size

    def _exchange(self, who: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order (snapshots: callers may then write theirs)."""
        check_tensor(f"ThreadComm.{who}", tensor, tensor.device)
        group = self._group
        group.slots[self.rank] = tensor.clone()
        group.barrier.wait()  # all slots written
        tensors = list(group.slots)
        group.barrier.wait()  # all slots read: the next collective may overwrite them
        return tensors

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        wide = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
        parts = self._exchange("all_reduce", tensor)
        total = parts[0].to(wide, copy=True)  # a copy: the snapshots are shared by all ranks
        for part in parts[1:]:
            total += part.to(wide)
        return tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange("all_gather", tensor))

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        check_root("ThreadComm.broadcast", root, self.size)
        return tensor.copy_(self._exchange("broadcast", tensor)[root])

    def barrier(self) -> None:
        self._group.barrier.wait()

    def host_allgather(self, values: list[int], what: str) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64)
        return [t.tolist() for t in self._exchange(f"host_allgather ({what})", mine)]


def simulate(tp_size: int, fn: Callable[[Communicator], R], timeout: float = 60.0) -> list[R]:
    """Run ``fn(comm)`` for every rank of a simulated group of ``tp_size``; results in rank order."""
    group = _Group(tp_size, timeout)
    results: list = [None] * tp_size
    errors: list[BaseException | None] = [None] * tp_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors[rank] = exc
            group.barrier.abort()  # release the ranks waiting for this one

    threads = [threading.Thread(target=run, args=(rank,), name=f"tp-rank-{rank}") for rank in range(tp_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Raise the original error (its type is what tests check), not the broken barriers it caused.
    failures = sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if failures:
        raise failures[0]
    return results
