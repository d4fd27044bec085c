"""Metamorphic cases anchored to HF: mixed step, chunked prefill, right and left padding."""

from __future__ import annotations

from collections.abc import Callable

import hf_adapters as hf
import torch

from .common import (
    DECODE_STEPS,
    _step,
    assert_close,
    case,
    check_cache,
    make_cache,
    make_layer,
    pack,
    poison_padding,
    rtol,
    rtol_same,
    sized,
)

# ---- metamorphic checks, each anchored to HF ----------------------------------------------------
METAMORPHIC: dict[str, Callable[[], hf.Oracle]] = {
    "llama_gqa": sized(hf.llama, num_heads=8, num_kv_heads=2),
    "bloom12": sized(hf.bloom, num_heads=12),
    "falcon_mqa": sized(hf.falcon, alibi=False),
}

# (past, new) per sequence; past 0 with new > 1: a context sequence; new 1: generation; else a chunk.
MIXED = [(0, 6), (5, 1), (4, 3), (7, 1), (0, 1)]
MIXED_ORDER = [2, 0, 3, 4, 1]  # order of the sequences inside the mixed step
MIXED_SLOTS = {0: 4, 1: 0, 2: 2, 3: 1, 4: 3}  # cache slot of each sequence


def _mixed_reference(build):
    def reference():
        o = build()
        traces = []
        for j, (past, new) in enumerate(MIXED):
            ids = hf.random_ids(1, past + new, 100 + j)
            traces.append(hf.run_decoder([o], ids, [past, new] if past else [new]))
        return o, traces

    return reference


def _mixed_check(ref, comm):
    """Pasts prefilled in one step, then one step mixing context, generation and a chunk with
    past, in arbitrary order and slots: equals HF per sequence and our separate runs."""
    o, traces = ref
    layer = make_layer(o, comm)
    cache = make_cache(layer, len(MIXED), 16)
    with_past = [j for j, (p, _) in enumerate(MIXED) if p]
    step = _step(new_lens=[MIXED[j][0] for j in with_past], slots=[MIXED_SLOTS[j] for j in with_past])
    y = layer(torch.cat([traces[j].calls[o.name][0].hidden[0] for j in with_past]), step, cache)
    for j, rows in zip(with_past, torch.split(y, step.new_lens), strict=True):
        assert_close(f"{o.name} mixed: prefill of seq {j}", rows, traces[j].calls[o.name][0].out[0], rtol())
    last = lambda j: traces[j].calls[o.name][-1]  # noqa: E731
    step = _step(
        new_lens=[MIXED[j][1] for j in MIXED_ORDER],
        past_lens=[MIXED[j][0] for j in MIXED_ORDER],
        slots=[MIXED_SLOTS[j] for j in MIXED_ORDER],
    )
    y = layer(torch.cat([last(j).hidden[0] for j in MIXED_ORDER]), step, cache)
    mixed = dict(zip(MIXED_ORDER, torch.split(y, step.new_lens), strict=True))
    for j in MIXED_ORDER:
        assert_close(f"{o.name} mixed step: seq {j} {MIXED[j]}", mixed[j], last(j).out[0], rtol())
        rows = [(MIXED_SLOTS[j], 0, torch.arange(sum(MIXED[j])))]
        check_cache(f"{o.name} mixed step: seq {j}", cache, layer, traces[j].caches[o.name][-1], rows, rtol())
    for j, (past, new) in enumerate(MIXED):  # each sequence alone, in its own fresh cache
        alone = make_layer(o, comm)
        c1 = make_cache(alone, 1, 16)
        if past:
            alone(traces[j].calls[o.name][0].hidden[0], _step(new_lens=[past]), c1)
        y1 = alone(last(j).hidden[0], _step(new_lens=[new], past_lens=[past]), c1)
        assert_close(f"{o.name} mixed step equals separate run: seq {j}", mixed[j], y1, rtol_same())


CHUNKS = [[4, 6], [7, 3]]  # per sequence: a 10-token prompt in two chunks of different sizes


def _chunk_reference(build):
    def reference():
        o = build()
        ids = hf.random_ids(2, 10 + DECODE_STEPS, 18)
        return o, hf.run_decoder([o], ids, [10] + [1] * DECODE_STEPS)

    return reference


def _chunk_check(ref, comm):
    """The prompt fed in chunks (different chunk sizes per sequence) equals HF's one-shot
    prefill; decoding then goes on as HF's."""
    o, trace = ref
    calls = trace.calls[o.name]
    layer = make_layer(o, comm)
    cache = make_cache(layer, 2, 10 + DECODE_STEPS)
    past = [0, 0]
    for k in range(2):
        new = [CHUNKS[b][k] for b in range(2)]
        x = torch.cat([calls[0].hidden[b, past[b] : past[b] + new[b]] for b in range(2)])
        y = layer(x, _step(new_lens=new, past_lens=past), cache)
        for b, rows in enumerate(torch.split(y, new)):
            assert_close(
                f"{o.name} chunk {k} of seq {b} (past {past[b]})",
                rows,
                calls[0].out[b, past[b] : past[b] + new[b]],
                rtol(),
            )
        past = [p + n for p, n in zip(past, new, strict=True)]
    rows = [(b, b, torch.arange(10)) for b in range(2)]
    check_cache(f"{o.name} chunked prefill", cache, layer, trace.caches[o.name][0], rows, rtol())
    for i, c in enumerate(calls[1:]):
        y = layer(c.hidden[:, 0], _step(new_lens=[1, 1], past_lens=[10 + i] * 2), cache)
        assert_close(f"{o.name} decode {i} after chunked prefill", y, c.out[:, 0], rtol())


