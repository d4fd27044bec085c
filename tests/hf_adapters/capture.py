"""Captured reference runs: forward hooks record the attention calls and caches while a whole HF model runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .common import Oracle, cache_kv


@dataclass
class Call:
    """One forward of the attention layer inside the HF model."""

    hidden: torch.Tensor  # [B, S, hidden] the attention's input
    out: torch.Tensor  # [B, S, hidden] its output after the dense projection
    encoder: torch.Tensor | None = None  # cross attention: [B, S_enc, hidden] the encoder states


@dataclass
class Trace:
    """Calls of each captured oracle (by name) and cache snapshots ``(keys, values)`` after
    each model call (by oracle name; cross attention: its cross cache)."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    caches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [B, S_total] 1 = real token (left padding), if any


@contextlib.contextmanager
def capture(*oracles: Oracle):
    """Record every call of each oracle's attention: ``{name: [Call, ...]}``."""
    calls: dict[str, list[Call]] = {o.name: [] for o in oracles}
    pending: dict[str, dict] = {}
    handles = []
    for o in oracles:

        def pre(module, args, kwargs, o=o):
            hidden = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get(o.encoder_kwarg) if o.encoder_kwarg else None
            pending[o.name] = dict(
                hidden=hidden.detach().clone(), encoder=None if enc is None else enc.detach().clone()
            )

        def post(module, args, output, o=o):
            p = pending.pop(o.name)
            calls[o.name].append(Call(hidden=p["hidden"], out=output.detach().clone(), encoder=p["encoder"]))

        handles.append(o.attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(o.out.register_forward_hook(post))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _snapshot(cache, oracles: list[Oracle], caches: dict) -> None:
    for o in oracles:
        k, v = cache_kv(cache, o.layer_idx, cross=o.kind == "cross")
        caches.setdefault(o.name, []).append((k.detach().clone(), v.detach().clone()))


def random_ids(batch: int, length: int, seed: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_decoder(
    oracles: list[Oracle],
    ids: torch.Tensor,
    splits: list[int],
    *,
    mask: torch.Tensor | None = None,
    extra: dict | None = None,
) -> Trace:
    """Run a decoder-only HF model (``oracles`` share it) over ``ids [B, L]`` in calls of
    ``splits`` tokens with ``use_cache=True`` (e.g. ``[prompt, 1, 1, ...]``: prefill then
    decode). ``mask [B, L]`` (left padding): passed as ``attention_mask`` (grown per call), and
    position ids counting real tokens where the model takes them. ``extra``: kwargs for every
    call (GPT-2's ``encoder_hidden_states`` / ``encoder_attention_mask``)."""
    model = oracles[0].model
    assert sum(splits) == ids.shape[1], (splits, ids.shape)
    trace = Trace(mask=mask)
    pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, start = None, 0
    with capture(*oracles) as calls:
        for n in splits:
            kw = dict(extra or {})
            if mask is not None:
                kw["attention_mask"] = mask[:, : start + n]
                if oracles[0].uses_position_ids:
                    kw["position_ids"] = pos[:, start : start + n]
            res = model(input_ids=ids[:, start : start + n], past_key_values=cache, use_cache=True, **kw)
            cache = res.past_key_values
            _snapshot(cache, oracles, trace.caches)
            start += n
    trace.calls = calls
    return trace


@torch.no_grad()
def run_t5(
    oracles: dict[str, Oracle], enc_ids: torch.Tensor, enc_mask: torch.Tensor, dec_ids: torch.Tensor, splits: list[int]
) -> Trace:
    """T5: encode ``enc_ids`` (right padding ``enc_mask``), then run the decoder over ``dec_ids`` in
    ``splits`` (prefix, then one token per step) with the cache."""
    model = oracles["encoder"].model
    trace = Trace()
    dec = [oracles["decoder"], oracles["cross"]]
    cache, enc_out, start = None, None, 0
    with capture(*oracles.values()) as calls:
        for n in splits:
            kw = dict(
                attention_mask=enc_mask,
                decoder_input_ids=dec_ids[:, start : start + n],
                past_key_values=cache,
                use_cache=True,
            )
            if enc_out is None:
                res = model(input_ids=enc_ids, **kw)
                enc_out = (res.encoder_last_hidden_state,)
            else:
                res = model(encoder_outputs=enc_out, **kw)
            cache = res.past_key_values
            _snapshot(cache, dec, trace.caches)
            start += n
    trace.calls = calls
    return trace


@torch.no_grad()
def run_encoder(oracle: Oracle, ids: torch.Tensor, mask: torch.Tensor) -> Trace:
    """BERT: one encoder pass over right-padded ``ids`` with ``attention_mask=mask``."""
    with capture(oracle) as calls:
        oracle.model(input_ids=ids, attention_mask=mask)
    return Trace(calls=calls, mask=mask)
