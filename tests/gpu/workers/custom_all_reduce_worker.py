"""The custom all-reduce on N ranks that may all share ONE GPU (CUDA IPC works between processes of
one device), built straight over MPI.COMM_WORLD: world.init would refuse more ranks than GPUs, and
NCCL refuses two ranks on one device, so nothing here needs either.

usage: custom_all_reduce_worker.py MODE
  correct      every size class (a few bytes, 8 KiB, the one-shot maximum and just past it, two-shot
               sizes with an odd element count, the buffer's size) x fp32/fp16/bf16 x {plain, bias,
               bias + residual}, in place on an aligned and an unaligned view inside a NaN-filled
               tensor (nothing outside the message may change), and through ``all_reduce_buffer``;
               against the fp64 sum of every rank's fresh random input; the same bits on every rank;
               RowLinear's GEMM writing into the registered buffer (bias fused); then
               TP_RUNTIME_CUSTOM_ALLREDUCE=0 turns it off on every rank; close() at the end
  graph        one-shot and two-shot captured in a CUDA graph, 100 replays with new inputs each;
               no close(): interpreter exit must stop the watchdog thread by itself
  skip         one-shot; the last rank skips one call: the others must end the job naming it
  skip_graph   two-shot in a graph; the last rank skips one replay: the same
Every rank regenerates every rank's input from its seed, so each checks against the full sum itself.
Prints ``PASS rank r`` at the end; rank 0 prints ``FAULT_AT <wall clock>`` just before a fault.
"""

import hashlib
import os
import sys
import time

import torch
from mpi4py import MPI

from tp_runtime.distributed.comm import Communicator
from tp_runtime.distributed.custom_all_reduce import CustomAllReduce, Route
from tp_runtime.distributed.watchdog import set_collective_timeout
from tp_runtime.layers.linear import RowLinear

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
KiB, MiB = 1 << 10, 1 << 20


def inputs(rank: int, shape, dtype, seed: int, device) -> torch.Tensor:
    """Rank ``rank``'s fresh random input (any rank can make it)."""
    g = torch.Generator(device=device).manual_seed(100_003 * seed + rank)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def operands(shape, dtype, seed: int, device, epilogue: str):
    """The bias and residual every rank passes (the same on every rank)."""
    g = torch.Generator(device=device).manual_seed(7 * seed + 1)
    bias = torch.randn(shape[-1], generator=g, device=device).to(dtype) if epilogue != "plain" else None
    res = torch.randn(shape, generator=g, device=device).to(dtype) if epilogue == "bias_residual" else None
    return bias, res


def check(got, n, shape, dtype, seed, device, bias, res, what):
    """Against the fp64 sum (+ bias + residual); then the same bits on every rank."""
    parts = [inputs(r, shape, dtype, seed, device).double() for r in range(n)]
    ref = sum(parts)
    scale = sum(p.abs() for p in parts)
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    if res is not None:
        ref, scale = ref + res.double(), scale + res.double().abs()
    # One rounding to the dtype at the end, after an fp32 sum of at most n + 2 terms.
    tol = torch.finfo(dtype).eps * ref.abs() + (n + 2) * torch.finfo(torch.float32).eps * scale + 1e-30
    err = (got.double() - ref).abs()
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3e}"
    digest = hashlib.sha256(got.contiguous().view(INT_VIEW[dtype]).cpu().numpy().tobytes()).hexdigest()
    digests = MPI.COMM_WORLD.allgather(digest)
    assert len(set(digests)) == 1, f"{what}: ranks disagree bit for bit: {digests}"


