"""Where the package's non-Python files are, in a source checkout and in an installed wheel alike."""

from __future__ import annotations

from pathlib import Path


def _shipped(name: str, what: str) -> Path:
    """An installed wheel ships the top-level folder ``name`` as ``tp_runtime/<name>/`` (pyproject maps
    the package ``tp_runtime.<name>`` to it); in a checkout, plain or editable-installed, it is the
    repository's top-level folder."""
    package = Path(__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{what} not found: neither {package / name} nor {package.parent / name}")


def kernels_dir() -> Path:
    """The directory holding the CUDA sources (``*.cu``, ``*.cuh``)."""
    return _shipped("kernels", "CUDA kernel sources")


def launch_dir() -> Path:
    """The directory holding the launcher (``tp_run``) and the launch scripts (the demo, benchmarks)."""
    return _shipped("launch", "launch scripts")
