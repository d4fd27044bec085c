"""Real models under mpirun: every decoder family at tp 2 and 4 against HF generate, the loader's slice
reads, and the real all-MiniLM-L6-v2 at tp 2, 3 and 4 against HF BertModel (workers/models_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_util import assert_passed, run_mpi

WORKERS = Path(__file__).resolve().parent / "workers"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_decoders_generate_like_hf(nprocs, tmp_path):
    assert_passed(run_mpi(nprocs, WORKERS / "models_worker.py", "decoders", tmp_path, timeout=600), nprocs)


def test_loader_reads_only_slices(tmp_path):
    assert_passed(run_mpi(2, WORKERS / "models_worker.py", "loader", tmp_path, timeout=300), 2)


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_minilm_embeddings_match_hf(nprocs, minilm_dir):
    assert_passed(run_mpi(nprocs, WORKERS / "models_worker.py", "minilm", minilm_dir, timeout=300), nprocs)
