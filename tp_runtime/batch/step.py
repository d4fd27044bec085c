"""The per-step batch description, built once per step and shared by every layer.

A step holds ``B`` sequences. Sequence ``i`` brings ``new_lens[i]`` tokens on top of
``past_lens[i]`` cached ones and lives in cache slot ``slots[i]`` (a batch row of a
contiguous cache, a row of a paged cache's block table). The step's tokens are packed,
sequence after sequence: ``[T, hidden]`` with ``T = sum(new_lens)``. A sequence with one new
token and a non-empty past is in the generation phase; every other one is a context
(prefill) chunk, which may start after cached tokens. Phases mix in any order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import as_device


def _ints(name: str, values, minimum: int) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(v) for v in values)  # rejects 2.5 rather than truncating it
    except TypeError:
        raise ValueError(f"Step.{name}: expected a sequence of ints, got {values!r}") from None
    bad = [v for v in out if v < minimum]
    if bad:
        raise ValueError(f"Step.{name}: every entry must be >= {minimum}, got {list(out)}")
    return out


@dataclass(frozen=True)
class Step:
    """Host-side lengths plus the device tensors every backend reads (built in ``__post_init__``).

    Device tensors (on ``device``), int32, all views of one buffer moved there in one copy:
      ``cu_seqlens [B+1]``: token offsets of each sequence in the packed batch.
      ``slot [B]``: each sequence's cache slot; ``past [B]``: its cached length before the step;
      ``seq_total [B]``: its length after the step (the keys of self attention).
      ``token_seq [T]``: index of each token's sequence; ``positions [T]``: absolute position of each
      token (past length + offset); ``total_len [T]``: its sequence's length after this step
      (dynamic NTK scaling).
      ``encoder [B]``: cross attention's keys per sequence, or None.
    A decode step (one new token per sequence) keeps ``past``, ``positions`` and ``total_len``
    adjacent, so that a replayed CUDA graph updates them with one copy (``load_decode_lengths``) or
    advances them with one increment (``advance_decode_lengths``).

    ``plans`` holds what a backend derives from the step once and every layer reuses (its typed
    plan, keyed by the layer description it serves); ``checked`` the once-per-step checks already
    made (cache states, agreement across ranks). Neither takes part in equality.
    """

    new_lens: tuple[int, ...]
    past_lens: tuple[int, ...] | None = None  # None: no cached tokens
    slots: tuple[int, ...] | None = None  # None: sequence i uses slot i
    encoder_lens: tuple[int, ...] | None = None  # cross attention: keys per sequence
    beam_width: int = 1
    cache_indirection: torch.Tensor | None = None  # [B_batch, beam_width, S_max] int32 beam ids
    device: torch.device | str = "cpu"
    total_lens: tuple[int, ...] = field(init=False, default=(), compare=False)  # past + new, per sequence
    cu_seqlens: torch.Tensor = field(init=False, repr=False, compare=False)
    slot: torch.Tensor = field(init=False, repr=False, compare=False)
    seq_total: torch.Tensor = field(init=False, repr=False, compare=False)
    token_seq: torch.Tensor = field(init=False, repr=False, compare=False)
    past: torch.Tensor = field(init=False, repr=False, compare=False)
    positions: torch.Tensor = field(init=False, repr=False, compare=False)
    total_len: torch.Tensor = field(init=False, repr=False, compare=False)
    encoder: torch.Tensor | None = field(init=False, repr=False, compare=False)
    plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    checked: set = field(default_factory=set, init=False, repr=False, compare=False)
    _decode_lengths: torch.Tensor | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        new = _ints("new_lens", self.new_lens, 1)
        if not new:
            raise ValueError("Step.new_lens: a step needs at least one sequence, got []")
        set_("new_lens", new)
        n = len(new)
        past = (0,) * n if self.past_lens is None else _ints("past_lens", self.past_lens, 0)
        slots = tuple(range(n)) if self.slots is None else _ints("slots", self.slots, 0)
        for name, v in (("past_lens", past), ("slots", slots)):
            if len(v) != n:
                raise ValueError(f"Step.{name}: expected {n} entries (one per sequence in new_lens), got {len(v)}")
        if len(set(slots)) != n:
            raise ValueError(f"Step.slots: each sequence needs its own cache slot, got {list(slots)}")
        set_("past_lens", past)
        set_("slots", slots)
        set_("device", as_device(self.device))
        if self.encoder_lens is not None:
            enc = _ints("encoder_lens", self.encoder_lens, 0)
            if len(enc) != n:
                raise ValueError(f"Step.encoder_lens: expected {n} entries, got {len(enc)}")
            set_("encoder_lens", enc)
        self._check_beams()
        self._build_tensors()

    def _check_beams(self) -> None:
        w = self.beam_width
        if not isinstance(w, int) or w < 1:
            raise ValueError(f"Step.beam_width: must be a positive int, got {w!r}")
        ind = self.cache_indirection
        if w == 1:
            if ind is not None:
                raise ValueError("Step.cache_indirection: given with beam_width=1; pass beam_width > 1 for beam search")
            return
        if ind is None:
            raise ValueError(f"Step.cache_indirection: required for beam search (beam_width={w}), got None")
        if ind.dim() != 3 or ind.shape[1] != w:
            raise ValueError(
                f"Step.cache_indirection: expected shape [batch, beam_width={w}, max_seq_len], got {tuple(ind.shape)}"
            )
        if ind.dtype != torch.int32:
            raise ValueError(f"Step.cache_indirection: expected dtype torch.int32, got {ind.dtype}")
        if max(self.slots) >= ind.shape[0] * w:
            raise ValueError(
                f"Step.slots: slot {max(self.slots)} is outside cache_indirection's {ind.shape[0]} x {w} beams"
            )
        if max(p + q for p, q in zip(self.past_lens, self.new_lens, strict=True)) > ind.shape[2]:
            raise ValueError(f"Step.cache_indirection: covers {ind.shape[2]} positions, the step needs more")
        if bool(((ind < 0) | (ind >= w)).any()):
            raise ValueError(f"Step.cache_indirection: every entry must name a beam in [0, {w}), got values outside")
        object.__setattr__(self, "cache_indirection", ind.to(self.device))

    def _build_tensors(self) -> None:
        """All int32 metadata in one host buffer, moved to the device in one copy (one H2D
        transfer per step instead of one per tensor); the named tensors are views of it."""
        i32 = torch.int32
        new = torch.tensor(self.new_lens, dtype=i32)
        past = torch.tensor(self.past_lens, dtype=i32)
        cu = torch.zeros(len(new) + 1, dtype=i32)
        cu[1:] = torch.cumsum(new, 0)
        token_seq = torch.repeat_interleave(torch.arange(len(new), dtype=i32), new.long())
        offset = torch.arange(int(cu[-1]), dtype=i32) - cu[token_seq.long()]
        # past, positions and total_len adjacent, in this order (the decode-lengths block)
        parts = {
            "cu_seqlens": cu,
            "slot": torch.tensor(self.slots, dtype=i32),
            "seq_total": past + new,
            "token_seq": token_seq,
            "past": past,
            "positions": past[token_seq.long()] + offset,
            "total_len": (past + new)[token_seq.long()],
        }
        if self.encoder_lens is not None:
            parts["encoder"] = torch.tensor(self.encoder_lens, dtype=i32)
        flat = torch.cat(list(parts.values())).to(self.device)
        views = dict(zip(parts, flat.split([p.numel() for p in parts.values()]), strict=True))
        views.setdefault("encoder", None)
        for name, view in views.items():
            object.__setattr__(self, name, view)
        if self.is_decode:
            b = len(new)
            start = views["past"].storage_offset() - flat.storage_offset()
            object.__setattr__(self, "_decode_lengths", flat[start : start + 3 * b].view(3, b))
        object.__setattr__(self, "total_lens", tuple(int(v) for v in (past + new).tolist()))

    # ---- decode steps replayed by a CUDA graph (batch/graphs.py) ----------------------------------
    @property
    def is_decode(self) -> bool:
        """One new token per sequence (each one in the generation phase when its past is non-empty)."""
        return all(n == 1 for n in self.new_lens)

    @staticmethod
    def fill_decode_lengths(buffer: np.ndarray, past: np.ndarray) -> None:
        """Write a decode step's lengths, given each sequence's past, into ``buffer`` (a numpy view of
        a ``[3, B]`` int32 tensor): its past, its new token's position (= past), its total (past + 1)."""
        buffer[0] = past
        buffer[1] = past
        buffer[2] = past + 1

    def load_decode_lengths(self, buffer: torch.Tensor) -> None:
        """Copy ``buffer`` (filled by ``fill_decode_lengths``) into this decode step's device lengths,
        on the current stream, without waiting: one copy updates ``past``, ``positions``, ``total_len``."""
        if self._decode_lengths is None:
            raise ValueError("Step.load_decode_lengths: only for steps of one new token per sequence")
        self._decode_lengths.copy_(buffer, non_blocking=True)

    def advance_decode_lengths(self) -> None:
        """Add one to this decode step's device lengths (past, position, total), on the current stream:
        captured at the end of a graph's step, it makes each replay the step after the previous one."""
        if self._decode_lengths is None:
            raise ValueError("Step.advance_decode_lengths: only for steps of one new token per sequence")
        self._decode_lengths.add_(1)

    def plan(self, key, build):
        """The plan a backend derives from this step for ``key`` (a frozen description), built by
        ``build()`` on the first call and shared by every later layer of the step."""
        found = self.plans.get(key)
        if found is None:
            found = self.plans[key] = build()
        return found

    def fingerprint(self) -> dict[str, int]:
        """One word per field that every rank of a group must agree on (``consistency.check_step_agreement``).

        Python's hash of a tuple of ints is the same in every process (only str and bytes hashes are
        salted), and costs a few µs even for large batches."""
        beams = (self.beam_width, () if self.cache_indirection is None else tuple(self.cache_indirection.shape))
        return {
            "new_lens": hash(self.new_lens),
            "past_lens": hash(self.past_lens),
            "slots": hash(self.slots),
            "encoder_lens": hash(self.encoder_lens or ()),
            "beam_width": hash(beams),
        }

    # ---- host-side views ------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return len(self.new_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.new_lens)

    def is_generation(self, i: int) -> bool:
        """One new token on top of a cached past: served by the decode kernel."""
        return self.new_lens[i] == 1 and self.past_lens[i] > 0

    def token_range(self, i: int) -> range:
        start = sum(self.new_lens[:i])
        return range(start, start + self.new_lens[i])

    def require_encoder_lens(self, what: str) -> tuple[int, ...]:
        if self.encoder_lens is None:
            raise ValueError(f"Step.encoder_lens: required for {what}, got None")
        return self.encoder_lens

    def encoder_step(self) -> Step:
        """The encoder tokens as a step of their own (cross-attention K/V written on the first decoder step)."""
        enc = self.require_encoder_lens("cross attention")
        if min(enc) < 1:
            raise ValueError(
                f"Step.encoder_lens: projecting encoder output needs >= 1 token per sequence, got {list(enc)}"
            )
        return Step(new_lens=enc, slots=self.slots, device=self.device)

    def subset(self, indices: list[int]) -> Step:
        """The same step restricted to some sequences (used by tests: a mixed step equals separate runs)."""
        pick = lambda v: None if v is None else tuple(v[i] for i in indices)  # noqa: E731
        return Step(
            new_lens=pick(self.new_lens),
            past_lens=pick(self.past_lens),
            slots=pick(self.slots),
            encoder_lens=pick(self.encoder_lens),
            beam_width=self.beam_width,
            cache_indirection=self.cache_indirection,
            device=self.device,
        )


def padding_to_packed(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``mask [B, S]`` (1 = real token, padded on either side) -> flat token indices ``[T]`` and
    the per-sequence lengths; ``padded.flatten(0, 1)[idx]`` is the packed batch.

    Each row's real tokens must be one run (left, right or both-sided padding): a row with a hole
    (``[1, 0, 1, 1]``) raises, since packing it would silently join its pieces and shift positions."""
    if mask.dim() != 2:
        raise ValueError(f"attention_mask: expected shape [batch, seq_len], got {tuple(mask.shape)}")
    m = mask.bool()
    starts = m.clone()
    starts[:, 1:] &= ~m[:, :-1]  # a real token whose left neighbour is padding starts a run
    holes = starts.sum(1) > 1
    if bool(holes.any()):
        row = int(holes.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask: row {row} is {m[row].int().tolist()}: its real tokens must be one run "
            "(padding on the left, the right or both), not split by padding"
        )
    return m.flatten().nonzero().squeeze(1), tuple(int(x) for x in m.sum(1).tolist())
