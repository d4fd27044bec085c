"""The launch scripts' command lines: argparse with the script's docstring (what it does, examples) as
the description, written once per job under mpirun.

    import cli             # the launch folder is on sys.path when a launch script runs
    p = cli.parser(__doc__)

Under an MPI launcher every rank parses the same arguments, so ``--help`` is printed by world rank 0
alone, and a bad argument raises ``UsageError`` (a ``ValueError`` naming the flag) instead of
printing a usage per rank: the job runner (``tp_runtime.distributed.run``) reports it once. Run
without a launcher, the parser behaves as argparse's does (usage and error, exit status 2).
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")  # set by Open MPI, MPICH, PMIx launchers


class UsageError(ValueError):
    """A bad command-line argument."""


def world_rank() -> int | None:
    """This process's rank as its MPI launcher set it (None outside one), without initialising MPI."""
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if world_rank() is None:
            super().error(message)
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def print_help(self, file=None) -> None:
        if world_rank() in (None, 0):
            super().print_help(file)


def parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows ``doc`` as written (its examples included)."""
    return _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
