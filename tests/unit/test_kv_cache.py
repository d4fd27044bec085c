"""KV caches: int8/fp8 storage against emulations written here, capacity errors that change nothing,
paged equals contiguous (random block tables, NaN in unused blocks), the block allocator, beam
indirection against a torch.gather reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tp_runtime.backends import reference
from tp_runtime.backends.base import AttentionSpec
from tp_runtime.batch.kv_cache import BlockAllocator, CacheCapacityError, CacheLayout, KVCache, LayerKV, PagedKVCache
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig, AttentionMaskType, KVCacheDType
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention
from tp_runtime.sharding import head_layout

NAN = float("nan")
CAUSAL = AttentionMaskType.causal


# ---- independent quantization emulations -------------------------------------------------------


def fp32_product(x: torch.Tensor, quant_scale: float) -> np.ndarray:
    """IEEE fp32 multiply of fp32 x by fp32(quant_scale): the exact product rounded once to fp32."""
    return (x.double().numpy() * float(np.float32(quant_scale))).astype(np.float32)


def emulate_int8(x: torch.Tensor, quant_scale: float) -> np.ndarray:
    y = fp32_product(x, quant_scale)
    return np.clip(np.rint(y), -128, 127).astype(np.int8)  # np.rint: round half to even


def _e4m3_magnitudes():
    """All non-negative finite float8 e4m3fn values with their bit patterns, decoded from the format:
    1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 subnormal; S.1111.111 is NaN, no inf."""
    mags = []
    for bits in range(0x7F):  # 0x7F is NaN
        e, m = bits >> 3, bits & 7
        mags.append((m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(mags), np.arange(0x7F, dtype=np.uint8)


def emulate_fp8_bits(x: torch.Tensor, quant_scale: float) -> np.ndarray:
    """Bit patterns of e4m3(clip(x·quant_scale, ±448)): nearest value, ties to the even mantissa."""
    mags, codes = _e4m3_magnitudes()
    assert mags[-1] == 448.0
    y = fp32_product(x, quant_scale).astype(np.float64).ravel()
    a = np.minimum(np.abs(y), 448.0)
    hi = np.searchsorted(mags, a, side="left").clip(max=len(mags) - 1)
    lo = (hi - 1).clip(min=0)
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(codes[lo] % 2 == 0, lo, hi)))
    pick = np.where(a == mags[hi], hi, pick)
    out = codes[pick] | np.where(np.signbit(y), 0x80, 0).astype(np.uint8)
    return out.reshape(x.shape)


def test_fp8_emulation_decodes_like_the_format():
    """The table itself against torch's decoding of every bit pattern (guards the emulation)."""
    mags, codes = _e4m3_magnitudes()
    decoded = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).double().numpy()
    assert np.array_equal(decoded, mags)


# ---- quantized storage --------------------------------------------------------------------------


