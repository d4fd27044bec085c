"""Collective communication for one tensor-parallel group, behind one small interface.

``Communicator`` is what layers see. Implementations:
  - ``NoComm``: group of size 1, no communication at all.
  - ``MpiComm``: CPU tensors, over an mpi4py communicator.
  - ``NcclComm``: CUDA tensors, NCCL through ``cupy.cuda.nccl``, on torch's current stream; small and
    medium all-reduces through the custom CUDA-IPC kernel (``custom_all_reduce``) where it applies.
All collectives act in place where the result has the input's shape and return a tensor.
Every collective of ``MpiComm`` and ``NcclComm`` checks its tensor first (device, dtype,
contiguity) and raises ``ValueError``/``TypeError`` naming what it expected and what it got.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from . import watchdog
from .custom_all_reduce import CustomAllReduce, Route
from .watchdog import TIMEOUT_ENV, CollectiveTimeout, NcclWatchdog, world_rank


class Communicator:
    """A tensor-parallel group: ``rank`` in ``[0, size)``."""

    rank: int = 0
    size: int = 1
    # Whether ``all_reduce``'s bias/residual are fused into the reduction (one rounding, no extra
    # kernel): then a row-parallel layer hands its bias to the all-reduce instead of rank 0's GEMM.
    fuses_epilogue: bool = False

    def all_reduce(
        self, tensor: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it. ``bias`` (``[tensor.shape[-1]]``, the same
        on every rank) is added once to the sum, then ``residual`` (``tensor``'s shape): the custom
        CUDA all-reduce fuses both into its kernel, the other paths add them after the sum."""
        raise NotImplementedError

    def all_reduce_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Where the producer of the next ``all_reduce`` of a ``shape`` ``dtype`` message may write it
        (a GEMM's ``out=``) to spare the copy into the transport's registered buffer, or None where
        there is none (then it makes its own tensor, as always). ``all_reduce`` of that tensor returns
        the sum in a new tensor; write it only after the previous ``all_reduce`` was enqueued, on the
        same stream, and pass it to the very next one."""
        return None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[size, *tensor.shape]``: every rank's tensor, in rank order."""
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with ``root``'s, in place; returns it."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def host_allgather(self, values: list[int], what: str) -> list[list[int]]:
        """Every rank's list of int64 ``values`` (same length on every rank), in rank order, over the
        host (MPI): no device work, no device synchronization. ``what`` names it in a timeout."""
        raise NotImplementedError


def add_epilogue(tensor: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """``tensor += bias; tensor += residual`` (each optional), in place: the epilogue of an all-reduce
    whose transport does not fuse it."""
    if bias is not None:
        tensor.add_(bias)
    if residual is not None:
        tensor.add_(residual)
    return tensor


class NoComm(Communicator):
    """A group of one rank: every collective is the identity."""

    def all_reduce(
        self, tensor: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        return add_epilogue(tensor, bias, residual)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0).clone()

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        if root != 0:
            raise ValueError(f"broadcast root must be 0 in a group of size 1, got {root}")
        return tensor

    def barrier(self) -> None:
        return None

    def host_allgather(self, values: list[int], what: str) -> list[list[int]]:
        return [list(values)]


# Floating types are what layers communicate; the integer types are for internal use
# (lengths, flags). Both implementations support exactly these.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def check_tensor(who: str, tensor: object, device: torch.device) -> None:
    """Raise unless ``tensor`` is a contiguous tensor of a supported dtype on ``device``.

    ``device`` with no index (``cpu``) matches any tensor of that device type.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != device.type or (device.index is not None and tensor.device != device):
        raise ValueError(f"{who}: expected a tensor on {device}, got one on {tensor.device}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{who}: expected dtype in ({names}), got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{who}: expected a contiguous tensor, got shape {tuple(tensor.shape)} with strides {tensor.stride()}"
        )


def raise_if_any(mpi_comm, error: str | None, what: str, payload: object = None) -> object:
    """Collective over ``mpi_comm``: raise on every rank if any rank passes an ``error``.

    Use it where one rank alone could fail and leave the others waiting in the next
    collective. Returns rank 0's ``payload`` (so one exchange can also share a value).
    """
    gathered = mpi_comm.allgather((error, payload))
    failed = [(rank, err) for rank, (err, _) in enumerate(gathered) if err is not None]
    if failed:
        lines = "; ".join(f"rank {rank}: {err}" for rank, err in failed)
        raise RuntimeError(f"{what} failed on {len(failed)} of {len(gathered)} ranks: {lines}")
    return gathered[0][1]


def agree_no_error(host: Communicator, check, what: str) -> None:
    """Run ``check()`` (raises on a local failure) on every rank, then raise on every rank if it raised
    on any: one host exchange under the collective deadline, so no rank is left waiting in the
    next collective while another raises alone. Also a barrier."""
    error: Exception | None = None
    try:
        check()
    except Exception as exc:  # reported to every rank below, then re-raised here
        error = exc
    failed = [rank for rank, (code,) in enumerate(host.host_allgather([int(error is not None)], what)) if code]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what}: failed on rank(s) {failed} (their own message says why)")


def check_root(who: str, root: int, size: int) -> None:
    if not 0 <= root < size:
        raise ValueError(f"{who}: expected root in [0, {size}), got {root}")


_SPIN_S = 2e-4  # MpiComm spins this long on a pending collective before it starts to sleep


class MpiComm(Communicator):
    """CPU tensors over an mpi4py communicator (the CPU path and CI).

    MPI has no bfloat16 and mpi4py no portable half type, so ``all_reduce`` of fp16 and
    bf16 sums a float32 copy and rounds the result once (more accurate than a reduction in
    the half type). ``all_gather`` and ``broadcast`` only move data: half types travel as
    their 16-bit patterns, exactly.
    """

    def __init__(self, mpi_comm):
        # Imported here, not at the top: importing mpi4py.MPI initialises MPI, which
        # `import tp_runtime` must not do (world.init does it).
        from mpi4py import MPI

        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()

    @staticmethod
    def _buffer(tensor: torch.Tensor):
        """A numpy view sharing ``tensor``'s memory that MPI can move bit for bit."""
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.view(torch.int16)
        return tensor.detach().numpy()

    def _wait(self, request, what: str) -> None:
        """Wait for a nonblocking MPI collective, at most ``collective_timeout()`` seconds.

        On expiry raise ``CollectiveTimeout``; under ``python -m mpi4py`` (launch/tp_run) the
        uncaught exception aborts the whole job, which is the point.
        """
        start = time.monotonic()
        deadline = start + watchdog.collective_timeout()
        pause = 0.0
        while not request.Test():
            now = time.monotonic()
            if now - start < _SPIN_S:  # a collective of ranks that arrive together: no sleep at all
                continue
            if now > deadline:
                raise CollectiveTimeout(
                    f"rank {world_rank()} (TP rank {self.rank}/{self.size}): MpiComm.{what} did not complete within "
                    f"{watchdog.collective_timeout():g} s: a peer died, skipped it or is stuck "
                    f"({TIMEOUT_ENV} sets the deadline)"
                )
            time.sleep(pause)  # then back off (CPU); the shortest sleep the OS gives is ~50 µs
            pause = min(pause + 1e-5, 1e-3)

    def all_reduce(
        self, tensor: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_tensor("MpiComm.all_reduce", tensor, torch.device("cpu"))
        if tensor.dtype in (torch.float16, torch.bfloat16):
            wide = tensor.float()
            self._wait(self._comm.Iallreduce(self._in_place, wide.numpy(), op=self._sum), "all_reduce")
            return add_epilogue(tensor.copy_(wide), bias, residual)
        self._wait(self._comm.Iallreduce(self._in_place, self._buffer(tensor), op=self._sum), "all_reduce")
        return add_epilogue(tensor, bias, residual)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        check_tensor("MpiComm.all_gather", tensor, torch.device("cpu"))
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        self._wait(self._comm.Iallgather(self._buffer(tensor), self._buffer(out)), "all_gather")
        return out

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        check_tensor("MpiComm.broadcast", tensor, torch.device("cpu"))
        check_root("MpiComm.broadcast", root, self.size)
        self._wait(self._comm.Ibcast(self._buffer(tensor), root=root), "broadcast")
        return tensor

    def barrier(self) -> None:
        self._wait(self._comm.Ibarrier(), "barrier")

    def host_allgather(self, values: list[int], what: str) -> list[list[int]]:
        mine = np.asarray(values, dtype=np.int64)
        out = np.empty((self.size, mine.size), dtype=np.int64)
        self._wait(self._comm.Iallgather(mine, out), what)
        return out.tolist()


class NcclComm(Communicator):
    """CUDA tensors on ``device`` through NCCL (``cupy.cuda.nccl``), one rank per GPU.

    Collectives are enqueued on torch's current stream with raw device pointers, so they
    order with the surrounding torch work and bf16 needs no CuPy dtype. Construction is
    collective over ``mpi_comm``: rank 0 makes the NCCL id and shares it over MPI together
    with every rank's error, if any, so a failure on one rank raises on all of them instead
    of leaving the others hanging.
    """

    def __init__(self, mpi_comm, device: torch.device | str):
        import cupy
        from cupy.cuda import nccl

        self._mpi = mpi_comm
        self._host = MpiComm(mpi_comm)  # host-side collectives (barrier, host_allgather), same deadline
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.device = torch.device(device)
        if self.device.type != "cuda" or self.device.index is None:
            raise ValueError(f"NcclComm: expected a device like cuda:0, got {device}")
        # NCCL binds the communicator to the current device: set it, for torch and CuPy, first.
        torch.cuda.set_device(self.device)
        cupy.cuda.Device(self.device.index).use()

        # Every rank checks it can load NCCL, rank 0 also makes the id; all ranks then see
        # every error, so none is left waiting in ncclCommInitRank for a rank that gave up.
        # Connect every NCCL channel when the communicator is made, not at a collective's first
        # use: a lazy connect blocks the host inside the collective call (holding the GIL) while
        # it waits for the peers, where no deadline could fire if a peer never comes.
        os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
        unique_id, error = None, None
        try:
            if not nccl.available:
                raise RuntimeError("CuPy cannot load the NCCL library (libnccl.so.2); install nvidia-nccl-cu*")
            if self.rank == 0:
                unique_id = nccl.get_unique_id()
        except Exception as exc:  # any failure must reach every rank, whatever its type
            error = f"{type(exc).__name__}: {exc}"
        unique_id = raise_if_any(mpi_comm, error, "NcclComm setup", payload=unique_id)

        # The custom CUDA-IPC all-reduce for small and medium messages (NCCL serves the rest);
        # collective, like everything here. Its kernels report timeouts through this watchdog.
        self.custom = CustomAllReduce(mpi_comm, self.device, watched=False)
        self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._watchdog = self.custom.watchdog = NcclWatchdog(self)
        self._dtypes = {
            torch.float32: nccl.NCCL_FLOAT32,
            torch.float16: nccl.NCCL_FLOAT16,
            torch.bfloat16: nccl.NCCL_BFLOAT16,
            torch.int32: nccl.NCCL_INT32,
            torch.int64: nccl.NCCL_INT64,
        }
        self._sum = nccl.NCCL_SUM
        # Warm-up: NCCL connects lazily, so the first collective is slow; pay for it here,
        # and check the result so a broken setup fails at construction, not mid-run.
        probe = torch.ones(1, device=self.device)
        self.all_reduce(probe)
        if probe.item() != self.size:
            raise RuntimeError(f"NcclComm: warm-up all_reduce of ones gave {probe.item()}, expected {self.size}")

    @property
    def fuses_epilogue(self) -> bool:  # type: ignore[override]
        return self.custom.usable

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def all_reduce(
        self, tensor: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_tensor("NcclComm.all_reduce", tensor, self.device)
        if self.custom.route(tensor) in (Route.ONE_SHOT, Route.TWO_SHOT):
            return self.custom.all_reduce(tensor, bias, residual)
        return add_epilogue(self.nccl_all_reduce(tensor), bias, residual)

    def nccl_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_reduce`` through NCCL whatever the size (the fallback; benchmarks compare with it)."""
        ptr = tensor.data_ptr()
        self._nccl.allReduce(ptr, ptr, tensor.numel(), self._dtypes[tensor.dtype], self._sum, self._stream())
        self._watchdog.watch("NcclComm.all_reduce")
        return tensor

    def all_reduce_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The custom path's registered buffer where the message routes there, else None (NCCL
        reduces the producer's own tensor in place)."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.custom.route_bytes(nbytes, dtype) in (Route.ONE_SHOT, Route.TWO_SHOT):
            return self.custom.all_reduce_buffer(shape, dtype)
        return None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        check_tensor("NcclComm.all_gather", tensor, self.device)
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=self.device)
        self._nccl.allGather(
            tensor.data_ptr(), out.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype], self._stream()
        )
        self._watchdog.watch("NcclComm.all_gather")
        return out

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        check_tensor("NcclComm.broadcast", tensor, self.device)
        check_root("NcclComm.broadcast", root, self.size)
        ptr = tensor.data_ptr()
        self._nccl.broadcast(ptr, ptr, tensor.numel(), self._dtypes[tensor.dtype], root, self._stream())
        self._watchdog.watch("NcclComm.broadcast")
        return tensor

    def barrier(self) -> None:
        """Return once every rank's work enqueued so far on its current stream has finished."""
        torch.cuda.current_stream(self.device).synchronize()
        # A custom all-reduce that gave up says so here, on every rank, under the collective deadline.
        agree_no_error(self._host, self.custom.check_async_error, "barrier")

    def host_allgather(self, values: list[int], what: str) -> list[list[int]]:
        return self._host.host_allgather(values, what)

    def check_async_error(self) -> None:
        """Raise if NCCL reported an asynchronous error on this communicator, or a custom all-reduce
        kernel gave up waiting for a peer (the watchdog polls it)."""
        self.custom.check_async_error()
        self._nccl.check_async_error()

    def abort(self) -> None:
        """Abandon the communicator without waiting for peers (after an error; it is unusable then)."""
        self._nccl.abort()

    def close(self) -> None:
        """Collective: stop and join the watchdog thread (after the collectives it watches finished),
        then release the custom all-reduce's buffers. Interpreter exit stops the watchdog by itself
        (``watchdog``): a job that never calls this still ends cleanly."""
        self._watchdog.close()
        self.custom.close()
