"""Beam search against HuggingFace ``generate(num_beams=k)``: our cache indirection must give, at
every step, the attention outputs HF computes while it physically reorders its cache.

HF (a tiny Llama with a random LM head, fp32) runs beam search; hooks record the attention
layer's inputs and outputs at each call and the ``beam_idx`` of every cache reorder. We replay
the same calls through our layer: the prompt is prefilled once per batch entry (beam 0's slot,
context shared by the beams), then each reorder becomes an update of ``cache_indirection``
(beam ``j`` inherits the history of the beam it was chosen from) and each decode call one step
of ``batch × beams`` sequences, slot ``b·W + j``. At tp 1 and, in a simulated group, tp 2.
"""

from __future__ import annotations

import contextlib

import hf_adapters as hf
import pytest
import torch
from simulated import simulate

from tp_runtime.batch.kv_cache import KVCache
from tp_runtime.batch.step import Step
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.attention import Attention

BATCH, BEAMS, PROMPT, NEW_TOKENS = 2, 3, 5, 7


@contextlib.contextmanager
def _record_reorders():
    """Record the ``beam_idx`` of every cache reorder HF's beam search does."""
    from transformers.cache_utils import DynamicCache

    seen, original = [], DynamicCache.reorder_cache

    def reorder(self, beam_idx):
        seen.append(beam_idx.detach().clone())
        return original(self, beam_idx)

    DynamicCache.reorder_cache = reorder
    try:
        yield seen
    finally:
        DynamicCache.reorder_cache = original


@pytest.fixture(scope="module")
def beam_run():
    from transformers import LlamaForCausalLM

    o = hf.llama(num_heads=8, num_kv_heads=2, head_size=16)
    lm = LlamaForCausalLM._from_config(o.model.config, attn_implementation="eager").eval()
    lm.model = o.model  # the oracle's (randomized) layer, with a random LM head on top
    with torch.no_grad():
        lm.lm_head.weight.copy_(torch.randn(lm.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    ids = hf.random_ids(BATCH, PROMPT, seed=21)
    with hf.capture(o) as calls, _record_reorders() as reorders, torch.no_grad():
        lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            num_beams=BEAMS,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
            early_stopping=False,
        )
    return o, calls[o.name], reorders


def _replay(o, hf_calls, reorders, comm):
    """Our outputs for each HF call, ``[B·W, S, hidden]``, through cache indirection."""
    layer = Attention(o.config, comm=comm)
    layer.load_weights(**o.weights)
    w, total = BEAMS, PROMPT + NEW_TOKENS
    cache = KVCache(
        config=o.config, head_layout=layer.head_layout, num_layers=1, max_batch=BATCH * w, max_seq_len=total
    )
    ind = torch.zeros(BATCH, w, total, dtype=torch.int32)  # context: beam 0's slot for every beam
    prompt = hf_calls[0].hidden  # [B·W, P, hidden]: the W rows of a batch entry are equal
    step = Step(new_lens=[PROMPT] * BATCH, slots=[b * w for b in range(BATCH)], beam_width=w, cache_indirection=ind)
    y = layer(prompt[::w].reshape(BATCH * PROMPT, -1), step, cache).reshape(BATCH, PROMPT, -1)
    outs = [y.repeat_interleave(w, dim=0)]
    past = PROMPT
    for call, beam_idx in zip(hf_calls[1:], reorders, strict=False):
        # Row r = b·W + j continues the beam HF moved into it: take over that beam's history.
        src = beam_idx.reshape(BATCH, w) - torch.arange(BATCH)[:, None] * w  # beam ids within the batch entry
        ind[:, :, :past] = torch.gather(ind[:, :, :past], 1, src[:, :, None].expand(-1, -1, past).to(torch.int64)).to(
            torch.int32
        )
        step = Step(
            new_lens=[1] * BATCH * w,
            past_lens=[past] * BATCH * w,
            slots=list(range(BATCH * w)),
            beam_width=w,
            cache_indirection=ind,
        )
        outs.append(layer(call.hidden.reshape(BATCH * w, -1), step, cache).reshape(BATCH * w, 1, -1))
        ind[:, :, past] = torch.arange(w, dtype=torch.int32)[None, :]  # the new token is in the beam's own slot
        past += 1
    return outs


def _check(o, hf_calls, outs):
    for i, (ours, call) in enumerate(zip(outs, hf_calls, strict=True)):
        scale = call.out.abs().max().item()
        err = (ours - call.out).abs().max().item()
        assert err <= 1e-5 * scale, f"call {i}: max abs error {err:.3g} vs output scale {scale:.3g}"


def test_hf_beam_search_reorders_the_cache(beam_run):
    _, hf_calls, reorders = beam_run
    assert len(hf_calls) == NEW_TOKENS  # prefill, then one call per generated token but the last
    assert len(reorders) >= NEW_TOKENS - 1
    identity = torch.arange(BATCH * BEAMS)
    assert any(not torch.equal(r, identity) for r in reorders), "no reorder moved a beam: the test would prove nothing"


@pytest.mark.parametrize("tp", [1, 2])
def test_beam_indirection_equals_hf_generate(beam_run, tp):
    o, hf_calls, reorders = beam_run
    if tp == 1:
        _check(o, hf_calls, _replay(o, hf_calls, reorders, NoComm()))
    else:
        for outs in simulate(tp, lambda comm: _replay(o, hf_calls, reorders, comm)):
            _check(o, hf_calls, outs)


def test_ignoring_the_reorders_is_caught(beam_run):
    """The oracle can fail: replaying without HF's reorders gives different outputs."""
    o, hf_calls, reorders = beam_run
    identity = [torch.arange(BATCH * BEAMS)] * len(reorders)
    with pytest.raises(AssertionError, match="max abs error"):
        _check(o, hf_calls, _replay(o, hf_calls, identity, NoComm()))