def crafted_values(quant_scale: float, n: int, seed: int) -> torch.Tensor:
    """Random values plus exact half-way points (k + 0.5)/qs, values past the clip range, and tiny ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 60 / quant_scale
    halves = (torch.randint(-140, 140, (n // 4,), generator=g).float() + 0.5) / quant_scale
    big = torch.tensor([200.0, -200.0, 127.5, -128.5, 1e4, -1e4, 600.0, -600.0, 449.0, 464.0]) / quant_scale
    tiny = torch.randn(n // 8, generator=g) * 1e-3 / quant_scale
    return torch.cat([x, halves, big, tiny])


@pytest.mark.parametrize("kind", [KVCacheDType.int8, KVCacheDType.fp8])
@pytest.mark.parametrize("dequant_scale", [0.25, 0.037, 1.7])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_quantized_storage_bit_exact(kind, dequant_scale, layout):
    """prepare() writes K and V; every stored value equals the emulation's, bit for bit."""
    kv_heads, d = 2, 8
    qs = 1.0 / dequant_scale
    vals = crafted_values(qs, 8 * 2 * kv_heads * d * 3, seed=int(dequant_scale * 1000))
    t = vals.numel() // (2 * kv_heads * d)
    vals = vals[: t * 2 * kv_heads * d].reshape(t, 2 * kv_heads * d)
    lay = head_layout(2, 2, 1, 0)
    qkv = torch.cat([torch.randn(t, 2 * d), vals], dim=1)  # Q (2 heads), then the crafted K and V
    step = Step(new_lens=[t])
    storage = kind.storage_dtype(torch.float32)
    if layout == "contiguous":
        data = torch.zeros(1, 2, kv_heads, t, d, dtype=storage)
        kv = LayerKV(CacheLayout.contiguous, data, kind, dequant_scale)
        stored = data[0]  # [2, KV, T, D]
    else:
        p = 8
        nb = -(-t // p)
        data = torch.zeros(nb + 2, 2, kv_heads, p, d, dtype=storage)
        table = torch.full((1, nb + 1), -1, dtype=torch.int32)
        table[0, :nb] = torch.randperm(nb + 2)[:nb].to(torch.int32)
        kv = LayerKV(CacheLayout.paged, data, kind, dequant_scale, table)
    reference.prepare(qkv, None, step, head_layout=lay, head_size=d, rope=None, kv=kv)
    k, v = vals[:, : kv_heads * d].reshape(t, kv_heads, d), vals[:, kv_heads * d :].reshape(t, kv_heads, d)
    if layout == "paged":
        stored = torch.cat([data[b] for b in table[0, :nb].tolist()], dim=2)[:, :, :t]
    for which, x in ((0, k), (1, v)):
        got = stored[which].transpose(0, 1)  # [T, KV, D]
        if kind is KVCacheDType.int8:
            want = emulate_int8(x, qs)
            assert np.array_equal(got.numpy(), want)
        else:
            want = emulate_fp8_bits(x, qs)
            assert np.array_equal(got.view(torch.uint8).numpy(), want)


@pytest.mark.parametrize("kind", [KVCacheDType.int8, KVCacheDType.fp8])
def test_quantized_cache_through_layer_and_attend(kind):
    """The layer stores its K/V quantized (exactly the emulation), attends over the dequantized values
    (float64 oracle from the emulated storage), and stays close to the unquantized cache."""
    c = AttentionConfig(
        hidden_size=32, num_heads=4, num_kv_heads=2, position_embedding="rope_gpt_neox", kv_cache_dtype=kind
    )
    c_ref = AttentionConfig(hidden_size=32, num_heads=4, num_kv_heads=2, position_embedding="rope_gpt_neox")
    g = torch.Generator().manual_seed(5)
    w = dict(
        qkv_weight=torch.randn(c.qkv_size, 32, generator=g) / 6,
        dense_weight=torch.randn(32, 32, generator=g) / 6,
        qkv_bias=torch.randn(c.qkv_size, generator=g) * 0.3,
        dense_bias=torch.randn(32, generator=g),
    )
    lay = head_layout(4, 2, 1, 0)
    dequant = 3.0 / (127 if kind is KVCacheDType.int8 else 448)
    layer, layer_ref = Attention(c, comm=NoComm()), Attention(c_ref, comm=NoComm())
    layer.load_weights(**w)
    layer_ref.load_weights(**w)
    cache = KVCache(config=c, head_layout=lay, num_layers=1, max_batch=2, max_seq_len=12, scales=[dequant])
    cache_ref = KVCache(config=c_ref, head_layout=lay, num_layers=1, max_batch=2, max_seq_len=12)
    x = torch.randn(9, 32, generator=g)
    step = Step(new_lens=[6, 3], slots=[1, 0])
    out = layer(x, step, cache)
    out_ref = layer_ref(x, step, cache_ref)
    q = reference.prepare(
        layer.qkv(x, with_bias=False), layer.qkv.bias, step, head_layout=lay, head_size=8, rope=layer.rope, kv=None
    )
    # stored == emulation of the layer's own K/V (K after RoPE), [T, KV, D], which the fp32 cache holds exactly
    rows = list(zip(step.slots, step.new_lens, strict=True))
    k, v = (torch.cat([cache_ref.data[0, s, which, :, :n].transpose(0, 1) for s, n in rows]) for which in (0, 1))
    for i, slot in enumerate(step.slots):
        r = step.token_range(i)
        for which, src in ((0, k), (1, v)):
            got = cache.data[0, slot, which, :, : len(r)].transpose(0, 1)
            if kind is KVCacheDType.int8:
                assert np.array_equal(got.numpy(), emulate_int8(src[r.start : r.stop], 1 / dequant))
            else:
                assert np.array_equal(
                    got.view(torch.uint8).numpy(), emulate_fp8_bits(src[r.start : r.stop], 1 / dequant)
                )
    # attend reads stored · dequant_scale: float64 softmax over the emulated values
    ctx = []
    for i in range(step.num_seqs):
        r = step.token_range(i)
        kk, vv = (k[r.start : r.stop], v[r.start : r.stop])
        if kind is KVCacheDType.int8:
            kd = torch.from_numpy(emulate_int8(kk, 1 / dequant)).double() * dequant
            vd = torch.from_numpy(emulate_int8(vv, 1 / dequant)).double() * dequant
        else:
            kd = torch.from_numpy(emulate_fp8_bits(kk, 1 / dequant)).view(torch.float8_e4m3fn).double() * dequant
            vd = torch.from_numpy(emulate_fp8_bits(vv, 1 / dequant)).view(torch.float8_e4m3fn).double() * dequant
        kd, vd = kd.repeat_interleave(2, dim=1), vd.repeat_interleave(2, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[r.start : r.stop].double(), kd) / math.sqrt(8)
        s = s.masked_fill(torch.ones(len(r), len(r), dtype=torch.bool).triu(1), float("-inf"))
        ctx.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vd).reshape(len(r), 32))
    want = torch.cat(ctx) @ w["dense_weight"].double().T + w["dense_bias"].double()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    tol = 0.05 if kind is KVCacheDType.int8 else 0.25
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    assert not torch.allclose(out, out_ref, atol=1e-6, rtol=0)  # quantization did something


