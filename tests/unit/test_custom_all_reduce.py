"""The custom all-reduce's host logic on the CPU: routing, the start-up agreement, the grid, the
environment switch, and the fused epilogue's fallback on transports that do not fuse it."""

from __future__ import annotations

import pytest
import torch

from tp_runtime.distributed import custom_all_reduce as car
from tp_runtime.distributed.comm import NoComm, agree_no_error
from tp_runtime.distributed.custom_all_reduce import Limits, Route, agree, route

MiB, KiB = car.MiB, car.KiB
LIMITS = Limits(one_shot_max=1 * MiB, two_shot_max=8 * MiB)


@pytest.mark.parametrize(
    "nbytes, expected",
    [
        (2, Route.ONE_SHOT),
        (8 * KiB, Route.ONE_SHOT),
        (1 * MiB, Route.ONE_SHOT),
        (1 * MiB + 2, Route.TWO_SHOT),
        (8 * MiB, Route.TWO_SHOT),
        (8 * MiB + 2, Route.NCCL),
        (512 * MiB, Route.NCCL),
    ],
)
def test_route_by_size(nbytes, expected):
    assert route(nbytes, torch.bfloat16, 2, True, LIMITS) is expected


def test_route_fallbacks():
    assert route(64, torch.float16, 1, False, LIMITS) is Route.IDENTITY  # tp 1: nothing at all
    assert route(64, torch.float16, 1, True, LIMITS) is Route.IDENTITY
    assert route(64, torch.float16, 4, False, LIMITS) is Route.NCCL  # switched off / no peer access
    assert route(64, torch.int32, 4, True, LIMITS) is Route.NCCL  # the kernel sums floats only
    assert route(64, torch.int64, 2, True, LIMITS) is Route.NCCL
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert route(64, dtype, 8, True, LIMITS) is Route.ONE_SHOT


def test_route_table_is_one_table_covering_every_group_the_kernel_serves():
    assert sorted(car.ROUTE_TABLE) == list(range(2, car.MAX_RANKS + 1))
    assert all(0 < one <= two for one, two in car.ROUTE_TABLE.values())
    assert car.DEFAULT_BUFFER_BYTES == max(two for _, two in car.ROUTE_TABLE.values())
    assert car.default_limits(9, 8 * MiB) == Limits(0, 0)  # past the kernel: nothing for the custom path


def test_default_limits():
    assert car.default_limits(2, 8 * MiB) == Limits(2 * MiB, 8 * MiB)  # 2 ranks: one-shot longer
    assert car.default_limits(4, 8 * MiB) == Limits(512 * KiB, 8 * MiB)
    assert car.default_limits(8, 256 * KiB) == Limits(256 * KiB, 256 * KiB)  # never past the buffer


def test_environment_switch():
    assert car.enabled_by_env({})
    assert car.enabled_by_env({car.CUSTOM_ENV: "1"})
    assert not car.enabled_by_env({car.CUSTOM_ENV: "0"})
    with pytest.raises(ValueError, match=r"TP_RUNTIME_CUSTOM_ALLREDUCE: expected 0 or 1, got 'off'"):
        car.enabled_by_env({car.CUSTOM_ENV: "off"})


def test_peer_reasons():
    a, b, far = ("n1", "0000:1b:00.0"), ("n1", "0000:2c:00.0"), ("n1", "0000:9d:00.0")
    can = lambda bus: bus in {a[1], b[1]}  # noqa: E731
    assert car.peer_reasons(a, [a, a, a], lambda bus: False) == []  # one GPU shared by the ranks
    assert car.peer_reasons(a, [a, b], can) == []
    assert car.peer_reasons(a, [a, far], can) == ["no peer access from GPU 0000:1b:00.0 to rank 1's GPU 0000:9d:00.0"]
    # The same bus id on another host is another GPU
    assert car.peer_reasons(a, [a, ("n2", a[1])], can) == ["rank 1 runs on another host (n2)"]


