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
Prints a table and, with ``--out``, writes JSON (GPU name, each figure, the ratios).
``run(args)`` is the entry point for launch/bench_attention.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import cli
import torch
from benchlib import median_ms

from tp_runtime.backends.capabilities import (
    CAPABILITIES,
    HOPPER_CONTEXT_BIASES,
    HOPPER_CONTEXT_MASKS,
    HOPPER_CONTEXT_MIN_PAGE,
)
from tp_runtime.batch.kv_cache import CacheLayout
from tp_runtime.config import KVCacheDType

N_SETS = 3  # input sets to rotate among
FEATURES = ("alibi", "t5", "bidirectional", "int8", "fp8")
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
    p.add_argument("--features", nargs="+", default=[], choices=[*FEATURES, "all"], help="feature rows (see above)")
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


# ---- row planning (no GPU) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One row: the plain layer (``feature`` None) or the same layer with one feature turned on."""

    dtype: str  # float16 | bfloat16
    head_size: int
    mask: str  # causal | full | bidirectional (ChatGLM's: full, the last key hidden from earlier queries)
    seq_len: int
    feature: str | None = None  # one of FEATURES

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def kernel_mask(self) -> str:
        """The kernels' name of the mask (``full`` is their ``padding``: every key of the sequence)."""
        return "padding" if self.mask == "full" else self.mask

    @property
    def bias(self) -> str:
        """The kernels' bias parameter (``cuda_context.score_bias_kind`` of the row's spec)."""
        return {"alibi": "alibi", "t5": "table"}.get(self.feature or "", "none")

    @property
    def cache_dtype(self) -> KVCacheDType:
        return KVCacheDType(self.feature) if self.feature in ("int8", "fp8") else KVCacheDType.auto

    def plain(self) -> Case:
        """The row this one compares with: the same shape, no feature (bidirectional: the full mask)."""
        return replace(self, feature=None, mask="full" if self.mask == "bidirectional" else self.mask)


def features(args) -> list[str]:
    return list(FEATURES) if "all" in args.features else list(dict.fromkeys(args.features))


def plan(args) -> list[Case]:
    """Every row in run order: the grid (dtype × D × mask × S), the plain rows the feature rows
    compare with that the grid lacks, then the feature rows."""
    grid = [Case(dt, d, m, s) for dt in args.dtypes for d in args.head_sizes for m in args.causal for s in args.seqlens]
    featured = [
        Case(dt, d, m, s, f)
        for dt in args.dtypes
        for d in args.feature_head_sizes
        for s in args.feature_seqlens
        for f in features(args)
        for m in (["bidirectional"] if f == "bidirectional" else args.causal)
    ]
    have = set(grid)
    bases = [c for c in dict.fromkeys(c.plain() for c in featured) if c not in have]
    return grid + bases + featured


def columns(case: Case, pages, *, hopper: bool, persistent: bool, baselines: bool) -> list[str]:
    """The columns timed in ``case``'s row, given whether ours is the Hopper kernel (``hopper``)
    and whether its grid is persistent. Feature rows time ours (and ``1/cta``) only."""
    one_cta = hopper and persistent
    cols = ["ours"]
    if hopper and case.feature is None:
        cols.append("mma_sync")
    if one_cta:
        cols.append("one_item_per_cta")
    if case.feature is None:
        for p in pages:
            cols.append(f"paged{p}")
            if one_cta and p >= HOPPER_CONTEXT_MIN_PAGE:  # smaller pages stay on mma.sync: no grid to compare
                cols.append(f"paged{p}_one_item_per_cta")
        cols += ["flash", "cudnn"] if baselines else []
    return cols