@pytest.mark.parametrize(
    "kind,scales,needle",
    [
        (KVCacheDType.int8, None, "scales"),
        (KVCacheDType.fp8, [1.0, 2.0], "scales"),
        (KVCacheDType.int8, [0.0], "scales"),
        (KVCacheDType.int8, [float("nan")], "scales"),
        (KVCacheDType.auto, [1.0], "scales"),
    ],
)
def test_cache_scales_validation(kind, scales, needle):
    c = AttentionConfig(hidden_size=16, num_heads=2, kv_cache_dtype=kind)
    with pytest.raises(ValueError, match=needle):
        KVCache(config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=1, max_seq_len=4, scales=scales)


def test_paged_block_size_must_be_power_of_two():
    c = AttentionConfig(hidden_size=16, num_heads=2)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(
            config=c,
            head_layout=head_layout(2, 2, 1, 0),
            num_layers=1,
            num_blocks=4,
            block_size=6,
            max_seqs=2,
            max_blocks_per_seq=2,
        )


# ---- capacity: raise before writing anything ---------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise snapshot (NaN-safe comparison of whole storages)."""
    return t.detach().clone().view(torch.uint8) if t.element_size() == 1 else t.detach().clone().view(torch.int16)


def small_layer(**kw):
    c = AttentionConfig(hidden_size=16, num_heads=2, **kw)
    g = torch.Generator().manual_seed(1)
    layer = Attention(c, comm=NoComm())
    layer.load_weights(
        qkv_weight=torch.randn(c.qkv_size, 16, generator=g) / 4,
        dense_weight=torch.randn(16, 16, generator=g) / 4,
        qkv_bias=torch.randn(c.qkv_size, generator=g),
        dense_bias=torch.randn(16, generator=g),
    )
    return c, layer


