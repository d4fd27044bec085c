"""Fault injection under mpirun: every failure ends the whole job promptly, with a message naming
the cause, and never leaves ranks waiting in a collective (CPU path; the same code runs on GPUs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mpi_util import assert_passed, run_mpi

WORKER = Path(__file__).resolve().parent / "workers" / "fault_worker.py"


def _failed(fault: str, bound: float, nprocs: int = 2, plain: bool = False):
    """Run ``fault``; the job must fail, and end within ``bound`` seconds of the fault (rank 0
    prints when it happens: start-up, which on GPUs includes CUDA, NCCL and compiling, is apart)."""
    result = run_mpi(nprocs, WORKER, fault, timeout=180, plain=plain)
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
    # The step's first collective is the host check that every rank has the same step; past it, on
    # the CPU MpiComm raises CollectiveTimeout, on a GPU the NCCL watchdog prints the same and aborts.
    assert re.search(r"(step check|all_reduce) did not complete within 5 s", out), out
    assert "rank 0 (TP rank 0/2)" in out, out


def test_mismatched_configs_fail_on_every_rank():
    out = _failed("config", 20)
    assert out.count("config of Attention differs across the tensor-parallel group in q_scaling (") == 1, out


def test_wrong_weight_shape_on_one_rank_fails_on_every_rank():
    out = _failed("weights", 20)
    assert "weights given to Attention.load_weights differs across the tensor-parallel group in qkv_weight" in out, out


def test_block_exhaustion_mid_run_leaves_other_sequences_unchanged():
    assert_passed(run_mpi(2, WORKER, "exhaustion", timeout=90), 2)


@pytest.mark.parametrize("nprocs", [2, 3])
@pytest.mark.parametrize("case", ["past_one", "past_all", "slots_one", "blocks_one", "unwritten_all", "unwritten_one"])
def test_steps_are_refused_on_every_rank_before_anything_changes(case, nprocs):
    """Ranks given different steps (on one rank or all), or a step reading what its slot never held:
    every rank raises the same error naming the field, and no cache byte changes (the worker checks)."""
    result = run_mpi(nprocs, WORKER, "refused", case, timeout=120)
    assert_passed(result, nprocs)
    assert result.output.count(" refused: ") == nprocs, result.output


@pytest.mark.parametrize("plain", [True, False], ids=["mpirun", "tp_run"])
def test_an_exception_on_one_rank_ends_the_job_under_any_launcher(plain):
    """The collective deadline is 60 s in the worker: the job must end long before it."""
    out = _failed("raise_one", 20, plain=plain)
    assert "an ordinary bug on rank 1" in out, out
    assert out.count("Traceback (most recent call last)") == 1, out  # reported once, by the failing rank
