"""The host side of a replayed decode graph: what the device lengths hold, and the cache checks, at O(1) a replay.

A graph of decode steps for fixed cache slots reads each sequence's past, position and total length
from device memory, and advances them itself (one captured ``add_`` at the end of the step), so in
the steady state (every call one token further than the last) the host writes nothing and copies
nothing: it only mirrors the lengths in numpy to know what the device holds. A call whose lengths
differ from the mirror (the first after eager steps, or a caller that jumps) stages them in pinned
memory and the graph's owner copies them in before the replay (``ReplayState.before``).

Why advance on the device rather than write the lengths into a pinned buffer that a captured copy
reads each replay: the copy is a graph node too (the same GPU cost as the captured increment), but
a refilled pinned buffer must not be overwritten before the previous replay has read it, which
either waits on an event (the host then runs at most one step ahead) or needs one graph per buffer
of a double buffer (twice the capture, twice the graph memory). The increment needs neither and
leaves the host nothing to write. The staging buffers for jumps form a ring of two with an event
each, so refilling one waits only for the copy two jumps back (in practice never).

The checks the layers make per step (capacity, a freed slot, a past beyond what was written) are not
run by a replay, so they are kept here, cheaply: the full vectorized check runs when the cache's
slot state changes (``cache.epoch``: reserve, free, set_written, blocks changing hands) or the lengths jump; it also
computes how many more replays fit in the reserved capacity (``headroom``), so a steady-state replay
checks one counter. Between full checks nothing can make them fail: capacity only grows by reserve,
``written`` only shrinks by free (both change the epoch), and each replay records what it writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .step import Step


class ReplayState:
    """Mirror of a decode graph's device lengths for ``slots`` of ``cache``, with its checks.

    ``before(past_lens)`` runs before each replay: it returns None when the device already holds these
    lengths (``past_lens`` None means "one further than the last replay"), else a staging tensor
    ``[3, B]`` int32 (past, position, total) that the caller copies into the step's device lengths on
    its stream, then calls ``staged(event)`` with an event recorded after that copy (None on the CPU).
    It raises ``CacheCapacityError``/``CacheStateError`` (via ``cache.check_step``, for its message)
    when the replay would not fit or would read unwritten positions. ``after()`` runs after the replay
    is enqueued: it advances the mirror and records the written positions in the cache.
    """

    def __init__(self, cache, slots: Sequence[int], *, pinned: bool):
        self.cache = cache
        self.slots = tuple(int(s) for s in slots)
        n = len(self.slots)
        self._idx = np.asarray(self.slots, dtype=np.int64)
        # The slots as a basic slice when they are a run (the common case: range(batch)), so that
        # recording what a replay wrote updates a view of ``cache.written`` in place.
        first = self.slots[0]
        self._run = slice(first, first + n) if self.slots == tuple(range(first, first + n)) else None
        self.past = np.zeros(n, dtype=np.int64)  # what the device's past holds for the next replay
        self.headroom = 0  # replays that fit in the capacity reserved at the last full check
        self._epoch: int | None = None  # cache.epoch at the last full check (None: check next time)
        make = (lambda: torch.empty(3, n, dtype=torch.int32).pin_memory()) if pinned else (
            lambda: torch.empty(3, n, dtype=torch.int32)
        )  # fmt: skip
        self._staging = [make() for _ in range(2)]
        self._events: list = [None, None]
        self.turn = 0

    def reset(self, past: np.ndarray) -> None:
        """The device lengths were set to ``past`` by other means (a step built with them)."""
        self.past = self.valid(past).copy()
        self._epoch = None

    def before(self, past_lens: Sequence[int] | np.ndarray | None) -> torch.Tensor | None:
        staged, previous = None, self.past
        if past_lens is not None:
            past = past_lens if isinstance(past_lens, np.ndarray) else np.asarray(past_lens, dtype=np.int64)
            if not np.array_equal(past, self.past):
                staged = self._stage(self.valid(past))
        if self.headroom < 1 or self._epoch != self.cache.epoch:
            try:
                self._check()
            except Exception:
                # A refused jump never reaches the device: the host mirror must not claim it did, or a
                # retry with the same lengths would stage nothing and replay the old device lengths.
                self.past, self._epoch = previous, None
                raise
        return staged

    def staged(self, event) -> None:
        """The copy out of the last staging buffer is enqueued; ``event`` completes after it."""
        self._events[self.turn] = event
        self.turn ^= 1

    def after(self) -> None:
        self.past += 1  # the replay's captured increment did the same to the device lengths
        self.headroom -= 1
        written = self.cache.written
        if self._run is not None:
            view = written[self._run]
            np.maximum(view, self.past, out=view)
        else:
            written[self._idx] = np.maximum(written[self._idx], self.past)

    # ---- the rare paths ------------------------------------------------------------------------
    def valid(self, past: np.ndarray) -> np.ndarray:
        n = len(self.slots)
        if past.shape != (n,) or past.min() < 1:
            raise ValueError(
                f"past_lens: expected {n} lengths >= 1 (decode tokens follow a cached past), got {past.tolist()}"
            )
        return past.astype(np.int64, copy=False)

    def _stage(self, past: np.ndarray) -> torch.Tensor:
        event = self._events[self.turn]
        if event is not None:
            event.synchronize()  # the copy out of this buffer, two jumps ago, has run
        buf = self._staging[self.turn]
        Step.fill_decode_lengths(buf.numpy(), past)
        self.past = past.copy()
        self._epoch = None  # the written positions must cover the new past
        return buf

    def _check(self) -> None:
        """The layers' per-step cache check, vectorized, for the next replay; sets ``headroom``."""
        cache, past = self.cache, self.past
        capacity = cache.capacities(self.slots)
        total = past + 1
        if (total > capacity).any() or (past > cache.written[self._idx]).any() or cache.freed[self._idx].any():
            step = Step(new_lens=(1,) * len(self.slots), past_lens=tuple(past.tolist()), slots=self.slots)
            cache.check_step(step, tuple(total.tolist()), tuple(past.tolist()))
        self.headroom = int((capacity - past).min())  # replay r (from 0) needs past + r + 1 <= capacity
        self._epoch = cache.epoch
