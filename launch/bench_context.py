"""Prefill attention throughput: our CUDA context kernels vs torch SDPA (flash and cuDNN backends).

    PYTHONPATH=. python3 launch/bench_context.py [--out launch/results/bench_context.json]
        [--dtypes float16 bfloat16] [--head-sizes 64 128] [--seqlens 512 ... 16384]
        [--tokens 16384] [--hidden 4096] [--repeats 10] [--inner 5] [--paged 64]

Same process, same inputs: fp16/bf16, causal and not, ``tokens / S`` sequences of length S,
``hidden / D`` heads. Our kernel reads K/V from a contiguous cache ``[B, 2, H, S, D]``; SDPA reads
the same bytes (``cache[:, 0]`` is ``[B, H, S, D]``). FLOPs: ``4·B·H·S²·D``, halved for causal.
Timing: CUDA events around ``inner`` back-to-back calls after warm-up, median of ``repeats``
measurements, rotating among several input sets. On a Hopper GPU "ours" is the sm_90a kernel
where it serves the case (column ``kernel``: hopper or mma_sync), and the ``mma.sync`` kernel is
timed as well in the same run (``TP_RUNTIME_HOPPER_CONTEXT=0``: columns ``mma_sync_*``), and
where the Hopper kernel runs a persistent grid (D 128) also with one CTA per (query tile, head)
(columns ``one_item_per_cta_*``, printed ``1/cta``). With
``--paged P`` ours is also timed on a paged cache of P-token pages holding the same K/V, its pages
in shuffled pool order (columns ``paged_*``, ``ratio_paged_vs_contiguous``). Prints a
table and writes JSON (GPU name, each figure, the baselines from the same run and the ratios).
``run(args)`` is the entry point for launch/bench_attention.py.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
from pathlib import Path

import cli
import torch
from benchlib import median_ms

N_SETS = 3  # input sets to rotate among


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (rank 0); default: print only, write nowhere"
    )
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
        "--paged", type=int, default=0, metavar="P", help="also time ours on a paged cache of P-token pages (0: no)"
    )
    p.add_argument("--prepare", action="store_true", help="also time the fused prepare kernel (bytes/s vs a copy)")
    p.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        metavar="W,MT,BN",
        help="also time these context-kernel tile shapes (warps, m-tiles per warp, keys per tile)",
    )
    return p.parse_args(argv)


@contextlib.contextmanager
def _mma_sync_only():
    """Within: the context launcher keeps every case on the mma.sync kernel."""
    old = os.environ.get("TP_RUNTIME_HOPPER_CONTEXT")
    os.environ["TP_RUNTIME_HOPPER_CONTEXT"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TP_RUNTIME_HOPPER_CONTEXT"]
        else:
            os.environ["TP_RUNTIME_HOPPER_CONTEXT"] = old


def _hopper_serves(dtype, d, causal) -> bool:
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.batch.kv_cache import CacheLayout
    from tp_runtime.config import KVCacheDType

    mask = "causal" if causal else "padding"
    fits = ch.variant(dtype, d, mask, "none", KVCacheDType.auto, CacheLayout.contiguous) is not None
    return fits and ch.hopper_gpu(torch.cuda.get_device_capability())


def _paged_copy(kv, page: int, gen: torch.Generator):
    """The contiguous cache ``[B, 2, H, S, D]`` as a paged ``LayerKV``: a contiguous pool
    ``[B·S/P, 2, H, P, D]`` with the pages in a random pool order, and the block table that finds them."""
    from tp_runtime.batch.kv_cache import CacheLayout, LayerKV
    from tp_runtime.config import KVCacheDType

    b, _, h, s, d = kv.data.shape
    if s % page:
        raise ValueError(f"--paged: the page size must divide the sequence length {s}, got {page}")
    n = s // page
    pages = kv.data.view(b, 2, h, n, page, d).permute(0, 3, 1, 2, 4, 5).reshape(b * n, 2, h, page, d)
    where = torch.randperm(b * n, generator=gen).to(kv.data.device)  # pool row of page (sequence, i)
    # torch.empty, not empty_like: at B 1 the reshape above is a strided view, whose strides
    # empty_like would keep (a non-contiguous pool, which the CUDA backend refuses).
    pool = torch.empty(pages.shape, dtype=pages.dtype, device=pages.device)
    pool[where] = pages
    table = where.to(torch.int32).view(b, n).contiguous()
    return LayerKV(CacheLayout.paged, pool, KVCacheDType.auto, 1.0, table)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _column(row: dict, name: str, timed) -> float | None:
    """``timed()``'s milliseconds, or None with ``row[name + "_error"]`` set: one failing column
    (an unserved case, a bad input) is reported in its row and the run goes on."""
    try:
        return timed()
    except Exception as e:  # noqa: BLE001 - any failure of one column is reported, not raised
        row[f"{name}_error"] = _first_line(e)
        return None


def _sdpa_call(backend, q, k, v, causal):
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _one(dtype, d, s, causal, args) -> dict:
    from tp_runtime.backends import cuda, cuda_context
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.backends.base import AttentionSpec
    from tp_runtime.batch.kv_cache import CacheLayout, LayerKV
    from tp_runtime.batch.step import Step
    from tp_runtime.config import AttentionMaskType, KVCacheDType

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
    timed = lambda calls: median_ms(calls, args.repeats, inner=args.inner, warmup=len(calls))  # noqa: E731
    hopper = _hopper_serves(dtype, d, causal)
    row["kernel"] = "hopper" if hopper else "mma_sync"
    chosen = cuda_context.tile_shape(d, causal=causal, max_new_len=s)
    row["tiles"] = [chosen["warps"], chosen["m_tiles"], chosen["block_n"]]
    ms = _column(row, "ours", lambda: timed(ours))
    if ms is not None:
        row["ours_ms"], row["ours_tflops"] = ms, flops / ms / 1e9
    if hopper:  # the fallback's figure in the same run
        with _mma_sync_only():
            ms_m = _column(row, "mma_sync", lambda: timed(ours))
        if ms_m is not None:
            row["mma_sync_ms"], row["mma_sync_tflops"] = ms_m, flops / ms_m / 1e9
    if hopper and ch.persistent(d):  # the persistent grid vs one CTA per (tile, head), same run
        ch.ONE_ITEM_PER_CTA = True
        try:
            ms_1 = _column(row, "one_item_per_cta", lambda: timed(ours))
        finally:
            ch.ONE_ITEM_PER_CTA = False
        if ms_1 is not None:
            row["one_item_per_cta_ms"], row["one_item_per_cta_tflops"] = ms_1, flops / ms_1 / 1e9
    if getattr(args, "paged", 0):  # the same K/V in a paged cache: what paging costs
        gen = torch.Generator().manual_seed(s)

        def paged_ms(sets=sets) -> float:
            paged = [(q, _paged_copy(kv, args.paged, gen)) for q, kv in sets]
            return timed([lambda q=q, kv=kv: cuda.attend(q, kv, step, spec) for q, kv in paged])

        ms_p = _column(row, "paged", paged_ms)
        row["paged_page"] = args.paged
        if ms_p is not None:
            row["paged_ms"], row["paged_tflops"] = ms_p, flops / ms_p / 1e9
    default, wide = cuda_context.TILES[d], cuda_context.TILES_WIDE.pop(d, None)
    try:
        for text in getattr(args, "tiles", []) or []:  # alternative tile shapes (tuning)
            cfg = tuple(int(x) for x in text.split(","))
            if list(cfg) == row["tiles"]:
                continue
            cuda_context.TILES[d] = cfg
            try:
                with _mma_sync_only():  # tile shapes are the mma.sync kernel's
                    ms_t = median_ms(ours, args.repeats, inner=args.inner, warmup=len(ours))
                row[f"tiles_{text}_tflops"] = flops / ms_t / 1e9
            except NotImplementedError:  # the tile shape does not fit this head size
                pass
    finally:
        cuda_context.TILES[d] = default
        if wide is not None:
            cuda_context.TILES_WIDE[d] = wide
    if not args.no_baselines:
        from torch.nn.attention import SDPBackend

        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            calls = []
            for q, kv in sets:
                qq = q.view(b, s, h, d).transpose(1, 2)  # [B, H, S, D], same bytes as ours
                calls.append(_sdpa_call(backend, qq, kv.data[:, 0], kv.data[:, 1], causal))
            ms_b = _column(row, label, lambda calls=calls: timed(calls))  # e.g. backend unavailable for the shape
            if ms_b is not None:
                row[f"{label}_ms"], row[f"{label}_tflops"] = ms_b, flops / ms_b / 1e9
    _ratios(row)
    del sets
    torch.cuda.empty_cache()
    return row


def _ratios(row: dict) -> None:
    """Ours against each column timed in the row (both figures present)."""
    for other, key in (("mma_sync", "ratio_vs_mma_sync"), ("flash", "ratio_vs_flash"), ("cudnn", "ratio_vs_cudnn")):
        if "ours_tflops" in row and f"{other}_tflops" in row:
            row[key] = row["ours_tflops"] / row[f"{other}_tflops"]
    if "ours_tflops" in row and "paged_tflops" in row:
        row["ratio_paged_vs_contiguous"] = row["paged_tflops"] / row["ours_tflops"]


def run(args: argparse.Namespace) -> list[dict]:
    """Benchmark every configuration in ``args``; print a table, write JSON to ``args.out`` (if given)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_context needs a CUDA GPU")
    _precompile(args)
    rows = []
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        for d in args.head_sizes:
            for c in args.causal:
                for s in args.seqlens:
                    try:
                        rows.append(_one(dtype, d, s, c == "causal", args))
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory setting up the row: report it, go on
                        b, h = max(1, args.tokens // s), max(1, args.hidden // d)
                        rows.append({"dtype": dt, "head_size": d, "seq_len": s, "batch": b, "heads": h,
                                     "causal": c == "causal", "kernel": "-", "row_error": _first_line(e)})  # fmt: skip
                        torch.cuda.empty_cache()
                    _print_row(rows[-1], header=len(rows) == 1)
    gpu = torch.cuda.get_device_name()
    payload = {"gpu": gpu, "torch": torch.__version__, "benchmark": "context attention (prefill)", "rows": rows}
    if getattr(args, "prepare", False):
        payload["prepare"] = bench_prepare(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"# {gpu}; JSON written to {args.out}")
    return rows


def bench_prepare(args) -> dict:
    """The fused prepare kernel (bias, NeoX RoPE, paged fp16 cache write) on ``args.tokens`` tokens,
    H 32, KV 8, D 128: bytes moved (qkv read; q and the cache rows written) per second,
    against a device-to-device copy of the same number of bytes (read + write) in the same run."""
    from tp_runtime.backends import cuda_prepare
    from tp_runtime.batch.kv_cache import CacheLayout, LayerKV
    from tp_runtime.batch.step import Step
    from tp_runtime.config import KVCacheDType, PositionEmbeddingType, RotaryScalingType
    from tp_runtime.position import RopeSpec
    from tp_runtime.sharding import HeadLayout

    t, h, kvh, d, p = args.tokens, 32, 8, 128, 64
    dev, dt = torch.device("cuda"), torch.float16
    step = Step(new_lens=[t // 4] * 4, device=dev)
    hl = HeadLayout(num_heads=h, num_kv_heads=kvh, tp_size=1, tp_rank=0)
    rope = RopeSpec(PositionEmbeddingType.rope_gpt_neox, d, 10000.0, RotaryScalingType.none, 1.0, 4096)
    blocks = -(-t // 4 // p)
    table = torch.arange(4 * blocks, dtype=torch.int32, device=dev).reshape(4, blocks)
    kv = LayerKV(CacheLayout.paged, torch.empty(4 * blocks, 2, kvh, p, d, dtype=dt, device=dev),
                 KVCacheDType.auto, 1.0, table)  # fmt: skip
    qkvs = [torch.randn(t, (h + 2 * kvh) * d, device=dev, dtype=dt) for _ in range(N_SETS)]
    bias = torch.randn((h + 2 * kvh) * d, device=dev, dtype=dt)
    calls = [
        lambda x=x: cuda_prepare.prepare(x, bias, step, head_layout=hl, head_size=d, rope=rope, kv=kv) for x in qkvs
    ]
    ms = median_ms(calls, args.repeats, inner=args.inner, warmup=len(calls))
    moved = t * (h + 2 * kvh) * d * 2 + t * h * d * 2 + t * 2 * kvh * d * 2  # read qkv, write q, write cache K/V
    src = torch.empty(moved // 4, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    ms_copy = median_ms(lambda: dst.copy_(src), args.repeats, inner=args.inner, warmup=1)  # moves 2·(moved/2) bytes
    row = {"kernel": "prepare", "tokens": t, "heads": h, "kv_heads": kvh, "head_size": d, "bytes": moved,
           "ms": ms, "gb_per_s": moved / ms / 1e6, "copy_gb_per_s": moved / ms_copy / 1e6}  # fmt: skip
    print(f"# prepare: {ms * 1e3:.1f} us, {row['gb_per_s']:.0f} GB/s (device copy {row['copy_gb_per_s']:.0f} GB/s)")
    return row


def _precompile(args) -> None:
    """Compile every kernel variant the run times, in parallel, before any timing."""
    from tp_runtime.backends import compile as kc
    from tp_runtime.backends.cuda_context import tile_shape

    wanted = []
    for dt in args.dtypes:
        for d in args.head_sizes:
            extra = [tuple(int(x) for x in t.split(",")) for t in args.tiles or []]
            for c in args.causal:
                chosen = [tile_shape(d, causal=c == "causal", max_new_len=s) for s in args.seqlens]
                shapes = [(t["warps"], t["m_tiles"], t["block_n"]) for t in chosen] + extra
                layouts = ["contiguous", "paged"] if getattr(args, "paged", 0) else ["contiguous"]
                for (w, mt, bn), layout in itertools.product(dict.fromkeys(shapes), layouts):
                    v = {
                        "dtype": dt,
                        "head_size": d,
                        "mask": "causal" if c == "causal" else "padding",
                        "bias": "none",
                        "layout": layout,
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
                if _hopper_serves(getattr(torch, dt), d, c == "causal"):
                    wanted.append(("context_hopper", {"dtype": dt, "head_size": d, "mask": v["mask"], "bias": "none"}))
    kc.precompile(wanted)


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'dtype':9} {'D':>4} {'mask':6} {'S':>6} {'B':>3} {'H':>3} | {'kernel':8} {'ours':>7} {'mma':>7}"
            f" {'flash':>7} {'cudnn':>7} | {'/mma':>6} {'/flash':>6} {'/cudnn':>6}   (TFLOP/s)"
        )
    f = lambda k: f"{r[k]:7.1f}" if k in r else "    n/a"  # noqa: E731
    g = lambda k: f"{r[k]:6.2f}" if k in r else "   n/a"  # noqa: E731
    print(
        f"{r['dtype']:9} {r['head_size']:>4} {'causal' if r['causal'] else 'full':6} {r['seq_len']:>6} {r['batch']:>3}"
        f" {r['heads']:>3} | {r['kernel']:8} {f('ours_tflops')} {f('mma_sync_tflops')} {f('flash_tflops')}"
        f" {f('cudnn_tflops')} | {g('ratio_vs_mma_sync')} {g('ratio_vs_flash')} {g('ratio_vs_cudnn')}"
        + "".join(f" {k[6:-7]}:{v:.0f}" for k, v in r.items() if k.startswith("tiles_"))
        + (
            f" paged{r['paged_page']}:{r['paged_tflops']:.0f} ({r['ratio_paged_vs_contiguous']:.2f}x)"
            if "ratio_paged_vs_contiguous" in r
            else ""
        )
        + (f" 1/cta:{r['one_item_per_cta_tflops']:.0f}" if "one_item_per_cta_tflops" in r else "")
        + "".join(f" [{k[:-6]} failed: {v}]" for k, v in r.items() if k.endswith("_error")),
        flush=True,
    )


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
