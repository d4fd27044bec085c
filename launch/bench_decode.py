"""Decode attention: K/V bytes read per second of our kernel against torch SDPA, in one process.

    python launch/bench_decode.py [--out launch/results/bench_decode.json] [--quick]

Figure of merit: the cache bytes a decode step must read, ``2·B·KV·L·D·bytes``, over the time of
one call (the same count for every backend, whatever it reads beside). The baselines are
``torch.nn.functional.scaled_dot_product_attention`` restricted to its flash and its cuDNN
backends, with ``q [B, H, 1, D]`` against ``K/V [B, KV, L, D]`` in contiguous tensors of their own;
for GQA they get ``enable_gqa=True`` when the backend accepts it, else K/V repeated to H heads
before timing (the row's ``gqa`` field says which). The device copy bandwidth (a torch clone of
1 GiB, bytes read + written) is measured in the same run.

Timing: every call is captured once per input buffer into a CUDA graph (so host overhead stays
out), replayed after warm-up; CUDA events around each replay, the median of many, the replays
rotating among enough input buffers (K/V, q, out) to exceed the L2 cache several times. Our
launcher's host time per call is measured separately (eager wall clock). Writes a table and a
JSON (GPU name, every figure, ratios); ``run(args)`` returns the rows.
"""

from __future__ import annotations

import json
import math
import os
import time

import cli
import torch
import torch.nn.functional as F
from benchlib import replay_seconds
from torch.nn.attention import SDPBackend, sdpa_kernel

from tp_runtime.backends import cuda_decode, cuda_plan
from tp_runtime.backends.base import AttentionSpec
from tp_runtime.batch.kv_cache import CacheLayout, LayerKV
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionMaskType, KVCacheDType
from tp_runtime.position import alibi_slopes

D = 128
# (H, KV) on one rank: Llama-2-7B-like MHA, Llama-3-8B GQA, MQA (Falcon-like), Llama-2-70B at tp 1,
# BLOOM-176B at tp 1 (ALiBi rows only)
HEADS = {"mha": (32, 32), "gqa": (32, 8), "mqa": (32, 1), "gqa64": (64, 8), "bloom": (112, 112)}
GRID_HEADS = ("mha", "gqa", "mqa", "gqa64")  # the SDPA grid
QUANT_HEADS = ("mha", "gqa", "mqa")  # int8/fp8 rows
BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (512, 2048, 8192, 32768)
SET_BYTES_MAX = 9 << 30  # one input set (cache, or SDPA's K+V): skip larger configurations
ROTATE_BYTES = 256 << 20  # rotate buffers until the inputs exceed this (L2 is 50-60 MB)
BASELINES = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--out", default=None, help="write the JSON here (rank 0); default: print only, write nowhere")
    p.add_argument("--quick", action="store_true", help="a few configurations only")
    p.add_argument("--seconds", type=float, default=0.15, help="timed replays per measurement (about)")
    return p.parse_args(argv)


# ---- timing ----------------------------------------------------------------------------------
def sdpa_calls(backend, q4, ks, vs, mode: str) -> list:
    """One SDPA call per input buffer, restricted to ``backend``."""

    def make(i):
        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q4[i], ks[i], vs[i], scale=1 / math.sqrt(D), enable_gqa=mode == "enable_gqa"
                )

        return call

    return [make(i) for i in range(len(q4))]


def copy_bandwidth(seconds: float) -> float:
    """Bytes read + written per second by a torch clone of 1 GiB (after half a second of clones, so
    the clocks have left idle)."""
    x = torch.randn(1 << 28, device="cuda")
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:
        x.clone()
        torch.cuda.synchronize()
    # eager: a captured clone becomes a memcpy node, which ran at ~2.8 TB/s on an H200 (a DMA copy?)
    t, _ = replay_seconds([lambda: x.clone()], seconds, 1e-3, graphs=False)
    return 2 * x.numel() * x.element_size() / t


