"""Decode steps replayed as one CUDA graph: Python runs once per step, not once per kernel.

A decode step of a tensor-parallel layer stack is a few dozen small launches (GEMMs, prepare,
decode attention, NCCL all-reduce) whose Python and launch overhead exceeds the GPU time at
small batches (the GPU idles most of such a step). ``DecodeGraph`` captures the
whole step once and replays it, with the step metadata in fixed device buffers updated in place.

What stays fixed between replays, and is checked: the sequences (cache slots, one new token
each), the decode key-split count (``decode_splits``, so launch shapes do not follow the
length), and a configuration whose kernels read lengths from the device only — RoPE without
dynamic NTK scaling (its base follows each sequence's length on the host), no relative attention
(its bias table is sized on the host), no beam search, no cross attention. What changes: the
input rows, the past lengths, and the paged cache's block table (updated in place by its
allocator, which the graph reads). The layers' check that every rank holds the same step runs
when the step is captured; a replay makes no host exchange, so the ranks must replay the same
``past_lens`` (each rank still checks them against what its cache holds).

The host path of a replay (``StepGraph._replay``): the lengths live on the device and the graph
advances them itself (``replay_state.py`` says why, and keeps the cache checks at O(1) a replay);
no synchronize, no MPI call, no per-sequence Python, so the host may queue step n+1 while step n
runs. ``launch/profile_step.py`` times each statement of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..config import AttentionConfig, PositionEmbeddingType, RotaryScalingType
from ..devices import as_device
from .replay_state import ReplayState
from .step import Step

Forward = Callable[[torch.Tensor, Step], torch.Tensor]  # (x [B, hidden], step) -> [B, hidden]


def check_graphable(config: AttentionConfig) -> None:
    """Raise ``ValueError`` for configurations whose kernels size or compute something per step on the host."""
    if config.rotary_scaling is RotaryScalingType.dynamic:
        raise ValueError("CUDA-graph steps: rotary_scaling='dynamic' recomputes the RoPE base per length on the host")
    if config.position_embedding is PositionEmbeddingType.relative:
        raise ValueError("CUDA-graph steps: relative attention sizes its bias table per step on the host")
    if config.cross_attention:
        raise ValueError("CUDA-graph steps: cross attention is not captured (its keys do not grow)")
    if config.check_finite:
        raise ValueError("CUDA-graph steps: check_finite reads the output on the host, which a graph cannot capture")


def graph_launcher(graph: torch.cuda.CUDAGraph, device: torch.device) -> Callable[[], object]:
    """What a replay calls to launch ``graph`` on ``device``'s current stream: ``cudaGraphLaunch`` of
    its executable graph through CuPy where torch exposes the handle, else ``graph.replay()``.

    Why not always ``replay()``: besides the launch, it sets the device and refreshes every random
    generator registered with the capture (torch registers the default one with every capture; on
    some versions that is two fill kernels per replay, whether the graph draws random numbers or
    not): host time and GPU nodes that a decode step drawing no random numbers does not need. The
    steps captured here draw none (a raw launch would not advance torch's generator).
    ``launch/profile_step.py`` times both."""
    try:
        import cupy

        launch, raw_stream = cupy.cuda.runtime.graphLaunch, torch._C._cuda_getCurrentRawStream
        graph_exec = graph.raw_cuda_graph_exec()
    except (ImportError, AttributeError, RuntimeError):
        return graph.replay
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lambda: launch(graph_exec, raw_stream(index))


class StepGraph:
    """One decode step for the fixed ``slots`` of ``cache``, captured once and replayed; a subclass says
    what the step computes (``_body``, also run eagerly for warm-up; it must draw no random numbers,
    see ``graph_launcher``) and what it writes back for the next replay (``_commit``, captured only)."""

    def __init__(self, *, config: AttentionConfig, slots: Sequence[int], cache, device, warmup: int = 2):
        check_graphable(config)
        self.device = as_device(device)
        if self.device.type != "cuda":
            raise ValueError(f"{type(self).__name__}: CUDA graphs need a CUDA device, got {self.device}")
        self.config, self.cache, self.warmup = config, cache, warmup
        self.slots = tuple(int(s) for s in slots)
        if not self.slots:
            raise ValueError(f"{type(self).__name__}: slots must name at least one sequence")
        self.state = ReplayState(cache, self.slots, pinned=True)
        self._jump_events = (torch.cuda.Event(), torch.cuda.Event())  # one per staging buffer
        self.step: Step | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._launch: Callable[[], object] | None = None

    def _body(self):
        raise NotImplementedError

    def _commit(self, out) -> None:
        """State the captured step writes for the next replay (nothing by default)."""

    def _replay(self, past_lens: Sequence[int] | np.ndarray | None) -> None:
        """The whole host path of a replay (``profile_step`` times these statements one by one)."""
        staged = self.state.before(past_lens)
        if staged is not None:  # lengths jumped: one copy from pinned memory, on this stream
            self._load(staged)
        self._launch()
        self.state.after()

    def _load(self, staged: torch.Tensor) -> None:
        self.step.load_decode_lengths(staged)
        event = self._jump_events[self.state.turn]
        event.record()
        self.state.staged(event)

    def _capture(self, past: np.ndarray):
        """Warm up, capture, and replay once (the first step). Returns what ``_body`` returned, in the
        graph's memory (overwritten by each replay)."""
        self.step = Step(new_lens=[1] * len(self.slots), past_lens=past.tolist(), slots=self.slots, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream (cuBLAS/NCCL set up lazily)
            for _ in range(self.warmup):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the NCCL watchdog polls its events) may keep using CUDA while
        # this one captures; the default mode would fail their calls and invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._body()
            self._commit(out)
            self.step.advance_decode_lengths()  # the next replay is the next step
        # Kept only once captured: after a failed capture the next call captures again instead of
        # replaying an empty graph.
        self.graph, self._launch = graph, graph_launcher(graph, self.device)
        self.state.reset(past)  # the step was built with these lengths: nothing to stage
        self._replay(None)
        return out


class DecodeGraph(StepGraph):
    """``graph(x, past_lens) -> out``: one decode step of ``forward`` for the fixed ``slots`` of ``cache``.

    ``forward(x, step)`` runs the layers (e.g. ``lambda x, s: stack(x, s, cache, decode_splits=8)``,
    with a fixed ``decode_splits``). The first call captures it (after warm-up runs, which rewrite
    the same K/V at the same positions, so the cache ends as after one step). Each replay advances
    the lengths on the device, so ``past_lens`` may be None (one further than the last call: the
    host then writes nothing); given lengths equal to that cost one comparison, others one copy.
    The input is copied into ``graph.x`` (a caller may write it there itself, on the current
    stream, and pass ``graph.x``, saving the copy; from another stream the write would race the
    previous replay's reads). The returned tensor is the graph's output buffer: copy it before
    the next call if it must outlive that call.
    """

    def __init__(
        self, forward: Forward, *, config: AttentionConfig, slots: Sequence[int], cache, device, warmup: int = 2
    ):
        super().__init__(config=config, slots=slots, cache=cache, device=device, warmup=warmup)
        self.forward = forward
        self.x = torch.empty(len(self.slots), config.hidden_size, dtype=config.dtype, device=self.device)
        self.out: torch.Tensor | None = None

    def _body(self) -> torch.Tensor:
        return self.forward(self.x, self.step)

    def __call__(self, x: torch.Tensor, past_lens: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        if x is not self.x:
            if x.shape != self.x.shape or x.dtype != self.x.dtype:
                raise ValueError(
                    f"x: expected [{len(self.slots)}, {self.config.hidden_size}] {self.config.dtype}, "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            self.x.copy_(x)
        if self.graph is None:
            if past_lens is None:
                raise ValueError("past_lens: the first call (the capture) needs each sequence's past, got None")
            self.out = self._capture(self.state.valid(np.asarray(past_lens, dtype=np.int64)))
        else:
            self._replay(past_lens)
        return self.out
