"""Where the time of one decode step goes: GPU time per kernel and host time, ours against the baseline.

    launch/tp_run -n 2 launch/profile_step.py --models bloom-176b --batches 1,64,256

For each model and batch (cached length as in ``bench_tp``), on the same shards and caches:
our eager step, our step replayed as a CUDA graph, and ``bench_tp``'s torch.distributed baseline.
Rank 0 prints, per variant, the step time (CUDA events, median), the host time spent inside the
call, the GPU-busy time (steps queued behind a sleep), the GPU time per kernel and the host time per
operation (torch.profiler, summed over the profiled steps and divided by their number).
``bench_tp`` times; this explains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import tp_runtime
from tp_runtime import DecodeGraph, KVCache, Step

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli  # noqa: E402
from bench_tp import DECODE, MODELS, BaselineLayer, build, graph_splits  # noqa: E402
from benchlib import gpu_busy_ms, host_ms, init_torch_distributed, median_ms  # noqa: E402

PROFILED_STEPS = 5


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


def profile_case(model, world, group, batch: int, length: int, top: int) -> None:
    dev, dtype = world.device, torch.float16
    cfg, layer = build(model, world, dtype)
    lay = layer.head_layout
    cache = KVCache(config=cfg, head_layout=lay, num_layers=1, max_batch=batch, max_seq_len=length, device=dev)
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
    pasts = [past] * batch
    base = BaselineLayer(cfg, layer, group)
    kc = torch.randn(batch, lay.num_kv_heads_per_rank, length, cfg.head_size, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    variants = {
        "ours eager": lambda: layer(xs[next(it) % 4], step, cache),
        f"ours graph (splits {splits})": lambda: dg(xs[next(it) % 4], pasts),
        "baseline": lambda: base(xs[next(it) % 4], kc, vc, past, 1, batch),
    }
    for name, fn in variants.items():
        ms = median_ms(fn, 20, device=dev)
        busy = gpu_busy_ms(fn)
        host = host_ms(fn, 20, device=dev) * 1e3  # µs the host spends inside the call
        kernels, host_ops = op_tables(fn, top)
        if world.rank == 0:
            print(
                f"\n== {model.name} tp {world.tp_size} B {batch} L {length} | {name}: step {ms * 1e3:.1f} µs, "
                f"GPU busy {busy * 1e3:.1f} µs, host in call {host:.1f} µs"
            )
            for k, us in kernels:
                print(f"   {us:9.1f} µs GPU   {k[:110]}")
            for k, us in host_ops[: top // 2]:
                print(f"   {us:9.1f} µs host  {k[:110]}")
    torch.cuda.empty_cache()


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--models", default=",".join(m.name for m in MODELS))
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    args = p.parse_args()
    world = tp_runtime.init()
    if world.device.type != "cuda":
        raise SystemExit("profile_step: needs GPUs (it reads CUDA kernel times)")
    group = init_torch_distributed(world)
    group = group if world.tp_size > 1 else None
    lengths = dict(DECODE)
    try:
        for m in MODELS:
            if m.name not in args.models.split(",") or m.heads % world.tp_size:
                continue
            for b in (int(v) for v in args.batches.split(",")):
                profile_case(m, world, group, b, lengths[b], args.top)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
