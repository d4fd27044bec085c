"""DecodeGraph on a GPU: replayed decode steps equal eager steps of the same layers, step after step,
over a paged cache that grows block by block while the graph is replayed; replays queued back to
back, with no host synchronization between them, still see each step's own lengths; lengths advanced
on the device and jumps both hold, and the host never waits for the GPU in a replay."""

import numpy as np
import pytest
import torch

from tp_runtime.batch.graphs import DecodeGraph
from tp_runtime.batch.kv_cache import KVCache, PagedKVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layers(cfg: AttentionConfig, n: int, dev: torch.device, g: torch.Generator) -> list[Attention]:
    """``n`` layers with random weights and biases drawn from ``g``."""
    dt, hidden = cfg.dtype, cfg.hidden_size
    layers = []
    for i in range(n):
        layer = Attention(cfg, comm=NoComm(), layer_idx=i, device=dev)
        layer.load_weights(
            qkv_weight=torch.randn(cfg.qkv_size, hidden, device=dev, generator=g).to(dt) / 32,
            dense_weight=torch.randn(hidden, hidden, device=dev, generator=g).to(dt) / 32,
            qkv_bias=torch.randn(cfg.qkv_size, device=dev, generator=g).to(dt) / 4,
            dense_bias=torch.randn(hidden, device=dev, generator=g).to(dt) / 4,
        )
        layers.append(layer)
    return layers


@pytest.mark.parametrize("pe,kv_heads", [("rope_gpt_neox", 2), ("alibi", 8)])
def test_graph_replay_equals_eager(pe, kv_heads):
    dev, dt = torch.device("cuda", torch.cuda.current_device()), torch.float16
    cfg = AttentionConfig(hidden_size=1024, num_heads=8, num_kv_heads=kv_heads, position_embedding=pe, dtype=dt)
    g = torch.Generator(device=dev).manual_seed(0)
    layers = _layers(cfg, 2, dev, g)
    caches = [
        PagedKVCache(config=cfg, head_layout=layers[0].head_layout, num_layers=2, num_blocks=64, block_size=16,
                     max_seqs=4, max_blocks_per_seq=16, device=dev)
        for _ in range(2)
    ]  # fmt: skip
    for c in caches:
        c.data.fill_(float("nan"))  # unused blocks poisoned

    def stack(x, step, cache):
        for layer in layers:
            x = x + layer(x, step, cache, decode_splits=4)
        return x

    slots, prompts = [0, 1, 2], [37, 5, 20]
    x0 = torch.randn(sum(prompts), 1024, device=dev, generator=g).to(dt)
    prefill = Step(new_lens=prompts, slots=slots, device=dev)
    for c in caches:
        c.reserve(prefill)
        stack(x0, prefill, c)
    graph = DecodeGraph(lambda x, s: stack(x, s, caches[0]), config=cfg, slots=slots, cache=caches[0], device=dev)
    past = list(prompts)
    for t in range(20):  # crosses block boundaries: the graph must follow the updated block table
        step = Step(new_lens=[1] * 3, past_lens=past, slots=slots, device=dev)
        for c in caches:
            c.reserve(step)
        x = torch.randn(3, 1024, device=dev, generator=g).to(dt)
        eager = stack(x, step, caches[1])
        replayed = graph(x, past).clone()
        # The same kernels on the same inputs; only a GEMM algorithm chosen differently under capture
        # could move the last bit. A wrong length or block table moves far more.
        torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3, msg=f"decode step {t}")
        past = [p + 1 for p in past]