RIGHT_LENS = [7, 3, 5]


def _right_pad_reference(build):
    def reference():
        o = build()
        traces = [
            hf.run_decoder([o], hf.random_ids(1, n + DECODE_STEPS, 200 + b), [n] + [1] * DECODE_STEPS)
            for b, n in enumerate(RIGHT_LENS)
        ]
        return o, traces

    return reference


def _right_pad_check(ref, comm):
    """Right-padded ``[B, S, hidden]`` (padding NaN) with lengths, and packed: both equal HF run
    per sequence, and each other; then decode steps with different past lengths."""
    o, traces = ref
    lens, s = RIGHT_LENS, max(RIGHT_LENS)
    x = torch.full((len(lens), s, o.config.hidden_size), float("nan"))
    for b, n in enumerate(lens):
        x[b, :n] = traces[b].calls[o.name][0].hidden[0]
    results = {}
    for form in ("padded", "packed"):
        layer = make_layer(o, comm)
        cache = make_cache(layer, len(lens), s + DECODE_STEPS)
        step = _step(new_lens=lens)
        y = layer(x, step, cache) if form == "padded" else layer(pack(x, lens), step, cache)
        y = pack(y, lens) if form == "padded" else y
        for b, rows in enumerate(torch.split(y, lens)):
            assert_close(f"{o.name} {form} prefill seq {b}", rows, traces[b].calls[o.name][0].out[0], rtol())
        results[form] = y
        if form == "packed":
            for i in range(DECODE_STEPS):
                xi = torch.cat([traces[b].calls[o.name][1 + i].hidden[0] for b in range(len(lens))])
                yi = layer(xi, _step(new_lens=[1] * len(lens), past_lens=[n + i for n in lens]), cache)
                ref_i = torch.cat([traces[b].calls[o.name][1 + i].out[0] for b in range(len(lens))])
                assert_close(f"{o.name} decode {i} with past lengths {[n + i for n in lens]}", yi, ref_i, rtol())
            for b, n in enumerate(lens):
                rows = [(b, 0, torch.arange(n + DECODE_STEPS))]
                check_cache(f"{o.name} seq {b}", cache, layer, traces[b].caches[o.name][-1], rows, rtol())
    assert_close(f"{o.name} packed equals padded", results["packed"], results["padded"], rtol_same())


LEFT_LENS = [7, 4, 6]


def _left_pad_reference(build):
    def reference():
        o = build()
        s = max(LEFT_LENS)
        ids = hf.random_ids(len(LEFT_LENS), s + DECODE_STEPS, 19)
        mask = torch.ones(len(LEFT_LENS), s + DECODE_STEPS, dtype=torch.long)
        for b, n in enumerate(LEFT_LENS):
            mask[b, : s - n] = 0
        return o, hf.run_decoder([o], ids, [s] + [1] * DECODE_STEPS, mask=mask)

    return reference


def _left_pad_check(ref, comm):
    """HF run on a left-padded batch with attention_mask (positions over real tokens): ours
    takes the padded batch with the same mask (padding NaN), then decodes packed."""
    o, trace = ref
    calls, mask = trace.calls[o.name], trace.mask
    s = max(LEFT_LENS)
    m0 = mask[:, :s].bool()
    layer = make_layer(o, comm)
    cache = make_cache(layer, len(LEFT_LENS), s + DECODE_STEPS)
    y = layer(poison_padding(calls[0].hidden, m0), _step(new_lens=LEFT_LENS), cache, attention_mask=m0.long())
    assert_close(f"{o.name} left-padded prefill (real tokens)", y[m0], calls[0].out[m0], rtol())
    for i, c in enumerate(calls[1:]):
        yi = layer(c.hidden[:, 0], _step(new_lens=[1] * len(LEFT_LENS), past_lens=[n + i for n in LEFT_LENS]), cache)
        assert_close(f"{o.name} decode {i} after left-padded prefill", yi, c.out[:, 0], rtol())
    rows = [(b, b, torch.nonzero(mask[b]).squeeze(1)) for b in range(len(LEFT_LENS))]
    check_cache(f"{o.name} left padding", cache, layer, trace.caches[o.name][-1], rows, rtol())


for _name, _build in METAMORPHIC.items():
    case(f"mixed_{_name}", _mixed_reference(_build))(_mixed_check)
    case(f"chunked_{_name}", _chunk_reference(_build))(_chunk_check)
    case(f"right_pad_{_name}", _right_pad_reference(_build))(_right_pad_check)
for _name in ("llama_gqa", "bloom12"):
    case(f"left_pad_{_name}", _left_pad_reference(METAMORPHIC[_name]))(_left_pad_check)
