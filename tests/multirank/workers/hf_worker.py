"""HuggingFace oracle checks for ``Attention`` / ``BertAttention`` at any TP size.

Every check compares our layer with a tiny HF model (``tests/hf_adapters.py``): the attention
output after the dense projection and all-reduce, the cache contents (this rank's KV heads
of HF's ``past_key_values``), and several decode steps; metamorphic checks (mixed step,
packed vs padded, chunked prefill, tp=N vs tp=1) are also anchored to HF outputs.

Each case is ``reference()`` (the HF side: rank independent, deterministic) plus
``check(ref, comm)`` (our side, on one rank of a TP group ``comm``), so the same code runs:
  - in one process: ``tests/unit/test_hf_oracles.py`` (``NoComm``, or ``simulate(tp, ...)``);
  - under mpirun: ``launch/tp_run -n N tests/multirank/workers/hf_worker.py [case ...]``:
    every rank builds the references itself and checks its own output; one line per case
    and rank, ``HF_CASE <name> rank <r> ok|FAIL <why>``, then ``PASS rank <r>`` if all passed.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[3]
for _p in (str(_ROOT), str(_ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import hf_adapters as hf  # noqa: E402
import torch  # noqa: E402

from tp_runtime.batch.kv_cache import KVCache, PagedKVCache  # noqa: E402
from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.distributed.comm import Communicator, NoComm  # noqa: E402
from tp_runtime.layers.attention import Attention, BertAttention  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Max abs error allowed, relative to the reference's max abs value (the output scale). fp32:
# measured errors are ~5e-7. Half types: 4 ulps at 1.0 (the reference is HF in fp32; measured
# errors are about 1-2 ulps).
RTOL = {F32: 1e-5, F16: 4 * torch.finfo(F16).eps, BF16: 4 * torch.finfo(BF16).eps}
RTOL_SAME = 2e-6  # our own runs that differ only in summation order (tp=N vs tp=1, mixed vs separate)
DECODE_STEPS = 8
DTYPE_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}

# Where our layers run. HF always runs on the CPU in fp32. main() sets these for the world's
# device: on CUDA (kernels for fp16/bf16 and head sizes 64..256 only) every oracle gets head
# size 64 and the fp32 cases run in bf16, with bf16 tolerances.
DEVICE = torch.device("cpu")
HEAD_SIZE: int | None = None  # overrides every oracle's head size
FP32_AS = F32  # the dtype the fp32 cases run in


def act(dtype: torch.dtype) -> torch.dtype:
    return FP32_AS if dtype is F32 else dtype


def rtol(dtype: torch.dtype = F32) -> float:
    return RTOL[act(dtype)]


def rtol_same() -> float:
    return RTOL_SAME if FP32_AS is F32 else RTOL[FP32_AS]


def sized(build, **kwargs) -> Callable:
    """``build(**kwargs)``, with ``HEAD_SIZE`` (when set) replacing the head size."""
    return lambda: build(**{**kwargs, **({} if HEAD_SIZE is None else {"head_size": HEAD_SIZE})})


# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------
_local = threading.local()  # per rank thread (simulate): the failures of the running case


def _fail(message: str) -> None:
    """Inside ``run_case`` a mismatch is recorded and the case goes on, so every rank runs the
    same collectives even when only one rank's cache differs; outside, it raises at once."""
    failures = getattr(_local, "failures", None)
    if failures is None:
        raise AssertionError(message)
    failures.append(message)


def run_case(c: Case, ref, comm: Communicator) -> None:
    """Run one case on one rank; raise ``AssertionError`` listing its mismatches (first 8)."""
    _local.failures = []
    try:
        c.check(ref, comm)
    finally:
        failures, _local.failures = _local.failures, None
    if failures:
        more = f"\n... and {len(failures) - 8} more" if len(failures) > 8 else ""
        raise AssertionError(f"{c.name} (tp rank {comm.rank}/{comm.size}):\n" + "\n".join(failures[:8]) + more)


