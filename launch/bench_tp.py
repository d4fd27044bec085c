"""Whole tensor-parallel attention layer per step: ours against a plain torch.distributed layer.

Run under the launcher, once per tp size, then merge the results:

    launch/tp_run -n 1 launch/bench_tp.py --out launch/results/bench_tp_tp1.json
    launch/tp_run -n 2 launch/bench_tp.py --out launch/results/bench_tp_tp2.json
    launch/tp_run -n 4 launch/bench_tp.py --out launch/results/bench_tp_tp4.json
    python launch/bench_tp.py --report launch/results/bench_tp_tp*.json   # table, BENCHMARKS.md rows, PNG

A step is the whole layer: QKV GEMM, prepare (bias, RoPE, cache write), attention, dense GEMM,
all-reduce, bias. The baseline is what a user would write instead (Megatron-style sharding,
``F.linear``, RoPE in torch, ``scaled_dot_product_attention`` with its fastest available backend
for the case, ``torch.distributed.all_reduce`` over NCCL), on the same shards and cache sizes.
Timing: CUDA events around each step after warm-up, the median of many repeats, inputs rotated
among several buffers. GPU idle time of a decode step is measured by queueing the steps behind a
long sleep kernel (so the host is never in the way) and comparing with the eager time.
``--smoke`` runs one tiny step of each on the CPU (CI), timing nothing.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass

import cli
import torch
import torch.nn.functional as F
from benchlib import gpu_busy_ms, init_torch_distributed, median_ms

import tp_runtime
from tp_runtime import Attention, AttentionConfig, DecodeGraph, KVCache, PagedKVCache, QuantMode, Step, precompile


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    pe: str


MODELS = (
    Model("llama2-7b", 4096, 32, 32, "rope_gpt_neox"),
    Model("llama2-70b", 8192, 64, 8, "rope_gpt_neox"),
    Model("bloom-176b", 14336, 112, 112, "alibi"),  # 112 heads: not a power of two
    Model("falcon-mqa", 4096, 64, 1, "rope_gpt_neox"),
)
PREFILL = (8, 2048)  # sequences x tokens
DECODE = ((1, 16384), (8, 4096), (64, 2048), (256, 1024))  # batch x cached tokens
# The same table on a machine without GPUs (the demo's benchmark mode): small shapes, fp32.
CPU_MODELS = (Model("tiny-gqa", 256, 8, 2, "rope_gpt_neox"), Model("tiny-alibi", 192, 12, 12, "alibi"))
CPU_PREFILL = (2, 128)
CPU_DECODE = ((1, 512), (8, 256))


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--out", default=None, help="JSON output (rank 0)")
    p.add_argument("--models", default=",".join(m.name for m in MODELS))
    p.add_argument("--phases", default="prefill,decode")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--fp8", action="store_true", help="also time prefill with FP8 projections (vs bf16)")
    p.add_argument("--graph", action="store_true", help="also time decode steps replayed as a CUDA graph")
    p.add_argument("--smoke", action="store_true", help="one tiny step of each on the CPU, no timing")
    p.add_argument(
        "--report", nargs="*", default=None, help="merge result JSONs into a table, plot and BENCHMARKS.md rows"
    )
    return p.parse_args(argv)


class BaselineLayer:
    """The same sharded layer in plain torch: what a user would write with torch.distributed."""

    def __init__(self, cfg: AttentionConfig, ours: Attention, dist_group):
        self.cfg, self.layout, self.group = cfg, ours.head_layout, dist_group
        self.w_qkv, self.b_qkv = ours.qkv.weight, ours.qkv.bias
        self.w_dense, self.b_dense = ours.dense.weight, ours.dense.bias
        self.rot = cfg.rotary_dim  # every RoPE model here is NeoX-style (rotated halves), base rotary_base
        self.slopes = ours.alibi_slopes

    def rope(self, x, pos):
        """NeoX rotary embedding of ``x [N, heads, D]`` at positions ``pos [N]`` (fp32 math), as users write it."""
        rot, half = self.rot, self.rot // 2
        inv_freq = 1.0 / self.cfg.rotary_base ** (torch.arange(0, rot, 2, device=x.device, dtype=torch.float32) / rot)
        angle = pos.float()[:, None] * inv_freq[None]  # [N, rot/2]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        a, b = x[..., :half].float(), x[..., half:rot].float()
        return torch.cat((a * cos - b * sin, b * cos + a * sin, x[..., rot:].float()), dim=-1).to(x.dtype)

    def __call__(self, x, k_cache, v_cache, past: int, new: int, batch: int):
        """x [B·new, hidden]; caches [B, KV_r, L_max, D]; every sequence has the same lengths."""
        h, kv, d = self.layout.num_heads_per_rank, self.layout.num_kv_heads_per_rank, self.cfg.head_size
        qkv = F.linear(x, self.w_qkv, self.b_qkv).view(batch, new, h + 2 * kv, d)
        q, k, v = qkv[:, :, :h], qkv[:, :, h : h + kv], qkv[:, :, h + kv :]
        if self.rot:
            pos = torch.arange(past, past + new, device=x.device).repeat(batch)
            q = self.rope(q.reshape(-1, h, d), pos).view(batch, new, h, d)
            k = self.rope(k.reshape(-1, kv, d), pos).view(batch, new, kv, d)
        k_cache[:, :, past : past + new] = k.transpose(1, 2)
        v_cache[:, :, past : past + new] = v.transpose(1, 2)
        keys, vals = k_cache[:, :, : past + new], v_cache[:, :, : past + new]
        mask = None
        if self.slopes is not None:  # ALiBi as an additive mask (+ causal), as users do with SDPA
            qp = torch.arange(past, past + new, device=x.device)
            kp = torch.arange(past + new, device=x.device)
            rel = (kp[None] - qp[:, None]).float()
            mask = self.slopes[:, None, None] * rel
            mask = mask.masked_fill(rel > 0, float("-inf")).to(x.dtype)[None]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            vals,
            attn_mask=mask,
            is_causal=mask is None and new > 1,
            scale=self.cfg.softmax_scale,
            enable_gqa=h != kv,
        )
        y = F.linear(o.transpose(1, 2).reshape(batch * new, h * d), self.w_dense)
        if self.group is not None:
            torch.distributed.all_reduce(y, group=self.group)
        return y + self.b_dense if self.b_dense is not None else y


def build(model: Model, world, dtype, quant=QuantMode.none, max_batch=8, max_len=2048):
    cfg = AttentionConfig(
        hidden_size=model.hidden,
        num_heads=model.heads,
        num_kv_heads=model.kv_heads,
        position_embedding=model.pe,
        dtype=dtype,
        quant_mode=quant,
    )
    dev = world.device
    gen = torch.Generator(device=dev).manual_seed(0)
    layer = Attention(cfg, comm=world.tp_comm, device=dev)
    s = 1 / math.sqrt(model.hidden)
    layer.load_weights(
        qkv_weight=(torch.randn(cfg.qkv_size, model.hidden, device=dev, generator=gen) * s).to(dtype),
        dense_weight=(torch.randn(model.hidden, model.heads * cfg.head_size, device=dev, generator=gen) * s).to(dtype),
        qkv_bias=(torch.randn(cfg.qkv_size, device=dev, generator=gen) * 0.1).to(dtype),
        dense_bias=(torch.randn(model.hidden, device=dev, generator=gen) * 0.1).to(dtype),
    )
    precompile([layer], world.local_comm)  # outside the timed region; one rank per node compiles
    return cfg, layer


# A replayed decode graph advances its lengths itself; every GRAPH_JUMP replays the benchmark jumps
# back to the benchmark's length (a staged copy), so the cache needs that much room. Timing a jump
# on every call would time the jump's host path, not the steady state a generation loop runs.
GRAPH_JUMP = 32


def graph_splits(batch: int, kv_heads: int, sms: int) -> int:
    """A fixed decode key-split count for a graph (launch shapes may not follow the length): about
    two blocks per SM, as the decode notes measured best."""
    return max(1, min(64, 2 * sms // max(batch * kv_heads, 1)))


def bench_case(
    model, world, group, phase, batch, length, repeats, dtype, paged=False, quant=QuantMode.none, graph=False
):
    dev = world.device
    new = length if phase == "prefill" else 1
    past = 0 if phase == "prefill" else length - 1
    cfg, layer = build(model, world, dtype, quant)
    lay = layer.head_layout
    if paged:
        block = 64
        per_seq = -(-length // block)
        cache = PagedKVCache(
            config=cfg,
            head_layout=lay,
            num_layers=1,
            num_blocks=batch * per_seq,
            block_size=block,
            max_seqs=batch,
            max_blocks_per_seq=per_seq,
            device=dev,
        )
    else:
        # Graph steps advance the lengths on the device: room for GRAPH_JUMP replays past the length.
        room = length + (GRAPH_JUMP if graph and phase == "decode" else 0)
        cache = KVCache(config=cfg, head_layout=lay, num_layers=1, max_batch=batch, max_seq_len=room, device=dev)
    cache.data.normal_()  # cached past: random, never zeros
    step = Step(new_lens=[new] * batch, past_lens=[past] * batch, device=dev)
    cache.set_written(step.slots, step.past_lens)  # the random past stands for written positions
    if paged:
        cache.reserve(step)
    xs = [torch.randn(batch * new, model.hidden, device=dev, dtype=dtype) for _ in range(4)]
    it = iter(range(1 << 30))
    ours = lambda: layer(xs[next(it) % 4], step, cache)  # noqa: E731
    row = dict(
        model=model.name,
        phase=phase,
        batch=batch,
        length=length,
        tp=world.tp_size,
        paged=paged,
        quant=quant.value,
        dtype=str(dtype).removeprefix("torch."),
    )
    row["ours_ms"] = median_ms(ours, repeats, device=dev)
    if phase == "prefill":  # the two projection GEMMs alone (FP8: with the activation quantizer)
        ctx = torch.randn(batch * new, len(layer.dense.cols), device=dev, dtype=dtype)
        proj = lambda: (layer.qkv.matmul(xs[0]), layer.dense.matmul(ctx))  # noqa: E731
        row["proj_ms"] = median_ms(proj, repeats, device=dev)
    if phase == "decode" and not paged and quant is QuantMode.none and dev.type == "cuda":
        busy = gpu_busy_ms(ours)
        row["gpu_busy_ms"] = busy
        row["gpu_idle_pct"] = max(0.0, 100 * (1 - busy / row["ours_ms"]))
        if graph:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            splits = graph_splits(batch, lay.num_kv_heads_per_rank, sms)
            dg = DecodeGraph(
                lambda x, s: layer(x, s, cache, decode_splits=splits),
                config=cfg,
                slots=list(range(batch)),
                cache=cache,
                device=dev,
            )
            pasts = [past] * batch

            calls = iter(range(1 << 30))

            def graphed():  # steady state (the lengths advance on the device), back to ``past`` now and then
                i = next(calls)  # the first call captures, with the lengths
                return dg(xs[i % 4], pasts if i % GRAPH_JUMP == 0 else None)

            row["graph_ms"] = median_ms(graphed, repeats, device=dev)
            row["graph_idle_pct"] = max(0.0, 100 * (1 - gpu_busy_ms(graphed) / row["graph_ms"]))
    if quant is QuantMode.none and not paged:
        base = BaselineLayer(cfg, layer, group)
        kc = torch.randn(batch, lay.num_kv_heads_per_rank, length, cfg.head_size, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        base_fn = lambda: base(xs[next(it) % 4], kc, vc, past, new, batch)  # noqa: E731
        row["baseline_ms"] = median_ms(base_fn, repeats, device=dev)
        row["ratio"] = row["baseline_ms"] / row["ours_ms"]
    row["tokens_per_s"] = batch * new / row["ours_ms"] * 1e3
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def smoke(world, group) -> None:
    """CI: one tiny prefill and decode step of ours and of the baseline on the CPU, checked equal."""
    model = Model("tiny", 64, 4, 2, "rope_gpt_neox")
    cfg, layer = build(model, world, torch.float32)
    cache = KVCache(
        config=cfg, head_layout=layer.head_layout, num_layers=1, max_batch=2, max_seq_len=8, device=world.device
    )
    base = BaselineLayer(cfg, layer, group)
    kc = torch.zeros(2, layer.head_layout.num_kv_heads_per_rank, 8, cfg.head_size)
    vc = torch.zeros_like(kc)
    x = torch.randn(2 * 5, 64)
    ours = layer(x, Step(new_lens=[5, 5]), cache)
    theirs = base(x, kc, vc, 0, 5, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    x1 = torch.randn(2, 64)
    ours = layer(x1, Step(new_lens=[1, 1], past_lens=[5, 5]), cache)
    theirs = base(x1, kc, vc, 5, 1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    world.log.info(
        "bench_tp smoke: ours equals the torch.distributed baseline (prefill and decode), tp=%d", world.tp_size
    )


def run(args, world=None) -> list[dict]:
    """Benchmark (or, with ``--smoke``, check) on the ranks of ``world`` (default: ``tp_runtime.init()``)."""
    world = world or tp_runtime.init(device="cpu" if args.smoke else None)
    group = init_torch_distributed(world)
    group = group if world.tp_size > 1 else None
    try:
        if args.smoke:
            smoke(world, group)
            return []
        return measure(args, world, group)
    finally:
        torch.distributed.destroy_process_group()


def measure(args, world, group) -> list[dict]:
    cuda = world.device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    models = [m for m in MODELS if m.name in args.models.split(",")] if cuda else CPU_MODELS
    prefill, decode = (PREFILL, DECODE) if cuda else (CPU_PREFILL, CPU_DECODE)
    rows = []
    gpu = torch.cuda.get_device_name(world.device) if cuda else "CPU"

    def add(row):  # saved after every row, so a run cut short still leaves its numbers
        rows.append(row)
        if world.rank == 0:
            print_table([row], header=len(rows) == 1)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(dict(gpu=gpu, tp=world.tp_size, rows=rows), f, indent=1)

    for m in models:
        if m.heads % world.tp_size:
            continue
        if "prefill" in args.phases:
            add(bench_case(m, world, group, "prefill", *prefill, args.repeats, dtype))
            if args.fp8 and cuda:
                add(bench_case(m, world, group, "prefill", *prefill, args.repeats, torch.bfloat16))
                add(
                    bench_case(
                        m, world, group, "prefill", *prefill, args.repeats, torch.bfloat16, quant=QuantMode.fp8_qdq
                    )
                )
        if "decode" in args.phases:
            for batch, length in decode:
                add(
                    bench_case(m, world, group, "decode", batch, length, args.repeats, dtype, graph=args.graph and cuda)
                )
            paged_case = (64, 2048) if cuda else decode[-1]
            add(bench_case(m, world, group, "decode", *paged_case, args.repeats, dtype, paged=True))
    return rows


def print_table(rows, header: bool = True) -> None:
    if header:
        print(
            f"{'model':12} {'phase':8} {'B':>4} {'L':>6} {'tp':>2} {'paged':>5} {'quant':>7} "
            f"{'ours ms':>9} {'base ms':>9} {'ratio':>6} {'idle%':>6} {'graph ms':>9} {'g.idle%':>7} {'proj ms':>8}"
        )
    for r in rows:
        print(
            f"{r['model']:12} {r['phase']:8} {r['batch']:4} {r['length']:6} {r['tp']:2} "
            f"{str(r['paged']):>5} {r['quant']:>7} "
            f"{r['ours_ms']:9.3f} {r.get('baseline_ms', float('nan')):9.3f} {r.get('ratio', float('nan')):6.2f} "
            f"{r.get('gpu_idle_pct', float('nan')):6.1f} {r.get('graph_ms', float('nan')):9.3f} "
            f"{r.get('graph_idle_pct', float('nan')):7.1f} {r.get('proj_ms', float('nan')):8.3f}"
        )


def report(paths) -> None:
    """Merge per-tp JSONs: ratios, strong-scaling efficiency (t1 / (tp · t_tp)), markdown and a plot."""
    results = [json.load(open(p)) for p in sorted(set(sum((glob.glob(p) for p in paths), [])))]
    key = lambda r: (r["model"], r["phase"], r["batch"], r["length"], r["paged"], r["quant"], r["dtype"])  # noqa: E731
    t1 = {key(r): r for res in results if res["tp"] == 1 for r in res["rows"]}

    def efficiency(r, field):  # strong scaling from tp 1 to r's tp, of the time in ``field``
        one = t1.get(key(r), {}).get(field)
        return f"{100 * one / (r['tp'] * r[field]):.0f}%" if one and r.get(field) else "-"

    lines = [
        "| GPU | model | phase | batch | len | tp | ours ms | baseline ms | ratio | scaling eff. | idle % "
        "| graph ms | graph ratio | graph idle % | graph scaling eff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp8 = [
        "| GPU | model | tp | bf16 step ms | fp8 step ms | step speed-up | bf16 projections ms | fp8 projections ms "
        "| projections speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        bf16 = {
            r["model"]: r
            for r in res["rows"]
            if r["phase"] == "prefill" and r["dtype"] == "bfloat16" and r["quant"] == "none"
        }
        for r in res["rows"]:
            if r["quant"] == "fp8_qdq" and r["model"] in bf16 and "proj_ms" in r:
                b = bf16[r["model"]]
                fp8.append(
                    f"| {res['gpu']} | {r['model']} | {r['tp']} | {b['ours_ms']:.3f} | {r['ours_ms']:.3f} | "
                    f"{b['ours_ms'] / r['ours_ms']:.2f} | {b['proj_ms']:.3f} | {r['proj_ms']:.3f} | "
                    f"{b['proj_ms'] / r['proj_ms']:.2f} |"
                )
            if r["quant"] != "none" or r["dtype"] == "bfloat16":
                continue  # the FP8 comparison's rows: in the second table
            eff = efficiency(r, "ours_ms")
            # our replayed step against the (eager) baseline: what a user of each would run
            graph_ratio = f"{r['baseline_ms'] / r['graph_ms']:.2f}" if "graph_ms" in r and "baseline_ms" in r else "-"
            extra = " paged" if r["paged"] else ""
            lines.append(
                f"| {res['gpu']} | {r['model']}{extra} | {r['phase']} | {r['batch']} | {r['length']} | {r['tp']} | "
                f"{r['ours_ms']:.3f} | {r.get('baseline_ms', float('nan')):.3f} | {r.get('ratio', float('nan')):.2f} | "
                f"{eff} | {r.get('gpu_idle_pct', float('nan')):.1f} | {r.get('graph_ms', float('nan')):.3f} | "
                f"{graph_ratio} | {r.get('graph_idle_pct', float('nan')):.1f} | {efficiency(r, 'graph_ms')} |"
            )
    print("\n".join(lines))
    print("\nFP8 projections vs bf16, prefill (same run):\n")
    print("\n".join(fp8))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for res in results:
        rows = [r for r in res["rows"] if "ratio" in r]
        ax.bar(
            [f"{r['model']}\n{r['phase']} B{r['batch']}" + f"\ntp{res['tp']}" for r in rows], [r["ratio"] for r in rows]
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("baseline time / our time")
    ax.tick_params(axis="x", labelsize=5, rotation=90)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(paths[0]) or ".", "bench_tp.png"), dpi=120)


if __name__ == "__main__":
    a = parse_args()
    if a.report is not None:
        report(a.report)
    else:
        run(a)
