"""The rows of launch/bench_context.py, planned without a GPU: which rows (the grid, the feature
rows and the plain rows they compare with), which columns each times, which kernel variants the run
compiles, how much attention it runs; the ratios of a timed row and the printed table.

    import bench_context_plan as bp   # the launch folder is on sys.path when a launch script runs

A row is a ``Case``; its columns are names (``ours``, ``mma_sync``, ``one_item_per_cta``,
``paged<P>``, ``paged<P>_one_item_per_cta``, ``flash``, ``cudnn``), each timed into
``<column>_ms`` / ``<column>_tflops`` or failing into ``<column>_error`` (launch/bench_context.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from tp_runtime.backends.capabilities import (
    CAPABILITIES,
    HOPPER_CONTEXT_BIASES,
    HOPPER_CONTEXT_MASKS,
    HOPPER_CONTEXT_MIN_PAGE,
)
from tp_runtime.batch.kv_cache import CacheLayout
from tp_runtime.config import KVCacheDType

N_SETS = 3  # input sets the timing rotates among (each column: N_SETS warm-up calls, then repeats × inner)
FEATURES = ("alibi", "t5", "bidirectional", "int8", "fp8")


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
    """The features of ``--features`` (``all``: every one), each once."""
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


def page_of(column: str) -> int:
    """The page size of a ``paged<P>[_one_item_per_cta]`` column."""
    return int(column.removeprefix("paged").split("_")[0])


def row_head(case: Case, args) -> dict:
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


def ratios(row: dict, pages, plain: dict | None) -> None:
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


def summary(cases, args, capability) -> str:
    n_feat = sum(c.feature is not None for c in cases)
    n_cols = sum(len(cols) for _, cols in planned_columns(cases, args, capability))
    return (
        f"# {len(cases)} rows ({len(cases) - n_feat} plain, {n_feat} with a feature), {n_cols} timed columns,"
        f" {planned_flop(cases, args, capability) / 1e15:.1f} PFLOP of attention"
    )


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
        (f"p{p}:1cta", 8, f"paged{p}_one_item_per_cta_tflops", ".0f"),
        ("/1cta", 5, f"ratio_paged{p}_one_item_per_cta_vs_contiguous", ".2f"),
    ]


def _groups(pages) -> list[list[tuple[str, int, str, str]]]:
    return [_FIXED[:5], _FIXED[5:]] + [_paged_fields(p) for p in pages]


def header(pages) -> str:
    head = f"{'dtype':9} {'D':>4} {'mask':6} {'feat':5} {'S':>6} {'B':>3} {'H':>3} | {'kernel':8}"
    body = " | ".join(" ".join(f"{name:>{w}}" for name, w, _, _ in g) for g in _groups(pages))
    return f"{head} {body}   (TFLOP/s; /x: ours over x; feature rows: /plain)"


def format_row(r: dict, pages) -> str:
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