def test_queued_replays_equal_eager():
    """The lengths travel through one pinned buffer that the graph copies from: the host must not
    refill it before the previous replay has copied it. Replays queued without a host sync (the
    GPU far behind) expose a refill that comes too early: later lengths in earlier steps."""
    dev, dt = torch.device("cuda", torch.cuda.current_device()), torch.float16
    cfg = AttentionConfig(hidden_size=1024, num_heads=8, num_kv_heads=2, position_embedding="rope_gpt_neox", dtype=dt)
    g = torch.Generator(device=dev).manual_seed(1)
    layers = _layers(cfg, 6, dev, g)  # enough GPU work per step that the host runs ahead of it
    batch, steps = 8, 60
    caches = [
        KVCache(
            config=cfg, head_layout=layers[0].head_layout, num_layers=6, max_batch=batch, max_seq_len=160, device=dev
        )
        for _ in range(2)
    ]

    def stack(x, step, cache):
        for layer in layers:
            x = x + layer(x, step, cache, decode_splits=2)
        return x

    prompts = np.array([37, 5, 20, 1, 64, 9, 13, 50])
    x0 = torch.randn(int(prompts.sum()), 1024, device=dev, generator=g).to(dt)
    for c in caches:
        stack(x0, Step(new_lens=prompts.tolist(), device=dev), c)
    graph = DecodeGraph(
        lambda x, s: stack(x, s, caches[0]), config=cfg, slots=range(batch), cache=caches[0], device=dev
    )
    xs = [torch.randn(batch, 1024, device=dev, generator=g).to(dt) for _ in range(steps)]
    replayed = [graph(xs[t], prompts + t).clone() for t in range(steps)]  # nothing here waits for the GPU
    for t in range(steps):
        step = Step(new_lens=[1] * batch, past_lens=(prompts + t).tolist(), device=dev)
        eager = stack(xs[t], step, caches[1])
        torch.testing.assert_close(replayed[t], eager, rtol=1e-3, atol=1e-3, msg=f"queued decode step {t}")


def test_replays_advance_on_the_device_and_never_wait():
    """``past_lens`` None (one further than the last call) and jumps (back, after eager steps) both
    equal eager steps; replays queued behind a sleeping kernel all return before it ends: the replay
    path neither synchronizes nor waits on an event."""
    dev, dt = torch.device("cuda", torch.cuda.current_device()), torch.float16
    cfg = AttentionConfig(hidden_size=512, num_heads=8, num_kv_heads=2, position_embedding="rope_gpt_neox", dtype=dt)
    g = torch.Generator(device=dev).manual_seed(2)
    layers = _layers(cfg, 2, dev, g)
    batch = 5
    caches = [
        KVCache(
            config=cfg, head_layout=layers[0].head_layout, num_layers=2, max_batch=batch, max_seq_len=128, device=dev
        )
        for _ in range(2)
    ]

    def stack(x, step, cache):
        for layer in layers:
            x = x + layer(x, step, cache, decode_splits=2)
        return x

    prompts = np.array([9, 30, 1, 17, 4])
    x0 = torch.randn(int(prompts.sum()), 512, device=dev, generator=g).to(dt)
    for c in caches:
        stack(x0, Step(new_lens=prompts.tolist(), device=dev), c)
    graph = DecodeGraph(
        lambda x, s: stack(x, s, caches[0]), config=cfg, slots=range(batch), cache=caches[0], device=dev
    )
    # steps 1-9 advancing, then a jump back to step 3 (rewrites positions already written), on to 12
    plan = [(t, t == 3 and i == 9) for i, t in enumerate([*range(1, 10), *range(3, 13)])]
    xs = {t: torch.randn(batch, 512, device=dev, generator=g).to(dt) for t in range(13)}
    replayed = {0: graph(xs[0], prompts).clone()}  # the capture (its warm-up may wait for the GPU)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # ~0.25 s of GPU time ahead of every replay
    asleep = torch.cuda.Event()
    asleep.record()
    for t, jump in plan:
        replayed[t] = graph(xs[t], prompts + t if jump else None).clone()
    assert not asleep.query(), "the host waited for the GPU during the replays"
    for t in range(13):
        eager = stack(xs[t], Step(new_lens=[1] * batch, past_lens=(prompts + t).tolist(), device=dev), caches[1])
        torch.testing.assert_close(replayed[t], eager, rtol=1e-3, atol=1e-3, msg=f"decode step {t}")
    assert caches[0].written.tolist() == (prompts + 13).tolist()
