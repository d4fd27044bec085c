"""TP-8 head layouts (BLOOM 112 ALiBi heads, Llama 64/8 GQA) and int8 / fp8 KV caches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import hf_adapters as hf
import torch

from tp_runtime.batch.kv_cache import KVCache
from tp_runtime.distributed.comm import Communicator, NoComm
from tp_runtime.layers.attention import Attention

from . import common
from .common import (
    F32,
    _decoder_reference,
    _step,
    _tp1_equal,
    act,
    assert_close,
    case,
    replay_decoder,
    rtol,
    sized,
)

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
    layer = Attention(cfg, comm=comm, device=common.DEVICE)
    layer.load_weights(**{k: None if v is None else v.to(common.DEVICE, dtype) for k, v in o.weights.items()})
    calls = trace.calls[o.name]
    b, total = calls[0].hidden.shape[0], sum(c.hidden.shape[1] for c in calls)
    cache = KVCache(
        config=cfg,
        head_layout=layer.head_layout,
        num_layers=1,
        max_batch=b,
        max_seq_len=total,
        scales=_kv_scale(o, trace, qmax),
        device=common.DEVICE,
    )
    past, outs = 0, []
    for i, c in enumerate(calls):
        s = c.hidden.shape[1]
        step = _step(new_lens=[s] * b, past_lens=[past] * b)
        y = layer(c.hidden.to(common.DEVICE, dtype).reshape(b * s, -1), step, cache).reshape(b, s, -1).cpu().float()
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
