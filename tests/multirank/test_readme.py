"""The README's Python examples run as written on 2 ranks and print their check against a reference;
the README names every environment variable the code reads and no file that does not exist."""

from __future__ import annotations

import re

import pytest
from mpi_util import REPO, run_mpi

README = (REPO / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)
SKIP = {"BASH_SOURCE", "PIPESTATUS", "PATH", "PYTHONPATH", "EUID", "SECONDS"}


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_and_checks_itself(index, tmp_path):
    script = tmp_path / f"example{index}.py"
    script.write_text(EXAMPLES[index])
    result = run_mpi(2, script, timeout=180)
    assert result.returncode == 0, result.output
    assert re.search(r"error vs [^\n]* \d\.\de-\d\d", result.output), result.output


def _variables_read() -> set[str]:
    names = set()
    for path in [*(REPO / "tp_runtime").rglob("*.py"), *(REPO / "launch").glob("*.py")]:
        text = path.read_text()
        names |= set(re.findall(r"environ(?:\.get)?[(\[]\"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"^[A-Z_]+_ENV = \"([A-Z0-9_]+)\"", text, re.M))
        for group in re.findall(r"_VARIABLES = \(([^)]*)\)", text):
            names |= set(re.findall(r"\"([A-Z][A-Z0-9_]+)\"", group))
    for path in [*(REPO / "launch").iterdir(), REPO / ".ci" / "run"]:
        if path.is_file() and path.read_text(errors="replace").startswith("#!/usr/bin/env bash"):
            names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", path.read_text()))
    return names - SKIP


def test_readme_names_every_environment_variable():
    missing = sorted(name for name in _variables_read() if f"`{name}`" not in README)
    assert not missing, f"README.md does not document {missing}"


def test_docs_name_only_files_that_exist():
    named = []
    for path in [*(REPO / "tp_runtime").rglob("*.py"), *(REPO / "launch").glob("*.py"), *(REPO / "kernels").iterdir()]:
        for name in re.findall(r"\b([\w/]+\.md)\b", path.read_text()):
            if not ((REPO / name).exists() or (path.parent / name).exists() or (REPO / "kernels" / name).exists()):
                named.append(f"{path.relative_to(REPO)}: {name}")
    assert not named, named
