"""DecodeGraph under mpirun on GPUs: the captured step (with its NCCL all-reduce) replays equal to
eager steps of the same tensor-parallel layers. Prints ``PASS rank r``."""

import torch

import tp_runtime
from tp_runtime.batch.graphs import DecodeGraph
from tp_runtime.batch.kv_cache import KVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.layers.attention import Attention


def main() -> None:
    world = tp_runtime.init()
    dev, dt = world.device, torch.float16
    cfg = AttentionConfig(hidden_size=1024, num_heads=16, num_kv_heads=4, position_embedding="rope_gpt_neox", dtype=dt)
    g = torch.Generator(device=dev).manual_seed(0)  # the same full weights on every rank
    layer = Attention(cfg, comm=world.tp_comm, device=dev)
    layer.load_weights(
        qkv_weight=torch.randn(cfg.qkv_size, 1024, device=dev, generator=g).to(dt) / 32,
        dense_weight=torch.randn(1024, 1024, device=dev, generator=g).to(dt) / 32,
        qkv_bias=torch.randn(cfg.qkv_size, device=dev, generator=g).to(dt) / 4,
        dense_bias=torch.randn(1024, device=dev, generator=g).to(dt) / 4,
    )
    caches = [
        KVCache(config=cfg, head_layout=layer.head_layout, num_layers=1, max_batch=2, max_seq_len=64, device=dev)
        for _ in range(2)
    ]
    prompts = [9, 30]
    prefill = Step(new_lens=prompts, device=dev)
    x0 = torch.randn(sum(prompts), 1024, device=dev, generator=g).to(dt)
    for c in caches:
        layer(x0, prefill, c)
    graph = DecodeGraph(
        lambda x, s: layer(x, s, caches[0], decode_splits=2), config=cfg, slots=[0, 1], cache=caches[0], device=dev
    )
    past = list(prompts)
    for t in range(12):
        x = torch.randn(2, 1024, device=dev, generator=g).to(dt)
        eager = layer(x, Step(new_lens=[1, 1], past_lens=past, device=dev), caches[1], decode_splits=2)
        replayed = graph(x, past).clone()
        torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3, msg=f"rank {world.rank} step {t}")
        past = [p + 1 for p in past]
    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
