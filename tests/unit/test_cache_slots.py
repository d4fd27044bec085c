"""The caches' slot life cycle: what each slot holds is tracked on the host, and a step that would
read positions its slot never received is refused before anything changes, on both cache kinds."""

from __future__ import annotations

import pytest
import torch

from tp_runtime import (
    Attention,
    AttentionConfig,
    CacheCapacityError,
    KVCache,
    NoComm,
    PagedKVCache,
    Step,
)
from tp_runtime.batch.kv_cache import CacheStateError
from tp_runtime.sharding import head_layout

HIDDEN = 16


def _layer(**kw):
    cfg = AttentionConfig(hidden_size=HIDDEN, num_heads=2, position_embedding="rope_gpt_neox", **kw)
    g = torch.Generator().manual_seed(3)
    layer = Attention(cfg, comm=NoComm())
    layer.load_weights(
        qkv_weight=torch.randn(cfg.qkv_size, HIDDEN, generator=g) / 4,
        dense_weight=torch.randn(HIDDEN, HIDDEN, generator=g) / 4,
        qkv_bias=torch.randn(cfg.qkv_size, generator=g),
        dense_bias=torch.randn(HIDDEN, generator=g),
    )
    return cfg, layer


def _cache(kind: str, cfg):
    lay = head_layout(2, 2, 1, 0)
    if kind == "contiguous":
        return KVCache(config=cfg, head_layout=lay, num_layers=1, max_batch=4, max_seq_len=32)
    return PagedKVCache(
        config=cfg, head_layout=lay, num_layers=1, num_blocks=16, block_size=4, max_seqs=4, max_blocks_per_seq=8
    )


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _refused(layer, cache, step, x, error, match):
    """The step raises ``error`` before any kernel runs: the cache's bytes and bookkeeping are unchanged."""
    before = (cache.data.clone(), cache.written.copy(), cache.freed.copy())
    with pytest.raises(error, match=match):
        layer(x, step, cache)
    assert torch.equal(cache.data, before[0])
    assert (cache.written == before[1]).all() and (cache.freed == before[2]).all()


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_past_beyond_what_was_written_is_refused(kind):
    cfg, layer = _layer()
    cache = _cache(kind, cfg)
    fresh = Step(new_lens=[1], past_lens=[3], slots=[1])  # a decode step on a slot never written
    cache.reserve(fresh)
    _refused(layer, cache, fresh, _x(1, 0), CacheStateError, r"slot 1: the step says past_lens=3, the slot holds 0")
    prompt = Step(new_lens=[5], slots=[1])
    cache.reserve(prompt)
    layer(_x(5, 1), prompt, cache)
    assert cache.written[1] == 5
    ahead = Step(new_lens=[1], past_lens=[6], slots=[1])  # skips position 5
    cache.reserve(ahead)
    _refused(layer, cache, ahead, _x(1, 2), CacheStateError, "past_lens=6, the slot holds 5")
    ok = Step(new_lens=[1], past_lens=[5], slots=[1])
    cache.reserve(ok)
    layer(_x(1, 3), ok, cache)
    assert cache.written[1] == 6


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_one_slot_life_cycle_on_both_caches(kind):
    """reserve -> steps -> free -> (refused until reserved again) -> reserve: the same calls on both kinds."""
    cfg, layer = _layer()
    cache = _cache(kind, cfg)
    prompt = Step(new_lens=[4, 3], slots=[0, 2])
    cache.reserve(prompt)
    layer(_x(7, 4), prompt, cache)
    cache.free(0)
    assert cache.written[0] == 0 and cache.written[2] == 3
    stale = Step(new_lens=[1], past_lens=[4], slots=[0])  # the freed sequence, continued by mistake
    error = CacheStateError if kind == "contiguous" else CacheCapacityError  # a freed paged slot has no blocks
    _refused(layer, cache, stale, _x(1, 5), error, "slot 0")
    with pytest.raises(CacheStateError, match="past_lens=4, the slot holds 0"):
        cache.reserve(stale)  # growing the slot for it is allowed; its past still is not there
        layer(_x(1, 5), stale, cache)
    reused = Step(new_lens=[6], slots=[0])  # a new sequence in the freed slot
    cache.reserve(reused)
    out = layer(_x(6, 6), reused, cache)
    assert torch.isfinite(out).all() and cache.written[0] == 6 and not cache.freed[0]


def test_freed_contiguous_slot_needs_reserve():
    cfg, layer = _layer()
    cache = _cache("contiguous", cfg)
    cache.free(3)
    step = Step(new_lens=[2], slots=[3])
    _refused(layer, cache, step, _x(2, 7), CacheStateError, r"slot 3 was freed: call reserve\(step\)")
    cache.reserve(step)
    layer(_x(2, 7), step, cache)


