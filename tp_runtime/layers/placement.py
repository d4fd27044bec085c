"""A built layer stays where and as it was built: ``Module.to``/``cuda``/``cpu``/``half``/... refused.

A layer's shards, backend (chosen for its device and dtype), communicator (NCCL is bound to a device)
and the caches built for it are fixed at construction; moving only its tensors would leave those
behind. A call that changes nothing (``layer.to(layer.device)``) is allowed.
"""

from __future__ import annotations

import itertools

import torch


def refuse_move(module: torch.nn.Module, fn) -> None:
    """Raise ``NotImplementedError`` naming the way out unless ``fn`` (what ``Module._apply`` applies to
    each tensor) leaves every parameter and buffer of ``module`` on its device, in its dtype."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = fn(tensor)
        if moved.device != tensor.device or moved.dtype != tensor.dtype:
            raise NotImplementedError(
                f"{type(module).__name__}: a built layer cannot move or change dtype "
                f"({tensor.device}, {tensor.dtype} -> {moved.device}, {moved.dtype}): build a new one with "
                "device=... and the dtype you want (AttentionConfig(dtype=...), or dtype=... for a linear layer), "
                "then load_weights"
            )
