"""position.py: RoPE (GPT-J pairs, NeoX halves, partial, linear and dynamic NTK scaling), T5 buckets,
ALiBi slopes. Oracles: complex-number rotation in float64 written here, position.py's docstring formulas
computed independently, and HF transformers' own functions (GPT-NeoX, Llama, GPT-J, T5, BLOOM)."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.t5.modeling_t5 import T5Attention

from tp_runtime.config import AttentionConfig, PositionEmbeddingType, RotaryScalingType
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention
from tp_runtime.position import RopeSpec, alibi_slopes, apply_rope, relative_bucket
from tp_runtime.sharding import head_layout, slice_heads

GPTJ, NEOX = PositionEmbeddingType.rope_gptj, PositionEmbeddingType.rope_gpt_neox


def spec(style, rot, *, base=10000.0, scaling=RotaryScalingType.none, factor=1.0, max_positions=2048):
    return RopeSpec(style, rot, base, scaling, factor, max_positions)


def rotate(x, positions, total_lens, sp):
    cos, sin = sp.cos_sin(torch.as_tensor(positions, dtype=torch.int32), torch.as_tensor(total_lens, dtype=torch.int32))
    return apply_rope(x, cos, sin, sp)


def oracle_rope(x, positions, bases, *, style, rot, divide=1.0):
    """Complex rotation in float64: channel pair i (GPT-J (2i, 2i+1), NeoX (i, i + rot/2)) is the complex
    number a + ib multiplied by exp(i·t/base^(2i/rot)); channels >= rot pass through."""
    x = x.double()
    out = x.clone()
    t_count, heads, _ = x.shape
    for t in range(t_count):
        pos = positions[t] / divide
        for h in range(heads):
            for i in range(rot // 2):
                ia, ib = (2 * i, 2 * i + 1) if style is GPTJ else (i, i + rot // 2)
                z = complex(x[t, h, ia].item(), x[t, h, ib].item())
                z = z * cmath.exp(1j * pos / bases[t] ** (2 * i / rot))
                out[t, h, ia], out[t, h, ib] = z.real, z.imag
    return out


def ntk_base(base, factor, n, m, rot):
    """Dynamic NTK: base' = base · ((f·n/M) − (f − 1))^(rot/(rot − 2)) when n > M."""
    if n <= m:
        return base
    return base * ((factor * n / m) - (factor - 1)) ** (rot / (rot - 2))


# ---- RoPE vs the complex-number oracle ---------------------------------------------------------


@pytest.mark.parametrize("style", [GPTJ, NEOX])
@pytest.mark.parametrize("d,rot", [(8, 8), (16, 4), (16, 8), (12, 6)])
def test_rope_matches_complex_rotation(style, d, rot):
    g = torch.Generator().manual_seed(d * 100 + rot)
    t, heads = 9, 3
    x = torch.randn(t, heads, d, generator=g)
    positions = torch.randint(0, 3000, (t,), generator=g).tolist()
    sp = spec(style, rot, base=10000.0)
    got = rotate(x, positions, [4000] * t, sp)
    want = oracle_rope(x, positions, [10000.0] * t, style=style, rot=rot)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-5)  # fp32 angle of positions up to 3000
    assert torch.equal(got[..., rot:], x[..., rot:])  # partial rotary: the rest is untouched, bit for bit
    assert got.dtype == x.dtype


