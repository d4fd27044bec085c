"""This process's place in the job: MPI rank, node-local rank, device, tensor-parallel group.

``init()`` is called once per process, on every rank, after the job has been started by
``mpirun`` (``launch/tp_run``); run without mpirun it gives a world of one rank.
Ranks ``[k*tp_size, (k+1)*tp_size)`` form TP group ``k`` (its ``dp_rank``); a world larger
than ``tp_size`` holds several independent groups (data-parallel replicas).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from .comm import Communicator, MpiComm, NcclComm, NoComm, raise_if_any

DEVICE_ENV = "TP_RUNTIME_DEVICE"
LAUNCHED_ENV = "TP_RUN_NPROCS"  # set by launch/tp_run: the number of ranks it asked mpirun for
# Variables in which a launcher announces how many processes it started: launch/tp_run, torchrun
# (torch.distributed), Open MPI, MPICH/Hydra. MPI must then report a world of that size.
SIZE_VARIABLES = (LAUNCHED_ENV, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_DEVICE_REQUESTS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class World:
    rank: int  # in MPI.COMM_WORLD
    size: int
    local_rank: int  # among the ranks on this node (MPI shared-memory split)
    local_size: int
    device: torch.device  # cuda:<local_rank>, or cpu
    tp_size: int
    tp_rank: int
    dp_rank: int  # which TP group this rank belongs to
    tp_comm: Communicator = field(repr=False)  # NoComm at tp_size 1, else NcclComm (CUDA) or MpiComm (CPU)
    local_comm: object = field(repr=False)  # MPI communicator of this node's ranks, e.g. for one-per-node work
    log: logging.Logger = field(repr=False)  # prints on world rank 0 only
    log_all: logging.Logger = field(repr=False)  # prints on every rank, prefixed with the rank

    @property
    def dp_size(self) -> int:
        """Number of TP groups."""
        return self.size // self.tp_size


_world: World | None = None


def init(tp_size: int | None = None, device: str | None = None) -> World:
    """Set up this rank (collective: every rank of the job must call it).

    ``tp_size``: ranks per tensor-parallel group; ``None`` means the whole world.
    ``device``: ``"cuda"``, ``"cpu"`` or ``"auto"``/``None`` (CUDA where torch and CuPy can
    use it, else CPU); when ``None`` the environment variable ``TP_RUNTIME_DEVICE`` may set it.
    A second call returns the same world, or raises if its arguments ask for another one.
    """
    global _world
    if _world is not None:
        _check_same(_world, tp_size, device)
        return _world

    from mpi4py import MPI  # initialises MPI (once per process)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _install_abort_hook(comm)
    mismatch = launcher_mismatch(os.environ, size)
    if mismatch is not None:
        # Every process is a world of its own here, so each would report: only the first one does.
        first = all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "PMI_RANK"))
        raise SystemExit(mismatch if first else 1)
    tp = size if tp_size is None else tp_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp_size must be a positive int or None, got {tp_size!r}")
    if size % tp:
        raise ValueError(f"world size {size} is not divisible by tp_size {tp}: TP groups must be equal")
    request = _device_request(device)

    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local_comm.Get_rank(), local_comm.Get_size()

    # Device choice can fail on one rank only (e.g. one node with fewer GPUs): agree first,
    # so every rank raises together; and a mix of CUDA and CPU ranks could never communicate.
    chosen, error = None, None
    try:
        chosen = _pick_device(request, local_rank, local_size)
    except RuntimeError as exc:
        error = str(exc)
    raise_if_any(comm, error, "tp_runtime.init: choosing the device")
    assert chosen is not None  # raise_if_any raised otherwise
    kinds = comm.allgather(chosen.type)
    if len(set(kinds)) > 1:
        raise RuntimeError(f"tp_runtime.init: ranks chose different device types, by rank: {kinds}")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)

    if tp == 1:
        tp_comm: Communicator = NoComm()
    else:
        tp_mpi = comm.Split(color=rank // tp, key=rank)
        tp_comm = NcclComm(tp_mpi, chosen) if chosen.type == "cuda" else MpiComm(tp_mpi)

    _self_test(comm, tp_comm, chosen)
    log, log_all = _loggers(rank, size)
    _world = World(
        rank=rank,
        size=size,
        local_rank=local_rank,
        local_size=local_size,
        device=chosen,
        tp_size=tp,
        tp_rank=rank % tp,
        dp_rank=rank // tp,
        tp_comm=tp_comm,
        local_comm=local_comm,
        log=log,
        log_all=log_all,
    )
    return _world


_abort_job_name = "tp_runtime_abort_job"


def _install_abort_hook(comm) -> None:
    """An uncaught exception on this rank ends the whole job at once: it is printed, with the rank,
    then MPI aborts every rank. Plain ``mpirun python script.py`` would otherwise leave the other
    ranks waiting in their next collective until its deadline. (Under ``launch/tp_run`` the ranks run
    in ``distributed.run``, which catches the exception first and reports it once for the job.)"""
    if comm.Get_size() == 1 or getattr(sys.excepthook, "__name__", "") == _abort_job_name:
        return
    previous, rank, size = sys.excepthook, comm.Get_rank(), comm.Get_size()

    def abort_job(kind, value, traceback) -> None:
        sys.stderr.write(f"tp_runtime: rank {rank} of {size} failed; aborting the job\n")
        previous(kind, value, traceback)
        sys.stderr.flush()
        comm.Abort(1)

    abort_job.__name__ = _abort_job_name  # a second init() must not wrap it again
    sys.excepthook = abort_job


def launcher_mismatch(environ, mpi_size: int) -> str | None:
    """One line saying why this launch cannot work (the environment announces several processes but
    MPI sees a world of another size: torchrun, or an mpirun of another MPI library), or None."""
    for name in SIZE_VARIABLES:
        announced = environ.get(name)
        if announced is None or not announced.isdigit() or int(announced) == mpi_size:
            continue
        if name != LAUNCHED_ENV and mpi_size > 1:  # MPI did start a job: another launcher's leftover variable
            continue
        if name == "WORLD_SIZE":
            how = "torchrun (or torch.distributed's launcher) is not this runtime's launcher"
        else:
            how = "the mpirun used belongs to another MPI library than mpi4py's (set MPIRUN=... to the matching one)"
        return (
            f"tp_runtime.init: {name}={announced} but MPI sees a world of {mpi_size}: {how}; "
            f"start the job with launch/tp_run -n {announced} script.py (or mpirun with mpi4py's MPI)"
        )
    return None


def _self_test(comm, tp_comm: Communicator, device: torch.device) -> None:
    """Start-up checksum of the TP group's all-reduce, in every dtype layers use: each rank gives
    ``rank + 1`` at positions that also tell the ranks apart, and every rank checks the exact
    sums. Verdicts are shared over MPI, so a broken transport fails on every rank, naming them."""
    error = None
    try:
        n = tp_comm.size
        expected = torch.arange(1, 9, dtype=torch.float64) * n * (n + 1) / 2  # small integers: exact in bf16
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            mine = (torch.arange(1, 9, dtype=torch.float64) * (tp_comm.rank + 1)).to(device=device, dtype=dtype)
            got = tp_comm.all_reduce(mine).double().cpu()
            if not torch.equal(got, expected):
                raise RuntimeError(f"{dtype} all-reduce gave {got.tolist()}, expected {expected.tolist()}")
    except Exception as exc:  # any failure must reach every rank
        error = f"{type(exc).__name__}: {exc}"
    raise_if_any(comm, error, "tp_runtime.init: the start-up all-reduce checksum")


def _device_request(device: str | None) -> str:
    request = device if device is not None else os.environ.get(DEVICE_ENV, "auto")
    if request not in _DEVICE_REQUESTS:
        source = "device" if device is not None else DEVICE_ENV
        raise ValueError(f"{source}: expected one of {_DEVICE_REQUESTS}, got {request!r}")
    return request


def cuda_unusable_reason() -> str | None:
    """Why this process cannot run CUDA work (torch and CuPy both needed), or None if it can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or any CUDA runtime error: both mean "not usable"
        return f"CuPy is not usable ({type(exc).__name__}: {exc})"
    return None


