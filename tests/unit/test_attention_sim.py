"""Metamorphic checks through the ``Attention`` layer, and simulated tensor parallelism in one process.

- a mixed step (context, generation, chunk-with-past, any order) equals running each sequence alone;
- a prompt fed in chunks equals one-shot prefill (outputs, cache, the decode after it);
- packed input equals padded input (right-padded, and left-padded with ``attention_mask``);
- tp = 2 and 4 (``simulated.simulate``: one thread per rank, a real summing all-reduce) equal tp = 1;
- a hypothesis property: random mixed schedules equal a float64 oracle computed sequence by sequence.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_weights import make_weights
from simulated import simulate
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.t5.modeling_t5 import T5Attention

from tp_runtime.batch.kv_cache import KVCache, PagedKVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention, BertAttention

HIDDEN = 32


def make_config(**kw) -> AttentionConfig:
    return AttentionConfig(**{"hidden_size": HIDDEN, "num_heads": 4, **kw})


def build(c: AttentionConfig, w: dict, comm, *, paged=False, max_seq_len=40, max_batch=4):
    layer = Attention(c, comm=comm)
    layer.load_weights(**w)
    scales = [0.03] if c.kv_cache_dtype.is_quantized else None
    if paged:
        cache = PagedKVCache(
            config=c,
            head_layout=layer.head_layout,
            num_layers=1,
            num_blocks=64,
            block_size=4,
            max_seqs=max_batch,
            max_blocks_per_seq=max_seq_len // 4,
            scales=scales,
        )
    else:
        cache = KVCache(
            config=c,
            head_layout=layer.head_layout,
            num_layers=1,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            scales=scales,
        )
    if not c.kv_cache_dtype.is_quantized:
        cache.data.fill_(float("nan"))
    return layer, cache


def run_step(layer, cache, x, step, **kw):
    if isinstance(cache, PagedKVCache):
        cache.reserve(step)
    return layer(x, step, cache, **kw)


CONFIGS = {
    "mha": dict(),
    "gqa_rope_gptj": dict(num_kv_heads=2, position_embedding="rope_gptj", rotary_pct=0.5),
    "mqa_rope_neox_linear": dict(
        num_kv_heads=1, position_embedding="rope_gpt_neox", rotary_scaling="linear", rotary_scaling_factor=2.0
    ),
    "alibi": dict(position_embedding="alibi"),
    "alibi_with_scale_mqa": dict(num_kv_heads=1, position_embedding="alibi_with_scale"),
    "relative_causal": dict(
        position_embedding="relative", relative_num_buckets=8, relative_max_distance=12, q_scaling=1 / math.sqrt(8)
    ),
    "int8_cache": dict(num_kv_heads=2, position_embedding="rope_gpt_neox", kv_cache_dtype="int8"),
    "fp8_cache": dict(num_kv_heads=2, kv_cache_dtype="fp8"),
}
# dynamic NTK past max_position_embeddings: per-sequence bases, keys keep their write-time rotation, so
# chunking a prompt legitimately changes the result (not in the chunked-prefill test)
MIXED_CONFIGS = {
    **CONFIGS,
    "dynamic_ntk": dict(
        num_kv_heads=2,
        position_embedding="rope_gpt_neox",
        rotary_scaling="dynamic",
        rotary_scaling_factor=2.0,
        max_position_embeddings=4,
    ),
}


# ---- a mixed step equals separate runs ------------------------------------------------------------


ORDERS = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]


@pytest.mark.parametrize("name", list(MIXED_CONFIGS))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("paged", [False, True])
def test_mixed_step_equals_separate_runs(name, order, paged):
    c = make_config(**MIXED_CONFIGS[name])
    w = make_weights(c, seed=len(name))
    g = torch.Generator().manual_seed(sum(order) + len(name))
    (la, ca), (lb, cb) = build(c, w, NoComm(), paged=paged), build(c, w, NoComm(), paged=paged)
    # history: sequence A (slot 3) has 6 tokens, B (slot 0) has 4; C (slot 1) is new
    warm = Step(new_lens=[6, 4], slots=[3, 0])
    xw = torch.randn(10, HIDDEN, generator=g)
    run_step(la, ca, xw, warm)
    run_step(lb, cb, xw, warm)
    seqs = [(1, 6, 3), (3, 4, 0), (5, 0, 1)]  # (new, past, slot): generation, chunk with past, context
    seqs = [seqs[i] for i in order]
    step = Step(new_lens=[s[0] for s in seqs], past_lens=[s[1] for s in seqs], slots=[s[2] for s in seqs])
    assert sorted(step.is_generation(i) for i in range(3)) == [False, False, True]
    x = torch.randn(step.num_tokens, HIDDEN, generator=g)
    mixed = run_step(la, ca, x, step)
    for i in range(3):
        r = step.token_range(i)
        alone = run_step(lb, cb, x[r.start : r.stop], step.subset([i]))
        assert not alone.isnan().any()
        torch.testing.assert_close(mixed[r.start : r.stop], alone, rtol=1e-6, atol=1e-6)


# ---- chunked prefill equals one-shot prefill ------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks", [(4, 1, 5, 3), (1,) * 13, (12, 1)])
def test_chunked_prefill_equals_one_shot(name, chunks):
    c = make_config(**CONFIGS[name])
    w = make_weights(c, seed=7)
    g = torch.Generator().manual_seed(len(chunks))
    prompt = torch.randn(13, HIDDEN, generator=g)
    (la, ca), (lb, cb) = build(c, w, NoComm()), build(c, w, NoComm(), paged=True)
    one = run_step(la, ca, prompt, Step(new_lens=[13], slots=[2]))
    outs, past = [], 0
    for n in chunks:
        outs.append(run_step(lb, cb, prompt[past : past + n], Step(new_lens=[n], past_lens=[past], slots=[1])))
        past += n
    torch.testing.assert_close(torch.cat(outs), one, rtol=1e-5, atol=1e-5)
    nxt = torch.randn(1, HIDDEN, generator=g)
    torch.testing.assert_close(
        run_step(lb, cb, nxt, Step(new_lens=[1], past_lens=[13], slots=[1])),
        run_step(la, ca, nxt, Step(new_lens=[1], past_lens=[13], slots=[2])),
        rtol=1e-5,
        atol=1e-5,
    )


# ---- packed equals padded ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mha", "gqa_rope_gptj", "alibi", "relative_causal"])
@pytest.mark.parametrize("padding", ["right", "right_mask", "left_mask"])
def test_packed_equals_padded(name, padding):
    c = make_config(**CONFIGS[name])
    w = make_weights(c, seed=11)
    g = torch.Generator().manual_seed(12)
    (la, ca), (lb, cb) = build(c, w, NoComm()), build(c, w, NoComm())
    lens, past = [5, 1, 3], [0, 0, 0]
    for _ in range(2):  # a context step, then a mixed step with generation
        step = Step(new_lens=lens, past_lens=past, slots=[2, 0, 1])
        packed = torch.randn(step.num_tokens, HIDDEN, generator=g)
        s = max(lens) + 2
        padded = torch.randn(3, s, HIDDEN, generator=g)  # random garbage in the padding
        mask = torch.zeros(3, s, dtype=torch.long)
        for i in range(3):
            r = step.token_range(i)
            start = s - lens[i] if padding == "left_mask" else 0
            padded[i, start : start + lens[i]] = packed[r.start : r.stop]
            mask[i, start : start + lens[i]] = 1
        want = la(packed, step, ca)
        got = lb(padded, step, cb, attention_mask=None if padding == "right" else mask)
        assert got.shape == (3, s, HIDDEN)
        for i in range(3):
            r = step.token_range(i)
            torch.testing.assert_close(got[i][mask[i].bool()], want[r.start : r.stop], rtol=1e-6, atol=1e-6)
        past = [p + n for p, n in zip(past, lens, strict=True)]
        lens = [1, 4, 1]


def test_bert_packed_equals_padded():
    c = make_config(
        mask_type="padding", position_embedding="relative", relative_num_buckets=8, relative_max_distance=10
    )
    w = make_weights(c, seed=13)
    layer = BertAttention(c, comm=NoComm())
    layer.load_weights(**w)
    g = torch.Generator().manual_seed(14)
    lens = [6, 2, 9]
    packed = torch.randn(sum(lens), HIDDEN, generator=g)
    padded = torch.randn(3, 9, HIDDEN, generator=g)
    start = 0
    for i, n in enumerate(lens):
        padded[i, :n] = packed[start : start + n]
        start += n
    want = layer(packed, lens)
    got = layer(padded, torch.tensor(lens))
    start = 0
    for i, n in enumerate(lens):
        torch.testing.assert_close(got[i, :n], want[start : start + n], rtol=1e-6, atol=1e-6)
        start += n


# ---- simulated tensor parallelism ------------------------------------------------------------------


def script(seed: int, hidden: int, *, cross=False):
    """Steps of a little serving run: prefill two, then a mixed step admitting a third, then decode."""
    g = torch.Generator().manual_seed(seed)
    steps = [
        Step(new_lens=[5, 3], slots=[0, 2]),
        Step(new_lens=[1, 4, 6], past_lens=[5, 3, 0], slots=[0, 2, 1]),
        Step(new_lens=[1, 1, 1], past_lens=[6, 6, 7], slots=[1, 0, 2]),
    ]
    if cross:
        enc_lens = {0: 4, 1: 7, 2: 2}
        steps = [
            Step(new_lens=s.new_lens, past_lens=s.past_lens, slots=s.slots, encoder_lens=[enc_lens[k] for k in s.slots])
            for s in steps
        ]
    xs = [torch.randn(s.num_tokens, hidden, generator=g) for s in steps]
    encs = [torch.randn(sum(s.encoder_lens), hidden, generator=g) for s in steps] if cross else None
    return steps, xs, encs


def run_script(c, w, comm, *, seed=0, paged=False, cross=False):
    layer, cache = build(c, w, comm, paged=paged)
    steps, xs, encs = script(seed, c.hidden_size, cross=cross)
    outs, seen = [], set()
    for i, (step, x) in enumerate(zip(steps, xs, strict=True)):
        if cross:
            # the cross cache is written once per sequence, from its encoder output, on its first decoder step
            fresh = [j for j, slot in enumerate(step.slots) if slot not in seen]
            if fresh:
                rows = torch.cat([torch.arange(step.token_range(j).start, step.token_range(j).stop) for j in fresh])
                ends = [sum(step.encoder_lens[: j + 1]) for j in range(step.num_seqs)]
                enc = torch.cat([encs[i][ends[j] - step.encoder_lens[j] : ends[j]] for j in fresh])
                outs.append(layer(x[rows], step.subset(fresh), cache, encoder_output=enc))
                seen.update(step.slots[j] for j in fresh)
        outs.append(run_step(layer, cache, x, step))
    return outs


def assert_tp_equals_tp1(c, w, tp_sizes, **kw):
    ref = run_script(c, w, NoComm(), **kw)
    assert not any(o.isnan().any() for o in ref)
    for tp in tp_sizes:
        per_rank = simulate(tp, lambda comm: run_script(c, w, comm, **kw))
        for rank_outs in per_rank:
            for got, want in zip(rank_outs, ref, strict=True):
                assert not got.isnan().any()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for rank_outs in per_rank[1:]:  # every rank holds the same all-reduced output, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(rank_outs, per_rank[0], strict=True))


TP_CASES = {
    "mha": (dict(num_heads=8), (2, 4)),
    "gqa_kv4": (dict(num_heads=8, num_kv_heads=4, position_embedding="rope_gpt_neox"), (2, 4)),
    "gqa_kv2_replicated": (dict(num_heads=8, num_kv_heads=2, position_embedding="rope_gptj", rotary_pct=0.5), (4,)),
    "mqa": (dict(num_heads=8, num_kv_heads=1, position_embedding="rope_gpt_neox"), (2, 4)),
    "alibi_12_heads": (dict(hidden_size=48, num_heads=12, position_embedding="alibi"), (2, 4)),
    "alibi_with_scale_mqa": (dict(num_heads=8, num_kv_heads=1, position_embedding="alibi_with_scale"), (2, 4)),
    "relative": (
        dict(num_heads=8, position_embedding="relative", relative_num_buckets=8, relative_max_distance=12),
        (2, 4),
    ),
    "int8_gqa": (dict(num_heads=8, num_kv_heads=2, kv_cache_dtype="int8"), (2, 4)),
    "no_bias": (dict(num_heads=8, qkv_bias=False, dense_bias=False), (4,)),
}


@pytest.mark.parametrize("name", list(TP_CASES))
def test_simulated_tp_equals_tp1(name):
    kw, tps = TP_CASES[name]
    c = make_config(**kw)
    assert_tp_equals_tp1(c, make_weights(c, seed=len(name)), tps, paged=name in ("gqa_kv2_replicated", "relative"))


def test_simulated_tp_cross_attention():
    c = make_config(num_heads=8, num_kv_heads=2, cross_attention=True, mask_type="causal")
    assert_tp_equals_tp1(c, make_weights(c, seed=5), (2, 4), cross=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_simulated_tp_bert_relative_and_explicit_bias(tp):
    g = torch.Generator().manual_seed(tp)
    lens = [5, 8, 2]
    x = torch.randn(sum(lens), HIDDEN, generator=g)
    c = make_config(
        num_heads=8,
        mask_type="padding",
        position_embedding="relative",
        relative_num_buckets=8,
        relative_max_distance=12,
    )
    w = make_weights(c, seed=1)

    def bert(comm):
        layer = BertAttention(c, comm=comm)
        layer.load_weights(**w)
        return layer(x, lens)

    want = bert(NoComm())
    for got in simulate(tp, bert):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # explicit [H, Q, K] bias: each rank passes its own heads' rows
    c2 = make_config(num_heads=8, position_embedding="relative", relative_table=False)
    w2 = make_weights(c2, seed=2)
    table = torch.randn(8, 10, 10, generator=g)

    def decoder(comm):
        layer, cache = build(c2, w2, comm)
        n = 8 // comm.size
        bias = table[comm.rank * n : (comm.rank + 1) * n].contiguous()
        return layer(x, Step(new_lens=lens), cache, position_bias=bias)

    want = decoder(NoComm())
    for got in simulate(tp, decoder):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- hypothesis: random schedules against a float64 oracle --------------------------------------------


def _rope64(x, positions, lens, c):
    """Complex rotation in float64; the base of each token is its sequence's length when it was written."""
    rot = c.rotary_dim
    half = rot // 2
    f, m = c.rotary_scaling_factor, c.max_position_embeddings
    n = lens.double()
    base = torch.full_like(n, c.rotary_base)
    if c.rotary_scaling.value == "dynamic":
        base = torch.where(n > m, c.rotary_base * ((f * n / m) - (f - 1)) ** (rot / (rot - 2)), base)
    t = positions.double() / (f if c.rotary_scaling.value == "linear" else 1.0)
    angle = t[:, None] / base[:, None] ** (2 * torch.arange(half, dtype=torch.float64) / rot)  # [L, rot/2]
    if c.position_embedding.value == "rope_gptj":
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
    else:
        a, b = x[..., :half], x[..., half:rot]
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    out = x.clone()
    if c.position_embedding.value == "rope_gptj":
        out[..., 0:rot:2], out[..., 1:rot:2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:rot] = z.real, z.imag
    return out


