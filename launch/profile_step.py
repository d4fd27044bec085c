"""Where the time of one decode step goes: GPU time per kernel and host time, ours against the baseline,
and the host path of a replayed graph statement by statement.

    launch/tp_run -n 2 launch/profile_step.py --models bloom-176b --batches 1,64,256
    launch/tp_run -n 1 launch/profile_step.py --batches 1,64 --host-only --out replay.json

For each model and batch (cached length as in ``bench_tp``), on the same shards and caches:
our eager step, our step replayed as a CUDA graph, and ``bench_tp``'s torch.distributed baseline.
Rank 0 prints, per variant, the step time (CUDA events, median), the host time spent inside the
call, the GPU-busy time (steps queued behind a sleep), the GPU time per kernel and the host time per
operation (torch.profiler, summed over the profiled steps and divided by their number).

Then, for the graph: the host µs of each statement of a steady-state replay (``StepGraph._replay``,
``time.perf_counter_ns`` around each, medians over ``--replays`` replays, the GPU drained every
``BLOCK`` replays outside the timed statements so that a full launch queue never blocks one), the
whole call, and the GPU idle share of back-to-back replays: 1 − busy / wall, busy from CUDA events
around steps queued behind a sleep, wall from the host clock around ``BLOCK`` steps queued back to
back (the host free to run ahead). ``--host-only`` skips the eager, baseline and profiler tables.
``bench_tp`` times; this explains.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import tp_runtime
from tp_runtime import DecodeGraph, KVCache, Step

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli  # noqa: E402
from bench_tp import DECODE, GRAPH_JUMP, MODELS, BaselineLayer, build, graph_splits  # noqa: E402
from benchlib import gpu_busy_ms, host_ms, init_torch_distributed, median_ms  # noqa: E402

PROFILED_STEPS = 5
BLOCK = GRAPH_JUMP  # replays queued between drains (and per wall-time sample); the cache has room for them


def op_tables(fn, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Per step, over ``PROFILED_STEPS`` steps: the ``top`` kernels by GPU µs, and the ``top`` host
    operations (torch ops, CUDA runtime calls) by their own host µs."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = [
        (e.key, e.device_time_total / PROFILED_STEPS)
        for e in events
        if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
    ]
    host = [
        (e.key, e.self_cpu_time_total / PROFILED_STEPS)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and e.key != "cudaDeviceSynchronize"
    ]
    by_time = lambda rows: sorted(rows, key=lambda r: -r[1])[:top]  # noqa: E731
    return by_time(gpu), by_time(host)


def replay_statements(dg: DecodeGraph, past: np.ndarray, replays: int) -> dict[str, float]:
    """Median host µs of each statement of a steady-state replay (the body of ``StepGraph._replay``,
    with the input already in ``dg.x``), of the whole ``dg(dg.x)`` call, and of torch's
    ``graph.replay()`` in place of the launch ``graph_launcher`` chose (for comparison; the same when
    it chose replay). Each block of ``BLOCK`` iterations starts from ``past`` again (an untimed jump)
    so that the cache never fills."""
    names = ("state.before", "launch", "state.after", "whole call", "torch replay()")
    ns: dict[str, list[int]] = {k: [] for k in names}
    clock = time.perf_counter_ns
    for _ in range(max(1, replays // BLOCK)):
        torch.cuda.synchronize()
        dg(dg.x, past)  # the jump back, untimed
        for _ in range(BLOCK // 2):
            t0 = clock()
            staged = dg.state.before(None)
            t1 = clock()
            dg._launch()
            t2 = clock()
            dg.state.after()
            t3 = clock()
            dg(dg.x)
            t4 = clock()
            dg.state.before(None)
            t5 = clock()
            dg.graph.replay()
            t6 = clock()
            dg.state.after()
            assert staged is None, "a steady-state replay stages nothing"
            for k, v in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5), strict=True):
                ns[k].append(v)
    torch.cuda.synchronize()
    return {k: statistics.median(v) / 1e3 for k, v in ns.items()}


def idle_share(dg: DecodeGraph, past: np.ndarray, samples: int = 10) -> tuple[float, float, float]:
    """(busy µs, wall µs, idle share) of back-to-back steady-state replays."""
    step = lambda: dg(dg.x)  # noqa: E731
    busy, wall = [], []
    for _ in range(samples):
        dg(dg.x, past)
        busy.append(gpu_busy_ms(step, BLOCK - 1) * 1e3)
        dg(dg.x, past)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(BLOCK - 1):
            step()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - start) / (BLOCK - 1) * 1e6)
    b, w = statistics.median(busy), statistics.median(wall)
    return b, w, max(0.0, 1 - b / w)


def profile_case(model, world, group, batch: int, length: int, args) -> dict:
    dev, dtype = world.device, torch.float16
    cfg, layer = build(model, world, dtype)
    lay = layer.head_layout
    # Room past the benchmark's length: steady-state replays advance the lengths (a jump back to
    # ``past`` at least every 3·BLOCK/2 replays).
    room = length + 2 * BLOCK
    cache = KVCache(config=cfg, head_layout=lay, num_layers=1, max_batch=batch, max_seq_len=room, device=dev)
    cache.data.normal_()
    past = length - 1
    step = Step(new_lens=[1] * batch, past_lens=[past] * batch, device=dev)
    cache.set_written(step.slots, step.past_lens)  # the random past stands for written positions
    xs = [torch.randn(batch, model.hidden, device=dev, dtype=dtype) for _ in range(4)]
    it = iter(range(1 << 30))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    splits = graph_splits(batch, lay.num_kv_heads_per_rank, sms)
    dg = DecodeGraph(
        lambda x, s: layer(x, s, cache, decode_splits=splits), config=cfg, slots=range(batch), cache=cache, device=dev
    )
    pasts = np.full(batch, past, dtype=np.int64)
    dg(xs[0], pasts)  # capture
    head = f"{model.name} tp {world.tp_size} B {batch} L {length}"
    row: dict = dict(model=model.name, tp=world.tp_size, batch=batch, length=length, splits=splits)
    if not args.host_only:
        base = BaselineLayer(cfg, layer, group)
        kc = torch.randn(batch, lay.num_kv_heads_per_rank, length, cfg.head_size, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)

        def graph_step():  # steady state, with a jump back to ``past`` every BLOCK - 1 replays
            i = next(it)
            return dg(xs[i % 4], pasts if i % (BLOCK - 1) == 0 else None)

        variants = {
            "ours eager": lambda: layer(xs[next(it) % 4], step, cache),
            f"ours graph (splits {splits})": graph_step,
            "baseline": lambda: base(xs[next(it) % 4], kc, vc, past, 1, batch),
        }
        for name, fn in variants.items():
            ms = median_ms(fn, 20, device=dev)
            busy = gpu_busy_ms(fn)
            host = host_ms(fn, 20, device=dev) * 1e3  # µs the host spends inside the call
            kernels, host_ops = op_tables(fn, args.top)
            if world.rank == 0:
                print(
                    f"\n== {head} | {name}: step {ms * 1e3:.1f} µs, "
                    f"GPU busy {busy * 1e3:.1f} µs, host in call {host:.1f} µs"
                )
                for k, us in kernels:
                    print(f"   {us:9.1f} µs GPU   {k[:110]}")
                for k, us in host_ops[: args.top // 2]:
                    print(f"   {us:9.1f} µs host  {k[:110]}")
    row["replay_host_us"] = replay_statements(dg, pasts, args.replays)
    row["launcher"] = launcher = "torch replay()" if dg._launch == dg.graph.replay else "cudaGraphLaunch (CuPy)"
    busy, wall, idle = idle_share(dg, pasts)
    row.update(graph_busy_us=busy, graph_wall_us=wall, graph_idle_pct=100 * idle)
    if world.rank == 0:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["replay_host_us"].items())
        print(f"\n== {head} | graph replay host µs (median, launch by {launcher}): {parts}")
        print(f"   back to back: GPU busy {busy:.1f} µs, wall {wall:.1f} µs per step, GPU idle {100 * idle:.1f}%")
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--models", default=",".join(m.name for m in MODELS))
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    p.add_argument("--replays", type=int, default=2048, help="replays timed statement by statement")
    p.add_argument("--host-only", action="store_true", help="only the replay host path and the GPU idle share")
    p.add_argument("--out", default=None, help="JSON of the replay figures (rank 0)")
    args = p.parse_args()
    world = tp_runtime.init()
    if world.device.type != "cuda":
        raise SystemExit("profile_step: needs GPUs (it reads CUDA kernel times)")
    group = init_torch_distributed(world)
    group = group if world.tp_size > 1 else None
    lengths = dict(DECODE)
    rows = []
    try:
        for m in MODELS:
            if m.name not in args.models.split(",") or m.heads % world.tp_size:
                continue
            for b in (int(v) for v in args.batches.split(",")):
                rows.append(profile_case(m, world, group, b, lengths[b], args))
        if args.out and world.rank == 0:
            gpu = torch.cuda.get_device_name(world.device)
            Path(args.out).write_text(json.dumps(dict(gpu=gpu, rows=rows), indent=1))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
