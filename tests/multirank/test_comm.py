"""Communicators, init() and launching, on real MPI jobs of 2 and 4 ranks (tests/mpi_util.py).

The workers use the device init() picks: MpiComm on a CPU machine, NcclComm on a GPU one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mpi_util import REPO, assert_passed, run_mpi

from tp_runtime.distributed.world import cuda_unusable_reason

WORKERS = Path(__file__).resolve().parent / "workers"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_collectives(nprocs, tmp_path):
    assert_passed(run_mpi(nprocs, WORKERS / "comm_worker.py", tmp_path), nprocs)


def test_bad_tensors_are_rejected():
    assert_passed(run_mpi(2, WORKERS / "bad_tensor_worker.py"), 2)


def test_exception_on_one_rank_ends_the_job():
    # Rank 1 raises; ranks 0, 2 and 3 wait in a collective that can never complete.
    result = run_mpi(4, WORKERS / "fail_worker.py", timeout=60)
    assert result.returncode != 0, result.output
    assert result.elapsed < 30, f"took {result.elapsed:.1f} s:\n{result.output}"
    assert "RuntimeError: deliberate failure on rank 1 alone" in result.output


@pytest.mark.parametrize("nprocs,tp_size", [(2, None), (4, 2)])
def test_world(nprocs, tp_size):
    args = [] if tp_size is None else [tp_size]
    result = run_mpi(nprocs, WORKERS / "world_worker.py", *args)
    assert_passed(result, nprocs)
    # world.log prints on rank 0 only; world.log_all on every rank, with its rank.
    assert re.findall(r"log line from rank \d+", result.output) == ["log line from rank 0"]
    for rank in range(nprocs):
        assert f"[rank {rank}/{nprocs}] log_all line" in result.output


def test_world_size_not_divisible_by_tp_size():
    result = run_mpi(2, WORKERS / "world_worker.py", 3)
    assert result.returncode != 0
    assert "world size 2 is not divisible by tp_size 3" in result.output


@pytest.mark.skipif(cuda_unusable_reason() is None, reason="this machine can use CUDA")
def test_cuda_requested_without_cuda_fails_on_every_rank():
    result = run_mpi(2, WORKERS / "world_worker.py", env={"TP_RUNTIME_DEVICE": "cuda"})
    assert result.returncode != 0
    assert "choosing the device failed on 2 of 2 ranks" in result.output
    assert "device 'cuda' was requested" in result.output


@pytest.mark.skipif(cuda_unusable_reason() is not None, reason="needs CUDA")
def test_more_ranks_than_gpus_fails_on_every_rank():
    import torch

    gpus = torch.cuda.device_count()
    # "auto": let the ranks try the GPUs (run_mpi would otherwise send a job this size to the CPU)
    result = run_mpi(gpus + 1, WORKERS / "world_worker.py", timeout=180, env={"TP_RUNTIME_DEVICE": "auto"})
    assert result.returncode != 0
    assert f"failed on {gpus + 1} of {gpus + 1} ranks" in result.output
    assert f"{gpus + 1} ranks on this node but only {gpus} GPUs visible" in result.output


def test_bench_comm_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = run_mpi(2, REPO / "launch" / "bench_comm.py", "--smoke", "--out", out)
    assert result.returncode == 0, result.output
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["results"]
    for row in report["results"]:
        assert row["ours_us"] > 0 and row["bytes"] > 0
