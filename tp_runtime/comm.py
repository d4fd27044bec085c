"""Collective communication for one tensor-parallel group, behind one small interface.

``Communicator`` is what layers see. Implementations:
  - ``NoComm``: group of size 1, no communication at all.
  - ``MpiComm`` (CPU tensors) and ``NcclComm`` (CUDA tensors): see below.
All collectives act in place where the result has the input's shape and return a tensor.
"""

from __future__ import annotations

import torch


class Communicator:
    """A tensor-parallel group: ``rank`` in ``[0, size)``."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[size, *tensor.shape]``: every rank's tensor, in rank order."""
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with ``root``'s, in place; returns it."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class NoComm(Communicator):
    """A group of one rank: every collective is the identity."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0).clone()

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        if root != 0:
            raise ValueError(f"broadcast root must be 0 in a group of size 1, got {root}")
        return tensor

    def barrier(self) -> None:
        return None
