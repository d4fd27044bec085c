"""Real models under mpirun: every decoder family at tp 2 and 4 against HF generate, the loader's slice
reads, and the real all-MiniLM-L6-v2 at tp 2, 3 and 4 against HF BertModel (workers/models_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_util import REPO, assert_passed, run_mpi

WORKERS = Path(__file__).resolve().parent / "workers"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_decoders_generate_like_hf(nprocs, tmp_path):
    assert_passed(run_mpi(nprocs, WORKERS / "models_worker.py", "decoders", tmp_path, timeout=600), nprocs)


def test_loader_reads_only_slices(tmp_path):
    assert_passed(run_mpi(2, WORKERS / "models_worker.py", "loader", tmp_path, timeout=300), 2)


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_minilm_embeddings_match_hf(nprocs, minilm_dir):
    assert_passed(run_mpi(nprocs, WORKERS / "models_worker.py", "minilm", minilm_dir, timeout=300), nprocs)


def test_main_job_embeds_with_real_minilm(minilm_dir):
    result = run_mpi(2, REPO / "launch" / "embed.py", "--model", minilm_dir, timeout=300)
    assert result.returncode == 0, result.output
    assert "cosine similarity" in result.output and "min cosine 0.99999" in result.output, result.output


def test_generate_script_on_a_local_checkpoint(tmp_path):
    from hf_adapters import checkpoints

    hf = checkpoints.build("llama")
    checkpoints.save(hf, tmp_path)
    want = checkpoints.hf_greedy(hf, [1, 2, 3], 5)
    result = run_mpi(
        2, REPO / "launch" / "generate.py", "--model", tmp_path, "--prompt", "1,2,3", "--max-new-tokens", 5
    )
    assert result.returncode == 0, result.output
    assert f"'1,2,3' -> '{','.join(map(str, want))}'" in result.output, result.output
