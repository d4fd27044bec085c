"""tp_runtime.functional: the seed's helpers against independent oracles.

ALiBi slopes are checked against BLOOM's ``build_alibi_tensor`` (HF transformers); biases,
masks and gathers against explicit Python loops over fresh random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import tp_runtime.functional as F
from tp_runtime import position, sharding
from tp_runtime.functional import expand_mask, gather_last_token_logits, generate_alibi_biases, generate_alibi_slopes


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """All heads' slopes from HF BLOOM: the alibi tensor at key position 1 is the slope itself."""
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # [H, 1, 2]
    assert alibi.shape == (num_heads, 1, 2)
    return alibi[:, 0, 1]


HEADS_TP = [(h, tp) for h in (12, 24, 40, 112) for tp in (1, 2, 4, 8) if h % tp == 0]


# ---- generate_alibi_slopes -------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,tp_size", HEADS_TP)
def test_alibi_slopes_every_rank_match_bloom(num_heads, tp_size):
    full = bloom_slopes(num_heads)
    per_rank = num_heads // tp_size
    got_all = []
    for rank in range(tp_size):
        got = generate_alibi_slopes(num_heads, tp_size=tp_size, tp_rank=rank)
        assert got.shape == (1, per_rank, 1, 1)
        assert got.dtype == torch.float32
        want = full[rank * per_rank : (rank + 1) * per_rank]
        # BLOOM raises an fp32 base to integer powers: a few ulps from the exact value.
        torch.testing.assert_close(got.flatten(), want, rtol=1e-5, atol=0)
        got_all.append(got.flatten())
    # the ranks together cover every head exactly once, in order
    torch.testing.assert_close(torch.cat(got_all), full, rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [0.125, 1 / math.sqrt(7.0), 3.0])
def test_alibi_slopes_scale_multiplies(scale):
    full = bloom_slopes(40).double() * scale
    for rank in range(4):
        got = generate_alibi_slopes(40, 4, rank, alibi_scale=scale)
        torch.testing.assert_close(got.flatten().double(), full[rank * 10 : rank * 10 + 10], rtol=1e-5, atol=0)


def test_alibi_slopes_non_power_of_two_ranks_are_not_trt05():
    """TRT-LLM 0.5 sliced wrongly for 112 heads at tp 8, ranks 5-7: our last rank holds BLOOM's last 14 heads,
    i.e. the interleaved 'extra' slopes 2^(-4(2(h-64)+1)/64), computed here from the closed form."""
    got = generate_alibi_slopes(112, 8, 7).flatten().double()
    h = torch.arange(98, 112, dtype=torch.float64)
    want = torch.pow(2.0, -4.0 * (2 * (h - 64) + 1) / 64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_alibi_slopes_use_position_and_sharding(monkeypatch):
    """The helper computes nothing itself: all-head slopes from position.alibi_slopes, the rank's range
    from sharding.head_layout / slice_heads (so the weights and the slopes can never disagree)."""
    calls = []

    def spy(name, fn):
        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(F, "alibi_slopes", spy("alibi_slopes", position.alibi_slopes))
    monkeypatch.setattr(F, "head_layout", spy("head_layout", sharding.head_layout))
    monkeypatch.setattr(F, "slice_heads", spy("slice_heads", sharding.slice_heads))
    generate_alibi_slopes(24, 4, 3)
    assert sorted(set(calls)) == ["alibi_slopes", "head_layout", "slice_heads"]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(num_heads=12, tp_size=8, tp_rank=0), "num_heads=12 is not divisible by tp_size=8"),
        (dict(num_heads=12, tp_size=4, tp_rank=4), "tp_rank"),
        (dict(num_heads=12, tp_size=4, tp_rank=-1), "tp_rank"),
        (dict(num_heads=0, tp_size=1, tp_rank=0), "num_heads"),
        (dict(num_heads=12, tp_size=0, tp_rank=0), "tp_size"),
        (dict(num_heads=12, alibi_scale=float("nan")), "alibi_scale"),
        (dict(num_heads=12, alibi_scale=float("inf")), "alibi_scale"),
        (dict(num_heads=12, alibi_scale="1"), "alibi_scale"),
    ],
)
def test_alibi_slopes_invalid(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        generate_alibi_slopes(**kwargs)


# ---- generate_alibi_biases -------------------------------------------------------------------


@pytest.mark.parametrize("key_length", [1, 7, 33])
def test_alibi_biases_explicit_loop(key_length):
    g = torch.Generator().manual_seed(key_length)
    slopes = torch.rand(1, 5, 1, 1, generator=g) + 0.1
    got = generate_alibi_biases(slopes, key_length)
    assert got.shape == (1, 5, 1, key_length)
    assert got.dtype == torch.float32
    for h in range(5):
        for k in range(key_length):
            assert got[0, h, 0, k].item() == pytest.approx(slopes[0, h, 0, 0].item() * k, rel=1e-6, abs=0)
    # broadcasts over batch and query
    scores = torch.randn(3, 5, 4, key_length, generator=g)
    assert (scores + got).shape == (3, 5, 4, key_length)


def test_alibi_biases_0d_tensor_length_and_1d_slopes():
    slopes = generate_alibi_slopes(12, 2, 1)
    a = generate_alibi_biases(slopes, torch.tensor(9))
    b = generate_alibi_biases(slopes.flatten(), 9)
    assert torch.equal(a, b)
    # softmax is shift-invariant: slope·k equals slope·(k − q) per query row
    q = 5
    rel = slopes.flatten()[:, None] * (torch.arange(9.0)[None, :] - q)
    s = torch.randn(6, 9)
    torch.testing.assert_close(torch.softmax(s + a[0, :, 0], -1), torch.softmax(s + rel, -1))


@pytest.mark.parametrize(
    "slopes,key_length,needle",
    [
        (torch.ones(1, 4, 2, 1), 3, "slopes"),
        (torch.ones(4, 1, 1, 1), 3, "slopes"),
        (torch.ones(1, 4, 1, 1, dtype=torch.int32), 3, "slopes"),
        (torch.ones(1, 4, 1, 1), -1, "key_length"),
        (torch.ones(1, 4, 1, 1), 2.5, "key_length"),
        (torch.ones(1, 4, 1, 1), torch.tensor([3]), "key_length"),
    ],
)
def test_alibi_biases_invalid(slopes, key_length, needle):
    with pytest.raises(ValueError, match=needle):
        generate_alibi_biases(slopes, key_length)


# ---- expand_mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float32])
@pytest.mark.parametrize("tgt_len", [None, 1, 6])
def test_expand_mask_explicit_loop(dtype, tgt_len):
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 9, generator=g) > 0.4).to(dtype)
    mask[0] = 1  # one row with nothing hidden
    got = expand_mask(mask, tgt_len)
    t = 9 if tgt_len is None else tgt_len
    assert got.shape == (4, 1, t, 9)
    assert got.dtype == torch.float32
    for b in range(4):
        for q in range(t):
            for k in range(9):
                v = got[b, 0, q, k].item()
                if mask[b, k].item() == 0:
                    assert v == float("-inf")
                else:
                    assert v == 0.0
    # a separate tensor, not a view whose rows alias each other
    got[0, 0, 0, 0] = 5.0
    assert t == 1 or got[0, 0, 1, 0].item() == 0.0


