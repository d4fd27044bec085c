"""DecodeGraph's checks, which run before anything touches a GPU."""

import pytest
import torch

from tp_runtime.batch.graphs import DecodeGraph, check_graphable
from tp_runtime.config import AttentionConfig

BASE = dict(hidden_size=64, num_heads=4, dtype=torch.float16)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(position_embedding="rope_gpt_neox", rotary_scaling="dynamic", rotary_scaling_factor=2.0), "dynamic"),
        (dict(position_embedding="relative", mask_type="causal"), "relative"),
        (dict(cross_attention=True), "cross attention"),
        (dict(check_finite=True), "check_finite"),
    ],
)
def test_configs_a_graph_cannot_capture(kw, match):
    with pytest.raises(ValueError, match=match):
        check_graphable(AttentionConfig(**BASE, **kw))


def test_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraph(lambda x, s: x, config=AttentionConfig(**BASE), slots=[0], cache=None, device="cpu")
