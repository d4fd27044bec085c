"""One spelling per device, so that equality checks between layers, steps and caches hold."""

from __future__ import annotations

import torch


def as_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> cpu; ``"cuda"`` (no index) -> the current CUDA device, ``cuda:<n>``. A CUDA device
    where torch sees none raises ``ValueError`` in one line."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected a device torch can use, got {device} but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
