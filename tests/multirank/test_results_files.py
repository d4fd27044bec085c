"""Smoke and CPU runs write nowhere unless --out is given; with --out they write there."""

from __future__ import annotations

import hashlib
import json

from mpi_util import REPO, run_mpi

RESULTS = REPO / "launch" / "results"


def _snapshot() -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.rglob("*")) if p.is_file()}


def test_bench_comm_smoke_writes_only_where_out_says(tmp_path):
    before = _snapshot()
    result = run_mpi(2, REPO / "launch" / "bench_comm.py", "--smoke", timeout=120)
    assert result.returncode == 0, result.output
    assert "wrote" not in result.output, result.output
    out = tmp_path / "comm.json"
    result = run_mpi(2, REPO / "launch" / "bench_comm.py", "--smoke", "--out", out, timeout=120)
    assert result.returncode == 0, result.output
    assert _snapshot() == before, "launch/results changed"
    assert json.loads(out.read_text())["results"], out.read_text()
