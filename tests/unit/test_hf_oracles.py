"""HF ``transformers`` oracles in one process: every case of ``tests/multirank/workers/hf_worker.py``
at tp=1 (``NoComm``) and at simulated tp 2 and 4 (one thread per rank, real all-reduce); a few
at tp 8. The same cases run under mpirun in ``tests/multirank/test_hf_multirank.py``.

Each case compares our layer with a tiny random-weight HF model (output after dense and
all-reduce, this rank's cache heads, 8 decode steps), never with our own output alone.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parents[1]
for _p in (str(_TESTS), str(_TESTS / "multirank" / "workers"), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import hf_adapters as hf  # noqa: E402
import hf_worker as W  # noqa: E402
from simulated import simulate  # noqa: E402

from tp_runtime.batch.step import Step  # noqa: E402
from tp_runtime.distributed.comm import NoComm  # noqa: E402


def _reference(name: str):
    return W.reference_of(W.CASES[name])


def _run(name: str, tp: int) -> None:
    c, ref = W.CASES[name], _reference(name)
    if tp == 1:
        W.run_case(c, ref, NoComm())
    else:
        simulate(tp, lambda comm: W.run_case(c, ref, comm))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(W.CASES))
def test_hf_case(name, tp):
    _run(name, tp)


# tp 8: KV heads replicated on 4 ranks (Llama 8/2), 1 KV head on 8 ranks (Falcon), 3 BLOOM heads per rank.
@pytest.mark.parametrize("name", ["decode_llama_gqa", "decode_falcon_mqa", "decode_bloom24", "mixed_llama_gqa"])
def test_hf_case_tp8(name):
    _run(name, 8)


def test_case_names_cover_the_oracle_list():
    """The model families the runtime serves, each with fp32 decode and a half-precision run."""
    names = set(W.CASES)
    for fam in (
        "bloom12",
        "bloom24",
        "mpt",
        "falcon_mqa",
        "falcon_alibi",
        "gpt_neox25",
        "gptj",
        "llama_gqa",
        "llama_linear",
        "llama_dynamic",
    ):
        assert f"decode_{fam}" in names
        assert any(n.endswith(f"_{fam}") and n.split("_")[0] in ("fp16", "bf16") for n in names), fam
    for n in (
        "t5",
        "bert",
        "gpt2",
        "left_pad_llama_gqa",
        "left_pad_bloom12",
        "mixed_llama_gqa",
        "chunked_bloom12",
        "right_pad_llama_gqa",
    ):
        assert n in names


# ---- the oracles themselves: can a wrong layer pass? ---------------------------------------------
def test_oracle_detects_wrong_weight_layout():
    """BLOOM's fused QKV is head-interleaved: loading it without the permutation must fail."""
    o, trace = _reference("decode_bloom12")
    bad = copy.copy(o)
    w = dict(o.weights)
    w["qkv_weight"] = o.model.h[0].self_attention.query_key_value.weight.detach()
    w["qkv_bias"] = o.model.h[0].self_attention.query_key_value.bias.detach()
    bad.weights = w
    with pytest.raises(AssertionError, match="output"):
        W.replay_decoder(bad, trace, NoComm())


def test_oracle_detects_wrong_scaling():
    """GPT-2 layer 2 with scale_attn_by_inverse_layer_idx: q_scaling 1 instead of 3 must fail."""
    oracles, trace = _reference("gpt2")
    bad = copy.copy(oracles["self"])
    bad.config = dataclasses.replace(bad.config, q_scaling=1.0)
    with pytest.raises(AssertionError, match="output"):
        W.replay_decoder(bad, trace, NoComm())


def test_falcon_eager_alibi_counts_the_bias_twice():
    """Why the Falcon ALiBi oracle uses SDPA: in transformers 5.17 ``FalconModel`` folds
    ``alibi/√D`` into the mask and eager ``FalconAttention`` also adds ``alibi`` to the scores.
    Eager equals our ``alibi_with_scale`` layer with doubled slopes; SDPA equals it as is."""
    o = hf.falcon(alibi=True)
    assert o.model.config._attn_implementation == "sdpa"
    eager_model = type(o.model)._from_config(copy.deepcopy(o.model.config), attn_implementation="eager").eval()
    eager_model.load_state_dict(o.model.state_dict())
    a = eager_model.h[0].self_attention
    eager = hf.Oracle("falcon_eager", eager_model, a, a.dense, o.config, o.weights)
    ids = hf.random_ids(2, 8, 0)
    sdpa_call = hf.run_decoder([o], ids, [8]).calls[o.name][0]
    eager_call = hf.run_decoder([eager], ids, [8]).calls[eager.name][0]
    layer = W.make_layer(o, NoComm())
    ours = layer(sdpa_call.hidden, Step(new_lens=[8, 8]), W.make_cache(layer, 2, 8))
    W.assert_close("ours vs HF Falcon SDPA", ours, sdpa_call.out, W.RTOL[torch.float32])
    assert (ours - eager_call.out).abs().max() > 1e-2
    layer.alibi_slopes.mul_(2)
    doubled = layer(sdpa_call.hidden, Step(new_lens=[8, 8]), W.make_cache(layer, 2, 8))
    W.assert_close("ours (slopes x2) vs HF Falcon eager", doubled, eager_call.out, W.RTOL[torch.float32])


def test_deinterleave_qkv():
    h, d = 3, 2
    rows = torch.arange(3 * h * d)  # interleaved: head 0 q(0,1) k(2,3) v(4,5), head 1 q(6,7) ...
    fused = hf.deinterleave_qkv(rows, h, d)
    assert fused.tolist() == [0, 1, 6, 7, 12, 13, 2, 3, 8, 9, 14, 15, 4, 5, 10, 11, 16, 17]
