"""launch/bench_context.py and its row plan (launch/bench_context_plan.py) on the CPU: the rows
(default grid, ``--quick``, ``--features``), the columns each times (``1/cta`` wherever the Hopper
grid is persistent, one paged column per page size), the kernel variants the run compiles, the paged
copy of every row (a cache the CUDA backend accepts, the same K/V), the feature rows' inputs, the
ratios and the printed table, and a failing column reported in its row while the others are timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))  # the launch scripts import cli, benchlib

import bench_context as bc  # noqa: E402
import bench_context_plan as bp  # noqa: E402

from tp_runtime.backends import compile as kc  # noqa: E402
from tp_runtime.backends import cuda_context  # noqa: E402
from tp_runtime.backends import cuda_context_hopper as ch  # noqa: E402
from tp_runtime.backends.cuda_common import cache_geometry  # noqa: E402
from tp_runtime.batch.kv_cache import CacheLayout, LayerKV  # noqa: E402
from tp_runtime.config import KVCacheDType  # noqa: E402

DEFAULTS = bc.parse_args([])
QUICK = bc.parse_args(["--quick"])
HOPPER, AMPERE = (9, 0), (8, 0)


@pytest.fixture
def persistent_causal_d128(monkeypatch):
    """The Hopper launcher's rule: a persistent grid for causal masks at D 128 only."""
    monkeypatch.setattr(ch, "persistent", lambda head_size, causal: head_size == 128 and causal)
    monkeypatch.delenv(ch.ENV, raising=False)


def test_defaults_and_the_quick_preset():
    assert DEFAULTS.head_sizes == [64, 128, 256] and DEFAULTS.paged == [] and DEFAULTS.features == []
    assert QUICK.dtypes == ["float16", "bfloat16"] and QUICK.head_sizes == [64, 128, 256]
    assert QUICK.causal == ["causal", "full"] and QUICK.seqlens == [2048, 4096, 8192, 16384]
    assert QUICK.paged == [16, 64] and bp.features(QUICK) == list(bp.FEATURES)
    assert QUICK.feature_seqlens == [4096] and QUICK.feature_head_sizes == [128]
    assert (QUICK.repeats, QUICK.inner) == (DEFAULTS.repeats, DEFAULTS.inner)
    mine = bc.parse_args(["--quick", "--dtypes", "bfloat16", "--paged", "64", "--repeats", "5"])  # flags win
    assert (
        mine.dtypes == ["bfloat16"] and mine.paged == [64] and mine.repeats == 5 and mine.head_sizes == [64, 128, 256]
    )
    assert bc.parse_args(["--paged", "16", "64"]).paged == [16, 64]
    with pytest.raises(SystemExit):
        bc.parse_args(["--paged", "0"])


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        bc.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "Examples:" in text and "--quick --out" in text and "--features" in text and "--paged 16 64" in text


def test_default_plan_is_the_grid():
    cases = bp.plan(DEFAULTS)
    assert len(cases) == 2 * 3 * 2 * 6 and all(c.feature is None for c in cases)
    assert cases[0] == bp.Case("float16", 64, "causal", 512) and cases[-1] == bp.Case("bfloat16", 256, "full", 16384)


def test_quick_plan_feature_rows_compare_with_grid_rows():
    cases = bp.plan(QUICK)
    grid = [c for c in cases if c.feature is None]
    featured = [c for c in cases if c.feature is not None]
    assert len(grid) == 2 * 3 * 2 * 4  # no plain row added: the grid holds every one the features need
    # per dtype: ALiBi, T5, int8, fp8 under both masks, bidirectional once (against the full mask)
    assert len(featured) == 2 * (4 * 2 + 1)
    assert all(c.seq_len == 4096 and c.head_size == 128 for c in featured)
    assert {c.plain() for c in featured} <= set(grid)
    bidir = [c for c in featured if c.feature == "bidirectional"]
    assert {c.mask for c in bidir} == {"bidirectional"} and {c.plain().mask for c in bidir} == {"full"}
    assert cases.index(featured[0]) == len(grid)  # feature rows last: their plain rows ran before


def test_feature_plan_adds_the_missing_plain_rows():
    args = bc.parse_args(["--head-sizes", "64", "--seqlens", "2048", "--causal", "causal", "--features",
                          "bidirectional", "int8", "int8", "--dtypes", "bfloat16"])  # fmt: skip
    cases = bp.plan(args)
    assert cases == [
        bp.Case("bfloat16", 64, "causal", 2048),
        bp.Case("bfloat16", 128, "full", 4096),  # bidirectional's plain row
        bp.Case("bfloat16", 128, "causal", 4096),  # int8's
        bp.Case("bfloat16", 128, "bidirectional", 4096, "bidirectional"),
        bp.Case("bfloat16", 128, "causal", 4096, "int8"),
    ]