def _pick_device(request: str, local_rank: int, local_size: int) -> torch.device:
    if request == "cpu":
        return torch.device("cpu")
    reason = cuda_unusable_reason()
    if reason is not None:
        if request == "cuda":
            raise RuntimeError(f"device 'cuda' was requested but {reason}")
        if torch.cuda.is_available() and local_rank == 0:  # a GPU torch can use, but no CuPy: say so, once a node
            logging.getLogger("tp_runtime.all").warning(
                f"tp_runtime.init: WARNING: running on the CPU although torch sees a GPU: {reason} "
                f"(install the cuda12 or cuda13 extra; {DEVICE_ENV}=cpu silences this)"
            )
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_size > gpus:
        raise RuntimeError(
            f"{local_size} ranks on this node but only {gpus} GPUs visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one rank drives one GPU; "
            f"start fewer ranks per node, or {DEVICE_ENV}=cpu"
        )
    return torch.device("cuda", local_rank)


def _check_same(world: World, tp_size: int | None, device: str | None) -> None:
    """A repeated init() may omit arguments, but those it gives must describe ``world``."""
    problems = []
    if tp_size is not None and tp_size != world.tp_size:
        problems.append(f"tp_size={tp_size} (initialised with {world.tp_size})")
    if device not in (None, "auto") and device != world.device.type:
        problems.append(f"device={device!r} (initialised with {world.device})")
    if problems:
        raise RuntimeError(f"tp_runtime.init called again with different arguments: {', '.join(problems)}")


def _loggers(rank: int, size: int) -> tuple[logging.Logger, logging.Logger]:
    """``tp_runtime`` (and its children) print on rank 0 only; ``tp_runtime.all`` on every rank."""
    log = logging.getLogger("tp_runtime")
    log_all = logging.getLogger("tp_runtime.all")
    log_all.propagate = False
    for logger, fmt in ((log, "%(message)s"), (log_all, f"[rank {rank}/{size}] %(message)s")):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if rank != 0:
        # Effective level of every tp_runtime.* logger that sets none itself: silent here.
        log.setLevel(logging.CRITICAL + 1)
    return log, log_all