def test_agreement_is_one_verdict_from_every_rank_facts():
    fine = (True, [])
    assert agree(4, [fine] * 4) is None
    assert agree(2, [fine, (False, [])]) == "TP_RUNTIME_CUSTOM_ALLREDUCE=0 on ranks [1]"
    assert agree(3, [fine, (True, ["no peer access x"]), fine]) == "rank 1: no peer access x"
    assert "at most 8" in agree(16, [fine] * 16)


def test_grid_is_a_function_of_the_message_only():
    assert car.grid_blocks(1, 2, 2, Route.ONE_SHOT) == 1  # a few bytes: one block (the tail)
    assert car.grid_blocks(4096, 2, 2, Route.ONE_SHOT) == 1  # 8 KiB = 512 packs
    assert car.grid_blocks(4097 * 8, 2, 2, Route.ONE_SHOT) == 9
    assert car.grid_blocks(1 << 22, 2, 2, Route.ONE_SHOT) == car.MAX_BLOCKS  # capped
    # two-shot: a rank's slice (rounded to 8 packs) sets the work
    assert car.grid_blocks(3 * 512 * 8, 2, 3, Route.TWO_SHOT) == 1
    assert car.grid_blocks(3 * 512 * 8 + 8, 2, 3, Route.TWO_SHOT) == 2


def test_epilogue_on_a_transport_that_does_not_fuse_it():
    comm = NoComm()
    assert not comm.fuses_epilogue
    x, bias, res = torch.randn(3, 5), torch.randn(5), torch.randn(3, 5)
    expected = x + bias + res
    out = comm.all_reduce(x, bias=bias, residual=res)
    assert out is x and torch.equal(out, expected)


def test_row_linear_hands_its_bias_to_a_fusing_all_reduce():
    from tp_runtime.layers.linear import RowLinear

    class Fusing(NoComm):  # a group of one whose all-reduce fuses the epilogue
        fuses_epilogue = True
        seen: list = []

        def all_reduce(self, tensor, bias=None, residual=None):
            self.seen.append(bias)
            return super().all_reduce(tensor, bias, residual)

    plain, fusing = RowLinear(6, 4, comm=NoComm()), RowLinear(6, 4, comm=Fusing())
    w, b = torch.randn(4, 6), torch.randn(4)
    plain.load_weights(w, b)
    fusing.load_weights(w, b)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fusing(x), plain(x))
    assert Fusing.seen and Fusing.seen[0] is fusing.bias


class _Buffered(NoComm):
    """A group of one with a fused epilogue and a registered buffer (one per dtype) the producer
    may write into: records each message's storage and the bias it was handed."""

    fuses_epilogue = True

    def __init__(self):
        self.buffers: dict = {}
        self.seen: list = []

    def all_reduce_buffer(self, shape, dtype):
        buf = self.buffers.setdefault(dtype, torch.full((4096,), float("nan"), dtype=dtype))
        return buf[: int(torch.tensor(shape).prod())].view(shape)

    def all_reduce(self, tensor, bias=None, residual=None):
        self.seen.append((tensor.data_ptr(), bias))
        return super().all_reduce(tensor.clone(), bias, residual)  # the sum in a new tensor, as the kernel