# ---- inputs ------------------------------------------------------------------------------------
def make_cache(b, kv_heads, length, cache_dtype: str, layout: str, block: int) -> LayerKV:
    """A filled cache for ``b`` sequences of ``length`` tokens (random values; paged: shuffled blocks)."""
    storage = {"auto": torch.float16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[cache_dtype]
    if layout == "contiguous":
        shape = (b, 2, kv_heads, length, D)
    else:
        per_seq = -(-length // block)
        shape = (b * per_seq + 1, 2, kv_heads, block, D)
    if cache_dtype == "int8":
        data = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
    else:
        data = torch.randn(shape, dtype=torch.float16, device="cuda").to(storage)
    dequant = {"auto": 1.0, "int8": 1.0 / 40, "fp8": 1.0 / 3}[cache_dtype]
    if layout == "contiguous":
        return LayerKV(CacheLayout.contiguous, data, KVCacheDType(cache_dtype), dequant)
    table = torch.randperm(shape[0], device="cuda")[: b * per_seq].to(torch.int32).reshape(b, per_seq)
    return LayerKV(CacheLayout.paged, data, KVCacheDType(cache_dtype), dequant, table.contiguous())


def n_sets(set_bytes: int) -> int:
    return max(1, min(16, -(-ROTATE_BYTES // set_bytes)))


def measure(case: dict, args, baselines: bool) -> dict:
    """Time ours (and the SDPA baselines) on one configuration; returns the row."""
    h, kv_heads = HEADS[case["heads"]]
    b, length, cache_dtype, layout, block = (
        case["batch"],
        case["context"],
        case["kv"],
        case["layout"],
        case.get("block", 0),
    )
    elem = 2 if cache_dtype == "auto" else 1
    kv_bytes = 2 * b * kv_heads * length * D * elem
    row = dict(case, kv_bytes=kv_bytes)
    sets = n_sets(kv_bytes)
    step = Step(new_lens=(1,) * b, past_lens=(length - 1,) * b, device="cuda")
    spec = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1 / math.sqrt(D))
    if case["group"] == "alibi":
        spec = AttentionSpec(
            mask=AttentionMaskType.causal, softmax_scale=1 / math.sqrt(D), alibi_slopes=alibi_slopes(h).cuda()
        )
    ids = list(range(b))

    caches = [make_cache(b, kv_heads, length, cache_dtype, layout, block) for _ in range(sets)]
    qs = [torch.randn(b, h, D, device="cuda", dtype=torch.float16) for _ in range(sets)]
    outs = [torch.empty_like(q) for q in qs]
    lses = [torch.empty(b, h, device="cuda") for _ in range(sets)]

    force = case.get("force")

    def ours(i):
        return lambda: cuda_decode.decode(qs[i], caches[i], step, ids, spec, outs[i], lses[i], force)

    est = kv_bytes / 3e12
    t, graphed = replay_seconds([ours(i) for i in range(sets)], args.seconds, est)
    row.update(ours_us=t * 1e6, ours_tbs=kv_bytes / t / 1e12, graph=graphed, tokens_per_s=b / t)
    if case["group"] == "alibi":  # the same call without the bias, same run
        plain = AttentionSpec(mask=AttentionMaskType.causal, softmax_scale=1 / math.sqrt(D))
        calls = [
            (lambda i=i: cuda_decode.decode(qs[i], caches[i], step, ids, plain, outs[i], lses[i], force))
            for i in range(sets)
        ]
        t_plain, _ = replay_seconds(calls, args.seconds, est)
        row.update(no_alibi_us=t_plain * 1e6, vs_no_alibi=t_plain / t)  # > 1: ALiBi faster
    kernel = cuda_decode.get_kernel("decode", **cuda_decode.variant(torch.float16, caches[0], D, h // kv_heads))
    smem = cuda_decode.PIPE_BYTES + (4 * cuda_decode.TABLE_CAP if layout == "paged" else 0)
    hc = -(-(h // kv_heads) // cuda_decode.heads_per_block(h // kv_heads, D))
    occupancy = cuda_decode._occupancy(kernel, torch.device("cuda"), smem)
    target = cuda_decode.split_target(caches[0], D, h // kv_heads)
    row["splits"] = force or cuda_plan.choose_splits(b * kv_heads * hc, length, *occupancy, target)
    row["blocks_per_sm"] = occupancy[1]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        ours(0)()
    row["host_us"] = (time.perf_counter() - t0) / 50 * 1e6  # launcher wall time per call (queue not full)
    torch.cuda.synchronize()

    if baselines and cache_dtype == "auto" and layout == "contiguous":
        del caches
        ks = [torch.randn(b, kv_heads, length, D, device="cuda", dtype=torch.float16) for _ in range(sets)]
        vs = [torch.randn(b, kv_heads, length, D, device="cuda", dtype=torch.float16) for _ in range(sets)]
        q4 = [q.unsqueeze(2) for q in qs]  # [B, H, 1, D]
        for name, backend in BASELINES.items():
            mode = "mha" if h == kv_heads else "enable_gqa"
            k_in, v_in = ks, vs
            try:
                first = sdpa_calls(backend, q4, k_in, v_in, mode)[0]()
            except Exception:  # noqa: BLE001 - any refusal of the backend: try repeated heads
                first = None
            if first is None and mode == "enable_gqa" and h // kv_heads * kv_bytes * sets <= 2 * SET_BYTES_MAX:
                mode = "repeat"  # K/V repeated to H heads before timing
                k_in = [k.repeat_interleave(h // kv_heads, 1) for k in ks]
                v_in = [v.repeat_interleave(h // kv_heads, 1) for v in vs]
                try:
                    first = sdpa_calls(backend, q4, k_in, v_in, mode)[0]()
                except Exception:  # noqa: BLE001
                    first = None
            if first is None:
                row[f"{name}_error"] = "unsupported"
                continue
            t, graphed = replay_seconds(sdpa_calls(backend, q4, k_in, v_in, mode), args.seconds, est)
            row.update({f"{name}_us": t * 1e6, f"{name}_tbs": kv_bytes / t / 1e12, f"{name}_graph": graphed})
            row[f"vs_{name}"] = t * 1e6 / row["ours_us"]  # > 1: ours faster
            row[f"{name}_heads"] = mode
            if name == "flash":  # sanity: ours on the same K/V agrees with the baseline
                both = torch.stack((ks[0], vs[0]), dim=1).contiguous()
                cache = LayerKV(CacheLayout.contiguous, both, KVCacheDType.auto, 1.0)
                cuda_decode.decode(qs[0], cache, step, ids, spec, outs[0], lses[0], None)
                row["max_diff_vs_flash"] = (outs[0].float() - first.squeeze(2).float()).abs().max().item()
                del both, cache
            del k_in, v_in, first
        del ks, vs
    torch.cuda.empty_cache()
    return row


def cases(quick: bool) -> list[dict]:
    out = []
    for heads in GRID_HEADS:
        kv_heads = HEADS[heads][1]
        for b in BATCHES:
            for length in CONTEXTS:
                if 2 * b * kv_heads * length * D * 2 > SET_BYTES_MAX:
                    continue
                if quick and (b, length) not in ((1, 32768), (64, 2048), (16, 8192)):
                    continue
                out.append(dict(group="sdpa", heads=heads, batch=b, context=length, kv="auto", layout="contiguous"))
    for heads in ("mha", "gqa"):
        for b, length in ((16, 8192), (64, 2048)):
            for block in (16, 64):
                out.append(
                    dict(group="paged", heads=heads, batch=b, context=length, kv="auto", layout="paged", block=block)
                )
    # long context, each point also in the SDPA grid above (the fp16 row the ratios refer to)
    quant_points = ((16, 8192), (1, 32768)) if quick else ((16, 8192), (4, 32768), (1, 32768))
    for heads in QUANT_HEADS:
        for b, length in quant_points:
            for cache_dtype in ("int8", "fp8"):
                out.append(
                    dict(group="quant", heads=heads, batch=b, context=length, kv=cache_dtype, layout="contiguous")
                )
    for b, length in ((1, 32768), (16, 2048)):  # ALiBi against the same call without it (BLOOM, tp 1)
        out.append(dict(group="alibi", heads="bloom", batch=b, context=length, kv="auto", layout="contiguous"))
    # one long sequence: time against the split count (the heuristic's data; around its v5 choices: MHA
    # 8, GQA 66, MQA 128, the key minimum: 256 and 384 (3 blocks/SM, v6's separate merge) show whether
    # a lower minimum would pay)
    sweep = {"mha": (4, 8, 16, 32, 64), "gqa": (16, 32, 48, 66, 96), "mqa": (32, 64, 128, 256, 384)}
    for heads, forces in sweep.items():
        for force in forces:
            out.append(
                dict(group="splits", heads=heads, batch=1, context=32768, kv="auto", layout="contiguous", force=force)
            )
    return out


def run(args) -> list[dict]:
    torch.manual_seed(0)
    rows = [dict(group="copy", copy_tbs=copy_bandwidth(args.seconds) / 1e12)]
    copy_tbs = rows[0]["copy_tbs"]
    print(format_row(rows[0]), flush=True)
    fp16 = {}
    for case in cases(args.quick):
        row = measure(case, args, baselines=case["group"] == "sdpa")
        row["vs_copy"] = row["ours_tbs"] / copy_tbs
        key = (row["heads"], row["batch"], row["context"])
        if row["group"] == "sdpa":
            fp16[key] = row
        ref = fp16.get(key)
        if ref is not None and row["group"] in ("paged", "splits"):
            row["vs_contiguous"] = ref["ours_us"] / row["ours_us"]  # > 1: paged faster
        if ref is not None and row["group"] == "quant":
            row["tokens_vs_fp16"] = row["tokens_per_s"] / ref["tokens_per_s"]
            for name in BASELINES:  # the fp16 SDPA of the same shape (torch has no 8-bit cache)
                if f"{name}_us" in ref:
                    row[f"{name}_fp16_us"] = ref[f"{name}_us"]
                    row[f"vs_{name}_fp16"] = ref[f"{name}_us"] / row["ours_us"]  # > 1: ours faster
        rows.append(row)
        print(format_row(row), flush=True)
        save(args.out, rows)  # after every row: a run cut short keeps what it measured
    rows.append(dict(group="copy", copy_tbs=copy_bandwidth(args.seconds) / 1e12, when="end"))
    print(format_row(rows[-1]), flush=True)
    save(args.out, rows)
    return rows


def save(path: str | None, rows: list[dict]) -> None:
    if path is None:
        return
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "head_size": D, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def format_row(r: dict) -> str:
    if r["group"] == "copy":
        return f"copy bandwidth (clone, read+write): {r['copy_tbs']:.2f} TB/s"
    layout = r["layout"][:6] + str(r.get("block") or "")
    name = f"{r['heads']:3s} B={r['batch']:<3d} L={r['context']:<5d} {layout:8s} {r['kv']:4s}"
    s = f"{name} ours {r['ours_us']:8.1f} us {r['ours_tbs']:5.2f} TB/s ({r['vs_copy']:.2f} copy) S={r['splits']:<3d}"
    for b in BASELINES:
        if f"{b}_tbs" in r:
            s += f" | {b} {r[f'{b}_tbs']:5.2f} TB/s x{r[f'vs_{b}']:.2f}"
        elif f"{b}_error" in r:
            s += f" | {b} {r[f'{b}_error']}"
    if "vs_contiguous" in r:
        s += f" | vs heuristic/contiguous {r['vs_contiguous']:.3f}"
    if "tokens_vs_fp16" in r:
        s += f" | tokens/s vs fp16 x{r['tokens_vs_fp16']:.2f}"
        for b in BASELINES:
            if f"vs_{b}_fp16" in r:
                s += f" vs {b} fp16 x{r[f'vs_{b}_fp16']:.2f}"
    if "vs_no_alibi" in r:
        s += f" | no ALiBi {r['no_alibi_us']:.1f} us, ALiBi/none speed x{r['vs_no_alibi']:.3f}"
    return s


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode: needs a CUDA GPU")
    print(f"bench_decode on {torch.cuda.get_device_name()}", flush=True)
    run(args)
    if args.out is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
