"""A custom all-reduce over CUDA-IPC buffers for small and medium messages (kernels/all_reduce.cu).

Every rank allocates one data buffer and one signal block with plain ``cudaMalloc`` (IPC handles
name whole allocations, so not a caching pool), zeroes the signals, and the ranks exchange the IPC
handles once over MPI; each rank maps its peers' allocations into its own address space. A call
copies the input into this rank's buffer (skipped when the producer wrote there directly, see
``all_reduce_buffer``) and launches one kernel that reads every rank's buffer:

  * one-shot (small): every rank sums all buffers in rank order (fp32 for fp16/bf16) -> bit-identical;
  * two-shot (medium): reduce-scatter into the owners' buffers, then all-gather of the slices.

The row-parallel bias (added once) and a residual are fused into the epilogue. The barrier
generations live in device memory and are advanced by the kernel itself, so a captured CUDA graph
replays safely. Spins are bounded by the collective deadline: a kernel that waited too long for a
peer writes that peer's rank into host-mapped memory and returns; ``check_async_error`` (polled by
the watchdog thread) raises ``CollectiveTimeout`` naming the collective, and the watchdog ends the
job exactly as for an NCCL failure.

Which path a message takes is ``route()``: a host-only function of facts every rank shares (the
message's size and dtype, the group size, and the start-up agreement on whether the custom path
is usable on every rank), so every rank makes the same choice. ``TP_RUNTIME_CUSTOM_ALLREDUCE=0``
turns the custom path off. Many ranks may share one GPU (IPC works between processes of one
device): that is how the one-GPU tests run it.

The kernel is compiled here with ``cupy.RawModule`` rather than through ``backends.compile``: the
communicators import no attention code (an import-linter contract), and this is one fixed source
with its six instantiations written out in the file (which is also how ``launch/check_kernels``
builds it).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from ..resources import kernels_dir
from . import watchdog
from .watchdog import TIMEOUT_ENV, CollectiveTimeout, NcclWatchdog

CUSTOM_ENV = "TP_RUNTIME_CUSTOM_ALLREDUCE"
KiB, MiB = 1 << 10, 1 << 20

# THE routing table -- every threshold of the custom path is here and nowhere else.
# Group size -> (one-shot up to, two-shot up to) bytes; NCCL above; the registered buffer is the
# largest two-shot size. One-shot reads n-1 whole peer buffers per rank, two-shot 2(n-1)/n of one
# plus a barrier more, so one-shot's range shrinks as the group grows.
# OPEN until measured on several GPUs: these are vLLM's and TensorRT-LLM's published crossovers
# (PERF_NOTES section 3), not ours. The one-GPU runs time-slice the ranks on one device and say
# nothing about them; set the table from launch/bench_comm on 2, 4 and 8 NVLink-connected GPUs.
ROUTE_TABLE: dict[int, tuple[int, int]] = {
    2: (2 * MiB, 8 * MiB),
    3: (512 * KiB, 8 * MiB),
    4: (512 * KiB, 8 * MiB),
    5: (512 * KiB, 8 * MiB),
    6: (512 * KiB, 8 * MiB),
    7: (512 * KiB, 8 * MiB),
    8: (512 * KiB, 8 * MiB),
}
DEFAULT_BUFFER_BYTES = max(two_shot for _, two_shot in ROUTE_TABLE.values())

# Mirrors of the kernel's constants (kernels/all_reduce.cu).
MAX_RANKS = 8
MAX_BLOCKS = 36
THREADS = 512
SLICE_ALIGN_PACKS = 8
PACK_BYTES = 16
_SIGNAL_BYTES = 2 * MAX_BLOCKS * MAX_RANKS * 4  # struct Signal: gen and flag
_TIMED_OUT = 1
_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped

_KERNEL_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


class Route(Enum):
    IDENTITY = "identity"  # a group of one: nothing to do
    ONE_SHOT = "one_shot"
    TWO_SHOT = "two_shot"
    NCCL = "nccl"  # the caller's fallback collective


@dataclass(frozen=True)
class Limits:
    """Message sizes in bytes: one-shot up to ``one_shot_max``, two-shot up to ``two_shot_max``."""

    one_shot_max: int
    two_shot_max: int


def default_limits(size: int, buffer_bytes: int) -> Limits:
    """``ROUTE_TABLE``'s row for ``size`` ranks (2..MAX_RANKS), both limits capped by the registered
    buffer; a group the kernel cannot serve gets nothing (every message goes to NCCL)."""
    one_shot, two_shot = ROUTE_TABLE.get(size, (0, 0))
    return Limits(one_shot_max=min(one_shot, buffer_bytes), two_shot_max=min(two_shot, buffer_bytes))


def route(nbytes: int, dtype: torch.dtype, size: int, usable: bool, limits: Limits) -> Route:
    """Which path an all-reduce of ``nbytes`` of ``dtype`` over ``size`` ranks takes.

    Every argument is the same on every rank of a group (the message is; ``usable`` comes from
    ``agree``), so every rank routes the same way.
    """
    if size == 1:
        return Route.IDENTITY
    if not usable or dtype not in _KERNEL_TYPES or nbytes > limits.two_shot_max:
        return Route.NCCL
    return Route.ONE_SHOT if nbytes <= limits.one_shot_max else Route.TWO_SHOT


def enabled_by_env(environ) -> bool:
    """``TP_RUNTIME_CUSTOM_ALLREDUCE``: ``0`` turns the custom path off, ``1`` or unset leaves it on."""
    value = environ.get(CUSTOM_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{CUSTOM_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def peer_reasons(mine: tuple[str, str], gpus: list[tuple[str, str]], can_access) -> list[str]:
    """Why this rank cannot reach each peer's memory ([] if it can reach all). ``mine``, ``gpus``: this
    rank's and every rank's (host name, GPU PCI bus id); ``can_access(bus)``: whether this process's GPU
    has peer access to that GPU of this host (the same GPU needs none: several ranks on one device
    share its memory through IPC; another host's GPU is out of reach)."""
    reasons = []
    for peer, (host, bus) in enumerate(gpus):
        if host != mine[0]:
            reasons.append(f"rank {peer} runs on another host ({host})")
        elif bus != mine[1] and not can_access(bus):
            reasons.append(f"no peer access from GPU {mine[1]} to rank {peer}'s GPU {bus}")
    return reasons


def agree(size: int, facts: list[tuple[bool, list[str]]]) -> str | None:
    """Why the custom path is off for the group, or None where every rank can use it. ``facts``:
    per rank, (``TP_RUNTIME_CUSTOM_ALLREDUCE`` allows it, ``peer_reasons``) -- gathered from every
    rank, so the verdict is the same on all of them."""
    if size > MAX_RANKS:
        return f"{size} ranks: the kernel serves at most {MAX_RANKS}"
    off = [rank for rank, (enabled, _) in enumerate(facts) if not enabled]
    if off:
        return f"{CUSTOM_ENV}=0 on ranks {off}"
    lacking = [f"rank {rank}: {'; '.join(why)}" for rank, (_, why) in enumerate(facts) if why]
    if lacking:
        return "; ".join(lacking)
    return None


def grid_blocks(numel: int, itemsize: int, size: int, kind: Route) -> int:
    """Blocks of the launch: one per 512 packs of a rank's work, 1 to 36. A function of the message
    and the group only, so every rank launches the same grid (block b meets block b of its peers)."""
    packs = numel * itemsize // PACK_BYTES
    if kind is Route.TWO_SHOT:
        chunk = -(-packs // size)
        packs = -(-chunk // SLICE_ALIGN_PACKS) * SLICE_ALIGN_PACKS
    return max(1, min(MAX_BLOCKS, -(-packs // THREADS)))


_streams: dict = {}


def _stream(device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream (one wrapper per torch stream)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    s = _streams.get((device.index, ptr))
    if s is None:
        import cupy

        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external; this form works in 12-14
            warnings.simplefilter("ignore", DeprecationWarning)
            s = _streams[(device.index, ptr)] = cupy.cuda.ExternalStream(ptr, device.index)
    return s


def compile_options(arch: str) -> tuple[str, ...]:
    """NVRTC options of kernels/all_reduce.cu (self-contained: no include path); launch/check_nvrtc.py
    compiles it with these too."""
    return (f"-arch={arch}", "-std=c++17")


def kernel_names() -> dict:
    """{(dtype, route): NVRTC name expression} of every variant of kernels/all_reduce.cu."""
    return {
        (dtype, kind): f"tp::ar::all_reduce_kernel<{ctype}, {'true' if kind is Route.TWO_SHOT else 'false'}>"
        for dtype, ctype in _KERNEL_TYPES.items()
        for kind in (Route.ONE_SHOT, Route.TWO_SHOT)
    }


class CustomAllReduce:
    """The custom all-reduce of one group (collective construction: every rank of ``mpi_comm``).

    ``usable`` says whether the group agreed to use it (``why_not`` says why not). ``watched``: a
    watchdog of its own polls ``check_async_error`` and watches each call; else the owner sets
    ``watchdog`` to one that polls its ``check_async_error`` (NcclComm does).
    """

    watchdog: NcclWatchdog | None = None

    def __init__(
        self, mpi_comm, device: torch.device | str, buffer_bytes: int = DEFAULT_BUFFER_BYTES, watched: bool = True
    ):
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self._mpi, self._watched = mpi_comm, watched
        self.device = torch.device(device)
        if buffer_bytes <= 0 or buffer_bytes % PACK_BYTES:
            raise ValueError(f"buffer_bytes: expected a positive multiple of {PACK_BYTES}, got {buffer_bytes}")
        self.limits = default_limits(self.size, buffer_bytes)
        self.usable = False
        self.why_not: str | None = "a group of one rank" if self.size == 1 else None
        if self.size == 1:
            return

        import cupy

        runtime = cupy.cuda.runtime
        from mpi4py import MPI

        def local_facts():
            cupy.cuda.Device(self.device.index).use()
            return (MPI.Get_processor_name(), runtime.deviceGetPCIBusId(self.device.index)), enabled_by_env(os.environ)

        # Every step that can fail on one rank runs through _everywhere before the next collective: an
        # error on one rank alone would leave the others waiting in an allgather with no deadline.
        mine, enabled = self._everywhere("custom all-reduce setup", local_facts)
        gpus = mpi_comm.allgather(mine)
        reasons = self._everywhere("custom all-reduce: peer access", lambda: peer_reasons(mine, gpus, self._can_access))
        self.why_not = agree(self.size, mpi_comm.allgather((enabled, reasons)))
        if self.why_not is not None:
            return
        mine_handles = self._everywhere("custom all-reduce setup (buffers, kernels)", lambda: self._setup(runtime))
        handles = mpi_comm.allgather(mine_handles)
        what = "custom all-reduce: opening the peers' IPC handles"
        self._everywhere(what, lambda: self._open_peers(runtime, handles))
        self.usable = True
        if watched:
            self.watchdog = NcclWatchdog(self)

    def _everywhere(self, what: str, step):
        """``step()`` on this rank; if it raised on any rank, every rank raises (naming ``what``)."""
        from .comm import raise_if_any

        result, error = None, None
        try:
            result = step()
        except Exception as exc:  # any failure must reach every rank
            error = f"{type(exc).__name__}: {exc}"
        raise_if_any(self._mpi, error, what)
        return result

    @staticmethod
    def _can_access(bus: str) -> bool:
        import cupy

        runtime = cupy.cuda.runtime
        try:
            other = runtime.deviceGetByPCIBusId(bus)
        except runtime.CUDARuntimeError:  # that GPU is not visible to this process at all
            return False
        return bool(runtime.deviceCanAccessPeer(cupy.cuda.Device().id, other))

    def _setup(self, runtime) -> tuple[bytes, bytes]:
        """Buffers, error word and kernels; returns this rank's IPC handles (data, signal)."""
        import cupy

        nbytes = self.limits.two_shot_max
        self._data = runtime.malloc(nbytes)
        self._signal = runtime.malloc(_SIGNAL_BYTES)
        runtime.memset(self._signal, 0, _SIGNAL_BYTES)  # generations and flags start at 0 on every rank
        runtime.deviceSynchronize()  # zeroed before any peer can signal into it (the next allgather)
        # Error word in pinned host memory the kernel writes: [code, awaited rank, generation, -].
        # cudaHostAllocMapped; with unified addressing (every 64-bit CUDA platform) the host pointer
        # is also the device pointer.
        self._error_host = runtime.hostAlloc(16, _HOST_ALLOC_MAPPED)
        ctypes.memset(self._error_host, 0, 16)
        self._error = (ctypes.c_uint32 * 4).from_address(self._error_host)
        memory = cupy.cuda.UnownedMemory(self._data, nbytes, self, self.device.index)
        self._staging = torch.as_tensor(
            cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0)), device=self.device
        )
        self._kernels = self._compile()
        return runtime.ipcGetMemHandle(self._data), runtime.ipcGetMemHandle(self._signal)

    def _compile(self) -> dict:
        import cupy

        names = kernel_names()
        arch = cupy.cuda.Device(self.device.index).compute_capability
        module = cupy.RawModule(
            code=(kernels_dir() / "all_reduce.cu").read_text(),
            options=compile_options(f"sm_{arch}"),
            name_expressions=list(names.values()),
        )
        return {key: module.get_function(name) for key, name in names.items()}

    def _open_peers(self, runtime, handles: list[tuple[bytes, bytes]]) -> None:
        data, signal = [0] * MAX_RANKS, [0] * MAX_RANKS
        for peer, (data_handle, signal_handle) in enumerate(handles):
            if peer == self.rank:  # a process cannot open its own handle: use the pointer itself
                data[peer], signal[peer] = self._data, self._signal
            else:
                data[peer] = runtime.ipcOpenMemHandle(data_handle)
                signal[peer] = runtime.ipcOpenMemHandle(signal_handle)
        # struct Peers, passed by value: CuPy passes a size-1 NumPy array as its raw bytes.
        self._peers = np.array(data + signal, dtype=np.uint64).view(np.dtype((np.void, 16 * MAX_RANKS)))

    # ---- the collective ------------------------------------------------------------------------
    def route(self, tensor: torch.Tensor) -> Route:
        return self.route_bytes(tensor.numel() * tensor.element_size(), tensor.dtype)

    def route_bytes(self, nbytes: int, dtype: torch.dtype) -> Route:
        """The path a message of ``nbytes`` of ``dtype`` takes in this group."""
        return route(nbytes, dtype, self.size, self.usable, self.limits)

    def all_reduce_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in this rank's registered buffer for a producer (a GEMM's ``out=``) to write its
        partial sums into: ``all_reduce`` of it skips the copy-in and returns the sum in a new tensor
        (the buffer itself is the peers' input; its contents are undefined after the call). Write it
        only after the previous all-reduce was enqueued, on the same stream."""
        if not self.usable:
            raise RuntimeError(f"all_reduce_buffer: the custom all-reduce is off ({self.why_not})")
        numel = int(np.prod(shape))
        nbytes = numel * dtype.itemsize
        if dtype not in _KERNEL_TYPES or nbytes > self.limits.two_shot_max:
            raise ValueError(
                f"all_reduce_buffer: expected a dtype in {list(_KERNEL_TYPES)} and at most "
                f"{self.limits.two_shot_max} bytes, got {dtype} with {nbytes} bytes"
            )
        return self._staging[:nbytes].view(dtype).view(shape)

    def all_reduce(
        self, tensor: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_r tensor_r + bias + residual`` on torch's current stream: in place (returns
        ``tensor``), except for a tensor from ``all_reduce_buffer`` (returns a new one). ``bias``:
        ``[tensor.shape[-1]]``, the same on every rank, added once; ``residual``: ``tensor``'s shape.
        The message must route to ONE_SHOT or TWO_SHOT (``route``)."""
        if tensor.device != self.device or not tensor.is_contiguous():
            raise ValueError(
                f"custom all_reduce: expected a contiguous tensor on {self.device}, got one on {tensor.device} "
                f"(contiguous: {tensor.is_contiguous()})"
            )
        kind = self.route(tensor)
        if kind not in (Route.ONE_SHOT, Route.TWO_SHOT):
            raise ValueError(
                f"custom all_reduce: {tuple(tensor.shape)} {tensor.dtype} routes to {kind.value} "
                f"({self.why_not or f'limits {self.limits}'}); the caller's NCCL path serves it"
            )
        self._check_operand("bias", bias, tensor, (tensor.shape[-1],) if tensor.dim() else (1,))
        self._check_operand("residual", residual, tensor, tuple(tensor.shape))
        nbytes = tensor.numel() * tensor.element_size()
        out = tensor
        if tensor.data_ptr() == self._data:
            out = torch.empty_like(tensor)
        else:
            self._staging[:nbytes].view(tensor.dtype).copy_(tensor.reshape(-1))
        timeout_s = watchdog.collective_timeout()
        grid = grid_blocks(tensor.numel(), tensor.element_size(), self.size, kind)
        args = (
            self._peers,
            np.int32(self.rank),
            np.int32(self.size),
            np.uint64(out.data_ptr()),
            np.uint64(0 if bias is None else bias.data_ptr()),
            np.int64(max(1, tensor.shape[-1] if tensor.dim() else 1)),
            np.uint64(0 if residual is None else residual.data_ptr()),
            np.int64(tensor.numel()),
            np.int32(out.data_ptr() % PACK_BYTES == 0),
            np.uint64(int(timeout_s * 1e9)),
            np.uint64(self._error_host),
        )
        with _stream(self.device):
            self._kernels[(tensor.dtype, kind)]((grid,), (THREADS,), args)
        # The kernel gives up at the deadline by itself and reports whom it waited for; the watchdog's
        # own deadline, a little later, only catches a kernel that never started.
        if self.watchdog is not None:
            self.watchdog.watch(f"custom all_reduce ({kind.value})", grace_s=5.0)
        return out

    def _check_operand(self, name: str, operand, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if operand is None:
            return
        if not isinstance(operand, torch.Tensor):
            raise TypeError(f"custom all_reduce: {name}: expected a torch.Tensor, got {type(operand).__name__}")
        if operand.data_ptr() == tensor.data_ptr():  # the kernel reads operands through the read-only cache
            raise ValueError(f"custom all_reduce: {name}: expected a tensor apart from the one reduced, got the same")
        if (
            operand.dtype != tensor.dtype
            or operand.device != tensor.device
            or tuple(operand.shape) != shape
            or not operand.is_contiguous()
        ):
            raise ValueError(
                f"custom all_reduce: {name}: expected a contiguous {tensor.dtype} tensor of shape {shape} on "
                f"{tensor.device}, got {operand.dtype} {tuple(operand.shape)} on {operand.device} "
                f"(contiguous: {operand.is_contiguous()})"
            )

    # ---- failure -------------------------------------------------------------------------------
    def check_async_error(self) -> None:
        """Raise ``CollectiveTimeout`` if a kernel gave up waiting for a peer (host memory read only:
        safe from the watchdog thread, also while a graph is being captured or replayed)."""
        if self.usable and self._error[0] == _TIMED_OUT:
            raise CollectiveTimeout(
                f"custom all_reduce of the TP group timed out after {watchdog.collective_timeout():g} s waiting "
                f"for rank {self._error[1]} (TP rank {self._error[1]}/{self.size}): it died, skipped the "
                f"collective or is stuck ({TIMEOUT_ENV} sets the deadline)"
            )

    def abort(self) -> None:
        """Nothing to abandon: every kernel already returned at its deadline (the watchdog's hook)."""

    def close(self) -> None:
        """Collective (every rank, after its last call): stop and join the watchdog this object made
        (``watched``), wait for this rank's kernels, unmap the peers' buffers, then -- once no peer
        maps them any more -- free this rank's. Unusable afterwards (``route`` gives NCCL); idempotent.
        Interpreter exit stops every watchdog by itself (``watchdog``), so a job that never calls it
        still ends cleanly; the driver frees the memory with the process. CUDA graphs captured with
        this all-reduce hold its buffers as kernel arguments: drop them before closing."""
        if self._watched and self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        if not self.usable:
            return
        import cupy

        from .comm import MpiComm, agree_no_error

        runtime = cupy.cuda.runtime
        torch.cuda.synchronize(self.device)  # this rank's last kernel finished: it reads no peer any more
        self.usable, self.why_not = False, "closed"
        pointers = self._peers.view(np.uint64).reshape(2, MAX_RANKS)  # [data, signal] x rank
        for peer in range(self.size):
            if peer != self.rank:
                runtime.ipcCloseMemHandle(int(pointers[0, peer]))
                runtime.ipcCloseMemHandle(int(pointers[1, peer]))
        # Every peer has unmapped this rank's buffers (the exchange is a barrier under the deadline); a
        # kernel that gave up on any rank raises on every rank, and then nothing is freed.
        agree_no_error(MpiComm(self._mpi), self.check_async_error, "custom all-reduce close")
        del self._staging  # the buffer's tensor view; one returned by all_reduce_buffer must not be used after
        runtime.free(self._data)
        runtime.free(self._signal)
        runtime.freeHost(self._error_host)
