"""Run a script on N MPI ranks from a test, the way a user would: through launch/tp_run, or
(``plain=True``) through a bare ``mpirun python script.py``.

mpirun starts in a new session, so on timeout the whole job (mpirun, its daemons, every
rank) can be killed and the test fails with what the job printed, instead of a hung
collective stalling the test run. Killing mpirun's process group is not enough: Open MPI
puts each rank in a process group of its own (same session), so the session is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TP_RUN = REPO / "launch" / "tp_run"


@dataclass
class MpiResult:
    returncode: int
    output: str  # stdout and stderr of every rank, interleaved
    elapsed: float  # seconds
    finished_at: float  # wall clock (time.time()) when the job ended, to compare with times ranks print


def job_device(nprocs: int) -> str:
    """Where ``run_mpi(nprocs, ...)`` runs its ranks: ``"cuda"`` with a GPU per rank, else ``"cpu"``."""
    return "cuda" if os.environ.get("TP_RUNTIME_DEVICE") != "cpu" and _gpus() >= nprocs else "cpu"


def _gpus() -> int:
    """GPUs this machine's ranks could use (0 without a usable CUDA + CuPy)."""
    from tp_runtime.distributed.world import cuda_unusable_reason

    return torch.cuda.device_count() if cuda_unusable_reason() is None else 0


def _plain_mpirun(nprocs: int) -> list[str]:
    """``mpirun -n N`` as a user types it (plus what Open MPI needs to run on a small CI machine)."""
    mpirun = shutil.which("mpirun") or os.path.join(sysconfig.get_path("scripts"), "mpirun")
    command = [mpirun, "-n", str(nprocs)]
    if "Open MPI" in subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout:
        command += ["--oversubscribe", "--bind-to", "none"]
    return command


def run_mpi(
    nprocs: int,
    script: str | os.PathLike,
    *args: object,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    plain: bool = False,
) -> MpiResult:
    """Run ``script args`` on ``nprocs`` ranks with this test's Python; ``env`` adds variables;
    ``plain``: through a bare ``mpirun python script.py`` instead of launch/tp_run."""
    full_env = dict(os.environ)
    # The ranks use this interpreter and this checkout, whatever is installed elsewhere.
    full_env["PYTHON"] = sys.executable
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    if "TP_RUNTIME_DEVICE" not in full_env and _gpus() < nprocs:
        # One rank drives one GPU: on a machine with fewer GPUs than ranks the job runs on the CPU.
        full_env["TP_RUNTIME_DEVICE"] = "cpu"
    if plain:
        if os.geteuid() == 0:
            full_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        command = [*_plain_mpirun(nprocs), sys.executable, str(script), *map(str, args)]
    else:
        command = [str(TP_RUN), "-n", str(nprocs), str(script), *map(str, args)]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s; output so far:\n{output}")
    return MpiResult(proc.returncode, output, time.monotonic() - start, time.time())


def _kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (Linux: the session id is field 6 of /proc/PID/stat)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name, in parentheses, may hold spaces: split after its closing one.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to kill


def assert_passed(result: MpiResult, nprocs: int) -> None:
    """The job exited 0 and every rank reached its end (printed ``PASS rank r``)."""
    assert result.returncode == 0, f"job failed (exit {result.returncode}):\n{result.output}"
    missing = [r for r in range(nprocs) if f"PASS rank {r}\n" not in result.output]
    assert not missing, f"ranks {missing} did not report PASS:\n{result.output}"
