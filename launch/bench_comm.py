"""All-reduce latency and bus bandwidth: ours (the custom CUDA-IPC kernel where it is selected, else
NCCL) against our NcclComm forced through NCCL and torch.distributed (NCCL), in the same run.

    launch/tp_run -n 2 launch/bench_comm.py [--dtypes bf16,fp32] [--quick] [--out launch/results/bench_comm.json]
    launch/tp_run -n 2 launch/bench_comm.py --smoke     # CPU, MpiComm, one tiny size, writes nowhere: for CI

Sizes 8 KiB .. 512 MiB, powers of 4 (``--quick``: up to 8 MiB, fewer repeats). Each row names the
path ``ours`` took (``one_shot``, ``two_shot``: the custom kernel; ``nccl``); where that is NCCL,
``ours`` and ``nccl`` are one measurement. Bus bandwidth is 2·(n−1)/n · bytes / time (NCCL's
convention). GPU times are medians of CUDA events around each call, after warm-up, rotating among
several buffers so caches do not flatter; between timed calls every buffer is scaled by 1/n (outside
the events) to keep values finite. Rank 0 prints a table and, with ``--out``, writes JSON.

More ranks than GPUs on the node (e.g. 2 ranks on one GPU): NCCL and torch.distributed refuse
several ranks per device, so only the custom kernel runs (all ranks on cuda:0, through CUDA IPC),
at the sizes it serves; the ranks then time-slice one GPU, so the figures are NOT those of
several GPUs -- the output says so.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cli
import torch
import torch.distributed
from benchlib import init_torch_distributed, median_ms

import tp_runtime
from tp_runtime.distributed.custom_all_reduce import CustomAllReduce, Route

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KiB, MiB = 1 << 10, 1 << 20
GPU_SIZES = [8 * KiB * 4**i for i in range(9)]  # 8 KiB .. 512 MiB, powers of 4
QUICK_MAX = 8 * MiB
SHARED_GPU_NOTE = (
    "several ranks share one GPU (CUDA IPC within the device): these figures test the path, they are not "
    "multi-GPU latencies. Each barrier waits until the GPU time-slices to the other ranks' processes "
    "(milliseconds a slice), so a call takes ms at every size whatever the kernel does; NCCL and "
    "torch.distributed cannot run several ranks on one GPU"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of " + ",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"sizes up to {QUICK_MAX // MiB} MiB, 20 repeats")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (rank 0); default: print only, write nowhere"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, MpiComm, 8 KiB, few repeats, no torch baseline")
    args = parser.parse_args(argv)
    args.dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    if args.smoke:
        args.repeats, args.warmup = 5, 1
    elif args.quick:
        args.repeats = min(args.repeats, 20)
    return args


@dataclass
class Group:
    """What the benchmark needs of the ranks: who they are and the all-reduces to time.

    ``ours``: the communicator's all_reduce as layers get it; ``route(tensor)``: the path it takes;
    ``nccl``/``torch``: the baselines (None where they cannot run)."""

    rank: int
    size: int
    device: torch.device
    communicator: str
    log: Callable[[str], None]
    barrier: Callable[[], None]
    ours: Callable[[torch.Tensor], object]
    route: Callable[[torch.Tensor], Route]
    nccl: Callable[[torch.Tensor], object] | None
    torch: Callable[[torch.Tensor], object] | None
    note: str | None = None


def ranks_share_a_gpu() -> bool:
    """More ranks on this node than GPUs (CUDA usable): the one-GPU mode."""
    from mpi4py import MPI

    from tp_runtime.distributed.world import cuda_unusable_reason

    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    return cuda_unusable_reason() is None and local > torch.cuda.device_count()


def shared_gpu_group() -> Group:
    """Every rank on cuda:0, the custom all-reduce built straight over MPI (world.init refuses this)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    custom = CustomAllReduce(comm, device)
    if not custom.usable:
        raise SystemExit(f"bench_comm: the custom all-reduce is off ({custom.why_not}) and NCCL cannot share a GPU")

    def barrier() -> None:
        torch.cuda.synchronize()
        custom.check_async_error()
        comm.Barrier()

    def log(line: str) -> None:
        if comm.Get_rank() == 0:
            print(line, flush=True)

    return Group(
        rank=comm.Get_rank(),
        size=comm.Get_size(),
        device=device,
        communicator="CustomAllReduce (ranks sharing one GPU)",
        log=log,
        barrier=barrier,
        ours=custom.all_reduce,
        route=custom.route,
        nccl=None,
        torch=None,
        note=SHARED_GPU_NOTE,
    )


def world_group(smoke: bool) -> Group:
    world = tp_runtime.init(device="cpu" if smoke else None)
    if world.tp_size < 2:
        raise SystemExit("bench_comm needs at least 2 ranks: launch/tp_run -n 2 launch/bench_comm.py")
    if world.device.type != "cuda" and not smoke:
        raise SystemExit("bench_comm measures NCCL and needs CUDA; on the CPU use --smoke")
    comm = world.tp_comm
    cuda = world.device.type == "cuda"
    return Group(
        rank=world.rank,
        size=world.tp_size,
        device=world.device,
        communicator=type(comm).__name__,
        log=world.log.info,
        barrier=comm.barrier,
        ours=comm.all_reduce,
        route=comm.custom.route if cuda else (lambda t: Route.NCCL),  # type: ignore[attr-defined]
        nccl=comm.nccl_all_reduce if cuda else None,  # type: ignore[attr-defined]
        torch=functools.partial(torch.distributed.all_reduce, group=init_torch_distributed(world)) if cuda else None,
    )


