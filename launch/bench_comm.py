"""All-reduce latency and bus bandwidth: our NcclComm against torch.distributed (NCCL), same run.

    launch/tp_run -n 2 launch/bench_comm.py [--dtypes bf16,fp32] [--out launch/results/bench_comm.json]
    launch/tp_run -n 2 launch/bench_comm.py --smoke     # CPU, MpiComm, one tiny size, writes nowhere: for CI

Bus bandwidth is 2·(n−1)/n · bytes / time (NCCL's convention: what each link carries in a
ring all-reduce). GPU times come from CUDA events around each call, after warm-up; the
median of many repeats is reported, rotating among several buffers so caches do not flatter.
Between timed calls every buffer is scaled by 1/n (outside the events) to keep values
finite. Rank 0 prints a table and writes JSON with the GPU name, each figure and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import cli
import torch
import torch.distributed
from benchlib import init_torch_distributed, median_ms

import tp_runtime
from tp_runtime import World

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KiB, MiB = 1 << 10, 1 << 20
GPU_SIZES = [8 * KiB * 4**i for i in range(9)]  # 8 KiB .. 512 MiB, powers of 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of " + ",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (rank 0); default: print only, write nowhere"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, MpiComm, 8 KiB, few repeats, no torch baseline")
    args = parser.parse_args(argv)
    args.dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    if args.smoke:
        args.repeats, args.warmup = 5, 1
    return args


def all_reduce_seconds(op: Callable[[torch.Tensor], object], buffers: list[torch.Tensor], world: World, args) -> float:
    """Median time of ``op(buffer)`` over ``args.repeats`` calls, all ranks starting together; the
    calls queue back to back, rotating among ``buffers``."""

    def rescale(i: int) -> None:  # an average of the ranks' values: stays finite, never zero
        buffers[i].mul_(1 / world.tp_size)

    calls = [functools.partial(op, buf) for buf in buffers]
    ms = median_ms(
        calls,
        args.repeats,
        device=world.device,
        warmup=args.warmup,
        after=rescale,  # outside the timed region
        ready=world.tp_comm.barrier,
        sync_each=False,
    )
    return ms / 1e3


def check_sum(op: Callable[[torch.Tensor], object], buf: torch.Tensor, world: World, who: str) -> None:
    """``op`` really sums over the group: ranks contribute rank+1, exact in every dtype here."""
    buf.fill_(world.tp_rank + 1)
    op(buf)
    expected = world.tp_size * (world.tp_size + 1) // 2
    if not bool((buf == expected).all()):
        raise AssertionError(f"{who}: all_reduce of rank+1 over {world.tp_size} ranks is not {expected}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = tp_runtime.init(device="cpu" if args.smoke else None)
    if world.tp_size < 2:
        raise SystemExit("bench_comm needs at least 2 ranks: launch/tp_run -n 2 launch/bench_comm.py")
    if world.device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_comm measures NCCL and needs CUDA; on the CPU use --smoke")
    ours = world.tp_comm.all_reduce
    theirs = (
        None if args.smoke else functools.partial(torch.distributed.all_reduce, group=init_torch_distributed(world))
    )

    n, rows = world.tp_size, []
    for dtype in args.dtypes:
        for nbytes in [8 * KiB] if args.smoke else GPU_SIZES:
            numel = nbytes // dtype.itemsize
            # Several buffers (up to 2 GiB in all) so consecutive calls do not reuse a cached one.
            count = max(2, min(8, (2 << 30) // nbytes))
            g = torch.Generator().manual_seed(world.rank)
            buffers = [torch.randn(numel, generator=g).to(dtype).to(world.device) for _ in range(count)]
            row = {"bytes": nbytes, "dtype": str(dtype).removeprefix("torch.")}
            for name, op in (("ours", ours), ("torch", theirs)):
                if op is None:
                    row[f"{name}_us"] = row[f"{name}_busbw_GBps"] = None
                    continue
                check_sum(op, buffers[0].clone(), world, name)
                seconds = all_reduce_seconds(op, buffers, world, args)
                row[f"{name}_us"] = seconds * 1e6
                row[f"{name}_busbw_GBps"] = 2 * (n - 1) / n * nbytes / seconds / 1e9
            row["torch_over_ours"] = row["torch_us"] / row["ours_us"] if theirs is not None else None
            rows.append(row)
            del buffers

    if theirs is not None:
        torch.distributed.destroy_process_group()
    if world.rank == 0:
        report(world, args, rows)


def report(world: World, args, rows: list[dict]) -> None:
    def fmt(value, spec):  # spec like "10.1f"; a missing figure prints as a right-aligned "-"
        return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)

    device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu (smoke)"
    comm = type(world.tp_comm).__name__
    baseline = "" if args.smoke else " vs torch.distributed"
    world.log.info(f"all_reduce over {world.tp_size} ranks on {device}: {comm}{baseline}")
    header = ("size", "dtype", "ours us", "ours GB/s", "torch us", "torch GB/s", "torch/ours")
    world.log.info(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 8, 10, 10, 10, 11, 11), strict=True)))
    for r in rows:
        size = f"{r['bytes'] // MiB} MiB" if r["bytes"] >= MiB else f"{r['bytes'] // KiB} KiB"
        world.log.info(
            f"{size:>10} {r['dtype']:>8} {fmt(r['ours_us'], '10.1f')} {fmt(r['ours_busbw_GBps'], '10.2f')} "
            f"{fmt(r['torch_us'], '10.1f')} {fmt(r['torch_busbw_GBps'], '11.2f')} {fmt(r['torch_over_ours'], '11.3f')}"
        )
    result = {
        "benchmark": "all_reduce (sum, in place)",
        "device": device,
        "world_size": world.size,
        "tp_size": world.tp_size,
        "communicator": comm,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if world.device.type == "cuda" else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "note": "times are medians; busbw = 2(n-1)/n * bytes / time; torch_over_ours > 1 means ours is faster",
        "results": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        world.log.info(f"wrote {args.out}")


if __name__ == "__main__":
    main()