@pytest.mark.parametrize("kind", [KVCacheDType.auto, KVCacheDType.int8])
def test_contiguous_capacity_error_changes_nothing(kind):
    c, layer = small_layer(kv_cache_dtype=kind)
    scales = None if kind is KVCacheDType.auto else [0.05]
    cache = KVCache(
        config=c, head_layout=head_layout(2, 2, 1, 0), num_layers=1, max_batch=3, max_seq_len=6, scales=scales
    )
    if kind is KVCacheDType.auto:
        cache.data.fill_(NAN)
    else:
        cache.data.copy_(torch.randint(-128, 128, cache.data.shape, dtype=torch.int8))
    g = torch.Generator().manual_seed(2)
    layer(torch.randn(4, 16, generator=g), Step(new_lens=[4], slots=[1]), cache)
    before = bits(cache.data)
    bad_steps = [
        Step(new_lens=[3], past_lens=[4], slots=[1]),  # 7 > max_seq_len
        Step(new_lens=[1, 7], past_lens=[4, 0], slots=[1, 0]),  # the second sequence alone overflows
        Step(new_lens=[1, 2], past_lens=[4, 0], slots=[1, 3]),  # slot 3 >= max_batch
    ]
    for step in bad_steps:
        with pytest.raises(CacheCapacityError):
            layer(torch.randn(step.num_tokens, 16, generator=g), step, cache)
        assert torch.equal(bits(cache.data), before)


def test_paged_capacity_errors_change_nothing():
    c, layer = small_layer()
    cache = PagedKVCache(
        config=c,
        head_layout=head_layout(2, 2, 1, 0),
        num_layers=2,
        num_blocks=5,
        block_size=4,
        max_seqs=4,
        max_blocks_per_seq=3,
    )
    cache.data.fill_(NAN)
    g = torch.Generator().manual_seed(3)
    s0 = Step(new_lens=[6, 3], slots=[0, 2])
    cache.reserve(s0)
    layer(torch.randn(9, 16, generator=g), s0, cache)

    def snapshot():
        a = cache.allocator
        return bits(cache.data), a.table.clone(), list(a.free_blocks), {k: list(v) for k, v in a.owned.items()}

    before = snapshot()
    # a step the reservation does not cover
    with pytest.raises(CacheCapacityError, match="reserve"):
        layer(torch.randn(3, 16, generator=g), Step(new_lens=[3], past_lens=[6], slots=[0]), cache)
    # the pool cannot cover it: 2 blocks free, 3 needed (all or nothing: slot 2 would have fit)
    with pytest.raises(CacheCapacityError, match="exhausted"):
        cache.reserve(Step(new_lens=[4, 9], past_lens=[3, 0], slots=[2, 1]))
    # more blocks than a sequence may own
    with pytest.raises(CacheCapacityError, match="max_blocks_per_seq"):
        cache.reserve(Step(new_lens=[7], past_lens=[6], slots=[0]))
    with pytest.raises(CacheCapacityError, match="slot"):
        cache.reserve(Step(new_lens=[1], slots=[4]))
    after = snapshot()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert after[2:] == before[2:]


def test_capacities_agree_with_check_step():
    """``capacities`` (ReplayState's vectorized test) says no exactly where ``check_step`` raises."""
    c, _ = small_layer()
    lay = head_layout(2, 2, 1, 0)
    contiguous = KVCache(config=c, head_layout=lay, num_layers=1, max_batch=3, max_seq_len=6)
    paged = PagedKVCache(
        config=c, head_layout=lay, num_layers=1, num_blocks=6, block_size=4, max_seqs=4, max_blocks_per_seq=3
    )
    paged.reserve(Step(new_lens=[5, 2], slots=[0, 2]))  # slot 0: 2 blocks, slot 2: 1, slots 1 and 3: none
    contiguous.set_written([0, 1, 2], [9] * 3)  # capacity alone is under test: every past is held
    paged.set_written([0, 1, 2, 3], [9] * 4)
    assert contiguous.capacities([0, 2, 3, -1]).tolist() == [6, 6, 0, 0]
    assert paged.capacities([0, 1, 2, 3]).tolist() == [8, 0, 4, 0]
    for cache, slots in ((contiguous, [0, 1, 2, 3]), (paged, [0, 1, 2, 3])):
        for total in range(1, 10):
            step = Step(new_lens=[1] * 4, past_lens=[total - 1] * 4, slots=slots)
            fits = cache.capacities(slots) >= total
            for slot, ok in zip(slots, fits, strict=True):
                one = Step(new_lens=[1], past_lens=[total - 1], slots=[slot])
                if ok:
                    cache.check_step(one)
                else:
                    with pytest.raises(CacheCapacityError):
                        cache.check_step(one)
            assert fits.all() == _fits(cache, step)