def oracle64(c, w, history, write_lens, n_new):
    """The last ``n_new`` outputs of one sequence, from its whole history, in float64."""
    x = history.double()
    h, kvh, d = c.num_heads, c.num_kv_heads, c.head_size
    qkv = x @ w["qkv_weight"].double().T + (w["qkv_bias"].double() if c.qkv_bias else 0)
    q = qkv[:, : h * d].reshape(-1, h, d)
    k = qkv[:, h * d : (h + kvh) * d].reshape(-1, kvh, d)
    v = qkv[:, (h + kvh) * d :].reshape(-1, kvh, d)
    L = x.shape[0]
    pos = torch.arange(L)
    if c.position_embedding.value.startswith("rope"):
        q = _rope64(q, pos, torch.full((L,), L), c)  # queries rotate with this step's length
        k = _rope64(k, pos, write_lens, c)  # keys keep the rotation they were written with
    k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    q = q[L - n_new :]
    scale = 1.0 / (c.q_scaling * math.sqrt(d))
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    rel = pos[None, :] - pos[L - n_new :, None]  # [n_new, L]
    if c.position_embedding.value == "alibi":
        slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), h, torch.float32)[:, 0, 1].double()
        s = s + slopes[:, None, None] * rel
    if c.position_embedding.value == "relative":
        bucket = T5Attention._relative_position_bucket(
            rel, bidirectional=False, num_buckets=c.relative_num_buckets, max_distance=c.relative_max_distance
        )
        s = s + w["relative_table"].double()[:, bucket]
    s = s.masked_fill(rel[None] > 0, float("-inf"))
    ctx = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).reshape(n_new, h * d)
    return ctx @ w["dense_weight"].double().T + (w["dense_bias"].double() if c.dense_bias else 0)


