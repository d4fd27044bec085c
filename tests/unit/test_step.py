"""Step: the per-step batch description. Derived tensors against explicit loops; every missing or
invalid field raises ValueError naming it (``Step.<field>``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tp_runtime.batch.kv_cache import KVCache
from tp_runtime.batch.step import Step, padding_to_packed
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention
from tp_runtime.sharding import head_layout


@pytest.mark.parametrize("seed", range(5))
def test_derived_tensors_explicit(seed):
    rnd = random.Random(seed)
    n = rnd.randint(1, 6)
    new = [rnd.randint(1, 7) for _ in range(n)]
    past = [rnd.choice([0, rnd.randint(1, 9)]) for _ in range(n)]
    slots = rnd.sample(range(10), n)
    s = Step(new_lens=new, past_lens=past, slots=slots)
    positions, total, seq, cu = [], [], [], [0]
    for i in range(n):
        for j in range(new[i]):
            positions.append(past[i] + j)
            total.append(past[i] + new[i])
            seq.append(i)
        cu.append(cu[-1] + new[i])
    assert s.positions.tolist() == positions
    assert s.total_len.tolist() == total
    assert s.token_seq.tolist() == seq
    assert s.cu_seqlens.tolist() == cu
    assert s.past.tolist() == past and s.slot.tolist() == slots
    for t in (s.positions, s.total_len, s.token_seq, s.cu_seqlens, s.past, s.slot):
        assert t.dtype == torch.int32
    assert s.num_seqs == n and s.num_tokens == sum(new)
    assert s.total_lens == tuple(p + q for p, q in zip(past, new, strict=True))
    for i in range(n):
        assert s.is_generation(i) == (new[i] == 1 and past[i] > 0)
        assert list(s.token_range(i)) == list(range(cu[i], cu[i + 1]))
    # subset keeps each sequence's own numbers
    pick = sorted(rnd.sample(range(n), max(1, n // 2)))
    sub = s.subset(pick)
    assert sub.new_lens == tuple(new[i] for i in pick)
    assert sub.past_lens == tuple(past[i] for i in pick)
    assert sub.slots == tuple(slots[i] for i in pick)


def test_defaults():
    s = Step(new_lens=[3, 1])
    assert s.past_lens == (0, 0) and s.slots == (0, 1) and s.encoder_lens is None
    assert not s.is_generation(1)  # one token without a past is a (tiny) context


def _ind(b, w, s):
    return torch.zeros(b, w, s, dtype=torch.int32)


INVALID = [
    (dict(new_lens=[]), "Step.new_lens"),
    (dict(new_lens=[2, 0]), "Step.new_lens"),
    (dict(new_lens=[-1]), "Step.new_lens"),
    (dict(new_lens=5), "Step.new_lens"),
    pytest.param(dict(new_lens=[2.5]), "Step.new_lens"),  # truncated to 2 would drop a token
    pytest.param(dict(new_lens=[2], past_lens=[1.5]), "Step.past_lens"),
    pytest.param(dict(new_lens=[2], slots=[0.5]), "Step.slots"),
    (dict(new_lens=[2, 3], past_lens=[1]), "Step.past_lens"),
    (dict(new_lens=[2, 3], past_lens=[1, -1]), "Step.past_lens"),
    (dict(new_lens=[2, 3], slots=[0]), "Step.slots"),
    (dict(new_lens=[2, 3], slots=[1, 1]), "Step.slots"),  # duplicate slots
    (dict(new_lens=[2, 3], slots=[0, -1]), "Step.slots"),
    (dict(new_lens=[2, 3], encoder_lens=[4]), "Step.encoder_lens"),
    (dict(new_lens=[2, 3], encoder_lens=[4, -1]), "Step.encoder_lens"),
    (dict(new_lens=[1, 1], past_lens=[3, 3], beam_width=2), "Step.cache_indirection"),  # beam without indirection
    (dict(new_lens=[1], beam_width=0), "Step.beam_width"),
    (dict(new_lens=[1], beam_width=2.0), "Step.beam_width"),
    (dict(new_lens=[1], cache_indirection=_ind(1, 1, 4)), "Step.cache_indirection"),  # indirection at width 1
    (dict(new_lens=[1, 1], past_lens=[3, 3], beam_width=2, cache_indirection=_ind(1, 3, 8)), "Step.cache_indirection"),
    (
        dict(new_lens=[1, 1], past_lens=[3, 3], beam_width=2, cache_indirection=_ind(1, 2, 8)[0]),
        "Step.cache_indirection",
    ),
    (
        dict(new_lens=[1, 1], past_lens=[3, 3], beam_width=2, cache_indirection=_ind(1, 2, 8).long()),
        "Step.cache_indirection",
    ),
    (dict(new_lens=[1, 1], past_lens=[3, 3], beam_width=2, cache_indirection=_ind(1, 2, 3)), "Step.cache_indirection"),
    (
        dict(new_lens=[1, 1], past_lens=[3, 3], slots=[0, 2], beam_width=2, cache_indirection=_ind(1, 2, 8)),
        "Step.slots",
    ),
]


@pytest.mark.parametrize("kwargs,field", INVALID)
def test_invalid_step_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        Step(**kwargs)
    assert field in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [2, -1])
def test_cache_indirection_values_must_name_a_beam(bad):
    """An entry outside [0, beam_width) would read another batch entry's beam (or out of bounds)."""
    ind = torch.zeros(2, 2, 8, dtype=torch.int32)
    ind[1, 0, 3] = bad
    with pytest.raises(ValueError, match="Step.cache_indirection"):
        Step(new_lens=[1] * 4, past_lens=[5] * 4, beam_width=2, cache_indirection=ind)


