"""A failing job reports once (tp_runtime.distributed.run under launch/tp_run): one line for a
validation error that every rank hits, one traceback for an unexpected exception, and none of
Open MPI's notices about the abort or the exit status."""

from __future__ import annotations

from pathlib import Path

from mpi_util import REPO, run_mpi

DEMO = REPO / "launch" / "demo.py"
WORKERS = Path(__file__).resolve().parent / "workers"
NOTICES = ("MPI_ABORT", "prterun", "mpirun", "Traceback")


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_bad_heads_on_4_ranks_is_one_line_naming_the_flag():
    result = run_mpi(4, DEMO, "--heads", "7", timeout=120)
    assert result.returncode != 0, result.output
    assert _lines(result.output) == [
        "error on rank 0 of 4: ValueError: --kv-heads: AttentionConfig.num_kv_heads=2: must divide num_heads=7 "
        "(the same on every rank)"
    ], result.output


def test_demo_on_3_ranks_names_the_flag_to_change():
    result = run_mpi(3, DEMO, timeout=120)
    assert result.returncode != 0, result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and "--hidden" in lines[0] and "tensor-parallel size 3" in lines[0], result.output


def test_unknown_position_embedding_is_one_usage_line():
    result = run_mpi(2, DEMO, "--pe", "rope", timeout=120)
    assert result.returncode != 0, result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and "argument --pe: invalid choice: 'rope'" in lines[0], result.output


def test_unexpected_exception_on_one_rank_shows_one_traceback():
    result = run_mpi(4, WORKERS / "fail_worker.py", timeout=60)
    assert result.returncode != 0, result.output
    assert result.output.count("Traceback") == 1, result.output
    assert result.output.count("RuntimeError: deliberate failure on rank 1 alone") == 2, result.output  # head, tail
    assert "error on rank 1 of 4: RuntimeError" in result.output, result.output
    assert not any(notice in result.output for notice in NOTICES[:3]), result.output


def test_help_is_printed_once_and_starts_nothing():
    result = run_mpi(2, DEMO, "--help", timeout=60)
    assert result.returncode == 0, result.output
    assert result.output.count("usage: demo.py") == 1, result.output
    assert "launch/tp_run -n 2 launch/demo.py" in result.output, result.output  # the examples
