"""Shared by the HF oracle cases: where they run, tolerances, comparison helpers, replays, the case registry."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

import hf_adapters as hf
import torch

from tp_runtime.batch.kv_cache import KVCache, PagedKVCache
from tp_runtime.batch.step import Step
from tp_runtime.distributed.comm import Communicator
from tp_runtime.layers.attention import Attention, BertAttention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Max abs error allowed, relative to the reference's max abs value (the output scale). fp32:
# measured errors are ~5e-7. Half types: 4 ulps at 1.0 (the reference is HF in fp32; measured
# errors are about 1-2 ulps).
RTOL = {F32: 1e-5, F16: 4 * torch.finfo(F16).eps, BF16: 4 * torch.finfo(BF16).eps}
RTOL_SAME = 2e-6  # our own runs that differ only in summation order (tp=N vs tp=1, mixed vs separate)
DECODE_STEPS = 8
DTYPE_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}

# Where our layers run. HF always runs on the CPU in fp32. hf_worker.main() sets these for the
# world's device: on CUDA (kernels for fp16/bf16 and head sizes 64..256 only) every oracle gets head
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
        head_layout=layer.head_layout,
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
        head_layout=layer.head_layout,
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
    Our per-rank cache holds this rank's KV heads (``head_layout.kv_heads``) of HF's cache."""
    heads = list(layer.head_layout.kv_heads)
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
        kw["position_bias"] = position_bias[list(layer.head_layout.q_heads)].contiguous()
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
        kw["position_bias"] = position_bias[list(layer.head_layout.q_heads)].contiguous()
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


def _decoder_reference(build, batch=2, prompt=6, seed=11):
    def reference():
        o = build()
        ids = hf.random_ids(batch, prompt + DECODE_STEPS, seed)
        return o, hf.run_decoder([o], ids, [prompt] + [1] * DECODE_STEPS)

    return reference
