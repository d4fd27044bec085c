"""BERT cases: padding, packed equals padded."""

from __future__ import annotations

import hf_adapters as hf

from tp_runtime.distributed.comm import NoComm

from .common import (
    F16,
    F32,
    _tp1_equal,
    case,
    replay_encoder,
    right_mask,
    sized,
)

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