def test_columns():
    plain, alibi = bp.Case("bfloat16", 128, "causal", 4096), bp.Case("bfloat16", 128, "causal", 4096, "alibi")
    cols = bp.columns(plain, [16, 64, 4], hopper=True, persistent=True, baselines=True)
    assert cols == [
        "ours",
        "mma_sync",
        "one_item_per_cta",
        "paged16",
        "paged16_one_item_per_cta",
        "paged64",
        "paged64_one_item_per_cta",
        "paged4",
        "flash",
        "cudnn",
    ]  # fmt: skip  (4-token pages: mma.sync)
    assert bp.columns(plain, [64], hopper=True, persistent=False, baselines=False) == ["ours", "mma_sync", "paged64"]
    assert bp.columns(plain, [64], hopper=False, persistent=True, baselines=True) == [
        "ours",
        "paged64",
        "flash",
        "cudnn",
    ]
    assert bp.columns(alibi, [64], hopper=True, persistent=True, baselines=True) == ["ours", "one_item_per_cta"]
    assert bp.columns(alibi, [64], hopper=False, persistent=False, baselines=True) == ["ours"]
    assert [bp.page_of(c) for c in ("paged16", "paged64_one_item_per_cta")] == [16, 64]


def test_one_item_per_cta_wherever_the_grid_is_persistent(persistent_causal_d128):
    planned = bp.planned_columns(bp.plan(QUICK), QUICK, HOPPER)
    for case, cols in planned:
        hopper = bp.hopper_expected(case, CacheLayout.contiguous, HOPPER)
        assert ("one_item_per_cta" in cols) == (hopper and case.head_size == 128 and case.causal), case
        if case.feature is None:
            assert ("mma_sync" in cols) == hopper and {"flash", "cudnn"} <= set(cols)
            assert all(f"paged{p}" in cols for p in QUICK.paged)
            assert all((f"paged{p}_one_item_per_cta" in cols) == ("one_item_per_cta" in cols) for p in QUICK.paged)
    assert any("one_item_per_cta" in cols for _, cols in planned)
    for case, cols in bp.planned_columns(bp.plan(QUICK), QUICK, AMPERE):  # no Hopper kernel: no mma/1cta column
        assert not any(c == "mma_sync" or c.endswith("one_item_per_cta") for c in cols), case


def test_quick_fits_its_time(persistent_causal_d128):
    """The closing table within ~4 minutes on an H200: the attention it times at 300 TFLOP/s (below
    the slowest column's average: the mma.sync kernel at ~270, paged 16 at ~300, cuDNN at ~550)."""
    cases = bp.plan(QUICK)
    seconds = bp.planned_flop(cases, QUICK, HOPPER) / 300e12
    assert 30 < seconds < 150, seconds
    assert bp.summary(cases, QUICK, HOPPER).startswith(f"# {len(cases)} rows (48 plain, 18 with a feature)")


@pytest.mark.parametrize("capability", [HOPPER, AMPERE])
def test_kernel_variants_resolve(capability, persistent_causal_d128):
    args = bc.parse_args(["--quick", "--paged", "4", "64", "--tiles", "8,1,128", "4,1,32"])
    variants = bp.kernel_variants(bp.plan(args), args, capability)
    for family, v in variants:
        kc._resolve(family, v)  # precompile raises on any unresolvable request
    assert len({(f, tuple(sorted((k, str(x)) for k, x in v.items()))) for f, v in variants}) == len(variants)
    hopper = [v for f, v in variants if f == "context_hopper"]
    assert bool(hopper) == (capability == HOPPER)
    mma = [v for f, v in variants if f == "context"]
    assert {v["cache"] for v in mma} == {"auto", "int8", "fp8"} and {v["layout"] for v in mma} == {
        "contiguous",
        "paged",
    }
    assert any((v["warps"], v["m_tiles"], v["block_n"]) == (8, 1, 128) for v in mma)
    if capability == HOPPER:  # what the capability table serves there compiles for the Hopper kernel
        served = {(v["head_size"], v["mask"], v["bias"]) for v in hopper}
        assert served >= {(64, "causal", "none"), (128, "padding", "none"), (128, "causal", "alibi")}


def test_feature_inputs_match_the_case():
    for f in (None, *bp.FEATURES):
        for mask in ("causal", "full", "bidirectional"):
            case = bp.Case("bfloat16", 64, mask, 32, f)
            spec = bc._spec(case, 4, "cpu")
            assert spec.mask.value == case.kernel_mask and cuda_context.score_bias_kind(spec) == case.bias
            assert (spec.relative_table is not None) == (f == "t5") and (spec.alibi_slopes is not None) == (
                f == "alibi"
            )
            kv = bc._cache(case, 2, 4, torch.bfloat16, "cpu")
            assert kv.cache_dtype is case.cache_dtype and kv.data.shape == (2, 2, 4, 32, 64)
            assert kv.data.dtype == case.cache_dtype.storage_dtype(torch.bfloat16)
    int8 = bc._cache(bp.Case("bfloat16", 64, "causal", 32, "int8"), 2, 4, torch.bfloat16, "cpu")
    assert int8.dequant_scale == 1 / bc.INT8_QUANT_SCALE and int8.data.abs().max() > 64  # the range is used