def all_reduce_seconds(op: Callable[[torch.Tensor], object], buffers: list[torch.Tensor], group: Group, args) -> float:
    """Median time of ``op(buffer)`` over ``args.repeats`` calls, all ranks starting together; the
    calls queue back to back, rotating among ``buffers``."""

    def rescale(i: int) -> None:  # an average of the ranks' values: stays finite, never zero
        buffers[i].mul_(1 / group.size)

    calls = [functools.partial(op, buf) for buf in buffers]
    ms = median_ms(
        calls,
        args.repeats,
        device=group.device,
        warmup=args.warmup,
        after=rescale,  # outside the timed region
        ready=group.barrier,
        sync_each=False,
    )
    return ms / 1e3


def check_sum(op: Callable[[torch.Tensor], object], buf: torch.Tensor, group: Group, who: str) -> None:
    """``op`` really sums over the group: ranks contribute rank+1, exact in every dtype here."""
    buf.fill_(group.rank + 1)
    op(buf)
    expected = group.size * (group.size + 1) // 2
    if not bool((buf == expected).all()):
        raise AssertionError(f"{who}: all_reduce of rank+1 over {group.size} ranks is not {expected}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shared = not args.smoke and ranks_share_a_gpu()
    group = shared_gpu_group() if shared else world_group(args.smoke)

    n, rows = group.size, []
    sizes = [8 * KiB] if args.smoke else [s for s in GPU_SIZES if not args.quick or s <= QUICK_MAX]
    for dtype in args.dtypes:
        for nbytes in sizes:
            numel = nbytes // dtype.itemsize
            path = group.route(torch.empty(numel, dtype=dtype, device="meta"))
            if shared and path is Route.NCCL:
                continue  # nothing can run it here
            # Several buffers (up to 2 GiB in all) so consecutive calls do not reuse a cached one.
            count = max(2, min(8, (2 << 30) // nbytes))
            g = torch.Generator().manual_seed(group.rank)
            buffers = [torch.randn(numel, generator=g).to(dtype).to(group.device) for _ in range(count)]
            route = path.value if group.device.type == "cuda" else "mpi"  # the CPU's MpiComm
            row: dict = {"bytes": nbytes, "dtype": str(dtype).removeprefix("torch."), "route": route}
            ops = {"ours": group.ours, "nccl": group.nccl, "torch": group.torch}
            for name, op in ops.items():
                if op is None or (name == "nccl" and path is Route.NCCL and not args.smoke):
                    row[f"{name}_us"] = row[f"{name}_busbw_GBps"] = None
                    continue
                check_sum(op, buffers[0].clone(), group, name)
                seconds = all_reduce_seconds(op, buffers, group, args)
                row[f"{name}_us"] = seconds * 1e6
                row[f"{name}_busbw_GBps"] = 2 * (n - 1) / n * nbytes / seconds / 1e9
            if path is Route.NCCL and group.nccl is not None:  # ours was NCCL: one measurement
                row["nccl_us"], row["nccl_busbw_GBps"] = row["ours_us"], row["ours_busbw_GBps"]
            for name in ("nccl", "torch"):
                row[f"{name}_over_ours"] = row[f"{name}_us"] / row["ours_us"] if row[f"{name}_us"] else None
            rows.append(row)
            del buffers

    if group.torch is not None:
        torch.distributed.destroy_process_group()
    if group.rank == 0:
        report(group, args, rows)


def report(group: Group, args, rows: list[dict]) -> None:
    def fmt(value, spec):  # spec like "10.1f"; a missing figure prints as a right-aligned "-"
        return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)

    device = torch.cuda.get_device_name(group.device) if group.device.type == "cuda" else "cpu (smoke)"
    group.log(f"all_reduce over {group.size} ranks on {device}: {group.communicator}")
    if group.note:
        group.log(f"NOTE: {group.note}")
    header = ("size", "dtype", "route", "ours us", "ours GB/s", "nccl us", "torch us", "nccl/ours", "torch/ours")
    widths = (10, 8, 9, 10, 10, 10, 10, 10, 11)
    group.log(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for r in rows:
        size = f"{r['bytes'] // MiB} MiB" if r["bytes"] >= MiB else f"{r['bytes'] // KiB} KiB"
        group.log(
            f"{size:>10} {r['dtype']:>8} {r['route']:>9} {fmt(r['ours_us'], '10.1f')} "
            f"{fmt(r['ours_busbw_GBps'], '10.2f')} {fmt(r['nccl_us'], '10.1f')} {fmt(r['torch_us'], '10.1f')} "
            f"{fmt(r['nccl_over_ours'], '10.3f')} {fmt(r['torch_over_ours'], '11.3f')}"
        )
    result = {
        "benchmark": "all_reduce (sum, in place)",
        "device": device,
        "tp_size": group.size,
        "world_size": group.size,
        "communicator": group.communicator,
        "shared_gpu": group.note is not None,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if group.device.type == "cuda" else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "note": (
            "times are medians; busbw = 2(n-1)/n * bytes / time; route: the path ours took (one_shot/two_shot: "
            "the custom kernel); nccl_over_ours > 1 means ours is faster" + (f"; {group.note}" if group.note else "")
        ),
        "results": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        group.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
