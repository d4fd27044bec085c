"""The wheel works away from the checkout: `pip install .` gives `tp-run` and `tp-demo`, and
`tp-run -n 2 tp-demo` runs the main job from the installed files alone."""

from __future__ import annotations

import os
import subprocess
import sys

from mpi_util import REPO


def test_console_scripts_run_the_main_job(tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(REPO)], check=True, capture_output=True, timeout=300)
    assert (target / "tp_runtime" / "py.typed").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(target), PATH=f"{target / 'bin'}{os.pathsep}{env['PATH']}", TP_RUNTIME_DEVICE="cpu")
    args = ["--hidden", "64", "--tokens", "8", "--repeats", "1", "--steps", "4", "--layers", "1"]
    result = subprocess.run(
        ["tp-run", "-n", "2", "tp-demo", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "verified" in output, output
    assert str(target / "tp_runtime") in subprocess.run(
        [sys.executable, "-c", "import tp_runtime; print(tp_runtime.__file__)"], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
