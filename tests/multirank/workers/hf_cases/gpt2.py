"""GPT-2 cases: attention scaled by the inverse layer index, and cross attention."""

from __future__ import annotations

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
    right_mask,
    sized,
)

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
