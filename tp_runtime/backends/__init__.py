"""Attention backends: ``reference`` (torch, any device) and ``cuda`` (CuPy RawKernels).

Layers receive a backend and never branch on the device themselves. ``get_backend(None, device)``
picks ``cuda`` for CUDA devices and ``reference`` otherwise; asking for ``cuda`` where it cannot
run raises (it never silently falls back).
"""

from __future__ import annotations

import importlib

import torch

from . import reference

NAMES = ("reference", "cuda")


def get_backend(name: str | None, device: torch.device | str):
    device = torch.device(device)
    if name is None:
        name = "cuda" if device.type == "cuda" else "reference"
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES} or None, got {name!r}")
    if name == "reference":
        return reference
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs a CUDA device, got device={device}")
    return importlib.import_module(".cuda", __name__)