PROPERTY_CONFIGS = [
    dict(num_heads=4, num_kv_heads=4),
    dict(num_heads=4, num_kv_heads=2, position_embedding="rope_gptj"),
    dict(num_heads=4, num_kv_heads=1, position_embedding="rope_gpt_neox", rotary_pct=0.5),
    dict(
        num_heads=4,
        num_kv_heads=2,
        position_embedding="rope_gpt_neox",
        rotary_scaling="dynamic",
        rotary_scaling_factor=2.0,
        max_position_embeddings=6,
    ),
    dict(num_heads=8, num_kv_heads=2, position_embedding="alibi", qkv_bias=False),
    dict(num_heads=4, num_kv_heads=4, position_embedding="relative", relative_num_buckets=8, relative_max_distance=10),
]


@st.composite
def schedules(draw):
    """A config, then steps: each a random subset of sequences advancing by a chunk (1 token = generation)."""
    cfg = draw(st.sampled_from(range(len(PROPERTY_CONFIGS))))
    n_seqs = draw(st.integers(1, 4))
    steps = []
    lengths = [0] * n_seqs
    for _ in range(draw(st.integers(1, 4))):
        live = draw(st.lists(st.sampled_from(range(n_seqs)), min_size=1, max_size=n_seqs, unique=True))
        chunk = []
        for i in live:
            n = draw(st.sampled_from([1, 1, 2, 3, 5, 8]))
            if lengths[i] + n > 20:
                continue
            chunk.append((i, n))
            lengths[i] += n
        if chunk:
            steps.append(chunk)
    return cfg, n_seqs, steps, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_property_random_schedules_match_float64_oracle(case):
    cfg, n_seqs, steps, paged, seed = case
    c = make_config(**PROPERTY_CONFIGS[cfg])
    w = make_weights(c, seed)
    layer, cache = build(c, w, NoComm(), paged=paged, max_seq_len=24, max_batch=n_seqs + 1)
    g = torch.Generator().manual_seed(seed)
    slot_of = torch.randperm(n_seqs + 1, generator=g).tolist()
    hist = [torch.zeros(0, HIDDEN) for _ in range(n_seqs)]
    write_lens = [torch.zeros(0, dtype=torch.long) for _ in range(n_seqs)]
    for chunk in steps:
        step = Step(
            new_lens=[n for _, n in chunk],
            past_lens=[len(hist[i]) for i, _ in chunk],
            slots=[slot_of[i] for i, _ in chunk],
        )
        x = torch.randn(step.num_tokens, HIDDEN, generator=g)
        out = run_step(layer, cache, x, step)
        for j, (i, n) in enumerate(chunk):
            r = step.token_range(j)
            hist[i] = torch.cat([hist[i], x[r.start : r.stop]])
            write_lens[i] = torch.cat([write_lens[i], torch.full((n,), len(hist[i]))])
            want = oracle64(c, w, hist[i], write_lens[i], n)
            torch.testing.assert_close(out[r.start : r.stop].double(), want, rtol=1e-4, atol=1e-4)