def shape(case: Case, args) -> tuple[int, int]:
    """(sequences B, heads H) of a row."""
    return max(1, args.tokens // case.seq_len), max(1, args.hidden // case.head_size)


def flops(case: Case, args) -> float:
    b, h = shape(case, args)
    return 4.0 * b * h * case.seq_len**2 * case.head_size / (2 if case.causal else 1)


def hopper_expected(case: Case, layout: CacheLayout, capability) -> bool:
    """Whether the Hopper kernel will serve ``case`` on a GPU of ``capability`` (the capability
    table's answer; at run time ``cuda_context_hopper.serves`` decides, on the real tensors)."""
    from tp_runtime.backends import cuda_context_hopper as ch

    dtype = getattr(torch, case.dtype)
    served = ch.variant(dtype, case.head_size, case.kernel_mask, case.bias, case.cache_dtype, layout) is not None
    return served and ch.hopper_gpu(capability)


def fallback_reason(case: Case, capability) -> str:
    """Why the Hopper kernel does not serve ``case``: the capability table's reason, else the GPU."""
    from tp_runtime.backends import cuda_context_hopper as ch

    if case.kernel_mask not in HOPPER_CONTEXT_MASKS:
        return f"mask {case.kernel_mask} (Hopper kernel: {list(HOPPER_CONTEXT_MASKS)})"
    if case.bias not in HOPPER_CONTEXT_BIASES:
        return f"bias {case.bias} (Hopper kernel: {list(HOPPER_CONTEXT_BIASES)})"
    why = CAPABILITIES["context_hopper"].problem(
        dtype=getattr(torch, case.dtype), head_size=case.head_size, cache_dtype=case.cache_dtype, capability=capability
    )
    if why is not None:
        return why
    if not ch.enabled():
        return f"{ch.ENV}=0"
    return "serves() declined the call (alignment or cache geometry)"


def persistent_grid(case: Case) -> bool:
    """Whether the Hopper kernel runs ``case`` on a persistent grid."""
    from tp_runtime.backends import cuda_context_hopper as ch

    return ch.persistent(case.head_size, case.causal)


def planned_columns(cases, args, capability) -> list[tuple[Case, list[str]]]:
    """Each row with the columns it will time on a GPU of ``capability`` (as the capability table
    says; the run decides per row with ``serves``)."""
    out = []
    for c in cases:
        hopper = hopper_expected(c, CacheLayout.contiguous, capability)
        cols = columns(
            c, args.paged, hopper=hopper, persistent=hopper and persistent_grid(c), baselines=not args.no_baselines
        )
        out.append((c, cols))
    return out


def planned_flop(cases, args, capability) -> float:
    """FLOPs the timed calls of the run execute (warm-up and measurements of every column)."""
    calls = N_SETS + args.repeats * args.inner
    return sum(calls * flops(c, args) * len(cols) for c, cols in planned_columns(cases, args, capability))


def kernel_variants(cases, args, capability) -> list[tuple[str, dict]]:
    """The compile-table variants the run launches on a GPU of ``capability``, each once."""
    from tp_runtime.backends import compile as kc
    from tp_runtime.backends import cuda_context
    from tp_runtime.backends import cuda_context_hopper as ch

    extra = [tuple(int(x) for x in t.split(",")) for t in args.tiles or []]
    wanted: dict[tuple, tuple[str, dict]] = {}

    def want(family: str, v: dict) -> None:
        try:
            kc._resolve(family, v)
        except NotImplementedError:  # outside the family (e.g. a tile shape too large for D): not launched
            return
        wanted.setdefault((family, tuple(sorted((k, str(x)) for k, x in v.items()))), (family, v))

    for c, cols in planned_columns(cases, args, capability):
        dtype = getattr(torch, c.dtype)
        layouts = [CacheLayout.contiguous] + [CacheLayout.paged] * (c.feature is None and bool(args.paged))
        mma = {}  # layout -> the mma.sync kernel's variant at the row's tile shape
        for layout in layouts:
            kind = SimpleNamespace(cache_layout=layout, cache_dtype=c.cache_dtype)
            mma[layout] = cuda_context.variant(dtype, c.head_size, c.kernel_mask, c.bias, kind, c.seq_len)
            hopper = hopper_expected(c, layout, capability)
            if hopper:
                want("context_hopper", ch.variant(dtype, c.head_size, c.kernel_mask, c.bias, c.cache_dtype, layout))
            small = layout is CacheLayout.paged and min(args.paged) < HOPPER_CONTEXT_MIN_PAGE
            if not hopper or "mma_sync" in cols or small:
                want("context", mma[layout])
        for w, mt, bn in extra if c.feature is None else []:  # the tile sweep: contiguous, mma.sync
            want("context", {**mma[CacheLayout.contiguous], "warps": w, "m_tiles": mt, "block_n": bn})
    return list(wanted.values())


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

    ch.ONE_ITEM_PER_CTA = True
    try:
        yield
    finally:
        ch.ONE_ITEM_PER_CTA = False


def _mode(column: str):
    """How ``column`` launches ours: forced onto mma.sync, one CTA per item, or as the launcher picks."""
    if column == "mma_sync":
        return _mma_sync_only()
    if column.endswith("one_item_per_cta"):
        return _one_item_per_cta()
    return contextlib.nullcontext()


def _page(column: str) -> int:
    """The page size of a ``paged<P>[_one_item_per_cta]`` column."""
    return int(column.removeprefix("paged").split("_")[0])


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


def _row_head(case: Case, args) -> dict:
    b, h = shape(case, args)
    return {
        "dtype": case.dtype,
        "head_size": case.head_size,
        "seq_len": case.seq_len,
        "batch": b,
        "heads": h,
        "mask": case.mask,
        "causal": case.causal,
        "feature": case.feature,
        "flops": flops(case, args),
    }


def _one(case: Case, args, plain: dict | None) -> dict:
    from torch.nn.attention import SDPBackend

    from tp_runtime.backends import cuda, cuda_context
    from tp_runtime.backends import cuda_context_hopper as ch
    from tp_runtime.batch.step import Step

    dtype, d, s = getattr(torch, case.dtype), case.head_size, case.seq_len
    b, h = shape(case, args)
    dev = torch.device("cuda")
    step = Step(new_lens=[s] * b, device=dev)
    spec = _spec(case, h, dev)
    sets = [(torch.randn(b * s, h, d, device=dev, dtype=dtype), _cache(case, b, h, dtype, dev)) for _ in range(N_SETS)]
    row = _row_head(case, args)
    q0, kv0 = sets[0]
    hopper = ch.serves(q0, torch.empty_like(q0), kv0, step, spec, case.kernel_mask, case.bias)
    row["kernel"] = "hopper" if hopper else "mma_sync"
    if not hopper:
        row["fallback"] = fallback_reason(case, torch.cuda.get_device_capability())
    chosen = cuda_context.tile_shape(d, causal=case.causal, max_new_len=s)
    row["tiles"] = [chosen["warps"], chosen["m_tiles"], chosen["block_n"]]  # the mma.sync kernel's
    attend = lambda pairs: [lambda q=q, kv=kv: cuda.attend(q, kv, step, spec) for q, kv in pairs]  # noqa: E731
    timed = lambda calls: median_ms(calls, args.repeats, inner=args.inner, warmup=len(calls))  # noqa: E731
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
        page = _page(column)
        if page not in paged:
            gen = torch.Generator().manual_seed(s)
            paged[page] = attend([(q, _paged_copy(kv, page, gen)) for q, kv in sets])
        return paged[page]

    def measure(column: str) -> float:
        calls = calls_of(column)
        with _mode(column):
            return timed(calls)

    cols = columns(case, args.paged, hopper=hopper, persistent=hopper and persistent_grid(case),
                   baselines=not args.no_baselines)  # fmt: skip
    for column in cols:
        ms = _column(row, column, lambda column=column: measure(column))
        if ms is not None:
            row[f"{column}_ms"], row[f"{column}_tflops"] = ms, row["flops"] / ms / 1e9
    if case.feature is None:
        _tile_sweep(row, case, args, attend(sets), timed)
    _ratios(row, args.paged, plain)
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


def _ratios(row: dict, pages, plain: dict | None) -> None:
    """Ours against each column timed in the row (both figures present); a feature row against
    its plain row."""

    def ratio(key: str, num: str, den: str, other: dict = row) -> None:
        if f"{num}_tflops" in row and f"{den}_tflops" in other:
            row[key] = row[f"{num}_tflops"] / other[f"{den}_tflops"]

    for other in ("mma_sync", "flash", "cudnn"):
        ratio(f"ratio_vs_{other}", "ours", other)
    for p in pages:
        ratio(f"ratio_paged{p}_vs_contiguous", f"paged{p}", "ours")
        ratio(f"ratio_paged{p}_one_item_per_cta_vs_contiguous", f"paged{p}_one_item_per_cta", "one_item_per_cta")
    if row.get("feature") and plain is not None:
        ratio("ratio_vs_plain", "ours", "ours", plain)
        if row.get("kernel") == "mma_sync":  # the same kernel without the feature
            ratio("ratio_vs_plain_mma_sync", "ours", "mma_sync", plain)


# ---- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict]:
    """Benchmark every row of ``plan(args)``; print a table, write JSON to ``args.out`` (if given)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_context needs a CUDA GPU")
    from tp_runtime.backends import compile as kc

    cases = plan(args)
    capability = torch.cuda.get_device_capability()
    print(_summary(cases, args, capability), flush=True)
    kc.precompile(kernel_variants(cases, args, capability))
    print(_header(args.paged), flush=True)
    rows, done = [], {}
    for case in cases:
        try:
            row = _one(case, args, done.get(case.plain()))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory setting up the row: report it, go on
            row = {**_row_head(case, args), "kernel": "-", "row_error": _first_line(e)}
        torch.cuda.empty_cache()  # the row's inputs (unreachable once _one returned) go back to the GPU
        done[case] = row
        rows.append(row)
        print(_format_row(row, args.paged), flush=True)
    gpu = torch.cuda.get_device_name()
    payload = {"gpu": gpu, "torch": torch.__version__, "benchmark": "context attention (prefill)", "rows": rows}
    if getattr(args, "prepare", False):
        payload["prepare"] = bench_prepare(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"# {gpu}; JSON written to {args.out}")
    return rows


def _summary(cases, args, capability) -> str:
    n_feat = sum(c.feature is not None for c in cases)
    n_cols = sum(len(cols) for _, cols in planned_columns(cases, args, capability))
    return (
        f"# {len(cases)} rows ({len(cases) - n_feat} plain, {n_feat} with a feature), {n_cols} timed columns,"
        f" {planned_flop(cases, args, capability) / 1e15:.1f} PFLOP of attention"
    )


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


# ---- the table ----------------------------------------------------------------------------------
# (header, width, row key, format): TFLOP/s figures, then ratios; one group per page size
_FIXED = [
    ("ours", 6, "ours_tflops", ".0f"),
    ("mma", 6, "mma_sync_tflops", ".0f"),
    ("1/cta", 6, "one_item_per_cta_tflops", ".0f"),
    ("flash", 6, "flash_tflops", ".0f"),
    ("cudnn", 6, "cudnn_tflops", ".0f"),
    ("/mma", 5, "ratio_vs_mma_sync", ".2f"),
    ("/flash", 6, "ratio_vs_flash", ".2f"),
    ("/cudnn", 6, "ratio_vs_cudnn", ".2f"),
]


def _paged_fields(p: int) -> list[tuple[str, int, str, str]]:
    return [
        (f"p{p}", 6, f"paged{p}_tflops", ".0f"),
        ("/ctg", 5, f"ratio_paged{p}_vs_contiguous", ".2f"),
        (f"p{p}1/cta", 8, f"paged{p}_one_item_per_cta_tflops", ".0f"),
        ("/1cta", 5, f"ratio_paged{p}_one_item_per_cta_vs_contiguous", ".2f"),
    ]


def _groups(pages) -> list[list[tuple[str, int, str, str]]]:
    return [_FIXED[:5], _FIXED[5:]] + [_paged_fields(p) for p in pages]


def _header(pages) -> str:
    head = f"{'dtype':9} {'D':>4} {'mask':6} {'feat':5} {'S':>6} {'B':>3} {'H':>3} | {'kernel':8}"
    body = " | ".join(" ".join(f"{name:>{w}}" for name, w, _, _ in g) for g in _groups(pages))
    return f"{head} {body}   (TFLOP/s; /x: ours over x; feature rows: /plain)"


def _format_row(r: dict, pages) -> str:
    mask = {"bidirectional": "bidir"}.get(r["mask"], r["mask"])
    feature = {"bidirectional": "bidir", None: "-"}.get(r["feature"], r["feature"])
    head = (
        f"{r['dtype']:9} {r['head_size']:>4} {mask:6} {feature:5} {r['seq_len']:>6} {r['batch']:>3} {r['heads']:>3}"
        f" | {r['kernel']:8}"
    )
    cell = lambda key, w, fmt: f"{r[key]:{w}{fmt}}" if key in r else f"{'-':>{w}}"  # noqa: E731
    body = " | ".join(" ".join(cell(key, w, fmt) for _, w, key, fmt in g) for g in _groups(pages))
    tail = ""
    if "ratio_vs_plain" in r:
        tail += f" /plain {r['ratio_vs_plain']:.2f}"
    if "ratio_vs_plain_mma_sync" in r:
        tail += f" (/plain mma {r['ratio_vs_plain_mma_sync']:.2f})"
    if "fallback" in r:
        tail += f" [mma_sync: {r['fallback']}]"
    tail += "".join(f" {k[6:-7]}:{v:.0f}" for k, v in r.items() if k.startswith("tiles_"))
    tail += "".join(f" [{k[:-6]} failed: {v}]" for k, v in r.items() if k.endswith("_error"))
    return f"{head} {body}{tail}"


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