def assert_close(what: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    ours, ref = ours.detach().cpu().float(), ref.detach().cpu().float()
    if ours.shape != ref.shape:
        return _fail(f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    scale = max(ref.abs().max().item(), 1e-6)
    diff = (ours - ref).abs()
    err = diff.max().item()
    if not err <= rtol * scale:  # also catches NaN
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if err == err else "NaN"
        _fail(f"{what}: max abs error {err:.3g} at {where} > {rtol:g} x scale {scale:.3g} (= {rtol * scale:.3g})")


class OnDevice:
    """Our layer on ``DEVICE``: moves the CPU inputs there (activations in its dtype) and the output back."""

    def __init__(self, layer):
        self.layer = layer

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def __call__(self, x: torch.Tensor, *args, encoder_output=None, **kwargs) -> torch.Tensor:
        dt = self.layer.config.dtype
        kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if encoder_output is not None:
            kwargs["encoder_output"] = encoder_output.to(DEVICE, dt)
        return self.layer(x.to(DEVICE, dt), *args, **kwargs).cpu()


def make_layer(o: hf.Oracle, comm: Communicator, dtype: torch.dtype = F32) -> OnDevice:
    dtype = act(dtype)
    cfg = dataclasses.replace(o.config, dtype=dtype)
    layer = (BertAttention if o.kind == "encoder" else Attention)(cfg, comm=comm, device=DEVICE)
    layer.load_weights(**{k: None if v is None else v.to(DEVICE, dtype) for k, v in o.weights.items()})
    return OnDevice(layer)


def make_cache(layer, max_batch: int, max_seq_len: int) -> KVCache:
    return KVCache(
        config=layer.config,
        head_layout=layer.layout,
        num_layers=1,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        device=DEVICE,
    )


def _step(**kwargs) -> Step:
    return Step(device=DEVICE, **kwargs)


def make_paged_cache(layer, max_batch: int, max_seq_len: int, block_size: int = 4) -> PagedKVCache:
    blocks = -(-max_seq_len // block_size)
    return PagedKVCache(
        config=layer.config,
        head_layout=layer.layout,
        num_layers=1,
        num_blocks=max_batch * blocks,
        block_size=block_size,
        max_seqs=max_batch,
        max_blocks_per_seq=blocks,
        device=DEVICE,
    )


def cached(cache: KVCache | PagedKVCache, slot: int, j: int, length: int) -> torch.Tensor:
    """K (``j`` 0) or V (1) of positions ``0..length-1`` of ``slot``: ``[KV_r, L, D]``."""
    if isinstance(cache, KVCache):
        return cache.data[0, slot, j, :, :length]
    pos = torch.arange(length, device=cache.data.device)
    blocks = cache.allocator.table[slot, pos // cache.block_size].long()
    return cache.data[0, blocks, j, :, pos % cache.block_size].transpose(0, 1)


def check_cache(what: str, cache, layer, hf_kv, rows: list[tuple[int, int, torch.Tensor]], rtol: float):
    """``rows``: (our slot, HF batch row, HF positions [L] that hold our positions 0..L-1).
    Our per-rank cache holds this rank's KV heads (``layout.kv_heads``) of HF's cache."""
    heads = list(layer.layout.kv_heads)
    for j, name in enumerate(("K", "V")):
        for slot, b, pos in rows:
            ref = hf_kv[j][b][heads][:, pos]  # [KV_r, L, D]
            assert_close(f"{what} cache {name} slot {slot}", cached(cache, slot, j, pos.numel()), ref, rtol)


def pack(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Right-padded ``[B, S, ...]`` -> packed ``[sum(lens), ...]``."""
    return torch.cat([x[b, :n] for b, n in enumerate(lens)])


def poison_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NaN where ``mask`` is 0: any use of a padding token shows up as NaN."""
    x = x.clone()
    x[~mask.bool()] = float("nan")
    return x


def right_mask(lens: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).long()


# ---------------------------------------------------------------------------------------------
# Replays: feed HF's captured inputs to our layer and compare with HF's outputs and cache
# ---------------------------------------------------------------------------------------------
def replay_decoder(
    o: hf.Oracle,
    trace: hf.Trace,
    comm: Communicator,
    dtype=F32,
    *,
    padded: bool = False,
    slots: list[int] | None = None,
    paged: bool = False,
    position_bias: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Equal-length batch, the calls HF made (prefill or chunks, then one token per call).
    ``padded``: give multi-token calls as ``[B, S, hidden]``; else packed ``[B·S, hidden]``.
    ``paged``: a paged cache (blocks of 4, grown before every step, so sequences interleave).
    ``position_bias``: explicit relative bias ``[H, L, L]`` (all heads; sliced to this rank)."""
    dtype = act(dtype)
    calls = trace.calls[o.name]
    b = calls[0].hidden.shape[0]
    slots = slots or list(range(b))
    layer = make_layer(o, comm, dtype)
    total = sum(c.hidden.shape[1] for c in calls)
    cache = (make_paged_cache if paged else make_cache)(layer, b, total)
    kw = {}
    if position_bias is not None:
        kw["position_bias"] = position_bias[list(layer.layout.q_heads)].contiguous()
    tol, past, outs = rtol(dtype), 0, []
    for i, c in enumerate(calls):
        s = c.hidden.shape[1]
        step = _step(new_lens=[s] * b, past_lens=[past] * b, slots=slots)
        if paged:
            cache.reserve(step)
        x = c.hidden.to(dtype)
        if padded and s > 1:
            y = layer(x, step, cache, **kw)
        else:
            y = layer(x.reshape(b * s, -1), step, cache, **kw).reshape(b, s, -1)
        assert_close(f"{o.name} {dtype} call {i} (past {past}, {s} new) output", y, c.out, tol)
        past += s
        rows = [(slots[r], r, torch.arange(past)) for r in range(b)]
        check_cache(f"{o.name} {dtype} after call {i}", cache, layer, trace.caches[o.name][i], rows, tol)
        outs.append(y)
    return outs


def replay_cross(
    o: hf.Oracle, trace: hf.Trace, comm: Communicator, enc_lens: list[int], dtype=F32, slots: list[int] | None = None
) -> list[torch.Tensor]:
    """Cross attention: the first call projects the (packed) encoder output into the cross
    cache, later calls reuse it; keys limited by each sequence's encoder length."""
    dtype = act(dtype)
    calls = trace.calls[o.name]
    b = calls[0].hidden.shape[0]
    slots = slots or list(range(b))
    layer = make_layer(o, comm, dtype)
    cache = make_cache(layer, b, max(enc_lens))
    tol, past, outs = rtol(dtype), 0, []
    for i, c in enumerate(calls):
        s = c.hidden.shape[1]
        step = _step(new_lens=[s] * b, past_lens=[past] * b, slots=slots, encoder_lens=enc_lens)
        enc = None
        if i == 0:
            enc = pack(poison_padding(c.encoder, right_mask(enc_lens, c.encoder.shape[1])), enc_lens).to(dtype)
        y = layer(c.hidden.to(dtype).reshape(b * s, -1), step, cache, encoder_output=enc).reshape(b, s, -1)
        assert_close(f"{o.name} {dtype} call {i} output", y, c.out, tol)
        rows = [(slots[r], r, torch.arange(enc_lens[r])) for r in range(b)]
        check_cache(f"{o.name} {dtype} after call {i}", cache, layer, trace.caches[o.name][i], rows, tol)
        past += s
        outs.append(y)
    return outs


def replay_encoder(
    o: hf.Oracle,
    trace: hf.Trace,
    comm: Communicator,
    lens: list[int],
    dtype=F32,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BertAttention on right-padded input (padding poisoned with NaN) and on packed input:
    both equal HF on real tokens, and each other. ``position_bias``: explicit ``[H, S, S]``."""
    dtype = act(dtype)
    c = trace.calls[o.name][0]
    mask = right_mask(lens, c.hidden.shape[1]).bool()
    layer = make_layer(o, comm, dtype)
    kw = {}
    if position_bias is not None:
        kw["position_bias"] = position_bias[list(layer.layout.q_heads)].contiguous()
    tol = rtol(dtype)
    x = poison_padding(c.hidden, mask).to(dtype)
    padded = layer(x, lens, **kw)
    assert_close(f"{o.name} {dtype} padded output (real tokens)", padded[mask], c.out[mask], tol)
    packed = layer(pack(x, lens), torch.tensor(lens), **kw)
    assert_close(f"{o.name} {dtype} packed output", packed, c.out[mask], tol)
    assert_close(f"{o.name} {dtype} packed == padded", packed, padded[mask], rtol_same())
    return packed


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    reference: Callable[[], object]  # HF side, the same on every rank
    check: Callable[[object, Communicator], None]  # our side, on one rank


CASES: dict[str, Case] = {}
_REFERENCES: dict[Callable, object] = {}


def reference_of(c: Case):
    """The case's HF reference, built once per process (cases may share one, e.g. fp32 and bf16)."""
    if c.reference not in _REFERENCES:
        _REFERENCES[c.reference] = c.reference()
    return _REFERENCES[c.reference]


def case(name: str, reference: Callable[[], object]):
    def register(check):
        CASES[name] = Case(name, reference, check)
        return check

    return register


def _tp1_equal(what: str, outs_n: list[torch.Tensor], outs_1: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(outs_n, outs_1, strict=True)):
        assert_close(f"{what} call {i}: tp=N equals tp=1", a, b, rtol_same())


# ---- decoder families: prefill + 8 decode steps, fp32 (tp=N == tp=1 too) and one half dtype --
DECODERS: dict[str, tuple[Callable[[], hf.Oracle], torch.dtype]] = {
    "bloom12": (sized(hf.bloom, num_heads=12), BF16),
    "bloom24": (sized(hf.bloom, num_heads=24, head_size=4), F16),
    "mpt": (sized(hf.mpt), F16),
    "falcon_mqa": (sized(hf.falcon, alibi=False), BF16),
    "falcon_alibi": (sized(hf.falcon, alibi=True), F16),
    "gpt_neox25": (sized(hf.gpt_neox, rotary_pct=0.25), F16),
    "gpt_neox100": (sized(hf.gpt_neox, rotary_pct=1.0), BF16),
    "gptj": (sized(hf.gptj), BF16),
    "llama_gqa": (sized(hf.llama, num_heads=8, num_kv_heads=2), F16),
    "llama_mqa": (sized(hf.llama, num_heads=8, num_kv_heads=1, bias=False), BF16),
    "llama_linear": (sized(hf.llama, num_heads=8, num_kv_heads=4, scaling="linear", factor=2.0), BF16),
}


_DECODER_REFERENCES: dict[str, Callable] = {}


def _decoder_reference(build, batch=2, prompt=6, seed=11):
    def reference():
        o = build()
        ids = hf.random_ids(batch, prompt + DECODE_STEPS, seed)
        return o, hf.run_decoder([o], ids, [prompt] + [1] * DECODE_STEPS)

    return reference


for _name, (_build, _half) in DECODERS.items():

    def _check_fp32(ref, comm, _name=_name):
        o, trace = ref
        outs = replay_decoder(o, trace, comm, padded=_name.startswith(("bloom", "llama")), slots=[1, 0])
        if comm.size > 1:
            _tp1_equal(o.name, outs, replay_decoder(o, trace, NoComm(), slots=[1, 0]))

    def _check_half(ref, comm, _half=_half):
        o, trace = ref
        replay_decoder(o, trace, comm, _half)

    _ref = _DECODER_REFERENCES[_name] = _decoder_reference(_build)
    case(f"decode_{_name}", _ref)(_check_fp32)
    case(f"{DTYPE_NAMES[_half]}_{_name}", _ref)(_check_half)


def _dynamic_reference():
    # Prompts longer than max_position_embeddings=8, equal lengths (HF scales by the batch max);
    # HF recomputes the base at every decode step (seq_len grows): our per-sequence rule equals it.
    o = sized(hf.llama, num_heads=8, num_kv_heads=2, scaling="dynamic", factor=2.0, max_positions=8)()
    ids = hf.random_ids(2, 12 + DECODE_STEPS, 12)
    return o, hf.run_decoder([o], ids, [12] + [1] * DECODE_STEPS)


@case("decode_llama_dynamic", _dynamic_reference)
def _(ref, comm):
    o, trace = ref
    outs = replay_decoder(o, trace, comm)
    if comm.size > 1:
        _tp1_equal(o.name, outs, replay_decoder(o, trace, NoComm()))


@case("bf16_llama_dynamic", _dynamic_reference)
def _(ref, comm):
    replay_decoder(*ref, comm, BF16)


def _dynamic_chunked_reference():
    # A 12-token prompt in two chunks of 6 (M = 8): the first chunk is rotated with the plain
    # base, the second with the base for length 12, and the cached keys keep theirs (HF alike).
    o = sized(hf.llama, num_heads=8, num_kv_heads=2, scaling="dynamic", factor=2.0, max_positions=8)()
    ids = hf.random_ids(2, 12 + DECODE_STEPS, 12)
    return o, hf.run_decoder([o], ids, [6, 6] + [1] * DECODE_STEPS)


@case("chunked_llama_dynamic", _dynamic_chunked_reference)
def _(ref, comm):
    replay_decoder(*ref, comm)


for _name in ("llama_gqa", "bloom12"):

    def _check_paged(ref, comm):
        replay_decoder(*ref, comm, paged=True, slots=[1, 0])

    case(f"paged_{_name}", _DECODER_REFERENCES[_name])(_check_paged)


# ---- T5: encoder (BertAttention, bidirectional buckets), decoder self (causal buckets), cross --
T5_ENC_LENS = [12, 7]


def _t5_reference():
    oracles = sized(hf.t5)()
    enc_ids = hf.random_ids(2, max(T5_ENC_LENS), 13)
    mask = right_mask(T5_ENC_LENS, max(T5_ENC_LENS))
    dec_ids = hf.random_ids(2, 6 + DECODE_STEPS, 14)  # decoder positions up to 13: causal log buckets
    return oracles, hf.run_t5(oracles, enc_ids, mask, dec_ids, [6] + [1] * DECODE_STEPS)


def _t5_check(dtype):
    def check(ref, comm):
        oracles, trace = ref
        outs = [replay_encoder(oracles["encoder"], trace, comm, T5_ENC_LENS, dtype)]
        outs += replay_decoder(oracles["decoder"], trace, comm, dtype, slots=[1, 0])
        outs += replay_cross(oracles["cross"], trace, comm, T5_ENC_LENS, dtype, slots=[1, 0])
        if comm.size > 1 and dtype is F32:
            one = NoComm()
            ref1 = [replay_encoder(oracles["encoder"], trace, one, T5_ENC_LENS)]
            ref1 += replay_decoder(oracles["decoder"], trace, one, slots=[1, 0])
            ref1 += replay_cross(oracles["cross"], trace, one, T5_ENC_LENS, slots=[1, 0])
            _tp1_equal("t5", outs, ref1)

    return check


case("t5", _t5_reference)(_t5_check(F32))
case("bf16_t5", _t5_reference)(_t5_check(BF16))


@case("t5_explicit_bias", _t5_reference)
def _(ref, comm):
    """Relative attention without a table: HF's own ``compute_bias`` tables ``[H, L, L]``
    (indexed by absolute query/key positions) given per call, for the encoder and decoder."""
    oracles, trace = ref
    with torch.no_grad():
        s = max(T5_ENC_LENS)
        enc_bias = oracles["encoder"].attn.compute_bias(s, s, device="cpu")[0]
        n = sum(c.hidden.shape[1] for c in trace.calls["t5_decoder"])
        dec_bias = oracles["decoder"].attn.compute_bias(n, n, device="cpu")[0]

    def explicit(o):
        weights = {k: v for k, v in o.weights.items() if k != "relative_table"}
        return dataclasses.replace(o, config=dataclasses.replace(o.config, relative_table=False), weights=weights)

    replay_encoder(explicit(oracles["encoder"]), trace, comm, T5_ENC_LENS, position_bias=enc_bias)
    replay_decoder(explicit(oracles["decoder"]), trace, comm, position_bias=dec_bias)


# ---- BERT: padding; packed equals padded --------------------------------------------------------
BERT_LENS = [7, 3, 5]


def _bert_reference():
    o = sized(hf.bert)()
    return o, hf.run_encoder(o, hf.random_ids(3, 7, 15), right_mask(BERT_LENS, 7))


def _bert_check(dtype):
    def check(ref, comm):
        o, trace = ref
        out = replay_encoder(o, trace, comm, BERT_LENS, dtype)
        if comm.size > 1 and dtype is F32:
            _tp1_equal("bert", [out], [replay_encoder(o, trace, NoComm(), BERT_LENS)])

    return check


case("bert", _bert_reference)(_bert_check(F32))
case("fp16_bert", _bert_reference)(_bert_check(F16))


# ---- GPT-2: scale_attn_by_inverse_layer_idx (layer 2: q_scaling 3), cross attention ------------
GPT2_ENC_LENS = [5, 3]


def _gpt2_reference():
    oracles = sized(hf.gpt2)()
    g = torch.Generator().manual_seed(16)
    enc = torch.randn(2, max(GPT2_ENC_LENS), oracles["self"].config.hidden_size, generator=g)
    extra = dict(encoder_hidden_states=enc, encoder_attention_mask=right_mask(GPT2_ENC_LENS, enc.shape[1]))
    ids = hf.random_ids(2, 6 + DECODE_STEPS, 17)
    return oracles, hf.run_decoder(list(oracles.values()), ids, [6] + [1] * DECODE_STEPS, extra=extra)


def _gpt2_check(dtype):
    def check(ref, comm):
        oracles, trace = ref
        outs = replay_decoder(oracles["self"], trace, comm, dtype)
        outs += replay_cross(oracles["cross"], trace, comm, GPT2_ENC_LENS, dtype)
        if comm.size > 1 and dtype is F32:
            ref1 = replay_decoder(oracles["self"], trace, NoComm())
            ref1 += replay_cross(oracles["cross"], trace, NoComm(), GPT2_ENC_LENS)
            _tp1_equal("gpt2", outs, ref1)

    return check


case("gpt2", _gpt2_reference)(_gpt2_check(F32))
case("bf16_gpt2", _gpt2_reference)(_gpt2_check(BF16))


# ---- tp 8: the head layouts that break at the largest TP size (BLOOM-176B's 112 ALiBi heads,
# Llama-2-70B's 64/8 GQA), scaled down in head size; int8 KV cache against HF and tp=1 -----------
TP8_DECODERS: dict[str, Callable[[], hf.Oracle]] = {
    "bloom112": sized(hf.bloom, num_heads=112, head_size=4),
    "llama64_8": sized(hf.llama, num_heads=64, num_kv_heads=8, head_size=4),
}
# Quantized K/V against HF's fp32 cache, relative to the output's scale: int8 a few quantization
# steps (measured ~1.5%); fp8 e4m3 keeps 3 mantissa bits (measured ~3%).
QUANT = {"int8": (127.0, 5e-2), "fp8": (448.0, 8e-2)}  # kind: (largest stored value, tolerance)


def _kv_scale(o: hf.Oracle, trace: hf.Trace, qmax: float) -> float:
    """Per-tensor dequant scale from the K/V projections of every input (amax / qmax), with room
    for RoPE, which can grow one channel of a pair by up to √2."""
    w, b = o.weights["qkv_weight"], o.weights.get("qkv_bias")
    h, d = o.config.num_heads, o.config.head_size
    x = torch.cat([c.hidden.reshape(-1, c.hidden.shape[-1]) for c in trace.calls[o.name]])
    kv = torch.nn.functional.linear(x, w[h * d :], None if b is None else b[h * d :])
    return 1.5 * kv.abs().max().item() / qmax


def replay_quantized(o: hf.Oracle, trace: hf.Trace, comm: Communicator, kind: str) -> list[torch.Tensor]:
    """Prefill and decode over an int8 or fp8 KV cache: close to HF (quantization error only)."""
    dtype = act(F32)
    qmax, tol = QUANT[kind]
    cfg = dataclasses.replace(o.config, dtype=dtype, kv_cache_dtype=kind)
    layer = Attention(cfg, comm=comm, device=DEVICE)
    layer.load_weights(**{k: None if v is None else v.to(DEVICE, dtype) for k, v in o.weights.items()})
    calls = trace.calls[o.name]
    b, total = calls[0].hidden.shape[0], sum(c.hidden.shape[1] for c in calls)
    cache = KVCache(
        config=cfg,
        head_layout=layer.layout,
        num_layers=1,
        max_batch=b,
        max_seq_len=total,
        scales=_kv_scale(o, trace, qmax),
        device=DEVICE,
    )
    past, outs = 0, []
    for i, c in enumerate(calls):
        s = c.hidden.shape[1]
        step = _step(new_lens=[s] * b, past_lens=[past] * b)
        y = layer(c.hidden.to(DEVICE, dtype).reshape(b * s, -1), step, cache).reshape(b, s, -1).cpu().float()
        assert_close(f"{o.name} {kind} KV call {i} (past {past}, {s} new) output", y, c.out, max(tol, rtol()))
        past += s
        outs.append(y)
    return outs


for _name, _build in TP8_DECODERS.items():

    def _check_tp8(ref, comm):
        o, trace = ref
        outs = replay_decoder(o, trace, comm)
        if comm.size > 1:
            _tp1_equal(o.name, outs, replay_decoder(o, trace, NoComm()))

    def _check_quantized(ref, comm, kind):
        o, trace = ref
        outs = replay_quantized(o, trace, comm, kind)
        if comm.size > 1:  # every rank quantizes with the same scale: tp=N equals tp=1
            _tp1_equal(f"{o.name} {kind} KV", outs, replay_quantized(o, trace, NoComm(), kind))

    _ref = _decoder_reference(_build)
    case(f"decode_{_name}", _ref)(_check_tp8)
    for _kind in QUANT:
        case(f"{_kind}_{_name}", _ref)(lambda ref, comm, _kind=_kind: _check_quantized(ref, comm, _kind))


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


# ---------------------------------------------------------------------------------------------
# mpirun entry point
# ---------------------------------------------------------------------------------------------
def _precompile_cuda(world) -> None:
    """Every kernel variant the cases can launch at head size 64, compiled once per node before the
    first case (in parallel processes), instead of by every rank on first use inside the cases."""
    import itertools

    from tp_runtime.backends.compile import precompile
    from tp_runtime.backends.cuda import context_tiles

    caches, layouts = ("auto", "int8", "fp8"), ("contiguous", "paged")
    wanted = []
    for dt in (F16, BF16):
        for cache, layout, rope in itertools.product(caches, (*layouts, "none"), ("none", "gptj", "neox")):
            wanted.append(("prepare", dict(dtype=dt, cache=cache, layout=layout, rope=rope)))
        for mask, bias, cache, layout in itertools.product(
            ("causal", "padding", "bidirectional"), ("none", "alibi", "table"), caches, layouts
        ):
            tiles = context_tiles(HEAD_SIZE, causal=mask == "causal")
            wanted.append(("context", dict(dtype=dt, head_size=HEAD_SIZE, mask=mask, bias=bias, layout=layout,
                                           cache=cache, **tiles)))  # fmt: skip
        for cache, layout, heads in itertools.product(caches, layouts, (1, 2, 4, 8)):
            wanted.append(("decode", dict(dtype=dt, cache=cache, layout=layout, head_size=HEAD_SIZE, heads=heads)))
    precompile(wanted, world.local_comm)


def main(argv: list[str]) -> int:
    import tp_runtime

    global DEVICE, HEAD_SIZE, FP32_AS
    torch.set_num_threads(1)  # ranks share few cores
    world = tp_runtime.init()  # TP_RUNTIME_DEVICE=cpu|cuda|auto (default auto)
    DEVICE = world.device
    if DEVICE.type == "cuda":
        HEAD_SIZE, FP32_AS = 64, BF16
        _precompile_cuda(world)
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"hf_worker: unknown cases {unknown}; known: {list(CASES)}")
    failed = 0
    for name in names:
        c = CASES[name]
        try:
            run_case(c, reference_of(c), world.tp_comm)
            status = "ok"
        except AssertionError as exc:  # every rank still ran the same collectives: go on
            failed += 1
            status = "FAIL " + " | ".join(str(exc).splitlines())
        print(f"HF_CASE {name} rank {world.rank} {status}", flush=True)
    world.tp_comm.barrier()
    if failed:
        print(f"FAIL rank {world.rank}: {failed} of {len(names)} cases", flush=True)
        return 1
    print(f"PASS rank {world.rank}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        raise