@pytest.mark.parametrize("style", [GPTJ, NEOX])
def test_rope_linear_scaling(style):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 8, generator=g)
    positions = [0, 1, 5, 17, 100, 511]
    sp = spec(style, 8, base=500.0, scaling=RotaryScalingType.linear, factor=4.0, max_positions=16)
    got = rotate(x, positions, [600] * 6, sp)
    want = oracle_rope(x, positions, [500.0] * 6, style=style, rot=8, divide=4.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("style", [GPTJ, NEOX])
@pytest.mark.parametrize("rot", [4, 8])
def test_rope_dynamic_ntk_per_sequence(style, rot):
    """Each token uses the base of its own sequence's length (not the batch maximum)."""
    g = torch.Generator().manual_seed(rot)
    m, f, base = 16, 2.5, 10000.0
    totals = [1, 3, 15, 16, 17, 40, 40, 97]  # below, at and above M
    positions = [0, 2, 14, 15, 9, 39, 0, 50]
    x = torch.randn(len(totals), 2, 8, generator=g)
    sp = spec(style, rot, base=base, scaling=RotaryScalingType.dynamic, factor=f, max_positions=m)
    want_bases = [ntk_base(base, f, n, m, rot) for n in totals]
    got_bases = sp.base_for_length(torch.tensor(totals))
    torch.testing.assert_close(got_bases, torch.tensor(want_bases, dtype=torch.float64), rtol=1e-12, atol=0)
    got = rotate(x, positions, totals, sp)
    want = oracle_rope(x, positions, want_bases, style=style, rot=rot)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


def test_rope_half_precision_keeps_dtype_and_accuracy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 16, generator=g)
    positions = [0, 3, 30, 300, 1000]
    sp = spec(NEOX, 16)
    for dt, tol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        got = rotate(x.to(dt), positions, [1001] * 5, sp)
        assert got.dtype == dt
        want = oracle_rope(x.to(dt), positions, [10000.0] * 5, style=NEOX, rot=16)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ---- RoPE vs HF transformers -------------------------------------------------------------------


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_rope_neox_vs_hf_gpt_neox(rotary_pct):
    hc = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=rotary_pct, max_position_embeddings=64)
    d, s = 16, 23
    rot = int(d * rotary_pct)
    g = torch.Generator().manual_seed(int(rotary_pct * 100))
    q = torch.randn(1, 4, s, d, generator=g)
    k = torch.randn(1, 4, s, d, generator=g)
    cos, sin = GPTNeoXRotaryEmbedding(hc)(q, torch.arange(s)[None])
    hq, hk = neox_apply(q, k, cos, sin)
    sp = RopeSpec.from_config(
        AttentionConfig(hidden_size=64, num_heads=4, position_embedding="rope_gpt_neox", rotary_pct=rotary_pct)
    )
    assert sp.rotary_dim == rot
    got_q = rotate(q[0].transpose(0, 1), list(range(s)), [s] * s, sp)  # [S, H, D]
    got_k = rotate(k[0].transpose(0, 1), list(range(s)), [s] * s, sp)
    torch.testing.assert_close(got_q, hq[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, hk[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rope_parameters,scaling,factor",
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, "none", 1.0),
        ({"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}, "linear", 3.0),
        ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "dynamic", 2.0),
    ],
)
@pytest.mark.parametrize("s", [10, 37])  # below and above max_position_embeddings=16
def test_rope_vs_hf_llama(rope_parameters, scaling, factor, s):
    """HF takes the batch maximum for dynamic scaling: one sequence (prefill) makes it per-sequence."""
    hc = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16, rope_parameters=rope_parameters)
    g = torch.Generator().manual_seed(s)
    q = torch.randn(1, 4, s, 16, generator=g)
    k = torch.randn(1, 4, s, 16, generator=g)
    cos, sin = LlamaRotaryEmbedding(hc)(q, torch.arange(s)[None])
    hq, hk = llama_apply(q, k, cos, sin)
    c = AttentionConfig(
        hidden_size=64,
        num_heads=4,
        max_position_embeddings=16,
        position_embedding="rope_gpt_neox",
        rotary_scaling=scaling,
        rotary_scaling_factor=factor,
    )
    sp = RopeSpec.from_config(c)
    got_q = rotate(q[0].transpose(0, 1), list(range(s)), [s] * s, sp)
    got_k = rotate(k[0].transpose(0, 1), list(range(s)), [s] * s, sp)
    torch.testing.assert_close(got_q, hq[0].transpose(0, 1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_k, hk[0].transpose(0, 1), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rot", [4, 16])
def test_rope_gptj_vs_hf_gptj(rot):
    d, s, heads = 16, 29, 3
    g = torch.Generator().manual_seed(rot)
    x = torch.randn(1, s, heads, d, generator=g)  # GPT-J's layout: [B, S, H, D]
    sincos = create_sinusoidal_positions(s, rot)[None]  # [1, S, rot]
    sin, cos = torch.split(sincos, rot // 2, dim=-1)
    want = torch.cat([gptj_apply(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)
    c = AttentionConfig(hidden_size=heads * d, num_heads=heads, position_embedding="rope_gptj", rotary_pct=rot / d)
    got = rotate(x[0], list(range(s)), [s] * s, RopeSpec.from_config(c))
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=2e-5)


# ---- T5 relative buckets vs HF ----------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 12), (6, 9), (33, 50)])
def test_relative_bucket_vs_hf_t5(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 301)
    want = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(got.long(), want.long())
    assert int(got.min()) >= 0 and int(got.max()) < num_buckets


def test_relative_bucket_causal_differs_from_bidirectional_past_distance_8():
    """TRT-LLM's kernel only did bidirectional buckets: for decoders they differ at distances >= 8."""
    rel = torch.arange(-40, 1)
    a = relative_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    b = relative_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(a[-8:], b[-8:])  # exact region agrees
    assert not torch.equal(a[:-8], b[:-8])


# ---- ALiBi slopes vs BLOOM --------------------------------------------------------------------


def bloom_slopes(num_heads):
    return build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 12, 24, 40, 64, 112])
def test_alibi_slopes_all_heads_vs_bloom(num_heads):
    got = alibi_slopes(num_heads)
    assert got.dtype == torch.float32 and got.shape == (num_heads,)
    torch.testing.assert_close(got, bloom_slopes(num_heads), rtol=1e-5, atol=0)


HEADS_TP = [(h, tp) for h in (12, 24, 40, 112) for tp in (1, 2, 4, 8) if h % tp == 0]


@pytest.mark.parametrize("num_heads,tp", HEADS_TP)
def test_alibi_slopes_per_rank_vs_bloom(num_heads, tp):
    """Sliced by the weights' head range (and the layer's own buffer) on every rank."""
    full = bloom_slopes(num_heads)
    n = num_heads // tp

    class _RankComm(NoComm):
        def __init__(self, rank):
            self.rank, self.size = rank, tp

    for rank in range(tp):
        want = full[rank * n : (rank + 1) * n]
        got = slice_heads(alibi_slopes(num_heads), head_layout(num_heads, num_heads, tp, rank))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        c = AttentionConfig(hidden_size=num_heads * 2, num_heads=num_heads, position_embedding="alibi")
        layer = Attention(c, comm=_RankComm(rank))
        torch.testing.assert_close(layer.alibi_slopes, want, rtol=1e-5, atol=0)


def test_alibi_with_scale_layer_slopes_are_scaled():
    """Falcon: (QKᵀ + bias)·scale, so the layer's slopes carry the softmax scale."""
    c = AttentionConfig(hidden_size=96, num_heads=12, position_embedding="alibi_with_scale", q_scaling=1.5)
    scale = 1.0 / (1.5 * math.sqrt(8))
    layer = Attention(c, comm=NoComm())
    torch.testing.assert_close(layer.alibi_slopes.double(), bloom_slopes(12).double() * scale, rtol=1e-5, atol=0)
