"""Reliability pieces that need no MPI: backend choice, cross-rank consistency checks (in a
simulated group), the NaN/Inf guard, the collective deadline knob."""

from __future__ import annotations

import pytest
import torch
from simulated import simulate

from tp_runtime import NoComm
from tp_runtime.backends import get_backend, reference
from tp_runtime.batch.kv_cache import KVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.consistency import check_same, fingerprint_tensors
from tp_runtime.distributed.watchdog import collective_timeout, set_collective_timeout
from tp_runtime.layers.attention import Attention


def test_backend_choice():
    assert get_backend(None, "cpu", torch.float16) is reference.BACKEND
    assert get_backend("reference", "cpu") is reference.BACKEND
    with pytest.raises(ValueError, match="backend='cuda' needs a CUDA device"):
        get_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        get_backend("triton", "cpu")


def test_cuda_backend_refuses_fp32_with_the_fix_named():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="use backend='reference' for fp32"):
        get_backend("cuda", "cuda", torch.float32)


def test_fingerprints_see_values_order_and_shape():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, generator=g)
    base = fingerprint_tensors(a, None)
    assert base == fingerprint_tensors(a.clone(), None)
    b = a.clone()
    b[3, 7] += 1e-3
    assert fingerprint_tensors(b, None) != base  # one value
    assert fingerprint_tensors(a.flip(0), None) != base  # order
    assert fingerprint_tensors(a.reshape(8, 4), None) != base  # shape
    assert fingerprint_tensors(a, a) != base  # None vs a tensor


def test_check_same_raises_on_every_rank():
    def rank_fn(comm):
        value = 7 if comm.rank != 2 else 8
        with pytest.raises(
            ValueError,
            match=r"weights differs across the tensor-parallel group in dense_weight \(ranks"
            r" \[0, 1, 3\]; ranks \[2\] agree among themselves on dense_weight\)",
        ):
            check_same(comm, "weights", {"qkv_weight": 3, "dense_weight": value}, torch.device("cpu"))
        check_same(comm, "weights", {"qkv_weight": 3, "dense_weight": 5}, torch.device("cpu"))  # agreement passes
        return True

    assert simulate(4, rank_fn) == [True] * 4


def _layer(comm, **cfg_kw):
    cfg = AttentionConfig(hidden_size=32, num_heads=4, num_kv_heads=2, **cfg_kw)
    g = torch.Generator().manual_seed(0)
    layer = Attention(cfg, comm=comm)
    layer.load_weights(
        qkv_weight=torch.randn(cfg.qkv_size, 32, generator=g),
        dense_weight=torch.randn(32, 32, generator=g),
        qkv_bias=torch.randn(cfg.qkv_size, generator=g),
        dense_bias=torch.randn(32, generator=g),
    )
    return cfg, layer


def test_mismatched_config_fails_on_every_rank_of_a_simulated_group():
    def rank_fn(comm):
        with pytest.raises(ValueError, match="config of Attention differs"):
            _layer(comm, q_scaling=1.0 if comm.rank == 0 else 2.0)
        return True

    assert simulate(2, rank_fn) == [True, True]


def test_nan_guard():
    cfg, layer = _layer(NoComm(), check_finite=True)
    cache = KVCache(config=cfg, head_layout=layer.head_layout, num_layers=1, max_batch=1, max_seq_len=8)
    x = torch.randn(3, 32)
    layer(x, Step(new_lens=[3]), cache)  # finite: fine
    x[1, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        layer(x, Step(new_lens=[3]), cache)


def test_collective_timeout_knob():
    old = collective_timeout()
    try:
        set_collective_timeout(2.5)
        assert collective_timeout() == 2.5
        for bad in (0, -1):
            with pytest.raises(ValueError, match="collective timeout"):
                set_collective_timeout(bad)
    finally:
        set_collective_timeout(old)


def test_bad_load_weights_changes_nothing():
    """Every argument is checked before anything is copied: a bad dense weight (or table, or
    scale) leaves the QKV shard that was loaded before it as it was."""
    cfg, layer = _layer(NoComm())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    good = dict(
        qkv_weight=torch.randn(cfg.qkv_size, 32, generator=g),
        dense_weight=torch.randn(32, 32, generator=g),
        qkv_bias=torch.randn(cfg.qkv_size, generator=g),
        dense_bias=torch.randn(32, generator=g),
    )
    for bad, match in (
        (dict(dense_weight=torch.randn(32, 31)), "weight: expected shape"),
        (dict(dense_bias=None), "bias: layer built with bias=True"),
        (dict(relative_table=torch.randn(4, 32)), "relative_table"),
        (dict(qkv_input_scale=0.5), "qkv_input_scale"),
    ):
        with pytest.raises(ValueError, match=match):
            layer.load_weights(**{**good, **bad})
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a failed load_weights({list(bad)})"


def test_start_up_checksum_catches_a_broken_all_reduce():
    from mpi4py import MPI

    from tp_runtime.distributed.comm import Communicator
    from tp_runtime.distributed.world import _self_test

    class Lossy(Communicator):  # rank 0 of 2 whose peer's contribution never arrives
        rank, size = 0, 2

        def all_reduce(self, tensor):
            return tensor

    class Right(Lossy):  # ... and one where it does (the peer, rank 1, gives 2x)
        def all_reduce(self, tensor):
            return tensor.mul_(3)

    _self_test(MPI.COMM_SELF, Right(), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="start-up all-reduce checksum failed on 1 of 1 ranks"):
        _self_test(MPI.COMM_SELF, Lossy(), torch.device("cpu"))


_ABORT_PATH = """
import sys, threading, time
from mpi4py import MPI  # initialised before any communicator exists, as in a job
from tp_runtime.distributed.watchdog import NcclWatchdog

released = threading.Event()

class Comm:  # stands in for NcclComm: its abort lets the waiting main thread go on, as NCCL's does
    rank, size = 0, 2
    def abort(self):
        released.set()

dog = object.__new__(NcclWatchdog)
dog._comm = Comm()
threading.Thread(target=dog._fail, args=("NcclComm.all_reduce did not complete",), daemon=True).start()
released.wait()  # the main thread waits in C with the GIL released, as in torch.cuda.synchronize()
print("MAIN WENT ON", flush=True)
time.sleep(30)
"""


def test_watchdog_abort_path_ends_the_process_and_stops_the_main_thread():
    """The NCCL watchdog's failure path (CPU-testable part): the reason is printed, the main
    thread does not carry on once the aborted collective lets its wait return (CollectiveTimeout
    is raised in it), and the process ends with status 3 within the abort's time bound, never
    hanging in interpreter exit (on a GPU it used to print PASS, then hang in MPI_Finalize)."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _ABORT_PATH], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "MAIN WENT ON" not in out, out
    assert "all_reduce did not complete; aborting the job" in out, out
    assert time.monotonic() - start < 20, out
