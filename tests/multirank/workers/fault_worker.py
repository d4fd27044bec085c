"""Fault injection: one tensor-parallel attention layer per rank, and one fault chosen by argv[1].

  sigkill        rank 1 kills itself with SIGKILL in the middle of a step; rank 0 waits in the all-reduce
  skip           rank 1 skips a collective and stays alive; rank 0 must time out, not hang
  config         rank 1 builds its layer with another q_scaling
  weights        rank 1 is given weights of the wrong shape
  exhaustion     the paged cache runs out of blocks mid-run: a clear error, other sequences unchanged
  refused CASE   a step every rank must refuse before anything changes (checked: the cache's bytes and
                 bookkeeping), CASE one of: past_one, past_all (ranks given different past lengths),
                 slots_one (different slots), blocks_one (the step's slot holds other blocks on one
                 rank), unwritten_all (a decode step on a slot never written, on every rank),
                 unwritten_one (one rank's slot was freed and reused: it holds nothing there)
  raise_one      rank 1 raises an ordinary exception after init (the job must end at once, under any launcher)
Rank 0 prints ``FAULT_AT <wall clock>`` just before the fault, so the test can bound the time from
the fault to the end of the job apart from start-up (CUDA, NCCL, kernel compilation). If a rank is
still alive 60 s after that, it prints every thread's stack (what it is stuck in).
Prints ``PASS rank r`` when a rank finishes normally (only ``exhaustion`` does).
"""

import faulthandler
import os
import signal
import sys
import time

import torch

import tp_runtime
from tp_runtime.batch.kv_cache import CacheCapacityError, CacheStateError, PagedKVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.consistency import StepMismatch
from tp_runtime.distributed.watchdog import set_collective_timeout
from tp_runtime.layers.attention import Attention

HIDDEN = 768  # 12 heads of 64, 6 KV heads: GQA that splits over 2 and over 3 ranks


