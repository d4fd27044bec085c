"""ColumnLinear -> RowLinear on real MPI jobs, and the demo (the main job) under mpirun."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_util import REPO, assert_passed, run_mpi

WORKERS = Path(__file__).resolve().parent / "workers"


@pytest.mark.parametrize(
    "nprocs,tp_size",
    [
        pytest.param(2, 2, id="one group of 2"),
        pytest.param(4, 2, id="two groups of 2, different inputs"),
    ],
)
def test_column_then_row_equals_unsharded(nprocs, tp_size):
    assert_passed(run_mpi(nprocs, WORKERS / "linear_worker.py", tp_size), nprocs)


def test_demo_runs_and_verifies():
    result = run_mpi(2, REPO / "launch" / "demo.py", "--hidden", "128", "--tokens", "16", "--repeats", "3")
    assert result.returncode == 0, result.output
    assert "verified" in result.output


def test_demo_attention_variants_at_tp4():
    """ALiBi with 12 heads (non-power-of-two slopes per rank) over an int8 paged cache, 4 ranks."""
    args = ("--hidden", "64", "--tokens", "8", "--repeats", "1", "--pe", "alibi", "--heads", "12", "--kv-heads", "12")
    result = run_mpi(4, REPO / "launch" / "demo.py", *args, "--kv-cache", "int8", "--steps", "12", timeout=240)
    assert result.returncode == 0, result.output
    assert "attention stack" in result.output and "verified" in result.output
