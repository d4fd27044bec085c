"""tp_runtime.sharding against the head-split rules of its docstring, checked from their consequences.

Oracles: which heads a rank owns is rebuilt from the rule's words (contiguous equal query
ranges; KV heads split or replicated on consecutive ranks), and the QKV slice is checked by
what attention needs from it: the rank's q/k/v projections equal the full projections'
heads, and each local query head finds its global KV head at its local KV index.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tp_runtime.sharding import even_range, head_layout, qkv_rows, slice_heads

TP_SIZES = (1, 2, 3, 4, 8)
HEADS = range(1, 33)


def violated_rules(H: int, KV: int, tp: int) -> list[dict[str, int]]:
    """The rules that (H, KV, tp) breaks, each as the numbers an error must name."""
    rules = []
    if H % tp:
        rules.append({"num_heads": H, "tp_size": tp})
    if H % KV:
        rules.append({"num_heads": H, "num_kv_heads": KV})
    if (KV >= tp and KV % tp) or (KV < tp and tp % KV):
        rules.append({"num_kv_heads": KV, "tp_size": tp})
    return rules


ALL_COMBOS = [(H, KV, tp) for H, KV, tp in itertools.product(HEADS, HEADS, TP_SIZES) if KV <= H]
VALID = [c for c in ALL_COMBOS if not violated_rules(*c)]
INVALID = [c for c in ALL_COMBOS if violated_rules(*c)]


def test_combination_lists_cover_both_outcomes():
    # Guards the parametrisations below against an empty list (a vacuous pass).
    assert len(VALID) > 100 and len(INVALID) > 100


@pytest.mark.parametrize("H,KV,tp", VALID)
def test_valid_layouts_follow_the_ownership_rule(H, KV, tp):
    layouts = [head_layout(H, KV, tp, r) for r in range(tp)]
    # Query heads: rank r owns the r-th of tp equal contiguous ranges, so every head exactly once.
    for r, lay in enumerate(layouts):
        assert list(lay.q_heads) == list(range(r * H // tp, (r + 1) * H // tp))
        assert lay.num_heads_per_rank == H // tp and lay.num_heads == H and lay.tp_size == tp
    # KV heads: split (KV >= tp) or each replicated on tp/KV consecutive ranks (KV < tp).
    if KV >= tp:
        owned = [list(lay.kv_heads) for lay in layouts]
        assert sorted(itertools.chain(*owned)) == list(range(KV))
        assert all(heads == list(range(r * KV // tp, (r + 1) * KV // tp)) for r, heads in enumerate(owned))
    else:
        replicas = tp // KV
        for r, lay in enumerate(layouts):
            assert list(lay.kv_heads) == [r // replicas]
    # What attention needs: local query head i reads local KV head i // group_size, and that
    # is the KV head its global query head belongs to (query head h uses KV head h // (H/KV)).
    for lay in layouts:
        for i, h in enumerate(lay.q_heads):
            assert lay.kv_heads[i // lay.group_size] == h // (H // KV)


@pytest.mark.parametrize("H,KV,tp", INVALID)
def test_invalid_layouts_raise_naming_the_numbers(H, KV, tp):
    with pytest.raises(ValueError) as info:
        head_layout(H, KV, tp, 0)
    message = str(info.value)
    named = [rule for rule in violated_rules(H, KV, tp) if all(f"{k}={v}" in message for k, v in rule.items())]
    assert named, f"message names none of the broken rules {violated_rules(H, KV, tp)}: {message!r}"


@pytest.mark.parametrize(
    "H,KV,tp",
    [
        pytest.param(12, 6, 4, id="KV>=tp, KV%tp!=0: TRT-LLM's ceil division accepted it"),
        pytest.param(8, 2, 3, id="H%tp!=0"),
        pytest.param(8, 3, 1, id="H%KV!=0"),
        pytest.param(24, 3, 2, id="KV>=tp, KV%tp!=0"),
        pytest.param(16, 2, 6, id="KV<tp, tp%KV!=0"),
    ],
)
def test_known_invalid_examples(H, KV, tp):
    with pytest.raises(ValueError):
        head_layout(H, KV, tp, 0)


@pytest.mark.parametrize(
    "args,fragments",
    [
        ((0, 1, 1, 0), ("num_heads", "got 0")),
        ((8, 0, 1, 0), ("num_kv_heads", "got 0")),
        ((8, 8, -2, 0), ("tp_size", "got -2")),
        ((8, 8, 2, 2), ("tp_rank", "tp_size=2", "got 2")),
        ((8, 8, 2, -1), ("tp_rank", "got -1")),
    ],
)
def test_out_of_range_arguments(args, fragments):
    with pytest.raises(ValueError) as info:
        head_layout(*args)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_even_range():
    for total, tp in itertools.product(range(1, 40), TP_SIZES):
        if total % tp:
            with pytest.raises(ValueError, match=rf"={total}\b.*tp_size={tp}"):
                even_range(total, tp, 0)
            continue
        ranges = [even_range(total, tp, r) for r in range(tp)]
        assert list(itertools.chain(*ranges)) == list(range(total))
        assert len({len(r) for r in ranges}) == 1


QKV_CASES = [(8, 8, 4), (8, 2, 4), (16, 1, 4), (12, 4, 2), (32, 8, 8), (4, 2, 1), (6, 3, 3)]


@pytest.mark.parametrize("H,KV,tp", QKV_CASES)
def test_qkv_rows_select_the_ranks_heads(H, KV, tp):
    D = 3
    for r in range(tp):
        lay = head_layout(H, KV, tp, r)
        # Row numbers of the fused [Q | K | V] weight, built head by head from the layout definition.
        q = [h * D + d for h in lay.q_heads for d in range(D)]
        k = [H * D + h * D + d for h in lay.kv_heads for d in range(D)]
        v = [(H + KV) * D + h * D + d for h in lay.kv_heads for d in range(D)]
        assert qkv_rows(lay, D).tolist() == q + k + v


@pytest.mark.parametrize("H,KV,tp", QKV_CASES)
def test_qkv_rows_give_the_ranks_projections(H, KV, tp):
    D, hidden, T = 4, 10, 5
    g = torch.Generator().manual_seed(H * 100 + KV * 10 + tp)
    weight = torch.randn((H + 2 * KV) * D, hidden, generator=g, dtype=torch.float64)
    bias = torch.randn((H + 2 * KV) * D, generator=g, dtype=torch.float64)
    x = torch.randn(T, hidden, generator=g, dtype=torch.float64)
    full = x @ weight.T + bias
    q_full = full[:, : H * D].reshape(T, H, D)
    k_full = full[:, H * D : (H + KV) * D].reshape(T, KV, D)
    v_full = full[:, (H + KV) * D :].reshape(T, KV, D)
    for r in range(tp):
        lay = head_layout(H, KV, tp, r)
        rows = qkv_rows(lay, D)
        local = x @ weight[rows].T + bias[rows]
        Hr, KVr = lay.num_heads_per_rank, lay.num_kv_heads_per_rank
        q, k, v = local.split([Hr * D, KVr * D, KVr * D], dim=1)
        torch.testing.assert_close(q.reshape(T, Hr, D), q_full[:, lay.q_heads.start : lay.q_heads.stop])
        torch.testing.assert_close(k.reshape(T, KVr, D), k_full[:, lay.kv_heads.start : lay.kv_heads.stop])
        torch.testing.assert_close(v.reshape(T, KVr, D), v_full[:, lay.kv_heads.start : lay.kv_heads.stop])


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("H,tp", [(12, 4), (112, 8), (5, 1), (6, 3)])
def test_slice_heads(H, tp, dim):
    shape = [2, 3]
    shape[dim] = H
    # Value = head index along `dim`, so the slice shows exactly which heads it kept.
    index_shape = [1, 1]
    index_shape[dim] = H
    full = torch.arange(H).reshape(index_shape).expand(shape)
    kept = []
    for r in range(tp):
        lay = head_layout(H, 1, tp, r)
        part = slice_heads(full, lay, dim)
        assert part.shape[dim] == H // tp
        heads = part.movedim(dim, 0).reshape(H // tp, -1)[:, 0].tolist()
        assert heads == list(range(r * H // tp, (r + 1) * H // tp))
        kept += heads
    assert kept == list(range(H))


def test_slice_heads_rejects_a_wrong_head_count():
    lay = head_layout(8, 8, 2, 1)
    with pytest.raises(ValueError, match=r"expected 8 heads along dim 1, got shape \(3, 7\)"):
        slice_heads(torch.zeros(3, 7), lay, dim=1)