def test_expand_mask_nonbinary_values_are_zero():
    mask = torch.tensor([[2, 0, 1, 3]])
    assert expand_mask(mask)[0, 0, 0].tolist() == [0.0, float("-inf"), 0.0, 0.0]


@pytest.mark.parametrize(
    "mask,tgt_len,needle",
    [
        (torch.ones(3), None, "mask"),
        (torch.ones(2, 3, 4), None, "mask"),
        (torch.ones(2, 3), 0, "tgt_len"),
        (torch.ones(2, 3), 1.5, "tgt_len"),
    ],
)
def test_expand_mask_invalid(mask, tgt_len, needle):
    with pytest.raises(ValueError, match=needle):
        expand_mask(mask, tgt_len)


# ---- gather_last_token_logits -----------------------------------------------------------------


@pytest.mark.parametrize("lens", [(1,), (3, 1, 5), (7, 7, 2, 1)])
def test_gather_packed(lens):
    g = torch.Generator().manual_seed(sum(lens))
    hidden = torch.randn(sum(lens), 6, generator=g)
    ids = torch.tensor(lens).cumsum(0).to(torch.int32)  # inclusive prefix sums
    got = gather_last_token_logits(hidden, ids, True)
    assert got.shape == (len(lens), 6)
    start = 0
    for i, n in enumerate(lens):
        assert torch.equal(got[i], hidden[start + n - 1])
        start += n
    # TRT-LLM-era packed input with a leading unit batch dimension
    assert torch.equal(gather_last_token_logits(hidden[None], ids, True), got)


@pytest.mark.parametrize("lens", [(1,), (3, 1, 5), (7, 7, 2, 1)])
def test_gather_padded(lens):
    g = torch.Generator().manual_seed(sum(lens) + 1)
    s = max(lens) + 2
    hidden = torch.randn(len(lens), s, 6, generator=g)
    got = gather_last_token_logits(hidden, torch.tensor(lens), False)
    assert got.shape == (len(lens), 6)
    for i, n in enumerate(lens):
        assert torch.equal(got[i], hidden[i, n - 1])


def test_gather_packed_equals_padded():
    g = torch.Generator().manual_seed(11)
    lens = [4, 1, 6]
    padded = torch.randn(3, 6, 5, generator=g)
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lens)])
    a = gather_last_token_logits(packed, torch.tensor(lens).cumsum(0), True)
    b = gather_last_token_logits(padded, torch.tensor(lens), False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "hidden,ids,packed,needle",
    [
        (torch.randn(6, 4), torch.tensor([2, 2, 6]), True, "strictly increasing"),  # a 0-length sequence
        (torch.randn(6, 4), torch.tensor([0, 6]), True, "last_token_ids"),
        (torch.randn(6, 4), torch.tensor([3, 7]), True, "last_token_ids"),
        (torch.randn(6, 4), torch.tensor([3.0, 6.0]), True, "integer"),
        (torch.randn(6, 4), torch.tensor([[3, 6]]), True, "1-d"),
        (torch.randn(2, 3, 4), torch.tensor([3, 6]), True, "hidden"),
        (torch.randn(2, 3, 4), torch.tensor([3, 0]), False, "last_token_ids"),
        (torch.randn(2, 3, 4), torch.tensor([3, 4]), False, "last_token_ids"),
        (torch.randn(2, 3, 4), torch.tensor([3]), False, "expected 2"),
        (torch.randn(6, 4), torch.tensor([3]), False, "hidden"),
        (torch.randn(6, 4), torch.tensor([3]), 1, "remove_input_padding"),
    ],
)
def test_gather_invalid(hidden, ids, packed, needle):
    with pytest.raises(ValueError, match=needle):
        gather_last_token_logits(hidden, ids, packed)
