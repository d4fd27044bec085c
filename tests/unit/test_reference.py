"""The reference backend (and the Attention layer on it) against tiny explicit Python loops in float64.

The oracle goes per sequence, per query, per head, per key: score, scale, bias, mask, softmax,
weighted sum, log-sum-exp, with nothing vectorised. T5 buckets come from HF's
``T5Attention._relative_position_bucket``; RoPE from a complex-number rotation written here.
"""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from layer_weights import make_weights
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.t5.modeling_t5 import T5Attention

from tp_runtime.backends import reference
from tp_runtime.backends.base import AttentionSpec
from tp_runtime.batch.kv_cache import CacheLayout, KVCache, LayerKV
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig, AttentionMaskType, KVCacheDType
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention, BertAttention
from tp_runtime.sharding import head_layout

NEG_INF = float("-inf")
CAUSAL, PADDING, BIDIR = AttentionMaskType.causal, AttentionMaskType.padding, AttentionMaskType.bidirectional


# ---- the oracle ---------------------------------------------------------------------------------


def hf_bucket(rel: int, *, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    return int(
        T5Attention._relative_position_bucket(
            torch.tensor([rel]), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )[0]
    )


def loop_attention(
    q,
    keys,
    values,
    q_positions,
    *,
    scale,
    mask,
    cross=False,
    slopes=None,
    bias_scale=1.0,
    rel_table=None,
    num_buckets=0,
    max_distance=0,
    rel_bias=None,
):
    """One sequence. ``q [n, H, D]``, ``keys/values [L, KV, D]``, ``q_positions`` (n ints).

    score(h, p, t) = Σ_d q·k · scale + slope_h·(t − p)·bias_scale + table_h[bucket(t − p)] + rel_bias[h, p, t]
                     − 10000 (bidirectional: last key, earlier queries); causal hides t > p.
    Returns ``out [n][H][D]`` and ``lse [n][H]`` as nested lists of Python floats.
    """
    q, keys, values = q.double().tolist(), keys.double().tolist(), values.double().tolist()
    n_heads, n_kv, n_keys = len(q[0]) if q else 0, len(keys[0]) if keys else 1, len(keys)
    group = n_heads // n_kv if keys else 1
    bucket_cache = {}
    out, lse = [], []
    for j, p in enumerate(q_positions):
        out_row, lse_row = [], []
        for h in range(n_heads):
            kh = h // group
            scores = []
            for t in range(n_keys):
                if mask is CAUSAL and not cross and t > p:
                    continue
                s = sum(a * b for a, b in zip(q[j][h], keys[t][kh], strict=True)) * scale
                if slopes is not None:
                    s += slopes[h] * (t - p) * bias_scale
                if rel_table is not None:
                    key = t - p
                    if key not in bucket_cache:
                        bucket_cache[key] = hf_bucket(
                            key, bidirectional=mask is not CAUSAL, num_buckets=num_buckets, max_distance=max_distance
                        )
                    s += rel_table[h][bucket_cache[key]]
                if rel_bias is not None:
                    s += rel_bias[h][p][t]
                if mask is BIDIR and not cross and t == n_keys - 1 and p < n_keys - 1:
                    s += -10000.0
                scores.append((t, s))
            m = max((s for _, s in scores), default=NEG_INF)
            if m == NEG_INF:
                out_row.append([0.0] * len(q[j][h]))
                lse_row.append(NEG_INF)
                continue
            total = sum(math.exp(s - m) for _, s in scores)
            o = [0.0] * len(q[j][h])
            for t, s in scores:
                w = math.exp(s - m) / total
                for d in range(len(o)):
                    o[d] += w * values[t][kh][d]
            out_row.append(o)
            lse_row.append(m + math.log(total))
        out.append(out_row)
        lse.append(lse_row)
    return out, lse


# ---- backend harness ----------------------------------------------------------------------------


def make_case(seqs, *, heads, kv_heads, d, dtype=torch.float32, seed=0, cross=False, scale_x=1.0):
    """``seqs``: (new, past) pairs (or (new, encoder_len) with ``cross``). Keys/values are written
    straight into a NaN-poisoned contiguous cache at shuffled slots; returns (q, kv, step, per-seq K/V)."""
    g = torch.Generator().manual_seed(seed)
    n = len(seqs)
    slots = torch.randperm(n + 2, generator=g)[:n].tolist()
    lengths = [b if cross else a + b for a, b in seqs]
    s_max = max(max(lengths), 1) + 3
    data = torch.full((n + 2, 2, kv_heads, s_max, d), float("nan"), dtype=dtype)
    kvs = []
    for slot, length in zip(slots, lengths, strict=True):
        k = (torch.randn(length, kv_heads, d, generator=g) * scale_x).to(dtype)
        v = torch.randn(length, kv_heads, d, generator=g).to(dtype)
        data[slot, 0, :, :length] = k.transpose(0, 1)
        data[slot, 1, :, :length] = v.transpose(0, 1)
        kvs.append((k, v))
    t = sum(new for new, _ in seqs)
    q = (torch.randn(t, heads, d, generator=g) * scale_x).to(dtype)
    if cross:
        step = Step(new_lens=[a for a, _ in seqs], past_lens=[0] * n, slots=slots, encoder_lens=[b for _, b in seqs])
    else:
        step = Step(new_lens=[a for a, _ in seqs], past_lens=[b for _, b in seqs], slots=slots)
    kv = LayerKV(CacheLayout.contiguous, data, KVCacheDType.auto, 1.0)
    return q, kv, step, kvs


def check_against_loops(q, kv, step, kvs, spec, *, atol=1e-5, rtol=1e-5, **oracle_kw):
    out, lse = reference.attend(q, kv, step, spec)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    for i, (k, v) in enumerate(kvs):
        rows = step.token_range(i)
        q_pos = list(range(step.past_lens[i], step.total_lens[i]))
        if spec.cross:
            q_pos = list(range(step.new_lens[i]))
        want_o, want_l = loop_attention(
            q[rows.start : rows.stop],
            k,
            v,
            q_pos,
            scale=spec.softmax_scale,
            mask=spec.mask,
            cross=spec.cross,
            **oracle_kw,
        )
        got_o = out[rows.start : rows.stop].double()
        got_l = lse[rows.start : rows.stop].double()
        torch.testing.assert_close(
            got_o, torch.tensor(want_o, dtype=torch.float64).reshape(got_o.shape), atol=atol, rtol=rtol
        )
        torch.testing.assert_close(
            got_l, torch.tensor(want_l, dtype=torch.float64).reshape(got_l.shape), atol=atol, rtol=rtol
        )
    return out, lse


MIXED = [(5, 0), (1, 6), (3, 4), (1, 1), (2, 0)]  # context, generation, chunk with past, generation, context
LAYOUTS = [(4, 4), (4, 2), (4, 1), (6, 3)]  # MHA, GQA, MQA, GQA with 2 queries per KV head


@pytest.mark.parametrize("heads,kv_heads", LAYOUTS)
@pytest.mark.parametrize("mask", [CAUSAL, BIDIR])
def test_masks_mixed_step(heads, kv_heads, mask):
    q, kv, step, kvs = make_case(MIXED, heads=heads, kv_heads=kv_heads, d=8, seed=heads * 10 + kv_heads)
    spec = AttentionSpec(mask=mask, softmax_scale=0.3)
    check_against_loops(q, kv, step, kvs, spec)


@pytest.mark.parametrize("heads,kv_heads", LAYOUTS)
def test_padding_mask_encoder(heads, kv_heads):
    q, kv, step, kvs = make_case([(7, 0), (1, 0), (4, 0)], heads=heads, kv_heads=kv_heads, d=8, seed=5)
    check_against_loops(q, kv, step, kvs, AttentionSpec(mask=PADDING, softmax_scale=1 / math.sqrt(8)))


def test_bidirectional_hides_only_last_key_from_earlier_queries():
    """A sanity check of the oracle itself: the ChatGLM rule changes the output (so the test can fail)."""
    q, kv, step, kvs = make_case([(6, 0)], heads=2, kv_heads=2, d=8, seed=9)
    a, _ = reference.attend(q, kv, step, AttentionSpec(mask=BIDIR, softmax_scale=0.35))
    b, _ = reference.attend(q, kv, step, AttentionSpec(mask=PADDING, softmax_scale=0.35))
    assert not torch.allclose(a[:5], b[:5])
    torch.testing.assert_close(a[5], b[5])  # the last query sees everything in both


@pytest.mark.parametrize("mask", [CAUSAL, BIDIR])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_alibi(mask, heads, kv_heads):
    q, kv, step, kvs = make_case(MIXED, heads=heads, kv_heads=kv_heads, d=8, seed=21)
    slopes = torch.rand(heads) + 0.05
    spec = AttentionSpec(mask=mask, softmax_scale=0.25, alibi_slopes=slopes)
    check_against_loops(q, kv, step, kvs, spec, slopes=slopes.tolist())


@pytest.mark.parametrize("mask", [CAUSAL, PADDING, BIDIR])
@pytest.mark.parametrize("num_buckets,max_distance", [(8, 12), (32, 128), (16, 20)])
def test_relative_implicit_buckets(mask, num_buckets, max_distance):
    """Lengths past max_distance so every bucket regime (exact, log, clamped) is hit; decoders (causal)
    must use one-sided buckets, encoders two-sided."""
    past = 0 if mask is PADDING else 9
    seqs = [(23, 0), (1, 26), (4, past)]
    q, kv, step, kvs = make_case(seqs, heads=3, kv_heads=3, d=4, seed=num_buckets)
    table = torch.randn(3, num_buckets)
    spec = AttentionSpec(
        mask=mask, softmax_scale=1.0, relative_table=table, num_buckets=num_buckets, max_distance=max_distance
    )
    check_against_loops(
        q, kv, step, kvs, spec, rel_table=table.tolist(), num_buckets=num_buckets, max_distance=max_distance
    )


@pytest.mark.parametrize("mask", [CAUSAL, PADDING])
def test_relative_explicit_table(mask):
    seqs = [(5, 0), (1, 7), (3, 2)] if mask is CAUSAL else [(5, 0), (8, 0)]
    q, kv, step, kvs = make_case(seqs, heads=2, kv_heads=1, d=8, seed=31)
    table = torch.randn(2, 10, 12)  # [H_r, Q_max, K_max] by absolute positions
    spec = AttentionSpec(mask=mask, softmax_scale=0.4, relative_bias=table)
    check_against_loops(q, kv, step, kvs, spec, rel_bias=table.tolist())


def test_fully_masked_rows_give_zeros_never_nan():
    seqs = [(4, 0), (1, 3)]
    q, kv, step, kvs = make_case(seqs, heads=2, kv_heads=2, d=8, seed=41)
    table = torch.randn(2, 4, 4)
    table[0, 1, :] = NEG_INF  # head 0, query position 1: nothing visible
    table[1, 3, :] = NEG_INF  # head 1, query position 3 (both sequences' rows at position 3)
    table[1, 2, :2] = NEG_INF  # partially masked row: still a normal softmax over the rest
    spec = AttentionSpec(mask=PADDING, softmax_scale=0.5, relative_bias=table)
    out, lse = check_against_loops(q, kv, step, kvs, spec, rel_bias=table.tolist())
    assert torch.equal(out[1, 0], torch.zeros(8)) and lse[1, 0].item() == NEG_INF
    assert torch.equal(out[3, 1], torch.zeros(8)) and lse[3, 1].item() == NEG_INF
    assert torch.equal(out[4, 1], torch.zeros(8)) and lse[4, 1].item() == NEG_INF  # the generation token at pos 3
    assert torch.isfinite(lse[2, 1])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cross_attention_encoder_lengths_with_empty_encoder(heads, kv_heads):
    """Keys limited by each sequence's encoder length (NaN beyond), no causal mask even for a causal
    decoder, no ChatGLM column; a 0-length encoder gives zeros and lse -inf."""
    seqs = [(3, 5), (1, 0), (2, 1), (4, 9)]  # (decoder tokens, encoder length)
    q, kv, step, kvs = make_case(seqs, heads=heads, kv_heads=kv_heads, d=8, seed=51, cross=True)
    for mask in (CAUSAL, BIDIR):
        spec = AttentionSpec(mask=mask, softmax_scale=0.3, cross=True)
        out, lse = check_against_loops(q, kv, step, kvs, spec)
        r = step.token_range(1)
        assert torch.equal(out[r.start], torch.zeros(heads, 8))
        assert (lse[r.start] == NEG_INF).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_softmax_in_fp32(dtype):
    """Scores beyond fp16's range (|q·k| ~ 1e5) still give the exact answer: the output is the fp64
    result rounded once to the dtype (at most one ulp off), which a half-precision softmax misses."""
    scale_x = 60.0 if dtype is torch.float16 else 1.0
    q, kv, step, kvs = make_case(MIXED, heads=4, kv_heads=2, d=16, dtype=dtype, seed=61, scale_x=scale_x)
    assert (torch.einsum("thd,thd->th", q.float(), q.float()).abs().max() > 65504) == (dtype is torch.float16)
    spec = AttentionSpec(mask=CAUSAL, softmax_scale=1 / math.sqrt(16) / (scale_x * scale_x) * 8)
    out, lse = reference.attend(q, kv, step, spec)
    assert out.dtype == dtype and not out.isnan().any()
    for i, (k, v) in enumerate(kvs):
        rows = step.token_range(i)
        want_o, want_l = loop_attention(
            q[rows.start : rows.stop],
            k,
            v,
            list(range(step.past_lens[i], step.total_lens[i])),
            scale=spec.softmax_scale,
            mask=CAUSAL,
        )
        want = torch.tensor(want_o, dtype=torch.float64).reshape(out[rows.start : rows.stop].shape)
        got = out[rows.start : rows.stop].double()
        ulp = (want.to(dtype).double().abs() * torch.finfo(dtype).eps).clamp(min=torch.finfo(dtype).tiny)
        assert ((got - want).abs() <= 1.01 * ulp).all(), float(((got - want).abs() / ulp).max())
        torch.testing.assert_close(
            lse[rows.start : rows.stop].double(), torch.tensor(want_l, dtype=torch.float64), rtol=1e-5, atol=1e-4
        )


# ---- through the Attention layer: weights, scaling, ALiBi flavours, RoPE -------------------------


def rope_oracle(x, positions, *, style, rot, base):
    """[L, heads, D] float64: complex rotation of pairs (2i, 2i+1) (GPT-J) or (i, i + rot/2) (NeoX)."""
    out = x.clone()
    for t, pos in enumerate(positions):
        for h in range(x.shape[1]):
            for i in range(rot // 2):
                a, b = (2 * i, 2 * i + 1) if style == "rope_gptj" else (i, i + rot // 2)
                z = complex(x[t, h, a].item(), x[t, h, b].item()) * cmath.exp(1j * pos / base ** (2 * i / rot))
                out[t, h, a], out[t, h, b] = z.real, z.imag
    return out


def layer_oracle(c: AttentionConfig, w, history: torch.Tensor, n_new: int, *, mask=None):
    """Outputs for the last ``n_new`` tokens of a sequence whose whole history is ``history [L, hidden]``."""
    x = history.double()
    h, kvh, d = c.num_heads, c.num_kv_heads, c.head_size
    qkv = x @ w["qkv_weight"].double().T + (w["qkv_bias"].double() if c.qkv_bias else 0.0)
    q = qkv[:, : h * d].reshape(-1, h, d)
    k = qkv[:, h * d : (h + kvh) * d].reshape(-1, kvh, d)
    v = qkv[:, (h + kvh) * d :].reshape(-1, kvh, d)
    length = x.shape[0]
    if c.position_embedding.value.startswith("rope"):
        q = rope_oracle(q, range(length), style=c.position_embedding.value, rot=c.rotary_dim, base=c.rotary_base)
        k = rope_oracle(k, range(length), style=c.position_embedding.value, rot=c.rotary_dim, base=c.rotary_base)
    q_scaling = c.q_scaling * (c.num_layers if c.apply_query_key_layer_scaling else 1)
    scale = 1.0 / (q_scaling * math.sqrt(d))
    slopes, bias_scale = None, 1.0
    if c.position_embedding.value in ("alibi", "alibi_with_scale"):
        slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), h, torch.float32)[:, 0, 1].tolist()
        bias_scale = scale if c.position_embedding.value == "alibi_with_scale" else 1.0
    out, _ = loop_attention(
        q[length - n_new :],
        k,
        v,
        list(range(length - n_new, length)),
        scale=scale,
        mask=mask or c.mask_type,
        slopes=slopes,
        bias_scale=bias_scale,
    )
    ctx = torch.tensor(out, dtype=torch.float64).reshape(n_new, h * d)
    return ctx @ w["dense_weight"].double().T + (w["dense_bias"].double() if c.dense_bias else 0.0)


LAYER_CONFIGS = {
    "causal_gqa": dict(num_heads=4, num_kv_heads=2),
    "q_scaling": dict(num_heads=4, q_scaling=0.7),
    "layer_scaling": dict(num_heads=4, q_scaling=1.3, apply_query_key_layer_scaling=True, num_layers=3),
    "alibi_12_heads": dict(hidden_size=48, num_heads=12, position_embedding="alibi"),
    "alibi_with_scale": dict(num_heads=4, position_embedding="alibi_with_scale", q_scaling=0.5),
    "alibi_with_scale_mqa": dict(num_heads=4, num_kv_heads=1, position_embedding="alibi_with_scale", qkv_bias=False),
    "rope_gptj_partial": dict(num_heads=2, position_embedding="rope_gptj", rotary_pct=0.5, rotary_base=100.0),
    "rope_neox_mqa": dict(num_heads=4, num_kv_heads=1, position_embedding="rope_gpt_neox", rotary_pct=0.5),
    "bidirectional": dict(num_heads=4, mask_type="bidirectional", dense_bias=False),
}


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_layer_prefill_then_decode_against_loops(name):
    kw = {"hidden_size": 32, **LAYER_CONFIGS[name]}
    c = AttentionConfig(**kw)
    w = make_weights(c, seed=len(name))
    layer = Attention(c, comm=NoComm())
    layer.load_weights(**w)
    cache = KVCache(
        config=c, head_layout=head_layout(c.num_heads, c.num_kv_heads, 1, 0), num_layers=1, max_batch=3, max_seq_len=16
    )
    cache.data.fill_(float("nan"))
    g = torch.Generator().manual_seed(7)
    hist = [torch.randn(n, c.hidden_size, generator=g) for n in (5, 3)]
    # prefill both sequences (slots 2 and 0), then three decode steps
    step = Step(new_lens=[5, 3], slots=[2, 0])
    out = layer(torch.cat(hist), step, cache)
    for i, hs in enumerate(hist):
        r = step.token_range(i)
        torch.testing.assert_close(
            out[r.start : r.stop].double(), layer_oracle(c, w, hs, len(hs)), atol=2e-5, rtol=1e-5
        )
    for _ in range(3):
        new = [torch.randn(1, c.hidden_size, generator=g) for _ in hist]
        step = Step(new_lens=[1, 1], past_lens=[len(h) for h in hist], slots=[2, 0])
        out = layer(torch.cat(new), step, cache)
        hist = [torch.cat([h, n]) for h, n in zip(hist, new, strict=True)]
        for i, hs in enumerate(hist):
            torch.testing.assert_close(out[i : i + 1].double(), layer_oracle(c, w, hs, 1), atol=2e-5, rtol=1e-5)


def test_bert_attention_padding_against_loops():
    c = AttentionConfig(hidden_size=32, num_heads=4, mask_type="padding")
    w = make_weights(c, seed=3)
    layer = BertAttention(c, comm=NoComm())
    layer.load_weights(**w)
    g = torch.Generator().manual_seed(4)
    lens = [6, 2, 4]
    x = torch.randn(sum(lens), 32, generator=g)
    out = layer(x, torch.tensor(lens))
    start = 0
    for n in lens:
        want = layer_oracle(c, w, x[start : start + n], n)
        torch.testing.assert_close(out[start : start + n].double(), want, atol=2e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_half_precision_close_to_fp64(dtype):
    c = AttentionConfig(hidden_size=32, num_heads=4, num_kv_heads=2, position_embedding="rope_gpt_neox", dtype=dtype)
    w = make_weights(c, seed=8)
    layer = Attention(c, comm=NoComm())
    layer.load_weights(**{k: v.to(dtype) for k, v in w.items()})
    cache = KVCache(config=c, head_layout=head_layout(4, 2, 1, 0), num_layers=1, max_batch=1, max_seq_len=8)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = layer(x, Step(new_lens=[7]), cache)
    assert out.dtype == dtype
    want = layer_oracle(c, {k: v.to(dtype) for k, v in w.items()}, x, 7)
    tol = 2e-2 if dtype is torch.float16 else 1e-1
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
