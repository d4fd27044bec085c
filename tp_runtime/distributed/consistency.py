"""Checks that every rank of a tensor-parallel group agrees (config, weights, each step), failing on all of them.

A mismatch must raise on every rank, never on one alone (that would leave the others waiting in
the next collective): each rank contributes its fingerprint to an all-gather and every rank
compares the same gathered values.
"""

from __future__ import annotations

import torch

from ..fingerprint import fingerprint_text
from .comm import Communicator


def fingerprint_tensors(*tensors: torch.Tensor | None) -> int:
    """A cheap, order-sensitive digest of full tensors, computed on their device (no host copy of
    the weights): sums of the values, their squares and their index-weighted values, in fp64."""
    parts = []
    for t in tensors:
        if t is None:
            parts.append("none")
            continue
        x = t.detach().reshape(-1).double()
        ramp = torch.linspace(0.5, 1.5, x.numel(), dtype=torch.float64, device=x.device)
        sums = torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()]).tolist()
        parts.append(f"{tuple(t.shape)}:{t.dtype}:" + ",".join(f"{s:.12e}" for s in sums))
    return fingerprint_text("|".join(parts))


def check_same(comm: Communicator, what: str, values: dict[str, int], device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``comm`` hold the same fingerprint under
    every name of ``values`` (a config field, a tensor argument); the message names those that differ."""
    if comm.size == 1:
        return
    names = list(values)
    mine = torch.tensor([values[name] for name in names], dtype=torch.int64, device=device)
    gathered = comm.all_gather(mine).reshape(comm.size, len(names)).tolist()
    differing = [i for i in range(len(names)) if len({row[i] for row in gathered}) != 1]
    if differing:
        groups: dict[int, list[int]] = {}
        for rank, row in enumerate(gathered):
            groups.setdefault(row[differing[0]], []).append(rank)
        listing = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        fields = ", ".join(names[i] for i in differing)
        raise ValueError(
            f"{what} differs across the tensor-parallel group in {fields} "
            f"({listing} agree among themselves on {names[differing[0]]})"
        )


class StepMismatch(RuntimeError):
    """The ranks of a tensor-parallel group were given different steps (lengths, slots, block tables)."""


def check_step_agreement(comm: Communicator, fields: dict[str, int]) -> None:
    """Raise ``StepMismatch`` on every rank unless all ranks of ``comm`` hold the same ``fields``
    (field name -> fingerprint, in a fixed order), naming the first field that differs.

    One host allgather of one word per step (no device work, no device synchronization); only when
    the words differ, a second one of every field's word finds the field."""
    if comm.size == 1:
        return
    digest = hash(tuple(fields.values()))  # a tuple of ints: the same hash on every rank
    if len({row[0] for row in comm.host_allgather([digest], "step check")}) == 1:
        return
    rows = comm.host_allgather(list(fields.values()), "step check (finding the field)")
    for i, name in enumerate(fields):
        groups: dict[int, list[int]] = {}
        for rank, row in enumerate(rows):
            groups.setdefault(row[i], []).append(rank)
        if len(groups) > 1:
            listing = "; ".join(f"ranks {ranks}" for ranks in groups.values())
            raise StepMismatch(
                f"step.{name} differs across the tensor-parallel group ({listing} agree among themselves): "
                "every rank must be given the same step"
            )
    raise StepMismatch("the step differs across the tensor-parallel group")  # digests of equal fields collided
