"""HF ``transformers`` oracles under mpirun at tp 1, 2 and 4: one job per TP size runs every case
of ``workers/hf_worker.py`` (CPU path here, CUDA where the world picks it); each rank checks its
own output and cache against the HF model it built itself. One pytest item per (tp, case)
reads that case's line from every rank. At tp 8 (oversubscribed on the CPU) the job runs the
cases whose head layouts matter there: BLOOM with 112 ALiBi heads, Llama 64/8 GQA, multi-query
with its one KV head on all 8 ranks, an int8 KV cache.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from mpi_util import MpiResult, run_mpi

_WORKERS = Path(__file__).resolve().parent / "workers"
WORKER = _WORKERS / "hf_worker.py"
if str(_WORKERS) not in sys.path:
    sys.path.insert(0, str(_WORKERS))

import hf_worker  # noqa: E402

TP8_CASES = (
    "decode_bloom112",
    "int8_bloom112",
    "decode_llama64_8",
    "int8_llama64_8",
    "fp8_llama64_8",
    "decode_falcon_mqa",
    "decode_llama_gqa",
    "decode_bloom24",
    "mixed_llama_gqa",
)
JOB_CASES = {1: (), 2: (), 4: (), 8: TP8_CASES}  # () = every case
TIMEOUT_S = 300  # per job; the 4- and 8-rank jobs oversubscribe a 2-core CI machine
_LINE = re.compile(r"^HF_CASE (\S+) rank (\d+) (ok|FAIL)(.*)$", re.M)
_jobs: dict[int, MpiResult] = {}


def _job(tp: int) -> MpiResult:
    """The worker picks the world's device: on a machine with CUDA (and a GPU per rank) it checks
    the CUDA backend (head size 64, half precision), else the CPU path (run_mpi decides)."""
    if tp not in _jobs:
        env = {"OMP_NUM_THREADS": "1"}
        _jobs[tp] = run_mpi(tp, WORKER, *JOB_CASES[tp], timeout=TIMEOUT_S, env=env)
    return _jobs[tp]


@pytest.mark.parametrize(
    "tp,name", [(tp, name) for tp, names in JOB_CASES.items() for name in (names or hf_worker.CASES)]
)
def test_hf_case_under_mpirun(tp, name):
    result = _job(tp)
    lines = {int(m[2]): (m[3], m[4].strip()) for m in _LINE.finditer(result.output) if m[1] == name}
    missing = [r for r in range(tp) if r not in lines]
    assert not missing, (
        f"ranks {missing} printed no result for {name} (job exit {result.returncode}, {result.elapsed:.0f} s):\n"
        + result.output[-6000:]
    )
    failed = {r: why for r, (status, why) in sorted(lines.items()) if status != "ok"}
    assert not failed, f"{name} at tp={tp}:\n" + "\n".join(f"rank {r}: {why}" for r, why in failed.items())


@pytest.mark.parametrize("tp", list(JOB_CASES))
def test_hf_job_passed(tp):
    """The job as a whole: exit 0, every rank printed PASS (also catches a crash after the cases)."""
    result = _job(tp)
    assert result.returncode == 0, f"job failed (exit {result.returncode}):\n{result.output[-6000:]}"
    missing = [r for r in range(tp) if f"PASS rank {r}\n" not in result.output]
    assert not missing, f"ranks {missing} did not report PASS:\n{result.output[-6000:]}"
