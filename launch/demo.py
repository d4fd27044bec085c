"""The main job: tensor-parallel layers on every rank, checked against the unsharded computation.

    launch/tp_run -n 2 launch/demo.py [--hidden 1024] [--tokens 64] [--dtype bf16] [--device cpu]

Every rank builds the same full weights (seeded), keeps its shard, runs, and compares its
result with the unsharded computation in float64; any rank outside the error budget fails
the whole job. Rank 0 prints the setup, the errors, the timing and "verified".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import tp_runtime
from tp_runtime import ColumnLinear, RowLinear, World

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per step (default %(default)s)")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on the CPU"
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="default: auto")
    parser.add_argument("--tp-size", type=int, default=None, help="ranks per TP group (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn``, all of its GPU work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(world: World, name: str, got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """Fail unless ``got`` (tensor parallel) is close to ``exact`` (float64): within twice the
    error of ``plain`` (unsharded, same dtype), plus one rounding at the output's scale for each
    rank's partial sum. Rank 0 reports the largest errors of its group."""
    mine = [(t.cpu().double() - exact).abs().max().item() for t in (got, plain)]
    errors = torch.tensor(mine, dtype=torch.float32, device=world.device)
    err, plain_err = world.tp_comm.all_gather(errors).max(dim=0).values.tolist()
    budget = 2 * plain_err + world.tp_size * torch.finfo(got.dtype).eps / 2 * exact.abs().max().item()
    world.log.info(f"{name}: max error vs float64 {err:.3g} (unsharded torch, same dtype: {plain_err:.3g})")
    if err > budget:
        raise AssertionError(f"{name}: error {err:.3g} exceeds the budget {budget:.3g}")


# --- linear pair: ColumnLinear (hidden -> 4*hidden), then RowLinear (4*hidden -> hidden) ---


def run_linear_pair(world: World, args: argparse.Namespace, dtype: torch.dtype) -> None:
    hidden, inner, dev, comm = args.hidden, 4 * args.hidden, world.device, world.tp_comm
    g = torch.Generator().manual_seed(args.seed)  # identical full tensors on every rank
    full = {
        "x": torch.randn(args.tokens, hidden, generator=g),
        "w1": torch.randn(inner, hidden, generator=g) / hidden**0.5,
        "b1": torch.randn(inner, generator=g),
        "w2": torch.randn(hidden, inner, generator=g) / inner**0.5,
        "b2": torch.randn(hidden, generator=g),
    }
    t = {k: v.to(dtype).to(dev) for k, v in full.items()}

    col = ColumnLinear(hidden, inner, comm=comm, dtype=dtype, device=dev)
    row = RowLinear(inner, hidden, comm=comm, dtype=dtype, device=dev)
    col.load_weights(t["w1"], t["b1"])
    row.load_weights(t["w2"], t["b2"])

    def step() -> torch.Tensor:
        return row(col(t["x"]))

    linear = torch.nn.functional.linear
    exact = {k: v.to(dtype).double() for k, v in full.items()}
    check(
        world,
        "linear pair",
        got=step(),
        plain=linear(linear(t["x"], t["w1"], t["b1"]), t["w2"], t["b2"]),
        exact=linear(linear(exact["x"], exact["w1"], exact["b1"]), exact["w2"], exact["b2"]),
    )
    seconds = median_seconds(step, dev, args.repeats)
    world.log.info(
        f"linear pair: [{args.tokens}, {hidden}] -> [{args.tokens}, {inner}] -> [{args.tokens}, {hidden}] "
        f"{str(dtype).removeprefix('torch.')}: median {seconds * 1e3:.3f} ms over {args.repeats} runs"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = tp_runtime.init(tp_size=args.tp_size, device=args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.bfloat16 if world.device.type == "cuda" else torch.float32)
    )
    name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
    world.log.info(
        f"tp_runtime demo: {world.size} ranks, tp_size {world.tp_size} ({world.dp_size} TP group(s)), "
        f"device {world.device} ({name}), comm {type(world.tp_comm).__name__}"
    )
    world.log_all.info(f"device {world.device}, TP group {world.dp_rank}, TP rank {world.tp_rank}")
    run_linear_pair(world, args, dtype)
    world.log.info("verified")


if __name__ == "__main__":
    main()
