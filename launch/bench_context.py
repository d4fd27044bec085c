"""Prefill attention throughput: our CUDA context kernel vs torch SDPA (flash and cuDNN backends).

    PYTHONPATH=. python3 launch/bench_context.py [--out launch/results/bench_context.json]
        [--dtypes float16 bfloat16] [--head-sizes 64 128] [--seqlens 512 ... 16384]
        [--tokens 16384] [--hidden 4096] [--repeats 10] [--inner 5]

Same process, same inputs: fp16/bf16, causal and not, ``tokens / S`` sequences of length S,
``hidden / D`` heads. Our kernel reads K/V from a contiguous cache ``[B, 2, H, S, D]``; SDPA reads
the same bytes (``cache[:, 0]`` is ``[B, H, S, D]``). FLOPs: ``4·B·H·S²·D``, halved for causal.
Timing: CUDA events around ``inner`` back-to-back calls after warm-up, median of ``repeats``
measurements, rotating among several input sets. Prints a table and writes JSON (GPU name,
each figure, the baselines from the same run and the ratios). ``run(args)`` is the entry point
for launch/bench_attention.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_context.json"
N_SETS = 3  # input sets to rotate among


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--head-sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // S)")
    p.add_argument("--hidden", type=int, default=4096, help="H·D (heads = hidden // D)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        metavar="W,MT,BN",
        help="also time these context-kernel tile shapes (warps, m-tiles per warp, keys per tile)",
    )
    return p.parse_args(argv)


def _time(calls, repeats: int, inner: int) -> float:
    """Median milliseconds per call (events around ``inner`` calls, rotating through ``calls``)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _sdpa_call(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _one(dtype, d, s, causal, args) -> dict:
    from tp_runtime.backends import cuda
    from tp_runtime.backends.base import AttentionSpec
    from tp_runtime.config import AttentionMaskType, KVCacheDType
    from tp_runtime.kv_cache import CacheLayout, LayerKV
    from tp_runtime.step import Step

    b = max(1, args.tokens // s)
    h = max(1, args.hidden // d)
    dev = torch.device("cuda")
    step = Step(new_lens=[s] * b, device=dev)
    mask = AttentionMaskType.causal if causal else AttentionMaskType.padding
    spec = AttentionSpec(mask=mask, softmax_scale=1.0 / math.sqrt(d))
    sets = []
    for _ in range(N_SETS):
        q = torch.randn(b * s, h, d, device=dev, dtype=dtype)
        cache = torch.randn(b, 2, h, s, d, device=dev, dtype=dtype)
        sets.append((q, LayerKV(CacheLayout.contiguous, cache, KVCacheDType.auto, 1.0)))
    flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
    row = {
        "dtype": str(dtype).removeprefix("torch."),
        "head_size": d,
        "seq_len": s,
        "batch": b,
        "heads": h,
        "causal": causal,
        "flops": flops,
    }
    ours = [lambda q=q, kv=kv: cuda.attend(q, kv, step, spec) for q, kv in sets]
    ms = _time(ours, args.repeats, args.inner)
    row["tiles"] = list(cuda.CONTEXT_TILES[d])
    row["ours_ms"], row["ours_tflops"] = ms, flops / ms / 1e9
    default = cuda.CONTEXT_TILES[d]
    for text in getattr(args, "tiles", []) or []:  # alternative tile shapes (tuning)
        cfg = tuple(int(x) for x in text.split(","))
        if cfg == default:
            continue
        cuda.CONTEXT_TILES[d] = cfg
        try:
            ms_t = _time(ours, args.repeats, args.inner)
            row[f"tiles_{text}_tflops"] = flops / ms_t / 1e9
        except NotImplementedError:  # the tile shape does not fit this head size
            pass
        finally:
            cuda.CONTEXT_TILES[d] = default
    if not args.no_baselines:
        from torch.nn.attention import SDPBackend

        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            calls = []
            for q, kv in sets:
                qq = q.view(b, s, h, d).transpose(1, 2)  # [B, H, S, D], same bytes as ours
                calls.append(_sdpa_call(backend, qq, kv.data[:, 0], kv.data[:, 1], causal))
            try:
                ms_b = _time(calls, args.repeats, args.inner)
                row[f"{label}_ms"], row[f"{label}_tflops"] = ms_b, flops / ms_b / 1e9
                row[f"ratio_vs_{label}"] = row["ours_tflops"] / row[f"{label}_tflops"]
            except RuntimeError as e:  # backend unavailable for this shape/dtype
                row[f"{label}_error"] = str(e).splitlines()[0][:200]
    del sets
    torch.cuda.empty_cache()
    return row


def run(args: argparse.Namespace) -> list[dict]:
    """Benchmark every configuration in ``args``; print a table, write JSON to ``args.out``."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_context needs a CUDA GPU")
    _precompile(args)
    rows = []
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        for d in args.head_sizes:
            for c in args.causal:
                for s in args.seqlens:
                    rows.append(_one(dtype, d, s, c == "causal", args))
                    _print_row(rows[-1], header=len(rows) == 1)
    gpu = torch.cuda.get_device_name()
    payload = {"gpu": gpu, "torch": torch.__version__, "benchmark": "context attention (prefill)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"# {gpu}; JSON written to {args.out}")
    return rows


def _precompile(args) -> None:
    """Compile every kernel variant the run times, in parallel, before any timing."""
    from tp_runtime.backends import compile as kc
    from tp_runtime.backends import cuda

    wanted = []
    for dt in args.dtypes:
        for d in args.head_sizes:
            shapes = [cuda.CONTEXT_TILES[d]] + [tuple(int(x) for x in t.split(",")) for t in args.tiles or []]
            for c in args.causal:
                for w, mt, bn in dict.fromkeys(shapes):
                    v = {
                        "dtype": dt,
                        "head_size": d,
                        "mask": "causal" if c == "causal" else "padding",
                        "bias": "none",
                        "layout": "contiguous",
                        "cache": "auto",
                        "warps": w,
                        "m_tiles": mt,
                        "block_n": bn,
                    }
                    try:
                        kc._resolve("context", v)
                    except NotImplementedError:
                        continue
                    wanted.append(("context", v))
    kc.precompile(wanted)


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'dtype':9} {'D':>4} {'mask':6} {'S':>6} {'B':>3} {'H':>3} | {'ours':>7} {'flash':>7} {'cudnn':>7}"
            f" | {'/flash':>6} {'/cudnn':>6}   (TFLOP/s)"
        )
    f = lambda k: f"{r[k]:7.1f}" if k in r else "    n/a"  # noqa: E731
    g = lambda k: f"{r[k]:6.2f}" if k in r else "   n/a"  # noqa: E731
    print(
        f"{r['dtype']:9} {r['head_size']:>4} {'causal' if r['causal'] else 'full':6} {r['seq_len']:>6} {r['batch']:>3}"
        f" {r['heads']:>3} | {f('ours_tflops')} {f('flash_tflops')} {f('cudnn_tflops')} |"
        f" {g('ratio_vs_flash')} {g('ratio_vs_cudnn')}"
        + "".join(f" {k[6:-7]}:{v:.0f}" for k, v in r.items() if k.startswith("tiles_")),
        flush=True,
    )


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
