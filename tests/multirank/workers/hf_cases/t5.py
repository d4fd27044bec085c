"""T5 cases: encoder, decoder self and cross attention with relative buckets, and explicit bias."""

from __future__ import annotations

import dataclasses

import hf_adapters as hf
import torch

from tp_runtime.distributed.comm import NoComm

from .common import (
    BF16,
    DECODE_STEPS,
    F32,
    _tp1_equal,
    case,
    replay_cross,
    replay_decoder,
    replay_encoder,
    right_mask,
    sized,
)

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