def test_fallback_reason(monkeypatch):
    monkeypatch.delenv(ch.ENV, raising=False)
    assert "int8" in bp.fallback_reason(bp.Case("float16", 128, "causal", 4096, "int8"), HOPPER)
    assert "compute capability 8.0" in bp.fallback_reason(bp.Case("float16", 128, "causal", 4096), AMPERE)
    monkeypatch.setenv(ch.ENV, "0")
    assert bp.fallback_reason(bp.Case("float16", 128, "causal", 4096), HOPPER) == f"{ch.ENV}=0"


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", DEFAULTS.head_sizes)
def test_every_default_row_builds_a_paged_copy_the_backend_accepts(d, page):
    for s in DEFAULTS.seqlens:  # B = tokens // S as in the bench (1 at S 16k: the round-2 crash); one head
        b = max(1, DEFAULTS.tokens // s)
        cache = torch.randn(b, 2, 1, s, d, dtype=torch.bfloat16)
        kv = LayerKV(CacheLayout.contiguous, cache, KVCacheDType.auto, 1.0)
        paged = bc._paged_copy(kv, page, torch.Generator().manual_seed(s))
        geometry = cache_geometry(paged, 1, d, torch.bfloat16)  # raises on a non-contiguous pool
        assert paged.data.is_contiguous() and geometry.length == page, (s, b)
        table = paged.block_table.long()  # [B, S/P]: sequence i's page j is pool row table[i, j]
        got = paged.data[table.flatten()].view(b, s // page, 2, 1, page, d).permute(0, 2, 3, 1, 4, 5)
        assert torch.equal(got.reshape(b, 2, 1, s, d), cache), (s, b)


def test_a_failing_column_is_reported_in_its_row():
    row: dict = {}

    def fails() -> float:
        raise ValueError("kv.data: the CUDA backend needs a contiguous cache tensor\nmore")

    assert bc._column(row, "paged64", fails) is None
    assert bc._column(row, "ours", lambda: 2.0) == 2.0
    assert row == {"paged64_error": "ValueError: kv.data: the CUDA backend needs a contiguous cache tensor"}


def _row(case: bp.Case, kernel: str, **tflops) -> dict:
    return {**bp.row_head(case, DEFAULTS), "kernel": kernel, **{f"{k}_tflops": v for k, v in tflops.items()}}


def test_ratios_and_the_table(capsys):
    pages = [16, 64]
    case = bp.Case("bfloat16", 128, "causal", 4096)
    plain = _row(case, "hopper", ours=500.0, mma_sync=250.0, one_item_per_cta=400.0, paged16=300.0,
                 paged16_one_item_per_cta=200.0, paged64=450.0, cudnn=625.0)  # fmt: skip
    plain["flash_error"] = "RuntimeError: no kernel"
    bp.ratios(plain, pages, None)
    assert plain["ratio_vs_mma_sync"] == 2.0 and plain["ratio_vs_cudnn"] == 0.8 and "ratio_vs_flash" not in plain
    assert plain["ratio_paged16_vs_contiguous"] == 0.6 and plain["ratio_paged64_vs_contiguous"] == 0.9
    assert plain["ratio_paged16_one_item_per_cta_vs_contiguous"] == 0.5
    assert "ratio_paged64_one_item_per_cta_vs_contiguous" not in plain and "ratio_vs_plain" not in plain
    int8 = _row(bp.Case("bfloat16", 128, "causal", 4096, "int8"), "mma_sync", ours=200.0)
    int8["fallback"] = "kv_cache_dtype=int8 (supported: ['auto'])"
    bp.ratios(int8, pages, plain)
    assert int8["ratio_vs_plain"] == 0.4 and int8["ratio_vs_plain_mma_sync"] == 0.8
    alibi = _row(bp.Case("bfloat16", 128, "causal", 4096, "alibi"), "hopper", ours=475.0)
    bp.ratios(alibi, pages, plain)
    assert alibi["ratio_vs_plain"] == 0.95 and "ratio_vs_plain_mma_sync" not in alibi
    failed = {**bp.row_head(bp.Case("float16", 256, "bidirectional", 4096, "bidirectional"), DEFAULTS),
              "kernel": "-", "row_error": "OutOfMemoryError: CUDA out of memory"}  # fmt: skip
    lines = [bp.header(pages)] + [bp.format_row(r, pages) for r in (plain, int8, alibi, failed)]
    bars = {line.split("(TFLOP/s")[0].count("|") for line in lines}
    assert bars == {1 + (2 + len(pages) - 1)}, lines  # the same column groups on every line
    assert "p16" in lines[0] and "p64:1cta" in lines[0]
    assert " 500 " in lines[1] and " 0.60 " in lines[1] and "[flash failed: RuntimeError: no kernel]" in lines[1]
    assert "int8" in lines[2] and "/plain 0.40 (/plain mma 0.80) [mma_sync: kv_cache_dtype=int8" in lines[2]
    assert "alibi" in lines[3] and "/plain 0.95" in lines[3] and "bidir" in lines[4] and "[row failed" in lines[4]
