"""Prefill attention throughput: our CUDA context kernels vs torch SDPA (flash and cuDNN backends).

    PYTHONPATH=. python3 launch/bench_context.py [--quick] [--out launch/results/bench_context.json]
        [--dtypes float16 bfloat16] [--head-sizes 64 128 256] [--seqlens 512 ... 16384]
        [--causal causal full] [--tokens 16384] [--hidden 4096] [--repeats 10] [--inner 5]
        [--paged 16 64] [--features all | alibi t5 bidirectional int8 fp8]
        [--feature-seqlens 4096] [--feature-head-sizes 128] [--no-baselines] [--prepare] [--tiles W,MT,BN ...]

Examples:
    launch/bench_context.py --quick --out $OUT/bench_context.json   # the closing table (~3 min on an H200)
    launch/bench_context.py --dtypes bfloat16 --head-sizes 128 --seqlens 4096 --paged 16 64
    launch/bench_context.py --head-sizes 128 --seqlens 4096 --causal causal --features alibi int8

Same process, same inputs: fp16/bf16, causal and not, ``tokens / S`` sequences of length S,
``hidden / D`` heads. Our kernel reads K/V from a contiguous cache ``[B, 2, H, S, D]``; SDPA reads
the same bytes (``cache[:, 0]`` is ``[B, H, S, D]``). FLOPs: ``4·B·H·S²·D``, halved for causal.
Timing: CUDA events around ``inner`` back-to-back calls after warm-up, median of ``repeats``
measurements, rotating among several input sets.

Columns of a row (each fails alone: ``<column>_error`` in the row, the others still timed):
  ours        our kernel as the launcher picks it (``kernel``: hopper, the sm_90a kernel, where
              ``cuda_context_hopper.serves`` says so, else mma_sync; ``fallback``: why not hopper)
  mma_sync    the ``mma.sync`` kernel on the same call (``TP_RUNTIME_HOPPER_CONTEXT=0``), where
              ours is the Hopper kernel
  one_item_per_cta  (printed ``1/cta``) the Hopper kernel with one CTA per (query tile, head)
              instead of its persistent grid (``ONE_ITEM_PER_CTA``), wherever the grid is persistent
  paged<P>    ours on a paged cache of P-token pages holding the same K/V, its pages in shuffled
              pool order, one column per ``--paged`` size; ``paged<P>_one_item_per_cta`` likewise
              where the grid is persistent (what paging costs apart from the persistent grid's cost)
  flash, cudnn  torch SDPA restricted to that backend
Ratios: ``ratio_vs_{mma_sync,flash,cudnn}`` (ours / that), ``ratio_paged<P>_vs_contiguous``,
``ratio_paged<P>_one_item_per_cta_vs_contiguous`` (against ``one_item_per_cta``).

``--features``: rows with one thing a user turns on, at ``--feature-seqlens`` × ``--feature-head-sizes``
(each dtype, each ``--causal`` mask): ALiBi (``alibi``), T5 relative buckets (``t5``), ChatGLM's
bidirectional mask (``bidirectional``, against the full mask), int8/fp8 caches (``int8``, ``fp8``; on
the ``mma.sync`` fallback where the Hopper kernel does not serve them: ``kernel``/``fallback`` say).
Each compares with the plain row of the same shape in the same run (``ratio_vs_plain``; on the
fallback also ``ratio_vs_plain_mma_sync``, the same kernel without the feature); a plain row the
grid lacks is added. ``--quick``: the closing-table preset (bf16 + fp16, D 64/128/256, causal + full,
S 2k-16k, pages 16 and 64, every feature at S 4k, D 128); flags given beside it win.
Prints a table and, with ``--out``, writes JSON (GPU name, each figure, the ratios). The rows, their
columns and the kernel variants to compile are planned without a GPU (launch/bench_context_plan.py).
``run(args)`` is the entry point for launch/bench_attention.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import bench_context_plan as bp
import cli
import torch
from bench_context_plan import N_SETS, Case
from benchlib import median_ms

from tp_runtime.batch.kv_cache import CacheLayout
from tp_runtime.config import KVCacheDType

T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # T5's defaults
INT8_QUANT_SCALE = 32.0  # cache stores x·32 (randn K/V within ±4 fills the int8 range)
QUICK = {
    "dtypes": ["float16", "bfloat16"],
    "head_sizes": [64, 128, 256],
    "causal": ["causal", "full"],
    "seqlens": [2048, 4096, 8192, 16384],
    "paged": [16, 64],
    "features": ["all"],
    "feature_seqlens": [4096],
    "feature_head_sizes": [128],
}


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (rank 0); default: print only, write nowhere"
    )
    p.add_argument("--quick", action="store_true", help="the closing-table preset (see above); other flags win")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    p.add_argument("--head-sizes", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // S)")
    p.add_argument("--hidden", type=int, default=4096, help="H·D (heads = hidden // D)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--no-baselines", action="store_true", help="no flash/cuDNN columns")
    p.add_argument(
        "--paged", nargs="*", type=int, default=[], metavar="P", help="also time ours on paged caches of P-token pages"
    )
    p.add_argument("--features", nargs="+", default=[], choices=[*bp.FEATURES, "all"], help="feature rows (see above)")
    p.add_argument("--feature-seqlens", nargs="+", type=int, default=[4096])
    p.add_argument("--feature-head-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--prepare", action="store_true", help="also time the fused prepare kernel (bytes/s vs a copy)")
    p.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        metavar="W,MT,BN",
        help="also time these context-kernel tile shapes (warps, m-tiles per warp, keys per tile)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.quick:  # the preset replaces the defaults; flags given on the command line still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    for page in args.paged:
        if page < 1:
            p.error(f"--paged: page sizes must be positive, got {page}")
    return args


# ---- one row on the GPU ------------------------------------------------------------------------
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


@contextlib.contextmanager
def _one_item_per_cta():
    """Within: the Hopper kernel launches one CTA per work item instead of its persistent grid."""
    from tp_runtime.backends import cuda_context_hopper as ch

    old, ch.ONE_ITEM_PER_CTA = ch.ONE_ITEM_PER_CTA, True
    try:
        yield
    finally:
        ch.ONE_ITEM_PER_CTA = old


def _mode(column: str):
    """How ``column`` launches ours: forced onto mma.sync, one CTA per item, or as the launcher picks."""
    if column == "mma_sync":
        return _mma_sync_only()
    if column.endswith("one_item_per_cta"):
        return _one_item_per_cta()
    return contextlib.nullcontext()


def _paged_copy(kv, page: int, gen: torch.Generator):
    """The contiguous cache ``[B, 2, H, S, D]`` as a paged ``LayerKV``: a contiguous pool
    ``[B·S/P, 2, H, P, D]`` with the pages in a random pool order, and the block table that finds them."""
    from tp_runtime.batch.kv_cache import LayerKV

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
    return LayerKV(CacheLayout.paged, pool, kv.cache_dtype, kv.dequant_scale, table)


def _cache(case: Case, b: int, h: int, dtype, dev):
    """A contiguous ``LayerKV [B, 2, H, S, D]`` of random K/V in the row's cache dtype."""
    from tp_runtime.batch.kv_cache import LayerKV
    from tp_runtime.quant import quantize_kv

    x = torch.randn(b, 2, h, case.seq_len, case.head_size, device=dev, dtype=dtype)
    if case.cache_dtype is KVCacheDType.auto:
        return LayerKV(CacheLayout.contiguous, x, KVCacheDType.auto, 1.0)
    quant = INT8_QUANT_SCALE if case.cache_dtype is KVCacheDType.int8 else 1.0
    return LayerKV(CacheLayout.contiguous, quantize_kv(x, quant, case.cache_dtype), case.cache_dtype, 1.0 / quant)


