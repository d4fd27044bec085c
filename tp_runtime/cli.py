"""Console scripts of an installed tp_runtime (``pip install .``): the launcher and the main job.

    tp-run -n 2 tp-demo          # = launch/tp_run -n 2 launch/demo.py in a checkout
    tp-run -n 2 my_script.py

Both run the files shipped in the wheel as ``tp_runtime/launch/`` (the repository's ``launch/``).
"""

from __future__ import annotations

import os
import runpy
import sys

from .resources import launch_dir


def tp_run() -> None:
    """``tp-run``: ``launch/tp_run`` with this Python for the ranks (unless ``PYTHON`` says otherwise)."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    script = str(launch_dir() / "tp_run")
    os.execve("/bin/bash", ["bash", script, *sys.argv[1:]], env)


def demo() -> None:
    """``tp-demo``: the main job (``launch/demo.py``), run on every rank under ``tp-run``."""
    script = launch_dir() / "demo.py"
    sys.argv[0] = str(script)
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
