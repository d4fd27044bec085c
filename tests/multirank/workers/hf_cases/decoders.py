"""Decoder-only families (BLOOM, MPT, Falcon, GPT-NeoX, GPT-J, Llama, dynamic NTK): decode, half dtypes, paged."""

from __future__ import annotations

from collections.abc import Callable

import hf_adapters as hf
import torch

from tp_runtime.distributed.comm import NoComm

from .common import (
    BF16,
    DECODE_STEPS,
    DTYPE_NAMES,
    F16,
    _decoder_reference,
    _tp1_equal,
    case,
    replay_decoder,
    sized,
)

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
