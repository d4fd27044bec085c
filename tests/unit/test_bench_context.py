"""launch/bench_context.py on the CPU: the paged copy of every row of the default grid is a cache
the CUDA backend accepts (contiguous pool, int32 table) and names the same K/V, and a failing
column is reported in its row while the others are still timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))  # the launch scripts import cli, benchlib

import bench_context  # noqa: E402

from tp_runtime.backends.cuda_common import cache_geometry  # noqa: E402
from tp_runtime.batch.kv_cache import CacheLayout, LayerKV  # noqa: E402
from tp_runtime.config import KVCacheDType  # noqa: E402

DEFAULTS = bench_context.parse_args([])


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", DEFAULTS.head_sizes)
def test_every_default_row_builds_a_paged_copy_the_backend_accepts(d, page):
    for s in DEFAULTS.seqlens:  # B = tokens // S as in the bench (1 at S 16k: the round-2 crash); one head
        b = max(1, DEFAULTS.tokens // s)
        cache = torch.randn(b, 2, 1, s, d, dtype=torch.bfloat16)
        kv = LayerKV(CacheLayout.contiguous, cache, KVCacheDType.auto, 1.0)
        paged = bench_context._paged_copy(kv, page, torch.Generator().manual_seed(s))
        geometry = cache_geometry(paged, 1, d, torch.bfloat16)  # raises on a non-contiguous pool
        assert paged.data.is_contiguous() and geometry.length == page, (s, b)
        table = paged.block_table.long()  # [B, S/P]: sequence i's page j is pool row table[i, j]
        got = paged.data[table.flatten()].view(b, s // page, 2, 1, page, d).permute(0, 2, 3, 1, 4, 5)
        assert torch.equal(got.reshape(b, 2, 1, s, d), cache), (s, b)


def test_a_failing_column_is_reported_in_its_row():
    row: dict = {}

    def fails() -> float:
        raise ValueError("kv.data: the CUDA backend needs a contiguous cache tensor\nmore")

    assert bench_context._column(row, "paged", fails) is None
    assert bench_context._column(row, "ours", lambda: 2.0) == 2.0
    assert row == {"paged_error": "ValueError: kv.data: the CUDA backend needs a contiguous cache tensor"}
    row.update(ours_tflops=300.0, cudnn_tflops=400.0)
    bench_context._ratios(row)
    assert row["ratio_vs_cudnn"] == 0.75 and "ratio_paged_vs_contiguous" not in row
    bench_context._print_row({**row, "dtype": "bfloat16", "head_size": 128, "seq_len": 16384, "batch": 1,
                              "heads": 32, "causal": True, "kernel": "hopper"}, header=True)  # fmt: skip
