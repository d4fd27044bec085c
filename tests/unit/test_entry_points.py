"""Every entry point honours --help (a usage with examples, exit 0, no side effects), and
launch/setup does not reinstall an unchanged checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL = ["launch/setup", "launch/gpu_suite", "launch/gpu_check", "launch/check_kernels", "launch/tp_run", ".ci/run"]
PYTHON = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "launch").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()
)


def _run(command: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def _tree() -> set[str]:
    return {str(p) for p in REPO.rglob("*") if ".git" not in p.parts and "__pycache__" not in p.parts}


@pytest.mark.parametrize("script", SHELL)
def test_shell_script_help(script, tmp_path):
    before = _tree()
    result = _run([script, "--help"], env={"TP_RUNTIME_VENV": str(tmp_path / "venv")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^\s+(\S+/)?{Path(script).name}\b", result.stdout, re.M), result.stdout  # an example line
    assert not (tmp_path / "venv").exists() and _tree() == before


@pytest.mark.parametrize("script", PYTHON)
def test_python_entry_point_help(script):
    result = _run([sys.executable, script, "--help"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    description = result.stdout.split("\noptions:")[0]
    examples = re.findall(rf"^    .*{re.escape(Path(script).name)}", description, re.M)  # indented command lines
    assert examples, f"{script}: the description shows no example:\n{result.stdout}"


def test_setup_installs_an_unchanged_checkout_once(tmp_path):
    """A stand-in venv Python records its calls: the second run with the same extras calls no pip."""
    log = tmp_path / "calls"
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"TP_RUNTIME_VENV": str(tmp_path / "venv")}
    for extras in ("mpi", "mpi", "mpi,test"):
        assert _run(["launch/setup", extras], env=env).returncode == 0
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install -e")]
    assert [line.rsplit("[", 1)[1] for line in installs] == ["mpi]", "mpi,test]"], log.read_text()
