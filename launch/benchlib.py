"""Timing and set-up helpers shared by the launch scripts (benchmarks, profiler, demo).

    import benchlib        # the launch folder is on sys.path when a launch script runs

Timing, every function a median over repeats after warm-up:
  - ``median_ms``: CUDA events around the calls (a host clock on the CPU), inputs rotated among
    several callables; the benchmarks' figure.
  - ``replay_seconds``: each call captured once as a CUDA graph, the replays timed with CUDA
    events (host overhead left out); eager calls where capture fails.
  - ``host_ms``: the host clock around one call, the GPU idle when it starts; with
    ``include_gpu`` until its GPU work has finished too (wall time of a step), else only the
    time the host spends inside the call.
  - ``gpu_busy_ms``: GPU time of a call with the host out of the way (calls queued behind a
    sleep kernel).
Set-up: ``init_torch_distributed(world)`` starts torch.distributed over the ranks of a
``tp_runtime`` world, for the torch baselines.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tp_runtime import World


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def median_ms(
    calls: Callable[[], object] | Sequence[Callable[[], object]],
    repeats: int,
    *,
    device: torch.device | str = "cuda",
    warmup: int = 3,
    inner: int = 1,
    after: Callable[[int], object] | None = None,
    ready: Callable[[], object] | None = None,
    sync_each: bool = True,
) -> float:
    """Median milliseconds per call: CUDA events around ``inner`` back-to-back calls (a host clock
    on the CPU), over ``repeats`` measurements, after ``warmup`` untimed calls.

    ``calls``: one callable, or one per input set; they are called in turn (warm-up, then timed
    calls, each starting from the first), so consecutive calls do not reuse a cached input.
    ``after(i)``: run after each call (warm-up included) with the index of the callable just
    called, outside the timed region (``inner`` must be 1), e.g. to reset that input.
    ``ready()``: run once between the warm-up and the timed calls, e.g. a barrier so that all
    ranks start together.
    ``sync_each``: wait for each measurement's end event before the next one starts; without it
    the timed calls queue back to back and the events are read once at the end.
    """
    calls = [calls] if callable(calls) else list(calls)
    if after is not None and inner != 1:
        raise ValueError("median_ms: after() runs outside the timed region, so inner must be 1")
    n = len(calls)
    for i in range(warmup):
        calls[i % n]()
        if after is not None:
            after(i % n)
    if ready is not None:
        ready()
    cuda = _is_cuda(device)
    if cuda:
        torch.cuda.synchronize()
    times, events, turn = [], [], 0
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(inner):
            calls[turn % n]()
            turn += 1
        if cuda:
            end.record()
            if sync_each:
                end.synchronize()
            events.append((start, end))
        else:
            times.append((time.perf_counter() - t0) * 1e3 / inner)
        if after is not None:
            after((turn - 1) % n)
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / inner for start, end in events]
    return statistics.median(times)


def host_ms(
    fn: Callable[[], object],
    repeats: int,
    *,
    device: torch.device | str = "cuda",
    warmup: int = 0,
    include_gpu: bool = False,
) -> float:
    """Median milliseconds of the host clock around ``fn()``, the GPU synchronized before each call:
    with ``include_gpu`` until ``fn``'s GPU work has finished too (its wall time, all of its GPU
    work included), else only the time the host spends inside the call."""
    sync = torch.cuda.synchronize if _is_cuda(device) else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        if include_gpu:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    sync()
    return statistics.median(times)


def gpu_busy_ms(fn: Callable[[], object], n: int = 20) -> float:
    """GPU time of one step with the host out of the way: queue ``n`` steps behind a sleep kernel."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~100 ms at ~2 GHz: long enough for the host to queue every step
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


_stream = None  # one side stream for warm-up and capture (the decode launcher keys workspaces by stream)


def replay_seconds(
    calls: Sequence[Callable[[], object]], seconds: float, est_s: float, graphs: bool = True
) -> tuple[float, bool]:
    """Median seconds of one call; ``calls`` is one callable per input buffer. Each is captured once
    as a CUDA graph when ``graphs`` and capture works (second value True), else called eagerly; the
    replays (about ``seconds`` of them, ``est_s`` each) rotate among the buffers, CUDA events
    around each."""
    global _stream
    if _stream is None:
        _stream = torch.cuda.Stream()
    stream = _stream
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the current stream
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up on the capture stream (compiles, allocates workspaces)
            c()
            c()
    stream.synchronize()
    runners, graphed = [], graphs
    try:
        for c in calls if graphs else ():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                c()
            runners.append(g.replay)
    except Exception:  # a backend that cannot be captured: time it eagerly
        torch.cuda.synchronize()
        graphed = False
    if not graphed:
        runners = list(calls)
    reps = int(min(400, max(20, seconds / max(est_s, 1e-6))))
    for r in runners * 2:
        r()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(events):
        a.record()
        runners[i % len(runners)]()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) / 1e3, graphed


def init_torch_distributed(world: World):
    """Start torch.distributed over the same ranks, for baselines; returns this rank's TP group.

    NCCL on CUDA, gloo on the CPU. Rank 0 picks a free port and shares its address over MPI
    (127.0.0.1 when the whole job is on one node, else its host name or $MASTER_ADDR).
    Collective: every rank calls it once, after init().
    """
    import socket

    import torch.distributed as dist

    address = None
    if world.rank == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        host = "127.0.0.1" if world.local_size == world.size else os.environ.get("MASTER_ADDR", socket.gethostname())
        address = (host, port)
    from mpi4py import MPI

    host, port = MPI.COMM_WORLD.bcast(address, root=0)
    cuda = world.device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=world.rank,
        world_size=world.size,
        device_id=world.device if cuda else None,
    )
    if world.tp_size == world.size:
        return dist.group.WORLD
    # new_group is collective over the whole world: every rank creates every TP group.
    groups = [dist.new_group(list(range(k * world.tp_size, (k + 1) * world.tp_size))) for k in range(world.dp_size)]
    return groups[world.dp_rank]
