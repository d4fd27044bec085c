"""Attention backends: ``reference`` (torch, any device) and ``cuda`` (CuPy RawKernels).

Layers receive a backend and never branch on the device themselves. ``get_backend(None, device, dtype)``
picks ``cuda`` for fp16/bf16 layers on CUDA devices and ``reference`` otherwise (the kernels
are half-precision kernels; fp32 layers are the exact, debugging path); asking for ``cuda``
where it cannot run raises (it never silently falls back).
"""

from __future__ import annotations

import importlib

import torch

from . import reference

NAMES = ("reference", "cuda")


CUDA_DTYPES = (torch.float16, torch.bfloat16)


def get_backend(name: str | None, device: torch.device | str, dtype: torch.dtype = torch.float16):
    device = torch.device(device)
    if name is None:
        name = "cuda" if device.type == "cuda" and dtype in CUDA_DTYPES else "reference"
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES} or None, got {name!r}")
    if name == "reference":
        return reference
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs a CUDA device, got device={device}")
    if dtype not in CUDA_DTYPES:
        raise ValueError(f"backend='cuda' runs fp16/bf16 layers, got dtype={dtype}: use backend='reference' for fp32")
    return importlib.import_module(".cuda", __name__)


def precompile(layers, local_comm=None) -> None:
    """Compile ahead of the first step what the layers will launch (the CUDA backend's kernels;
    nothing for the reference backend). Under mpirun pass ``World.local_comm``: one rank per node
    compiles, the others then load the binaries from the disk cache. Collective over it."""
    cuda_layers = [layer for layer in layers if layer.backend.name == "cuda"]
    if cuda_layers:
        importlib.import_module(".cuda", __name__).precompile_layers(cuda_layers, local_comm)