def test_encoder_lens_required_for_cross_attention():
    s = Step(new_lens=[2, 1])
    with pytest.raises(ValueError, match="Step.encoder_lens"):
        s.require_encoder_lens("cross attention")
    with pytest.raises(ValueError, match="Step.encoder_lens"):
        s.encoder_step()
    with pytest.raises(ValueError, match="Step.encoder_lens"):
        Step(new_lens=[2, 1], encoder_lens=[3, 0]).encoder_step()  # nothing to project for sequence 1
    enc = Step(new_lens=[2, 1], slots=[4, 2], encoder_lens=[3, 5]).encoder_step()
    assert enc.new_lens == (3, 5) and enc.slots == (4, 2) and enc.past_lens == (0, 0)


def test_layer_cross_attention_without_encoder_lens_names_the_field():
    c = AttentionConfig(hidden_size=16, num_heads=2, cross_attention=True)
    layer = Attention(c, comm=NoComm())
    cache = KVCache(config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=2, max_seq_len=8)
    with pytest.raises(ValueError, match="Step.encoder_lens"):
        layer(torch.randn(3, 16), Step(new_lens=[2, 1]), cache, encoder_output=torch.randn(5, 16))
    with pytest.raises(ValueError, match="encoder_output"):
        layer(torch.randn(3, 16), Step(new_lens=[2, 1], encoder_lens=[2, 2]), cache, encoder_output=torch.randn(5, 16))


def test_layer_step_mismatches_name_the_field():
    c = AttentionConfig(hidden_size=16, num_heads=2)
    layer = Attention(c, comm=NoComm())
    cache = KVCache(config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=2, max_seq_len=8)
    step = Step(new_lens=[2, 1])
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(4, 16), step, cache)  # 4 packed tokens, the step has 3
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(3, 2, 16), step, cache)  # batch 3, the step has 2 sequences
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 3, 16), step, cache, attention_mask=torch.ones(2, 3))  # 3+3 real tokens, not 2+1
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(3, 16), step, cache, attention_mask=torch.ones(2, 3))  # mask with packed input
    with pytest.raises(ValueError, match="kv_cache"):
        layer(torch.randn(3, 16), step, None)
    with pytest.raises(ValueError, match="encoder_output"):
        layer(torch.randn(3, 16), step, cache, encoder_output=torch.randn(3, 16))


def test_layer_position_bias_shape_names_the_field():
    c = AttentionConfig(hidden_size=16, num_heads=2, position_embedding="relative", relative_table=False)
    layer = Attention(c, comm=NoComm())
    cache = KVCache(config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=1, max_seq_len=8)
    step = Step(new_lens=[5])
    with pytest.raises(ValueError, match="position_bias"):
        layer(torch.randn(5, 16), step, cache, position_bias=torch.randn(3, 8, 8))  # 3 heads, the rank has 2
    with pytest.raises(ValueError, match="position_bias"):
        layer(torch.randn(5, 16), step, cache, position_bias=torch.randn(2, 8))


def test_layer_position_bias_too_short_names_the_field():
    c = AttentionConfig(hidden_size=16, num_heads=2, position_embedding="relative", relative_table=False)
    layer = Attention(c, comm=NoComm())
    cache = KVCache(config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="position_bias"):
        layer(torch.randn(5, 16), Step(new_lens=[5]), cache, position_bias=torch.randn(2, 3, 3))  # positions 0..4


@pytest.mark.parametrize("seed", range(4))
def test_padding_to_packed_left_and_right(seed):
    g = torch.Generator().manual_seed(seed)
    b, s = 4, 7
    lens = torch.randint(1, s + 1, (b,), generator=g).tolist()
    left = torch.randint(0, 2, (b,), generator=g).tolist()
    mask = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        start = s - lens[i] if left[i] else 0
        mask[i, start : start + lens[i]] = 1
    idx, got_lens = padding_to_packed(mask)
    want = [i * s + j for i in range(b) for j in range(s) if mask[i, j]]
    assert idx.tolist() == want and list(got_lens) == lens
    with pytest.raises(ValueError, match="attention_mask"):
        padding_to_packed(mask[0])


def test_decode_lengths_load_with_one_copy():
    """A decode step's past, positions and total_len are refreshed from one host buffer filled from
    each sequence's past (how a CUDA graph replays a step); the kernels then read the new lengths."""
    step = Step(new_lens=[1, 1, 1], past_lens=[4, 9, 2], slots=[2, 0, 5])
    buf = torch.empty(3, 3, dtype=torch.int32)  # as ReplayState's staging buffers, unpinned on the CPU
    Step.fill_decode_lengths(buf.numpy(), np.array([7, 1, 3]))
    step.load_decode_lengths(buf)
    assert step.past.tolist() == [7, 1, 3] and step.positions.tolist() == [7, 1, 3]
    assert step.total_len.tolist() == [8, 2, 4] and step.slot.tolist() == [2, 0, 5]
    assert step.cu_seqlens.tolist() == [0, 1, 2, 3] and step.token_seq.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="load_decode_lengths"):
        Step(new_lens=[2, 1], past_lens=[0, 3]).load_decode_lengths(buf)


def test_decode_lengths_advance_by_one():
    """What a replayed graph does at the end of each step: past, positions and total_len all move one
    token on (seq_total, read only by the context kernel, is not in the block)."""
    step = Step(new_lens=[1, 1], past_lens=[4, 9], slots=[1, 0])
    step.advance_decode_lengths()
    step.advance_decode_lengths()
    assert step.past.tolist() == [6, 11] and step.positions.tolist() == [6, 11] and step.total_len.tolist() == [7, 12]
    assert step.slot.tolist() == [1, 0] and step.cu_seqlens.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="advance_decode_lengths"):
        Step(new_lens=[2, 1], past_lens=[0, 3]).advance_decode_lengths()
