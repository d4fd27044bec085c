"""Attention backends: ``reference`` (torch, any device) and ``cuda`` (CuPy RawKernels).

Layers receive a backend and never branch on the device themselves. ``get_backend(None, device, dtype)``
picks ``cuda`` for fp16/bf16 layers on CUDA devices and ``reference`` otherwise (the kernels
are half-precision kernels; fp32 layers are the exact, debugging path); asking for ``cuda``
where it cannot run raises (it never silently falls back).
"""

from __future__ import annotations

import importlib

import torch

from .capabilities import HALF_DTYPES
from .reference import BACKEND as REFERENCE

NAMES = ("reference", "cuda")

_cuda_backends: dict = {}


def get_backend(name: str | None, device: torch.device | str, dtype: torch.dtype = torch.float16):
    """The backend object for layers of ``dtype`` on ``device`` (see ``base.py`` for its operations)."""
    device = torch.device(device)
    if name is None:
        name = "cuda" if device.type == "cuda" and dtype in HALF_DTYPES else "reference"
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES} or None, got {name!r}")
    if name == "reference":
        return REFERENCE
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs a CUDA device, got device={device}")
    if dtype not in HALF_DTYPES:
        raise ValueError(f"backend='cuda' runs fp16/bf16 layers, got dtype={dtype}: use backend='reference' for fp32")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _cuda_backends:
        cuda = importlib.import_module(".cuda", __name__)  # CuPy is needed only from here on
        _cuda_backends[index] = cuda.CudaBackend(torch.device("cuda", index))
    return _cuda_backends[index]