def build(world, q_scaling=1.0, wrong_shape=False):
    dtype = torch.float16 if world.device.type == "cuda" else torch.float32
    cfg = AttentionConfig(
        hidden_size=HIDDEN,
        num_heads=12,
        num_kv_heads=6,
        position_embedding="rope_gpt_neox",
        q_scaling=q_scaling,
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(0)
    layer = Attention(cfg, comm=world.tp_comm, device=world.device)
    on = dict(device=world.device, dtype=dtype)
    qkv = torch.randn(cfg.qkv_size + (16 if wrong_shape else 0), HIDDEN, generator=g).to(**on) / 16
    layer.load_weights(
        qkv_weight=qkv,
        dense_weight=torch.randn(HIDDEN, HIDDEN, generator=g).to(**on) / 16,
        qkv_bias=torch.randn(cfg.qkv_size, generator=g).to(**on),
        dense_bias=torch.randn(HIDDEN, generator=g).to(**on),
    )
    return cfg, layer


def paged(layer, num_blocks):
    """A small paged cache for ``layer``: blocks of 4 tokens, 2 sequences of at most 16."""
    return PagedKVCache(
        config=layer.config,
        head_layout=layer.head_layout,
        num_layers=1,
        num_blocks=num_blocks,
        block_size=4,
        max_seqs=2,
        max_blocks_per_seq=4,
        device=layer.device,
    )


def rand(*shape, like, seed=None):
    """Random activations for ``like`` (a layer): its device and dtype, never zeros."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g).to(device=like.device, dtype=like.config.dtype)


REFUSED = {  # case -> (the error every rank raises, a piece of its message)
    "past_one": (StepMismatch, "step.past_lens differs"),
    "past_all": (StepMismatch, "step.past_lens differs"),
    "slots_one": (StepMismatch, "step.slots differs"),
    "blocks_one": (StepMismatch, "step.cache_slots differs"),
    "unwritten_all": (CacheStateError, "past_lens=3, the slot holds 0"),
    "unwritten_one": (StepMismatch, "step.cache_slots differs"),
}


def refused(world, case: str) -> None:
    """Every rank is given a step it must refuse, with the same error, before anything changes."""
    r, dev = world.rank, world.device
    cfg, layer = build(world)
    cache = paged(layer, num_blocks=8)
    prompt = Step(new_lens=[4], slots=[0], device=dev)  # fills slot 0's first block
    cache.reserve(prompt)
    layer(rand(4, HIDDEN, seed=1, like=layer), prompt, cache)
    if case == "blocks_one" and r == 1:  # slot 1 takes the next free block here: slot 0 grows into another
        cache.reserve(Step(new_lens=[2], slots=[1], device=dev))
    if case == "unwritten_one" and r == 1:  # a scheduler bug on one rank: its sequence freed, its slot reused
        cache.free(0)
        cache.reserve(prompt)
    past, slot = 4, 0
    if case == "past_one" and r == 1:
        past = 3
    if case == "past_all":
        past = 4 - r  # every rank differs from every other (each within what its slot holds)
    if case == "slots_one" and r == 1:
        slot = 1
    if case == "unwritten_all":
        past, slot = 3, 1  # never written on any rank
    step = Step(new_lens=[1], past_lens=[past], slots=[slot], device=dev)
    cache.reserve(step)
    before = (cache.data.clone(), cache.written.copy(), cache.allocator.table.clone())
    error, needle = REFUSED[case]
    try:
        layer(rand(1, HIDDEN, seed=2, like=layer), step, cache)
    except error as exc:
        assert needle in str(exc), f"rank {r}: {exc}"
        print(f"rank {r} refused: {type(exc).__name__}: {exc}", flush=True)
    else:
        raise AssertionError(f"rank {r}: the step was not refused")
    after = (cache.data, cache.written, cache.allocator.table)
    assert torch.equal(after[0], before[0]) and (after[1] == before[1]).all(), f"rank {r}: the cache changed"
    assert torch.equal(after[2], before[2]), f"rank {r}: the block table changed"


def main(fault: str, case: str | None = None) -> None:
    world = tp_runtime.init()  # the CPU in CI; NCCL and the CUDA kernels on a GPU machine
    dev = world.device
    set_collective_timeout(5)
    r = world.rank

    def fault_now():
        if r == 0:
            print(f"FAULT_AT {time.time():.3f}", flush=True)
        faulthandler.dump_traceback_later(60, exit=False)

    if fault == "refused":
        fault_now()
        refused(world, case)
    elif fault == "raise_one":
        set_collective_timeout(60)  # the job must end long before any collective deadline
        cfg, layer = build(world)
        fault_now()
        if r == 1:
            raise RuntimeError("an ordinary bug on rank 1")
        world.tp_comm.barrier()  # the others wait for rank 1, which never comes
    elif fault == "config":
        fault_now()
        build(world, q_scaling=2.0 if r == 1 else 1.0)
    elif fault == "weights":
        fault_now()
        build(world, wrong_shape=r == 1)
    elif fault in ("sigkill", "skip"):
        cfg, layer = build(world)
        cache = paged(layer, num_blocks=8)
        step = Step(new_lens=[3], device=dev)
        cache.reserve(step)
        layer(rand(3, HIDDEN, like=layer), step, cache)  # one good step on every rank
        world.tp_comm.barrier()  # both ranks are past start-up (and kernel compilation)
        fault_now()
        if r == 1:
            if fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # alive, but never joins the next all-reduce
        step = Step(new_lens=[1], past_lens=[3], device=dev)
        cache.reserve(step)
        layer(rand(1, HIDDEN, like=layer), step, cache)  # rank 0 waits for rank 1 here
        if dev.type == "cuda":
            torch.cuda.synchronize()  # NCCL is asynchronous: the host waits here (the watchdog fires)
    elif fault == "exhaustion":
        cfg, layer = build(world)
        cache = paged(layer, num_blocks=3)
        x = rand(8, HIDDEN, seed=1, like=layer)
        first = Step(new_lens=[4, 4], slots=[0, 1], device=dev)
        cache.reserve(first)
        layer(x, first, cache)
        before = cache.data.clone()
        table = cache.allocator.table.clone()
        grow = Step(new_lens=[3, 1], past_lens=[4, 4], slots=[0, 1], device=dev)  # needs 2 more blocks, 1 is free
        try:
            cache.reserve(grow)
        except CacheCapacityError as exc:
            assert "exhausted" in str(exc), exc
        else:
            raise AssertionError("reserve should have run out of blocks")
        assert torch.equal(cache.data, before) and torch.equal(cache.allocator.table, table), "cache changed"
        # The scheduler drops sequence 0; sequence 1 decodes on and matches a run that never saw the failure.
        cache.free(0)
        only = Step(new_lens=[1], past_lens=[4], slots=[1], device=dev)
        cache.reserve(only)
        x1 = rand(1, HIDDEN, seed=2, like=layer)
        got = layer(x1, only, cache)
        clean = paged(layer, num_blocks=3)
        solo = Step(new_lens=[4], slots=[1], device=dev)
        clean.reserve(solo)
        layer(x[4:], solo, clean)
        clean.reserve(only)
        torch.testing.assert_close(got, layer(x1, only, clean), rtol=0, atol=0)
    print(f"PASS rank {r}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