def _spec(case: Case, h: int, dev):
    from tp_runtime.backends.base import AttentionSpec
    from tp_runtime.config import AttentionMaskType
    from tp_runtime.position import alibi_slopes

    mask = AttentionMaskType.padding if case.mask == "full" else AttentionMaskType(case.mask)
    kw: dict = {}
    if case.feature == "alibi":
        kw["alibi_slopes"] = alibi_slopes(h).to(dev)
    elif case.feature == "t5":  # implicit buckets: one-sided under the causal mask, two-sided otherwise
        table = torch.randn(h, T5_BUCKETS, device=dev)
        kw.update(relative_table=table, num_buckets=T5_BUCKETS, max_distance=T5_MAX_DISTANCE)
    return AttentionSpec(mask=mask, softmax_scale=1.0 / math.sqrt(case.head_size), **kw)


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


def _one(case: Case, args, plain: dict | None, dev: torch.device) -> dict:
    from torch.nn.attention import SDPBackend

    from tp_runtime.backends import cuda, cuda_context
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.batch.step import Step

    dtype, d, s = getattr(torch, case.dtype), case.head_size, case.seq_len
    b, h = bp.shape(case, args)
    step = Step(new_lens=[s] * b, device=dev)
    spec = _spec(case, h, dev)
    sets = [(torch.randn(b * s, h, d, device=dev, dtype=dtype), _cache(case, b, h, dtype, dev)) for _ in range(N_SETS)]
    row = bp.row_head(case, args)
    q0, kv0 = sets[0]
    hopper = ch.serves(q0, torch.empty_like(q0), kv0, step, spec, case.kernel_mask, case.bias)
    row["kernel"] = "hopper" if hopper else "mma_sync"
    if not hopper:
        row["fallback"] = bp.fallback_reason(case, torch.cuda.get_device_capability(dev))
    chosen = cuda_context.tile_shape(d, causal=case.causal, max_new_len=s)
    row["tiles"] = [chosen["warps"], chosen["m_tiles"], chosen["block_n"]]  # the mma.sync kernel's
    attend = lambda pairs: [lambda q=q, kv=kv: cuda.attend(q, kv, step, spec) for q, kv in pairs]  # noqa: E731
    timed = lambda calls: median_ms(calls, args.repeats, device=dev, inner=args.inner, warmup=len(calls))  # noqa: E731
    paged: dict[int, list] = {}  # page size -> calls on paged copies of the sets (built once per row)

    def calls_of(column: str) -> list:
        if column in ("flash", "cudnn"):
            backend = SDPBackend.FLASH_ATTENTION if column == "flash" else SDPBackend.CUDNN_ATTENTION
            # q as [B, H, S, D] and K/V as cache[:, 0] / cache[:, 1]: the same bytes as ours reads
            return [
                _sdpa_call(backend, q.view(b, s, h, d).transpose(1, 2), kv.data[:, 0], kv.data[:, 1], case.causal)
                for q, kv in sets
            ]
        if not column.startswith("paged"):
            return attend(sets)
        page = bp.page_of(column)
        if page not in paged:
            gen = torch.Generator().manual_seed(s)
            paged[page] = attend([(q, _paged_copy(kv, page, gen)) for q, kv in sets])
        return paged[page]

    def measure(column: str) -> float:
        calls = calls_of(column)
        with _mode(column):
            return timed(calls)

    cols = bp.columns(case, args.paged, hopper=hopper, persistent=hopper and bp.persistent_grid(case),
                   baselines=not args.no_baselines)  # fmt: skip
    for column in cols:
        ms = _column(row, column, lambda column=column: measure(column))
        if ms is not None:
            row[f"{column}_ms"], row[f"{column}_tflops"] = ms, row["flops"] / ms / 1e9
    if case.feature is None:
        _tile_sweep(row, case, args, attend(sets), timed)
    bp.ratios(row, args.paged, plain)
    return row


