"""A whole greedy decode step of a model as one CUDA graph: embedding lookup, every block, the final
norm, the LM head, the argmax, and the chosen token written back as the next step's input.

``run(ids, past, steps)`` queues ``steps`` replays with nothing between them on the host but the
O(1) bookkeeping of ``StepGraph._replay``, and reads the tokens back once at the end (one sync per
chunk instead of one per token). Every rank computes the same argmax from the same all-gathered
logits (the gather hands every rank the same bytes), so greedy decoding needs no broadcast; the
sampled paths (temperature, top-k, top-p) keep rank 0's choice and its broadcast in ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..batch.graphs import StepGraph
from .decoder import DecoderModel


class GreedyDecodeGraph(StepGraph):
    """Greedy decode steps of ``model`` for the fixed ``slots`` of ``cache``, up to ``chunk`` per ``run``.

    Device state besides the lengths: ``ids [B]`` (each sequence's input token, overwritten by the
    token each step chooses) and ``history [chunk, B]`` with a device counter ``count`` (the row the
    next step's tokens go to; reset by each ``run``)."""

    def __init__(self, model: DecoderModel, *, slots: Sequence[int], cache, chunk: int, decode_splits: int):
        super().__init__(config=model.attention_config, slots=slots, cache=cache, device=model.device)
        if chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        self.model, self.chunk, self.decode_splits = model, chunk, decode_splits
        n = len(self.slots)
        self.ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.history = torch.zeros(chunk, n, dtype=torch.long, device=self.device)
        self.count = torch.zeros(1, dtype=torch.long, device=self.device)

    def _body(self) -> torch.Tensor:
        m, step = self.model, self.step
        assert step is not None, "the step is built by _capture before any _body"
        x = m.embed_tokens(self.ids, step.positions)
        return m.head(m.layers(x, step, self.cache, decode_splits=self.decode_splits)).argmax(dim=-1)  # [B]

    def _commit(self, chosen: torch.Tensor) -> None:
        self.ids.copy_(chosen)
        self.history.index_copy_(0, self.count, chosen[None])
        self.count.add_(1)

    def run(self, ids: Sequence[int], past: Sequence[int], steps: int) -> np.ndarray:
        """``steps`` greedy tokens per sequence after input tokens ``ids`` at ``past``: ``[steps, B]``.
        The caller reserved the cache for all of them (checked, as a replay checks)."""
        if not 1 <= steps <= self.chunk:
            raise ValueError(f"steps: expected 1 to chunk={self.chunk}, got {steps}")
        ids = list(ids)
        if len(ids) != len(self.slots):  # copy_ would broadcast a single id to every sequence
            raise ValueError(f"ids: expected {len(self.slots)} token ids (one per slot), got {len(ids)}")
        # Once per chunk, after the previous chunk's read-back: the inputs may come from eager steps.
        self.ids.copy_(torch.tensor(ids, dtype=torch.long))
        self.count.zero_()
        if self.graph is None:
            self._capture(self.state.valid(np.asarray(past, dtype=np.int64)))
        else:
            self._replay(past)
        for _ in range(steps - 1):
            self._replay(None)  # nothing here waits for the GPU: the host queues the chunk ahead
        return self.history[:steps].cpu().numpy()
