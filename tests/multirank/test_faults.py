"""Fault injection under mpirun: every failure ends the whole job promptly, with a message naming
the cause, and never leaves ranks waiting in a collective (CPU path; the same code runs on GPUs)."""

from __future__ import annotations

import re
from pathlib import Path

from mpi_util import assert_passed, run_mpi

WORKER = Path(__file__).resolve().parent / "workers" / "fault_worker.py"


def _failed(fault: str, bound: float):
    """Run ``fault``; the job must fail, and end within ``bound`` seconds of the fault (rank 0
    prints when it happens: start-up, which on GPUs includes CUDA, NCCL and compiling, is apart)."""
    result = run_mpi(2, WORKER, fault, timeout=180)
    assert result.returncode != 0, result.output
    at = re.search(r"^FAULT_AT (\d+\.\d+)$", result.output, re.M)
    assert at, f"{fault}: rank 0 never reached the fault:\n{result.output}"
    took = result.finished_at - float(at[1])
    assert took < bound, f"{fault}: the job ended {took:.1f} s after the fault (bound {bound} s):\n{result.output}"
    return result.output


def test_sigkill_of_one_rank_mid_step_ends_the_job():
    out = _failed("sigkill", 20)
    assert "signal 9" in out or "Killed" in out, out


def test_rank_skipping_a_collective_times_out_with_its_name():
    out = _failed("skip", 25)  # collective deadline 5 s in the worker, abort steps bounded
    # CPU: MpiComm raises CollectiveTimeout; GPU: the NCCL watchdog prints the same reason and aborts.
    assert "all_reduce did not complete within 5 s" in out, out
    assert "rank 0 (TP rank 0/2)" in out, out


def test_mismatched_configs_fail_on_every_rank():
    out = _failed("config", 20)
    assert out.count("config of Attention differs across the tensor-parallel group in q_scaling (") == 1, out


def test_wrong_weight_shape_on_one_rank_fails_on_every_rank():
    out = _failed("weights", 20)
    assert "weights given to Attention.load_weights differs across the tensor-parallel group in qkv_weight" in out, out


def test_block_exhaustion_mid_run_leaves_other_sequences_unchanged():
    assert_passed(run_mpi(2, WORKER, "exhaustion", timeout=90), 2)
