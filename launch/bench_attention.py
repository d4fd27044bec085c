"""Attention kernels on one GPU against torch SDPA (flash and cuDNN backends), in one run.

    python launch/bench_attention.py [--part context|decode|all] [-- options of that part]

``context``: TFLOP/s of the fused context (prefill) kernel (``launch/bench_context.py``);
``decode``: KV bytes read per second of the decode kernel, contiguous/paged/int8/fp8, with the
device copy bandwidth of the same run (``launch/bench_decode.py``). Each part prints its table
and, given ``--out`` after ``--``, writes its JSON there (GPU name, each figure, each ratio).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_context  # noqa: E402
import bench_decode  # noqa: E402
import cli  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--part", choices=["context", "decode", "all"], default="all")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_attention times the CUDA kernels and needs a GPU; on the CPU the reference backend is "
            "for correctness, not speed (python -m pytest tests/unit checks it)"
        )
    if args.part in ("context", "all"):
        bench_context.run(bench_context.parse_args(rest if args.part == "context" else []))
    if args.part in ("decode", "all"):
        bench_decode.main(rest if args.part == "decode" else [])


if __name__ == "__main__":
    main()
