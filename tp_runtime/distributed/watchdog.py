"""Deadlines for collectives: the timeout every communicator uses, and the NCCL watchdog thread.

A collective still unfinished after ``collective_timeout()`` seconds ends the whole job with a
message naming the rank and the collective. ``MpiComm`` checks the deadline in its own wait loop;
NCCL collectives are asynchronous, so ``NcclWatchdog`` watches them from a daemon thread and, when
one is late or NCCL reports an error, aborts the communicator and then MPI.
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import os
import sys
import threading
import time
from collections import deque

import torch

TIMEOUT_ENV = "TP_RUNTIME_COLLECTIVE_TIMEOUT"
_timeout_s = float(os.environ.get(TIMEOUT_ENV, "60"))


def set_collective_timeout(seconds: float) -> None:
    """Deadline of every collective (default 60 s, or ``$TP_RUNTIME_COLLECTIVE_TIMEOUT``).

    A collective still unfinished after it ends the whole job with a message naming the rank
    and the collective: a peer that died, skipped the collective or hangs cannot hold the
    others (and their GPUs) forever.
    """
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"collective timeout: expected seconds > 0, got {seconds!r}")
    _timeout_s = float(seconds)


def collective_timeout() -> float:
    return _timeout_s


class CollectiveTimeout(RuntimeError):
    """A collective did not complete before its deadline."""


def world_rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


_failed = threading.Event()  # a watchdog gave up on a collective: this process must not exit normally
_aborted = threading.Event()  # ... and has aborted the NCCL communicator (or given up on that)


_live: set[NcclWatchdog] = set()  # watchdogs whose thread runs (closed ones leave)
_exiting = threading.Event()  # interpreter exit began: no exception is raised into the main thread any more


@atexit.register
def _at_exit() -> None:
    """Runs before MPI_Finalize (mpi4py's C-level exit hook) and before torch's own exit hooks (this
    module imports torch first), while daemon threads still run. Every watchdog thread is stopped and
    joined here: one left polling would call into torch/CUDA while the interpreter finalises, and a
    daemon thread that takes the GIL back then is ended with a forced unwind that aborts the process
    ("terminate called without an active exception") inside torch's C++ frames. A watchdog that gave
    up on a collective (now or while draining) ends the process before MPI_Finalize could wait for
    peers that never come."""
    _exiting.set()
    for dog in list(_live):
        dog.close()
    if _failed.is_set():
        _aborted.wait(3.0)
        sys.stderr.flush()
        os._exit(3)


class NcclWatchdog:
    """Deadlines for NCCL collectives (and the custom all-reduce's kernels) without stalling the host.

    Each collective records a CUDA event behind it on the stream; a daemon thread polls the
    oldest events and the communicator's asynchronous error. A collective unfinished after
    ``collective_timeout()`` seconds, or an NCCL error, ends the job: the message names the rank
    and the collective, the communicator is aborted (not destroyed, which can block), then MPI
    aborts every rank. Nothing is watched while a CUDA graph is being captured.
    """

    def __init__(self, comm):
        self._comm = comm
        self._pending: deque = deque()  # (event, what, deadline), oldest first
        self._spare: list = []  # events of finished collectives, recorded again by later ones
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tp_runtime-nccl-watchdog", daemon=True)
        _live.add(self)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread once the collectives watched so far have finished, and join it: each
        still unfinished keeps its deadline (a late one ends the job as always, so this returns
        within the latest deadline). Idempotent; the interpreter's exit calls it for every
        watchdog still running, and the owning communicator's ``close`` does."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        _live.discard(self)

    def watch(self, what: str, grace_s: float = 0.0) -> None:
        """Watch the work just enqueued on the current stream: ``what`` names it (``NcclComm.all_reduce``);
        its deadline is the collective deadline plus ``grace_s`` (for a kernel that reports its own
        timeout first, more precisely)."""
        if torch.cuda.is_current_stream_capturing():
            return
        if self._stop.is_set():
            raise RuntimeError(f"{what}: the communicator was closed")
        with self._lock:
            event = self._spare.pop() if self._spare else torch.cuda.Event()  # no event made per call
        event.record(torch.cuda.current_stream(self._comm.device))
        with self._lock:
            self._pending.append((event, what, time.monotonic() + _timeout_s + grace_s))

    def _run(self) -> None:
        torch.cuda.set_device(self._comm.device)
        while True:
            if self._stop.is_set():
                time.sleep(0.01)  # closed, draining: poll without spinning
            else:
                self._stop.wait(0.05)
            stopping = self._stop.is_set()
            with self._lock:
                while self._pending and self._done(self._pending[0][0]):
                    self._spare.append(self._pending.popleft()[0])
                late = self._pending[0] if self._pending and time.monotonic() > self._pending[0][2] else None
                drained = not self._pending
            if late is not None:
                self._fail(
                    f"{late[1]} did not complete within {_timeout_s:g} s: a peer died, skipped it "
                    f"or is stuck ({TIMEOUT_ENV} sets the deadline)"
                )
            try:
                self._comm.check_async_error()
            except CollectiveTimeout as exc:  # a custom all-reduce kernel gave up waiting for a peer
                self._fail(str(exc))
            except Exception as exc:  # an NCCL error on this communicator: nothing will complete now
                self._fail(f"NCCL reported an error: {exc}")
            if stopping and drained:  # closed, nothing left to watch, and the last check above was clean
                return

    @staticmethod
    def _done(event: torch.cuda.Event) -> bool:
        """Whether the collective behind ``event`` finished. A query that errors counts as not yet:
        the deadline still ends the job if it never does, and this thread must not die (it is the
        only one that can end a job whose main thread waits on the GPU)."""
        try:
            return event.query()
        except RuntimeError:  # torch.AcceleratorError derives from it
            return False

    def _fail(self, reason: str) -> None:
        # First of all, before anything that takes time: the abort below lets the main thread's
        # wait (torch.cuda.synchronize, say) return as if the collective had finished, and it must
        # not go on with the garbage. CollectiveTimeout is raised in it at its next Python
        # instruction (as MpiComm raises on the CPU); should it reach interpreter exit first --
        # which freezes this daemon thread and cancels faulthandler -- the atexit hook ends the
        # process before MPI_Finalize waits for peers that never come.
        _failed.set()
        c = self._comm
        print(
            f"tp_runtime watchdog: rank {world_rank()} (TP rank {c.rank}/{c.size}): {reason}; aborting the job",
            file=sys.stderr,
            flush=True,
        )
        if not _exiting.is_set():  # at exit the main thread is in the exit hook, which ends the process
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(threading.main_thread().ident), ctypes.py_object(CollectiveTimeout)
            )
        from mpi4py import MPI

        # Each step gets a bounded time: neither a wedged NCCL abort nor MPI may keep the job alive.
        # The joins below need the GIL to return, which a blocked C call (the abort, say) may hold:
        # faulthandler's timer is a C thread, so it ends the process (printing every thread's
        # stack first) even then.
        faulthandler.dump_traceback_later(15, exit=True)
        for action, seconds in ((c.abort, 2.0), (lambda: MPI.COMM_WORLD.Abort(3), 10.0)):
            t = threading.Thread(target=action, daemon=True)
            t.start()
            t.join(seconds)
            _aborted.set()  # the communicator's abort is over (or timed out): exiting may proceed
        os._exit(3)  # mpirun sees a rank die without finalising and ends the others