def _tile_sweep(row: dict, case: Case, args, ours: list, timed) -> None:
    """The mma.sync kernel at the ``--tiles`` shapes (tuning): ``tiles_<W,MT,BN>_tflops``."""
    from tp_runtime.backends import cuda_context

    d = case.head_size
    default, wide = cuda_context.TILES[d], cuda_context.TILES_WIDE.pop(d, None)
    try:
        for text in args.tiles or []:
            cfg = tuple(int(x) for x in text.split(","))
            if list(cfg) == row["tiles"]:
                continue
            cuda_context.TILES[d] = cfg
            try:
                with _mma_sync_only():  # tile shapes are the mma.sync kernel's
                    ms_t = timed(ours)
                row[f"tiles_{text}_tflops"] = row["flops"] / ms_t / 1e9
            except NotImplementedError:  # the tile shape does not fit this head size
                pass
    finally:
        cuda_context.TILES[d] = default
        if wide is not None:
            cuda_context.TILES_WIDE[d] = wide


# ---- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict]:
    """Benchmark every row of ``plan(args)``; print a table, write JSON to ``args.out`` (if given)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_context needs a CUDA GPU")
    from tp_runtime.backends import compile as kc

    cases = bp.plan(args)
    capability = torch.cuda.get_device_capability()
    print(bp.summary(cases, args, capability), flush=True)
    try:
        kc.precompile(bp.kernel_variants(cases, args, capability))
    except Exception as e:  # noqa: BLE001 - e.g. one variant fails to compile: it fails its own columns later
        print(f"# precompiling failed ({_first_line(e)}); each variant compiles at its first use", flush=True)
    print(bp.header(args.paged), flush=True)
    gpu = torch.cuda.get_device_name()
    rows, done = [], {}
    payload = {"gpu": gpu, "torch": torch.__version__, "benchmark": "context attention (prefill)", "rows": rows}
    for case in cases:
        try:
            row = _one(case, args, done.get(case.plain()), torch.device("cuda"))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory setting up the row: report it, go on
            row = {**bp.row_head(case, args), "kernel": "-", "row_error": _first_line(e)}
        torch.cuda.empty_cache()  # the row's inputs (unreachable once _one returned) go back to the GPU
        done[case] = row
        rows.append(row)
        print(bp.format_row(row, args.paged), flush=True)
        _write(args.out, payload)  # after every row: a run stopped early keeps what it measured
    if getattr(args, "prepare", False):
        payload["prepare"] = bench_prepare(args)
    _write(args.out, payload)
    if args.out is not None:
        print(f"# {gpu}; JSON written to {args.out}")
    return rows


def _write(out: Path | None, payload: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))


def bench_prepare(args) -> dict:
    """The fused prepare kernel (bias, NeoX RoPE, paged fp16 cache write) on ``args.tokens`` tokens,
    H 32, KV 8, D 128: bytes moved (qkv read; q and the cache rows written) per second,
    against a device-to-device copy of the same number of bytes (read + write) in the same run."""
    from tp_runtime.backends import cuda_prepare
    from tp_runtime.batch.kv_cache import LayerKV
    from tp_runtime.batch.step import Step
    from tp_runtime.config import PositionEmbeddingType, RotaryScalingType
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


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
