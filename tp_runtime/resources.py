"""Where the package's non-Python files are, in a source checkout and in an installed wheel alike."""

from __future__ import annotations

from pathlib import Path


def kernels_dir() -> Path:
    """The directory holding the CUDA sources (``*.cu``, ``*.cuh``).

    An installed wheel ships them as ``tp_runtime/kernels/`` (pyproject maps the package
    ``tp_runtime.kernels`` to the top-level ``kernels/``); in a checkout, plain or
    editable-installed, they are the repository's top-level ``kernels/``.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"CUDA kernel sources not found: neither {package / 'kernels'} nor {package.parent / 'kernels'}"
    )