def _fits(cache, step) -> bool:
    try:
        cache.check_step(step)
    except CacheCapacityError:
        return False
    return True


def test_exhaustion_leaves_other_sequences_intact():
    """A new request that does not fit fails; the running sequences decode on as if nothing happened."""
    c, layer = small_layer(position_embedding="rope_gptj")
    lay = head_layout(2, 2, 1, 0)
    paged = PagedKVCache(
        config=c, head_layout=lay, num_layers=1, num_blocks=6, block_size=2, max_seqs=4, max_blocks_per_seq=8
    )
    paged.data.fill_(NAN)
    contiguous = KVCache(config=c, head_layout=lay, num_layers=1, max_batch=4, max_seq_len=16)
    g = torch.Generator().manual_seed(4)
    s0 = Step(new_lens=[3, 4], slots=[0, 1])
    x0 = torch.randn(7, 16, generator=g)
    paged.reserve(s0)
    torch.testing.assert_close(layer(x0, s0, paged), layer(x0, s0, contiguous), rtol=0, atol=0)
    before = bits(paged.data)
    bad = Step(new_lens=[1, 1, 5], past_lens=[3, 4, 0], slots=[0, 1, 2])
    with pytest.raises(CacheCapacityError, match="exhausted"):
        paged.reserve(bad)
    with pytest.raises(CacheCapacityError):
        layer(torch.randn(7, 16, generator=g), bad, paged)
    assert torch.equal(bits(paged.data), before)
    s1 = Step(new_lens=[1, 1], past_lens=[3, 4], slots=[0, 1])
    x1 = torch.randn(2, 16, generator=g)
    paged.reserve(s1)
    torch.testing.assert_close(layer(x1, s1, paged), layer(x1, s1, contiguous), rtol=0, atol=0)


# ---- block allocator --------------------------------------------------------------------------


def test_allocator_grows_frees_and_reuses():
    a = BlockAllocator(num_blocks=8, block_size=4, max_seqs=3, max_blocks_per_seq=5, device="cpu")
    assert a.num_free == 8
    a.reserve({0: 5, 2: 4})  # ceil(5/4) = 2 blocks, ceil(4/4) = 1
    assert len(a.owned[0]) == 2 and len(a.owned[2]) == 1 and a.num_free == 5
    assert a.capacity(0) == 8 and a.capacity(2) == 4 and a.capacity(1) == 0
    a.reserve({0: 8})  # already covered
    assert len(a.owned[0]) == 2
    a.reserve({0: 13})  # grows by 2
    assert len(a.owned[0]) == 4 and a.num_free == 3
    all_owned = a.owned[0] + a.owned[2]
    assert len(set(all_owned)) == len(all_owned)  # no block given twice
    for slot in range(3):
        row = a.table[slot].tolist()
        blocks = a.owned.get(slot, [])
        assert row[: len(blocks)] == blocks and all(b == -1 for b in row[len(blocks) :])
    freed = set(a.owned[0])
    a.free(0)
    assert a.num_free == 7 and 0 not in a.owned
    assert (a.table[0] == -1).all()
    a.reserve({1: 16})  # 4 blocks: taken from the 7 free, freed ones included
    assert len(a.owned[1]) == 4 and freed & set(a.owned[1])
    assert set(a.owned[1]).isdisjoint(a.owned[2])
    a.free(1)
    a.free(2)
    assert a.num_free == 8 and sorted(a.free_blocks) == list(range(8))
    a.free(1)  # freeing an empty slot is harmless
    assert a.num_free == 8


