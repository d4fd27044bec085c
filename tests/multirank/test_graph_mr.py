"""CUDA-graph decode steps across GPUs (NCCL inside the graph): only where there are 2 GPUs."""

from pathlib import Path

import pytest
import torch
from mpi_util import assert_passed, run_mpi

from tp_runtime.distributed.world import cuda_unusable_reason

WORKER = Path(__file__).resolve().parent / "workers" / "graph_worker.py"


@pytest.mark.skipif(
    cuda_unusable_reason() is not None or torch.cuda.device_count() < 2, reason="needs 2 GPUs with CuPy"
)
def test_graph_replay_equals_eager_at_tp2():
    assert_passed(run_mpi(2, WORKER, timeout=240), 2)
