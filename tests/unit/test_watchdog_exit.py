"""The watchdog thread at interpreter exit: stopped and joined before the interpreter finalises
(a daemon thread still calling into torch then is killed by a forced unwind through torch's C++
frames: "terminate called without an active exception", status 134), after the collectives it
watches have finished -- or, where one never does, the job ends at its deadline as always."""

from __future__ import annotations

import subprocess
import sys
import time

_SCRIPT = """
import atexit, threading, time
import torch
torch.cuda.set_device = lambda device: None  # the watchdog thread sets the device: none on the CPU
from mpi4py import MPI
# Registered before the watchdog's own hook, so it runs after it (atexit is last in, first out).
atexit.register(lambda: print("WATCHDOG THREADS AT EXIT", [t.name for t in threading.enumerate()
                                                        if t.name.startswith("tp_runtime")], flush=True))
from tp_runtime.distributed import watchdog

class Comm:  # stands in for NcclComm / CustomAllReduce
    rank, size, device = 0, 2, None
    def check_async_error(self):
        pass
    def abort(self):
        pass

class Event:  # stands in for the CUDA event behind a collective: done after `after` seconds
    def __init__(self, after):
        self.at = time.monotonic() + after
    def query(self):
        done = time.monotonic() > self.at
        if done and not getattr(self, "said", False):
            self.said = True
            print("COLLECTIVE FINISHED", flush=True)
        return done

watchdog.set_collective_timeout({timeout})
dog = watchdog.NcclWatchdog(Comm())
dog._pending.append((Event({after}), "NcclComm.all_reduce", time.monotonic() + {timeout}))
{body}
print("MAIN DONE", flush=True)
"""


def _run(after: float, timeout: float, body: str = "") -> tuple[int, str, float]:
    start = time.monotonic()
    script = _SCRIPT.format(after=after, timeout=timeout, body=body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_exit_waits_for_the_watched_collective_then_joins_the_thread():
    code, out, _ = _run(after=0.5, timeout=30)
    assert code == 0, out
    assert out.index("MAIN DONE") < out.index("COLLECTIVE FINISHED") < out.index("WATCHDOG THREADS AT EXIT []"), out


def test_close_joins_the_thread_and_is_idempotent():
    body = "dog.close(); dog.close(); print('ALIVE AFTER CLOSE', dog._thread.is_alive(), flush=True)"
    code, out, _ = _run(after=0.2, timeout=30, body=body)
    assert code == 0, out
    assert "COLLECTIVE FINISHED" in out and "ALIVE AFTER CLOSE False" in out, out
    assert "WATCHDOG THREADS AT EXIT []" in out, out


def test_a_collective_that_never_finishes_ends_the_exiting_job_at_its_deadline():
    code, out, took = _run(after=1e9, timeout=1.0)
    assert code == 3, out
    assert "NcclComm.all_reduce did not complete within 1 s" in out and "aborting the job" in out, out
    assert "MAIN DONE" in out and "WATCHDOG THREADS AT EXIT" not in out, out
    assert took < 20, out
