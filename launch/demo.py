"""The main job: tensor-parallel layers on every rank, checked against the unsharded computation.

    launch/tp_run -n 2 launch/demo.py [--pe rope_gpt_neox] [--heads 8 --kv-heads 2] [--device cpu] [--bench]

Two parts, both verified on every rank:
  1. a ColumnLinear -> RowLinear pair against the unsharded computation in float64;
  2. a stack of tensor-parallel ``Attention`` layers serving requests that arrive and finish
     mid-run over a paged KV cache: each step mixes prefills of new requests with decode
     steps of running ones; every step's output is compared with the same stack at tp=1 on
     the reference backend (full weights, a contiguous cache, float32); per-step times printed.
On GPUs the attention runs on the CUDA kernels; on the CPU on the reference backend.
Any rank outside its error budget fails the whole job; rank 0 ends with "verified".
``--bench`` then prints the tensor-parallel layer benchmark's table for this machine
(``launch/bench_tp.py``: GPU shapes on GPUs, small shapes on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import benchlib
import cli
import torch

import tp_runtime
from tp_runtime import (
    Attention,
    AttentionConfig,
    ColumnLinear,
    KVCache,
    NoComm,
    PagedKVCache,
    PositionEmbeddingType,
    RowLinear,
    Step,
    World,
    precompile,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per step (default %(default)s)")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on the CPU"
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="default: auto")
    parser.add_argument("--tp-size", type=int, default=None, help="ranks per TP group (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    attn = parser.add_argument_group("attention stack")
    attn.add_argument(
        "--pe", default="rope_gpt_neox", choices=[p.value for p in PositionEmbeddingType], help="position embedding"
    )
    attn.add_argument("--heads", type=int, default=8)
    attn.add_argument("--kv-heads", type=int, default=2, help="< heads: GQA; 1: MQA")
    attn.add_argument("--head-size", type=int, default=64)
    attn.add_argument("--layers", type=int, default=2)
    attn.add_argument("--kv-cache", choices=["auto", "int8", "fp8"], default="auto")
    attn.add_argument("--steps", type=int, default=24, help="serving steps")
    attn.add_argument("--backend", choices=["reference", "cuda"], default=None, help="default: cuda on GPUs")
    parser.add_argument(
        "--bench",
        action="store_true",
        help="then print launch/bench_tp.py's table for this machine (whole layer vs a torch.distributed layer)",
    )
    return parser.parse_args(argv)


FLAGS = {  # AttentionConfig field -> the flag that sets it
    "hidden_size": "--heads/--head-size",
    "num_heads": "--heads",
    "num_kv_heads": "--kv-heads",
    "head_size": "--head-size",
    "position_embedding": "--pe",
    "kv_cache_dtype": "--kv-cache",
    "dtype": "--dtype",
}


def attention_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        hidden_size=args.heads * args.head_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        position_embedding=args.pe,
        max_position_embeddings=64,
        kv_cache_dtype=args.kv_cache,
    )


def check_args(args: argparse.Namespace, tp_size: int, dtype: torch.dtype) -> None:
    """Every flag against the config's rules and the tensor-parallel size, before any work: a bad
    value raises ``ValueError`` naming the flag to change (the same on every rank)."""
    ranks = f"the tensor-parallel size {tp_size} (ranks per group: tp_run -n, or --tp-size)"
    for flag, value in (("--hidden", args.hidden), ("--tokens", args.tokens), ("--layers", args.layers)):
        if value < 1:
            raise ValueError(f"{flag}: expected a positive number, got {value}")
    if 4 * args.hidden % tp_size:
        raise ValueError(f"--hidden: expected 4 * hidden divisible by {ranks}, got {args.hidden}")
    try:
        cfg = AttentionConfig(**attention_kwargs(args), dtype=dtype)
    except ValueError as exc:
        field = next((name for name in FLAGS if f"AttentionConfig.{name}=" in str(exc)), None)
        raise ValueError(f"{FLAGS.get(field, 'attention flags')}: {exc}") from None
    if cfg.num_heads % tp_size:
        raise ValueError(f"--heads: expected a multiple of {ranks}, got {cfg.num_heads}")
    kv, tp = cfg.num_kv_heads, tp_size
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"--kv-heads: expected a multiple or a divisor of {ranks}, got {kv}")


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
    seconds = benchlib.host_ms(step, args.repeats, device=dev, warmup=3, include_gpu=True) / 1e3  # wall time
    world.log.info(
        f"linear pair: [{args.tokens}, {hidden}] -> [{args.tokens}, {inner}] -> [{args.tokens}, {hidden}] "
        f"{str(dtype).removeprefix('torch.')}: median {seconds * 1e3:.3f} ms over {args.repeats} runs"
    )


# --- attention stack: in-flight batching over a paged cache, verified against tp=1 ---


def run_attention_stack(world: World, args: argparse.Namespace, dtype: torch.dtype) -> None:
    dev, comm = world.device, world.tp_comm
    if dtype == torch.float32 and dev.type == "cuda" and args.backend != "reference":
        dtype = torch.bfloat16  # the CUDA kernels take fp16/bf16
    kw = attention_kwargs(args)
    cfg = AttentionConfig(**kw, dtype=dtype)
    ref_cfg = AttentionConfig(**kw, dtype=torch.float32)
    hidden = cfg.hidden_size
    g = torch.Generator().manual_seed(args.seed + 1)  # identical full weights and requests on every rank
    weights = [
        dict(
            qkv_weight=torch.randn(cfg.qkv_size, hidden, generator=g) / hidden**0.5,
            dense_weight=torch.randn(hidden, hidden, generator=g) / hidden**0.5,
            qkv_bias=torch.randn(cfg.qkv_size, generator=g) * 0.1,
            dense_bias=torch.randn(hidden, generator=g) * 0.1,
        )
        for _ in range(args.layers)
    ]
    scales = 0.05 if cfg.kv_cache_dtype.is_quantized else None  # dequant scale: |K|, |V| stay under ~6
    ours, oracle = [], []
    for i, w in enumerate(weights):
        layer = Attention(cfg, comm=comm, layer_idx=i, backend=args.backend, device=dev)
        layer.load_weights(**{k: v.to(dev, dtype) for k, v in w.items()})
        ours.append(layer)
        ref = Attention(ref_cfg, comm=NoComm(), layer_idx=i, backend="reference")
        ref.load_weights(**{k: v.to(dtype).float() for k, v in w.items()})
        oracle.append(ref)
    precompile(ours, world.local_comm)  # CUDA kernels: one rank per node compiles, before the first step
    max_seqs, block = 6, 16
    cache = PagedKVCache(
        config=cfg,
        head_layout=ours[0].head_layout,
        num_layers=args.layers,
        num_blocks=48,
        block_size=block,
        max_seqs=max_seqs,
        max_blocks_per_seq=8,
        scales=scales,
        device=dev,
    )
    ref_cache = KVCache(
        config=ref_cfg,
        head_layout=oracle[0].head_layout,
        num_layers=args.layers,
        max_batch=max_seqs,
        max_seq_len=8 * block,
        scales=scales,
    )
    # Requests: (arrival step, prompt tokens, tokens to generate); they arrive and finish mid-run.
    requests = [
        (
            int(torch.randint(0, max(args.steps - 4, 1), (1,), generator=g)),
            int(torch.randint(1, 40, (1,), generator=g)),
            int(torch.randint(2, 24, (1,), generator=g)),
        )
        for _ in range(10)
    ]
    running: dict[int, list[int]] = {}  # slot -> [cached tokens, tokens left to generate]
    pending = sorted(requests)
    worst, times = 0.0, []
    for step_no in range(args.steps):
        new, past, slots = [], [], []
        for slot, (n_cached, _) in running.items():
            new.append(1), past.append(n_cached), slots.append(slot)
        while pending and pending[0][0] <= step_no and len(running) < max_seqs:
            _, prompt, gen_len = pending.pop(0)
            slot = min(set(range(max_seqs)) - set(running))
            running[slot] = [0, gen_len]
            new.append(prompt), past.append(0), slots.append(slot)
        if not new:
            world.log.info(f"step {step_no:3d}: idle (no request has arrived yet)")
            continue
        step = Step(new_lens=new, past_lens=past, slots=slots, device=dev)
        cache.reserve(step)
        x = torch.randn(step.num_tokens, hidden, generator=g)
        h, h_ref = x.to(dev, dtype), x.to(dtype).float()
        ref_step = Step(new_lens=new, past_lens=past, slots=slots)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for layer in ours:
            h = h + layer(h, step, cache)
        sync()
        times.append(time.perf_counter() - start)
        for layer in oracle:
            h_ref = h_ref + layer(h_ref, ref_step, ref_cache)
        err = ((h.float().cpu() - h_ref).abs().max() / h_ref.abs().max()).item()
        worst = max(worst, err)
        tol = 1e-4 if dtype == torch.float32 and not cfg.kv_cache_dtype.is_quantized else 5e-2
        if not err <= tol:
            raise AssertionError(f"attention stack step {step_no}: relative error {err:.3g} vs tp=1 exceeds {tol:g}")
        n_ctx = sum(p == 0 for p in past)
        world.log.info(
            f"step {step_no:3d}: {n_ctx} prefill + {len(new) - n_ctx} decode sequences, "
            f"{step.num_tokens:4d} tokens, {times[-1] * 1e3:7.2f} ms, error vs tp=1 {err:.2e}"
        )
        for slot, p in zip(slots, past, strict=True):
            state = running[slot]
            state[0] += step.new_lens[slots.index(slot)]
            state[1] -= p > 0  # a decode step produced one token
            if state[1] <= 0:
                running.pop(slot)
                cache.free(slot)
    world.log.info(
        f"attention stack: {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, pe {args.pe}, "
        f"kv cache {args.kv_cache}, backend {ours[0].backend.name}: "
        f"median step {statistics.median(times) * 1e3:.2f} ms, "
        f"worst relative error vs tp=1 {worst:.2e}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = tp_runtime.init(tp_size=args.tp_size, device=args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.bfloat16 if world.device.type == "cuda" else torch.float32)
    )
    check_args(args, world.tp_size, dtype)
    name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
    world.log.info(
        f"tp_runtime demo: {world.size} ranks, tp_size {world.tp_size} ({world.dp_size} TP group(s)), "
        f"device {world.device} ({name}), comm {type(world.tp_comm).__name__}"
    )
    world.log_all.info(f"device {world.device}, TP group {world.dp_rank}, TP rank {world.tp_rank}")
    run_linear_pair(world, args, dtype)
    run_attention_stack(world, args, dtype)
    world.log.info("verified")
    if args.bench:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_tp

        if world.device.type != "cuda":
            world.log.info("--bench on the CPU: the reference backend is for correctness, not speed (times below)")
        cuda_args = ["--models", "llama2-7b,llama2-70b", "--repeats", "10", "--graph"]
        bench_tp.run(bench_tp.parse_args(cuda_args if world.device.type == "cuda" else ["--repeats", "5"]), world=world)


if __name__ == "__main__":
    main()
