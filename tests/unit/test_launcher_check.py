"""init() refuses a launch where the environment announces several processes but MPI sees one
(torchrun, or another MPI library's mpirun) in one line naming launch/tp_run; a GPU without CuPy
is one warning line, not a silent CPU run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from tp_runtime.distributed import world

REPO = Path(__file__).resolve().parents[2]


def test_launcher_mismatch_names_the_launcher():
    assert world.launcher_mismatch({}, 1) is None
    assert world.launcher_mismatch({"WORLD_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "2"}, 2) is None
    line = world.launcher_mismatch({"WORLD_SIZE": "2"}, 1)
    assert "torchrun" in line and "launch/tp_run -n 2" in line and "\n" not in line
    line = world.launcher_mismatch({"TP_RUN_NPROCS": "4"}, 1)
    assert "another MPI library" in line and "MPIRUN=" in line


def _init_as(rank: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}
    env["TP_RUNTIME_DEVICE"] = "cpu"
    code = "import tp_runtime; tp_runtime.init(); print('initialised')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_torchrun_processes_stop_with_one_line():
    first, second = _init_as("0"), _init_as("1")
    assert first.returncode == 1 and second.returncode == 1
    assert first.stdout == "" and first.stderr.count("\n") == 1, first.stderr
    assert "torchrun" in first.stderr and "launch/tp_run -n 2" in first.stderr
    assert second.stdout == second.stderr == "", second.stderr  # the first process speaks for all


def test_gpu_without_cupy_warns_in_one_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(world, "cuda_unusable_reason", lambda: "CuPy is not usable (ImportError: no cupy)")
    with caplog.at_level(logging.WARNING):
        assert world._pick_device("auto", local_rank=0, local_size=1) == torch.device("cpu")
    assert len(caplog.records) == 1 and "CuPy is not usable" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        world._pick_device("auto", local_rank=1, local_size=2)  # other ranks of the node stay quiet
    assert not caplog.records