def cases(ar: CustomAllReduce, dtype):
    """(shape, expected route) for every size class."""
    item = torch.empty((), dtype=dtype).element_size()
    one, two = ar.limits.one_shot_max // item, ar.limits.two_shot_max // item
    return [
        ((1, 3), Route.ONE_SHOT),  # a few bytes: the tail only
        ((8, 8 * KiB // item // 8), Route.ONE_SHOT),  # 8 KiB
        ((1, 1000), Route.ONE_SHOT),  # a non-multiple-of-16-byte count
        ((one // 1024, 1024), Route.ONE_SHOT),  # the one-shot maximum
        ((1, one + 8), Route.TWO_SHOT),  # just past it
        ((777, 2053), Route.TWO_SHOT),  # an odd count, 3.2 MB (fp32: 6.4 MB)
        ((two // 4096, 4096), Route.TWO_SHOT),  # the whole buffer
    ]


def correct(ar: CustomAllReduce, n: int, device) -> None:
    seed = 0
    for dtype in DTYPES:
        for shape, expected in cases(ar, dtype):
            numel = shape[0] * shape[1]
            # offset 1 element: an output not 16-byte aligned
            for epilogue, offset in (("plain", 0), ("bias", 1), ("bias_residual", 0)):
                seed += 1
                what = f"{n} ranks {dtype} {shape} {epilogue} offset {offset}"
                bias, res = operands(shape, dtype, seed, device, epilogue)
                room = torch.full((numel + 40,), float("nan"), dtype=dtype, device=device)
                x = room[offset : offset + numel].view(shape)
                x.copy_(inputs(ar.rank, shape, dtype, seed, device))
                assert ar.route(x) is expected, f"{what}: routed to {ar.route(x)}, expected {expected}"
                out = ar.all_reduce(x, bias=bias, residual=res)
                assert out is x, f"{what}: not in place"
                check(out, n, shape, dtype, seed, device, bias, res, what)
                outside = torch.cat([room[:offset], room[offset + numel :]])
                assert torch.isnan(outside).all(), f"{what}: wrote outside the message"
            # A producer writing straight into the registered buffer: no copy-in, a new output.
            seed += 1
            bias, res = operands(shape, dtype, seed, device, "bias_residual")
            buf = ar.all_reduce_buffer(shape, dtype)
            buf.copy_(inputs(ar.rank, shape, dtype, seed, device))
            out = ar.all_reduce(buf, bias=bias, residual=res)
            assert out.data_ptr() != buf.data_ptr()
            check(out, n, shape, dtype, seed, device, bias, res, f"{n} ranks {dtype} {shape} all_reduce_buffer")
    torch.cuda.synchronize()
    ar.check_async_error()
    row_linear(ar, n, device)

    os.environ["TP_RUNTIME_CUSTOM_ALLREDUCE"] = "0" if ar.rank == n - 1 else "1"  # off on one rank: off on all
    off = CustomAllReduce(MPI.COMM_WORLD, device, buffer_bytes=1 * MiB)
    assert not off.usable and off.why_not == f"TP_RUNTIME_CUSTOM_ALLREDUCE=0 on ranks [{n - 1}]", off.why_not
    assert off.route(torch.empty(4, device=device)) is Route.NCCL


class Custom(Communicator):
    """The layers' view of the custom path alone (NcclComm needs one GPU per rank): a fused epilogue
    and the registered buffer; records whether each message arrived in that buffer."""

    fuses_epilogue = True

    def __init__(self, ar: CustomAllReduce):
        self.ar, self.rank, self.size, self.in_buffer = ar, ar.rank, ar.size, []

    def all_reduce(self, tensor, bias=None, residual=None):
        self.in_buffer.append(tensor.data_ptr() == self.ar.all_reduce_buffer((1,), tensor.dtype).data_ptr())
        return self.ar.all_reduce(tensor, bias, residual)

    def all_reduce_buffer(self, shape, dtype):
        return self.ar.all_reduce_buffer(shape, dtype)


def row_linear(ar: CustomAllReduce, n: int, device) -> None:
    """RowLinear's GEMM writes its partial sums straight into the registered buffer, the bias fused
    into the all-reduce: against the fp64 layer on the full input."""
    comm = Custom(ar)
    for dtype, lead in ((torch.bfloat16, (3, 5)), (torch.float32, (37,)), (torch.bfloat16, (1500,))):  # one-, two-shot
        # in_features 1200: divisible by 2, 3 and 4 ranks
        layer = RowLinear(1200, 776, comm=comm, bias=True, dtype=dtype, device=device)
        g = torch.Generator(device=device).manual_seed(11)
        w = torch.randn(776, 1200, generator=g, device=device).to(dtype)
        b = torch.randn(776, generator=g, device=device).to(dtype)
        x = torch.randn(*lead, 1200, generator=g, device=device).to(dtype)
        layer.load_weights(w, b)
        got = layer(x[..., layer.cols.start : layer.cols.stop])
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        scale = torch.nn.functional.linear(x.double().abs(), w.double().abs(), b.double().abs())
        tol = (n + 4) * torch.finfo(dtype).eps * scale + 1e-30  # each rank's GEMM rounds once, then the sum
        err = (got.double() - ref).abs()
        what = f"{n} ranks RowLinear {dtype} {lead}"
        assert comm.in_buffer[-1], f"{what}: the GEMM did not write into the registered buffer"
        assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} elements off, max error {err.max().item():.3e}"
        digests = MPI.COMM_WORLD.allgather(
            hashlib.sha256(got.view(INT_VIEW[dtype]).cpu().numpy().tobytes()).hexdigest()
        )
        assert len(set(digests)) == 1, f"{what}: ranks disagree bit for bit"


def capture(g: torch.cuda.CUDAGraph):
    """Capture into ``g``; thread-local mode: the watchdog thread may query an event meanwhile."""
    return torch.cuda.graph(g, capture_error_mode="thread_local")


def graph(ar: CustomAllReduce, n: int, device) -> None:
    for dtype, shape, expected in (
        (torch.bfloat16, (16, 2048), Route.ONE_SHOT),
        (torch.float16, (1100, 1027), Route.TWO_SHOT),
    ):
        bias, res = operands(shape, dtype, 0, device, "bias_residual")
        static = torch.zeros(shape, dtype=dtype, device=device)
        assert ar.route(static) is expected
        ar.all_reduce(static, bias=bias, residual=res)  # warm-up, outside the graph
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with capture(g):
            ar.all_reduce(static, bias=bias, residual=res)
        for i in range(100):
            static.copy_(inputs(ar.rank, shape, dtype, 1000 + i, device))
            g.replay()
            check(static, n, shape, dtype, 1000 + i, device, bias, res, f"{n} ranks graph replay {i} {expected}")
    torch.cuda.synchronize()
    ar.check_async_error()


def skip(ar: CustomAllReduce, n: int, device, in_graph: bool) -> None:
    set_collective_timeout(3.0)
    shape = (4, 1024) if not in_graph else (1100, 1027)
    x = inputs(ar.rank, shape, torch.float16, 1, device)
    run = lambda: ar.all_reduce(x)  # noqa: E731
    if in_graph:
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with capture(g):
            ar.all_reduce(x)
        run = g.replay
    run()  # every rank: a good call first
    torch.cuda.synchronize()
    MPI.COMM_WORLD.Barrier()
    if ar.rank == 0:
        print(f"FAULT_AT {time.time():.3f}", flush=True)
    if ar.rank == n - 1:
        time.sleep(60)  # skipped the call, alive: the others' kernels must give up, not spin
        return
    run()
    torch.cuda.synchronize()  # returns: the kernel gave up at the deadline
    ar.check_async_error()  # raises CollectiveTimeout naming the collective (unless the watchdog was first)
    raise AssertionError("the call without the last rank completed")


def main() -> None:
    mode = sys.argv[1]
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    device = torch.device("cuda", 0)  # every rank on one GPU
    torch.cuda.set_device(device)
    set_collective_timeout(60.0)  # ranks time-slice one GPU: a barrier can take a few ms here
    ar = CustomAllReduce(comm, device)
    assert ar.usable, ar.why_not
    if mode == "correct":
        correct(ar, n, device)
        ar.close()  # collective: the watchdog joined, the buffers released (graph mode leaves it to exit)
        assert not ar.usable and ar.watchdog is None
    elif mode == "graph":
        graph(ar, n, device)
    elif mode in ("skip", "skip_graph"):
        skip(ar, n, device, in_graph=mode == "skip_graph")
        return  # the job must have ended before: no PASS
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"PASS rank {ar.rank}", flush=True)


if __name__ == "__main__":
    main()
