"""One rank of a job: ``python -m tp_runtime.distributed.run script.py [args]`` (or ``-m module``).

``launch/tp_run`` starts every rank this way. It runs the script as ``python script.py`` would, and
reports a failure once for the whole job instead of once per rank:

- a failing rank tells the others (a message on a private communicator), then waits up to
  ``GRACE_S`` to hear which other ranks failed;
- the lowest failing rank prints: a validation error (``ValueError``, ``TypeError``,
  ``NotImplementedError``, ``SystemExit("message")``) as one line naming the rank, anything else
  with its traceback; the other failing ranks print nothing;
- if every rank failed, every rank exits with status 1 (MPI finalised); otherwise the lowest
  failing rank aborts the job (``MPI_Abort``), which ends the ranks still waiting in a collective.

One race is left: a lower rank failing just after a higher one reported (past its ``GRACE_S``) but
before the abort reaches it reports too, so such a job prints two reports.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
import traceback

GRACE_S = 2.0  # how long a failing rank waits to hear from the others before it reports
EXPECTED = (ValueError, TypeError, NotImplementedError)
_TAG = 15  # on a communicator of our own (a duplicate of COMM_WORLD): no user message can match it


def _run(args: list[str]) -> None:
    if args[0] == "-m":
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))  # as `python script.py` does
        runpy.run_path(args[0], run_name="__main__")


def describe(exc: BaseException) -> tuple[str, bool]:
    """(one line naming the error, whether that line is the whole report)."""
    if isinstance(exc, SystemExit):
        return (exc.code if isinstance(exc.code, str) else f"exit status {exc.code}"), True
    return f"{type(exc).__name__}: {exc}", isinstance(exc, EXPECTED)


def _script_frames(tb):
    """The traceback from the script's first frame on (this runner's and runpy's left out)."""
    while tb is not None and tb.tb_next is not None:
        name = tb.tb_frame.f_code.co_filename
        if name != __file__ and not name.startswith("<frozen") and "runpy" not in name:
            break
        tb = tb.tb_next
    return tb


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def report_line(rank: int, size: int, line: str, others: dict[int, str]) -> str:
    """The lowest failing rank's headline: its error, and which other ranks failed (the same way or not)."""
    text = f"error on rank {rank} of {size}: {line}"
    same = sorted(r for r, other in others.items() if other == line)
    different = sorted(r for r, other in others.items() if other != line)
    if size > 1 and len(same) == size - 1:
        text += " (the same on every rank)"
    elif same:
        text += f" (the same on ranks {_ranks(same)})"
    if different:
        text += f" (ranks {_ranks(different)} failed otherwise, e.g. {others[different[0]]})"
    return text


def fail(comm, exc: BaseException) -> int:
    """Report ``exc`` once for the job (see the module docstring); returns the exit status, or aborts."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    line, whole = describe(exc)
    sends = [comm.isend(line, dest=r, tag=_TAG) for r in range(size) if r != rank]
    failed = {rank: line}
    deadline = time.monotonic() + GRACE_S
    status = MPI.Status()
    while len(failed) < size and time.monotonic() < deadline:
        if comm.iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
            source = status.Get_source()
            failed[source] = comm.recv(source=source, tag=_TAG)
        else:
            time.sleep(0.005)
    if min(failed) == rank:
        others = {r: other for r, other in failed.items() if r != rank}
        print(report_line(rank, size, line, others), file=sys.stderr, flush=True)
        if not whole:
            traceback.print_exception(type(exc), exc, _script_frames(exc.__traceback__), file=sys.stderr)
            sys.stderr.flush()
    if len(failed) == size:  # nobody is left waiting in a collective: end normally, with status 1
        MPI.Request.waitall(sends)
        return 1
    if min(failed) != rank:
        time.sleep(10 * GRACE_S)  # the lowest failing rank aborts the job meanwhile
    MPI.COMM_WORLD.Abort(1)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args == ["-m"]:
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()  # collective: every rank runs this line before its script
    try:
        _run(args)
    except SystemExit as exc:
        return 0 if exc.code in (None, 0) else fail(comm, exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return fail(comm, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
