"""HuggingFace oracle checks for ``Attention`` / ``BertAttention`` at any TP size.

Every check compares our layer with a tiny HF model (``tests/hf_adapters/``): the attention
output after the dense projection and all-reduce, the cache contents (this rank's KV heads
of HF's ``past_key_values``), and several decode steps; metamorphic checks (mixed step,
packed vs padded, chunked prefill, tp=N vs tp=1) are also anchored to HF outputs.

Each case is ``reference()`` (the HF side: rank independent, deterministic) plus
``check(ref, comm)`` (our side, on one rank of a TP group ``comm``), so the same code runs:
  - in one process: ``tests/unit/test_hf_oracles.py`` (``NoComm``, or ``simulate(tp, ...)``);
  - under mpirun: ``launch/tp_run -n N tests/multirank/workers/hf_worker.py [case ...]``:
    every rank builds the references itself and checks its own output; one line per case
    and rank, ``HF_CASE <name> rank <r> ok|FAIL <why>``, then ``PASS rank <r>`` if all passed.

The cases live in ``hf_cases/`` beside this file, one module per model family or theme
(``decoders``, ``t5``, ``bert``, ``gpt2``, ``tp8``, ``metamorphic``); what they share (where our
layers run, tolerances, comparison helpers, replays, the case registry) is ``hf_cases/common.py``.
This module is the entry point mpirun starts, and what the tests import (``import hf_worker``).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[3]
for _p in (str(_ROOT), str(_ROOT / "tests"), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from hf_cases import common  # noqa: E402
from hf_cases.common import (  # noqa: E402
    BF16,
    CASES,
    F16,
    RTOL,
    assert_close,
    make_cache,
    make_layer,
    reference_of,
    replay_decoder,
    run_case,
)

# What tests/unit/test_hf_oracles.py uses (``import hf_worker as W``). The settings main() sets
# (DEVICE, HEAD_SIZE, FP32_AS) live in hf_cases.common, and are read there.
__all__ = [
    "CASES",
    "RTOL",
    "assert_close",
    "main",
    "make_cache",
    "make_layer",
    "reference_of",
    "replay_decoder",
    "run_case",
]


# ---------------------------------------------------------------------------------------------
# mpirun entry point
# ---------------------------------------------------------------------------------------------
def _precompile_cuda(world) -> None:
    """Every kernel variant the cases can launch at head size 64, compiled once per node before the
    first case (in parallel processes), instead of by every rank on first use inside the cases."""
    import itertools

    from tp_runtime.backends.compile import precompile
    from tp_runtime.backends.cuda import context_tiles

    head_size = common.HEAD_SIZE  # 64: main() sets it before calling this
    caches, layouts = ("auto", "int8", "fp8"), ("contiguous", "paged")
    wanted = []
    for dt in (F16, BF16):
        for cache, layout, rope in itertools.product(caches, (*layouts, "none"), ("none", "gptj", "neox")):
            wanted.append(("prepare", dict(dtype=dt, cache=cache, layout=layout, rope=rope)))
        for mask, bias, cache, layout in itertools.product(
            ("causal", "padding", "bidirectional"), ("none", "alibi", "table"), caches, layouts
        ):
            tiles = context_tiles(head_size, causal=mask == "causal")
            wanted.append(("context", dict(dtype=dt, head_size=head_size, mask=mask, bias=bias, layout=layout,
                                           cache=cache, **tiles)))  # fmt: skip
        for cache, layout, heads in itertools.product(caches, layouts, (1, 2, 4, 8)):
            wanted.append(("decode", dict(dtype=dt, cache=cache, layout=layout, head_size=head_size, heads=heads)))
    precompile(wanted, world.local_comm)


def main(argv: list[str]) -> int:
    import tp_runtime

    torch.set_num_threads(1)  # ranks share few cores
    world = tp_runtime.init()  # TP_RUNTIME_DEVICE=cpu|cuda|auto (default auto)
    common.DEVICE = world.device
    if common.DEVICE.type == "cuda":
        common.HEAD_SIZE, common.FP32_AS = 64, BF16
        _precompile_cuda(world)
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"hf_worker: unknown cases {unknown}; known: {list(CASES)}")
    failed = 0
    for name in names:
        c = CASES[name]
        try:
            run_case(c, reference_of(c), world.tp_comm)
            status = "ok"
        except AssertionError as exc:  # every rank still ran the same collectives: go on
            failed += 1
            status = "FAIL " + " | ".join(str(exc).splitlines())
        print(f"HF_CASE {name} rank {world.rank} {status}", flush=True)
    world.tp_comm.barrier()
    if failed:
        print(f"FAIL rank {world.rank}: {failed} of {len(names)} cases", flush=True)
        return 1
    print(f"PASS rank {world.rank}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        raise