@pytest.mark.parametrize("fp8", [False, True])
def test_row_linear_gemm_writes_into_the_registered_buffer(fp8):
    """Where the communicator offers its registered buffer, RowLinear's GEMM writes the partial sums
    there (the custom path then skips its copy-in) and the bias goes to the fused epilogue; the
    result equals the layer on a communicator without a buffer. FP8's scaled GEMM has no ``out=``:
    it copies its result there."""
    from tp_runtime.layers.fp8 import FP8RowLinear
    from tp_runtime.layers.linear import RowLinear

    torch.manual_seed(3)
    kind = FP8RowLinear if fp8 else RowLinear
    dtype = torch.bfloat16 if fp8 else torch.float32
    w, b, x = torch.randn(24, 40).to(dtype), torch.randn(24).to(dtype), torch.randn(2, 3, 40).to(dtype)
    comm = _Buffered()
    plain, buffered = kind(40, 24, comm=NoComm(), dtype=dtype), kind(40, 24, comm=comm, dtype=dtype)
    plain.load_weights(w, b)
    buffered.load_weights(w, b)
    got = buffered(x)
    assert comm.seen == [(comm.buffers[dtype].data_ptr(), buffered.bias)]
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, plain(x))  # the bias added after the GEMM, not inside it: one rounding apart
    assert torch.isnan(comm.buffers[dtype][2 * 3 * 24 :]).all()  # nothing written past the message


def test_matmul_into_out_takes_no_bias():
    from tp_runtime.layers.linear import RowLinear

    layer = RowLinear(8, 4, comm=NoComm())
    with pytest.raises(ValueError, match="out= takes no bias"):
        layer.matmul(torch.randn(2, 8), layer.bias, out=torch.empty(2, 4))


def test_communicators_without_a_registered_buffer_offer_none():
    from mpi4py import MPI

    from tp_runtime.distributed.comm import MpiComm

    for comm in (NoComm(), MpiComm(MPI.COMM_SELF)):
        assert comm.all_reduce_buffer((2, 3), torch.float32) is None


def test_mpi_comm_adds_the_epilogue_after_the_sum():
    from mpi4py import MPI

    from tp_runtime.distributed.comm import MpiComm

    x, bias, res = torch.randn(2, 4).half(), torch.randn(4).half(), torch.randn(2, 4).half()
    expected = x + bias + res
    assert torch.equal(MpiComm(MPI.COMM_SELF).all_reduce(x, bias, res), expected)


_KERNEL_TIMEOUT = """
import time
import torch
torch.cuda.set_device = lambda device: None  # the watchdog thread sets the device: none on the CPU
from mpi4py import MPI
from tp_runtime.distributed.watchdog import CollectiveTimeout, NcclWatchdog

class Comm:  # stands in for a CustomAllReduce whose kernel gave up waiting for rank 1
    rank, size, device = 0, 2, None
    def check_async_error(self):
        raise CollectiveTimeout("custom all_reduce of the TP group timed out after 3 s waiting for rank 1")
    def abort(self):
        pass

NcclWatchdog(Comm())
time.sleep(20)
print("MAIN WENT ON", flush=True)
"""


def test_a_kernel_timeout_ends_the_process_through_the_watchdog_naming_the_collective():
    """The custom kernel's error word reaches the host through ``check_async_error``, which the
    watchdog thread polls: its message is printed as is and the process ends (status 3), as for NCCL."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _KERNEL_TIMEOUT], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "MAIN WENT ON" not in out, out
    assert (
        "rank 0 (TP rank 0/2): custom all_reduce of the TP group timed out after 3 s waiting for rank 1; "
        "aborting the job" in out
    ), out
    assert time.monotonic() - start < 15, out


class _TwoRanks(NoComm):
    """A host exchange seen from rank 0 of two, where rank 1 reports ``peer_code``."""

    def __init__(self, peer_code: int):
        self.peer_code = peer_code

    def host_allgather(self, values, what):
        return [list(values), [self.peer_code]]


def test_agree_no_error_raises_on_every_rank_when_one_failed():
    def fails():
        raise RuntimeError("kernel gave up waiting for rank 1")

    with pytest.raises(RuntimeError, match="kernel gave up"):  # the failing rank: its own error
        agree_no_error(_TwoRanks(0), fails, "barrier")
    with pytest.raises(RuntimeError, match=r"barrier: failed on rank\(s\) \[1\]"):  # a healthy rank
        agree_no_error(_TwoRanks(1), lambda: None, "barrier")
    agree_no_error(_TwoRanks(0), lambda: None, "barrier")  # nobody failed: no error