def test_allocator_exhaustion_is_all_or_nothing():
    a = BlockAllocator(num_blocks=4, block_size=2, max_seqs=3, max_blocks_per_seq=4, device="cpu")
    a.reserve({0: 3})
    state = (a.table.clone(), list(a.free_blocks), {k: list(v) for k, v in a.owned.items()})
    with pytest.raises(CacheCapacityError, match=r"needs 3 more blocks of 2 tokens, 2 of 4 are free"):
        a.reserve({1: 2, 2: 4})
    assert torch.equal(a.table, state[0]) and a.free_blocks == state[1] and a.owned == state[2]


# ---- paged equals contiguous ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", [KVCacheDType.auto, KVCacheDType.int8])
def test_paged_equals_contiguous_random_block_tables_backend(seed, kind):
    g = torch.Generator().manual_seed(seed)
    kv_heads, heads, d, p = 2, 4, 8, 4
    seqs = [(5, 0), (1, 9), (3, 4), (1, 2)]
    n = len(seqs)
    lengths = [a + b for a, b in seqs]
    slots = torch.randperm(n, generator=g).tolist()
    storage = kind.storage_dtype(torch.float32)
    scale = 1.0 if kind is KVCacheDType.auto else 0.04
    nb_seq = [-(-length // p) for length in lengths]
    num_blocks = sum(nb_seq) + 4
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((n, max(nb_seq) + 1), -1, dtype=torch.int32)
    for i, s in enumerate(slots):
        table[s, : nb_seq[i]] = torch.tensor([perm.pop() for _ in range(nb_seq[i])], dtype=torch.int32)
    fill = NAN if kind is KVCacheDType.auto else 0
    paged = LayerKV(
        CacheLayout.paged, torch.full((num_blocks, 2, kv_heads, p, d), fill, dtype=storage), kind, scale, table
    )
    contig = LayerKV(
        CacheLayout.contiguous, torch.full((n, 2, kv_heads, max(lengths), d), fill, dtype=storage), kind, scale
    )
    if kind is KVCacheDType.int8:  # poison with random codes instead (int8 has no NaN)
        paged.data.copy_(torch.randint(-128, 128, paged.data.shape, generator=g, dtype=torch.int8))
        contig.data.copy_(torch.randint(-128, 128, contig.data.shape, generator=g, dtype=torch.int8))
    lay = head_layout(heads, kv_heads, 1, 0)
    # history: write every sequence's past, then run the step
    hist = Step(
        new_lens=[b for _, b in seqs if b] or [1],
        past_lens=[0] * sum(1 for _, b in seqs if b),
        slots=[s for s, (_, b) in zip(slots, seqs, strict=True) if b],
    )
    qkv_h = torch.randn(hist.num_tokens, (heads + 2 * kv_heads) * d, generator=g)
    for kv in (paged, contig):
        reference.prepare(qkv_h, None, hist, head_layout=lay, head_size=d, rope=None, kv=kv)
    step = Step(new_lens=[a for a, _ in seqs], past_lens=[b for _, b in seqs], slots=slots)
    qkv = torch.randn(step.num_tokens, (heads + 2 * kv_heads) * d, generator=g)
    spec = AttentionSpec(mask=CAUSAL, softmax_scale=0.3, alibi_slopes=torch.rand(heads))
    outs = []
    for kv in (paged, contig):
        q = reference.prepare(qkv, None, step, head_layout=lay, head_size=d, rope=None, kv=kv)
        outs.append(reference.attend(q, kv, step, spec))
    assert not outs[0][0].isnan().any()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_paged_equals_contiguous_through_layer(block_size):
    """Several steps (prefill, chunks crossing block boundaries, decode, a finished sequence freed and
    its blocks reused by a new one) with a shuffled free list so block tables are random."""
    c, layer = small_layer(num_kv_heads=1, position_embedding="rope_gpt_neox")
    lay = head_layout(2, 1, 1, 0)
    paged = PagedKVCache(
        config=c,
        head_layout=lay,
        num_layers=1,
        num_blocks=64 // block_size + 8,
        block_size=block_size,
        max_seqs=4,
        max_blocks_per_seq=32 // block_size + 1,
    )
    paged.data.fill_(NAN)
    g = torch.Generator().manual_seed(block_size)
    paged.allocator.free_blocks = torch.randperm(paged.allocator.num_blocks, generator=g).tolist()
    contig = KVCache(config=c, head_layout=lay, num_layers=1, max_batch=4, max_seq_len=32)
    contig.data.fill_(NAN)
    steps = [
        Step(new_lens=[5, 3], slots=[0, 2]),
        Step(new_lens=[1, 6], past_lens=[5, 3], slots=[0, 2]),
        Step(new_lens=[7, 1, 1], past_lens=[0, 6, 9], slots=[1, 0, 2]),
        "free 0",
        Step(new_lens=[1, 4, 1], past_lens=[7, 0, 10], slots=[1, 0, 2]),
        Step(new_lens=[1, 1, 1], past_lens=[11, 8, 4], slots=[2, 1, 0]),
    ]
    for step in steps:
        if isinstance(step, str):
            paged.free(0)
            contig.data[0, 0].fill_(NAN)
            continue
        paged.reserve(step)
        x = torch.randn(step.num_tokens, 16, generator=g)
        a, b = layer(x, step, paged), layer(x, step, contig)
        assert not a.isnan().any()
        assert torch.equal(a, b)


# ---- beam search: cache indirection -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_beam_indirection_vs_gather(layout, heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    batch, width, s_max, d = 2, 3, 12, 8
    past = [7, 5]  # per batch entry, same for its beams
    data = torch.randn(batch * width, 2, kv_heads, s_max, d, generator=g)
    ind = torch.randint(0, width, (batch, width, s_max), generator=g, dtype=torch.int32)
    slots = list(range(batch * width))
    step = Step(
        new_lens=[1] * len(slots),
        past_lens=[past[s // width] for s in slots],
        slots=slots,
        beam_width=width,
        cache_indirection=ind,
    )
    q = torch.randn(len(slots), heads, d, generator=g)
    if layout == "contiguous":
        kv = LayerKV(CacheLayout.contiguous, data.clone(), KVCacheDType.auto, 1.0)
    else:
        p = 4
        per = s_max // p
        perm = torch.randperm(batch * width * per + 3, generator=g)
        table = perm[: batch * width * per].reshape(batch * width, per).to(torch.int32)
        pool = torch.full((batch * width * per + 3, 2, kv_heads, p, d), NAN)
        for s in slots:
            for j in range(per):
                pool[table[s, j]] = data[s, :, :, j * p : (j + 1) * p]
        kv = LayerKV(CacheLayout.paged, pool, KVCacheDType.auto, 1.0, table)
    spec = AttentionSpec(mask=CAUSAL, softmax_scale=0.35)
    out, _ = reference.attend(q, kv, step, spec)
    # reference: gather every position's K/V from the beam the indirection names, then the new token
    # (position past) from the sequence's own slot
    view = data.reshape(batch, width, 2, kv_heads, s_max, d)
    idx = ind.long()[:, :, None, None, :, None].expand(batch, width, 2, kv_heads, s_max, d)
    gathered = torch.gather(view, 1, idx).reshape(batch * width, 2, kv_heads, s_max, d)
    for s in slots:
        n = past[s // width]
        kk = torch.cat([gathered[s, 0, :, :n], data[s, 0, :, n : n + 1]], dim=1).double()  # [KV, n+1, D]
        vv = torch.cat([gathered[s, 1, :, :n], data[s, 1, :, n : n + 1]], dim=1).double()
        kk, vv = kk.repeat_interleave(heads // kv_heads, 0), vv.repeat_interleave(heads // kv_heads, 0)
        att = torch.softmax(torch.einsum("hd,hkd->hk", q[s].double(), kk) * 0.35, -1)
        want = torch.einsum("hk,hkd->hd", att, vv)
        torch.testing.assert_close(out[s].double(), want, atol=1e-5, rtol=1e-5)
    # the indirection matters: the same step without it reads each beam's own history
    plain = Step(new_lens=[1] * len(slots), past_lens=[past[s // width] for s in slots], slots=slots)
    assert not torch.allclose(reference.attend(q, kv, plain, spec)[0], out)
