"""The custom CUDA-IPC all-reduce with 2, 3 and 4 MPI ranks on ONE GPU (CUDA IPC works between
processes of one device): every size class, dtype and fused epilogue against an fp64 sum, the same
bits on every rank, CUDA-graph replays, and a rank skipping the call (the job ends naming it).

Ranks time-slice the one GPU, so the figures of these jobs say nothing about speed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mpi_util import assert_passed, run_mpi

pytest.importorskip("cupy")

WORKER = Path(__file__).resolve().parent / "workers" / "custom_all_reduce_worker.py"
ENV = {"NCCL_NVLS_ENABLE": "0", "TP_RUNTIME_DEVICE": "cuda"}


@pytest.mark.parametrize("nprocs", [2, 3, 4])
@pytest.mark.parametrize("mode", ["correct", "graph"])
def test_custom_all_reduce_on_one_gpu(mode, nprocs):
    assert_passed(run_mpi(nprocs, WORKER, mode, timeout=150, env=ENV), nprocs)


@pytest.mark.parametrize(("mode", "nprocs"), [("skip", 2), ("skip_graph", 3)])
def test_a_rank_skipping_the_call_ends_the_job_naming_it(mode, nprocs):
    """Deadline 3 s in the worker: the kernels give up, the message names the collective and the
    rank waited for, and the job ends well within the deadline plus the abort steps."""
    result = run_mpi(nprocs, WORKER, mode, timeout=120, env=ENV)
    assert result.returncode != 0, result.output
    at = re.search(r"^FAULT_AT (\d+\.\d+)$", result.output, re.M)
    assert at, f"rank 0 never reached the fault:\n{result.output}"
    took = result.finished_at - float(at[1])
    assert took < 20, f"the job ended {took:.1f} s after the fault:\n{result.output}"
    assert f"custom all_reduce of the TP group timed out after 3 s waiting for rank {nprocs - 1}" in result.output
    assert "PASS rank" not in result.output, result.output