def test_cross_attention_reads_only_what_the_encoder_wrote():
    cfg = AttentionConfig(hidden_size=HIDDEN, num_heads=2, cross_attention=True)
    layer = Attention(cfg, comm=NoComm())
    g = torch.Generator().manual_seed(4)
    layer.load_weights(
        qkv_weight=torch.randn(cfg.qkv_size, HIDDEN, generator=g),
        dense_weight=torch.randn(HIDDEN, HIDDEN, generator=g),
        qkv_bias=torch.randn(cfg.qkv_size, generator=g),
        dense_bias=torch.randn(HIDDEN, generator=g),
    )
    lay = head_layout(2, 2, 1, 0)
    paged = PagedKVCache(
        config=cfg, head_layout=lay, num_layers=1, num_blocks=8, block_size=4, max_seqs=2, max_blocks_per_seq=4
    )
    step = Step(new_lens=[2], slots=[0], encoder_lens=[5])
    enc = _x(5, 8)
    with pytest.raises(CacheCapacityError, match=r"cache.reserve\(step.encoder_step\(\)\)"):
        layer(_x(2, 9), step, paged, encoder_output=enc)
    # no encoder_output yet: nothing to read
    _refused(layer, paged, step, _x(2, 9), CacheStateError, "cross attention .* reads 5 positions, the slot holds 0")
    paged.reserve(step.encoder_step())
    layer(_x(2, 9), step, paged, encoder_output=enc)
    later = Step(new_lens=[1], past_lens=[2], slots=[0], encoder_lens=[5])
    assert torch.isfinite(layer(_x(1, 10), later, paged)).all()


def test_set_written_declares_positions_filled_by_other_means():
    cfg, layer = _layer()
    cache = _cache("contiguous", cfg)
    cache.data.normal_()
    step = Step(new_lens=[1, 1], past_lens=[9, 4], slots=[0, 1])
    with pytest.raises(CacheStateError):
        layer(_x(2, 11), step, cache)
    cache.set_written([0, 1], [9, 4])
    layer(_x(2, 11), step, cache)
    assert cache.written[:2].tolist() == [10, 5]


# ---- inputs that would be silently misread -------------------------------------------------------
def _bert():
    from tp_runtime import BertAttention

    cfg = AttentionConfig(hidden_size=HIDDEN, num_heads=2, mask_type="padding")
    layer = BertAttention(cfg, comm=NoComm())
    g = torch.Generator().manual_seed(5)
    layer.load_weights(
        qkv_weight=torch.randn(cfg.qkv_size, HIDDEN, generator=g) / 4,
        dense_weight=torch.randn(HIDDEN, HIDDEN, generator=g) / 4,
        qkv_bias=torch.randn(cfg.qkv_size, generator=g),
        dense_bias=torch.randn(HIDDEN, generator=g),
    )
    return layer


def test_mask_with_a_hole_is_refused():
    cfg, layer = _layer()
    cache = _cache("contiguous", cfg)
    x = torch.randn(2, 4, HIDDEN)
    holed = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"row 0 is \[1, 0, 1, 1\]: its real tokens must be one run"):
        layer(x, Step(new_lens=[3, 2]), cache, attention_mask=holed)
    assert (cache.written == 0).all()
    with pytest.raises(ValueError, match="row 0 is"):
        _bert()(x, attention_mask=holed)


def test_bert_takes_left_and_right_padding_and_empty_rows():
    """Each padded row equals that sequence run alone (packed); a row of padding gives zeros, and so do
    the padding positions."""
    layer = _bert()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, HIDDEN, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
    out = layer(x, attention_mask=mask)
    for row in range(4):
        real = mask[row].bool()
        if real.any():
            alone = layer(x[row][real], [int(real.sum())])
            torch.testing.assert_close(out[row][real], alone)
        assert (out[row][~real] == 0).all()
    with pytest.raises(ValueError, match="input_lengths"):
        layer(x, [3, 4, 1, 2], attention_mask=mask)  # lengths that disagree with the mask
    assert (layer(x, attention_mask=torch.zeros(4, 5, dtype=torch.long)) == 0).all()


def test_bert_takes_numpy_lengths():
    import numpy as np

    layer = _bert()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(layer(x, np.array([2, 3])), layer(x, [2, 3]))
    with pytest.raises(ValueError, match="input_lengths"):
        layer(x, [2.5, 2.5])


def test_embed_refuses_token_ids_outside_the_vocabulary(minilm_dir):
    """An id no rank owns would embed as zeros (vocabulary-parallel rows): refused instead."""
    from tp_runtime import embed, load_model

    model = load_model(minilm_dir, comm=NoComm(), device="cpu")
    with pytest.raises(ValueError, match=r"sentences\[1\]: token ids \[-1\] outside \[0, vocab_size=30522\)"):
        embed(model, [[101, 2023, 102], [101, -1, 102]])
