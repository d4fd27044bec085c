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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..config import AttentionConfig, PositionEmbeddingType, RotaryScalingType
from ..devices import as_device
from .step import Step

Forward = Callable[[torch.Tensor, Step], torch.Tensor]  # (x [B, hidden], step) -> [B, hidden]


def check_graphable(config: AttentionConfig) -> None:
    """Raise ``ValueError`` for configurations whose kernels size or compute something per step on the host."""
    if config.rotary_scaling is RotaryScalingType.dynamic:
        raise ValueError("DecodeGraph: rotary_scaling='dynamic' recomputes the RoPE base per length on the host")
    if config.position_embedding is PositionEmbeddingType.relative:
        raise ValueError("DecodeGraph: relative attention sizes its bias table per step on the host")
    if config.cross_attention:
        raise ValueError("DecodeGraph: cross attention is not captured (its keys do not grow)")
    if config.check_finite:
        raise ValueError("DecodeGraph: check_finite reads the output on the host, which a graph cannot capture")


class DecodeGraph:
    """``graph(x, past_lens) -> out``: one decode step of ``forward`` for the fixed ``slots`` of ``cache``.

    ``forward(x, step)`` runs the layers (e.g. ``lambda x, s: stack(x, s, cache, decode_splits=8)``,
    with a fixed ``decode_splits``). The first call captures it (after warm-up runs, which rewrite
    the same K/V at the same positions, so the cache ends as after one step); later calls write
    the lengths into the graph's pinned buffer, copy ``x`` into its input buffer and replay (a
    caller may write ``x`` into ``graph.x`` itself, on the current stream, and pass that, saving the
    copy; from another stream the write would race the previous replay's reads). The returned
    tensor is the graph's output buffer: copy it before the next call if it must outlive that call.
    """

    def __init__(
        self, forward: Forward, *, config: AttentionConfig, slots: Sequence[int], cache, device, warmup: int = 2
    ):
        check_graphable(config)
        self.device = as_device(device)
        if self.device.type != "cuda":
            raise ValueError(f"DecodeGraph: CUDA graphs need a CUDA device, got {self.device}")
        self.forward, self.config, self.cache, self.warmup = forward, config, cache, warmup
        self.slots = tuple(int(s) for s in slots)
        self._slots = np.asarray(self.slots, dtype=np.int64)
        if not self.slots:
            raise ValueError("DecodeGraph: slots must name at least one sequence")
        n = len(self.slots)
        self.x = torch.empty(n, config.hidden_size, dtype=config.dtype, device=self.device)
        # The lengths travel from one pinned buffer, copied by the graph's own first node: the host
        # fills it through numpy and replays, with no copy of its own to launch. The host must not
        # refill it before the previous replay has copied it out: ``_copied`` is recorded by the
        # graph right after that copy (an external event node), so the wait is at most the time
        # for the previous replay to start, and nothing in the steady state.
        self._lengths = Step.decode_lengths_buffer(n)
        self._rows = self._lengths.numpy()
        self._copied = torch.cuda.Event(external=True)
        self._capacity: np.ndarray | None = None
        self._capacity_version = None
        self.step: Step | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, past_lens: Sequence[int] | np.ndarray) -> torch.Tensor:
        # Everything here runs while the GPU waits (the idle share of a step), so
        # the lengths go through numpy whatever the batch, never a Python loop over sequences.
        n = len(self.slots)
        past = np.asarray(past_lens, dtype=np.int64)
        if past.shape != (n,) or past.min() < 1:
            raise ValueError(
                f"past_lens: expected {n} lengths >= 1 (decode tokens follow a cached past), got {past.tolist()}"
            )
        if x.shape != self.x.shape or x.dtype != self.x.dtype:
            raise ValueError(
                f"x: expected [{n}, {self.config.hidden_size}] {self.config.dtype}, got {tuple(x.shape)} {x.dtype}"
            )
        if self.graph is None:
            self.x.copy_(x)
            return self._capture(past.tolist())
        # The graph does not run the layers' host-side checks: the cache's capacity and what each slot
        # holds are checked here, vectorized (check_step only to raise its message).
        total = past + 1
        if self._capacity_version != self.cache.version:
            self._capacity = self.cache.capacities(self.slots)
            self._capacity_version = self.cache.version
        cache = self.cache
        if (
            (total > self._capacity).any()
            or (past > cache.written[self._slots]).any()
            or cache.freed[self._slots].any()
        ):
            cache.check_step(self.step, tuple(total.tolist()), tuple(past.tolist()))
        self._copied.synchronize()
        Step.fill_decode_lengths(self._rows, past)
        if x.data_ptr() != self.x.data_ptr():  # callers may write the input into ``graph.x`` directly
            self.x.copy_(x)
        self.graph.replay()
        cache.written[self._slots] = np.maximum(cache.written[self._slots], total)
        return self.out

    def _capture(self, past: list[int]) -> torch.Tensor:
        self.step = Step(new_lens=[1] * len(self.slots), past_lens=past, slots=self.slots, device=self.device)
        Step.fill_decode_lengths(self._rows, np.asarray(past, dtype=np.int64))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream (cuBLAS/NCCL set up lazily)
            for _ in range(self.warmup):
                self.forward(self.x, self.step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the NCCL watchdog polls its events) may keep using CUDA while
        # this one captures; the default mode would fail their calls and invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step.load_decode_lengths(self._lengths)
            self._copied.record()
            out = self.forward(self.x, self.step)
        # Kept only once captured: after a failed capture the next call captures again instead of
        # replaying an empty graph.
        self.graph, self.out = graph, out
        self.graph.replay()
        return self.out
