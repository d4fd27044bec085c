"""The benchmark and soak scripts run under mpirun (CPU smoke runs: correctness, no timing)."""

from __future__ import annotations

import json

from mpi_util import REPO, job_device, run_mpi


def test_bench_tp_smoke_equals_baseline():
    result = run_mpi(2, REPO / "launch" / "bench_tp.py", "--smoke", timeout=180)
    assert result.returncode == 0, result.output
    assert "ours equals the torch.distributed baseline" in result.output


def test_soak_short_run_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    args = ("--steps", "400", "--checkpoint-every", "50", "--device", "cpu", "--out", out)
    result = run_mpi(2, REPO / "launch" / "soak.py", *args, timeout=240)
    assert result.returncode == 0, result.output
    stats = json.loads(out.read_text())
    assert stats["leaked_blocks"] == 0 and stats["checkpoints"] >= 5 and stats["finished"] > 0
    assert result.output.count("soak: step ") >= 5, result.output  # progress on rank 0, once per checkpoint
    assert "soak: step 50/400" in result.output, result.output


def test_demo_benchmark_mode_prints_the_table():
    args = ("--hidden", "64", "--tokens", "8", "--repeats", "1", "--steps", "4", "--bench")
    result = run_mpi(2, REPO / "launch" / "demo.py", *args, timeout=300)
    assert result.returncode == 0, result.output
    assert "verified" in result.output and "ours ms   base ms  ratio" in result.output, result.output
    model = "llama2-7b" if job_device(2) == "cuda" else "tiny-gqa"  # GPU shapes on GPUs (demo.py)
    assert result.output.count(model) >= 3, result.output
