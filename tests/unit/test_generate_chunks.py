"""generate()'s greedy graph path on the CPU: the chunking, the lazy stop-token checks and the arrivals,
with the CUDA graph replaced by eager steps of the same model that keep its contract (``run(ids, past,
steps)`` -> ``[steps, B]`` tokens, each fed back as the next input, the cache checked as a replay does).
The tokens must equal eager generation's, whatever the stops, budgets, arrivals and slot count."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hf_adapters import checkpoints

from tp_runtime import NoComm, generate, load_model
from tp_runtime.batch.step import Step

gen = importlib.import_module("tp_runtime.models.generate")  # the module (the package exports the function)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [20, 21]]


class EagerChunks:
    """A stand-in for ``GreedyDecodeGraph`` that runs each step eagerly."""

    runs: list[int] = []

    def __init__(self, model, kv, slots):
        self.model, self.kv, self.slots = model, kv, tuple(slots)

    def run(self, ids, past, steps):
        assert 1 <= steps <= gen.GRAPH_CHUNK
        EagerChunks.runs.append(steps)
        ids, past, out = list(ids), list(past), []
        for _ in range(steps):
            step = Step(new_lens=[1] * len(ids), past_lens=past, slots=self.slots)
            ids = self.model(torch.tensor(ids), step, self.kv).argmax(-1).tolist()  # checks the cache as a replay
            out.append(ids)
            past = [p + 1 for p in past]
        return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_chunks")
    checkpoints.save(checkpoints.build("llama", seed=3), folder)
    return load_model(folder, comm=NoComm(), device="cpu")


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(gen, "_graphable", lambda model, enabled: enabled)
    monkeypatch.setattr(gen, "_greedy_graph", EagerChunks)
    monkeypatch.setattr(gen, "GRAPH_CHUNK", 4)
    EagerChunks.runs = []


@pytest.mark.parametrize("cache", ["paged", "contiguous"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(start_steps=[0, 1, 6, 2]),
        dict(start_steps=[0, 0, 3, 9], max_batch=2),
        dict(max_batch=1),
    ],
)
def test_chunks_equal_eager_generation(model, chunked, cache, kw):
    eager = generate(model, PROMPTS, max_new_tokens=11, stop_token_ids=(), cache=cache, cuda_graphs=False, **kw)
    assert EagerChunks.runs == []
    got = generate(model, PROMPTS, max_new_tokens=11, stop_token_ids=(), cache=cache, **kw)
    assert got == eager
    assert max(EagerChunks.runs) == 4 and all(len(g) == 11 for g in got)


def test_stop_tokens_cut_the_output_inside_a_chunk(model, chunked):
    free = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=(), cuda_graphs=False)
    # A stop token for each request at a step that falls inside a chunk of 4, not at its end.
    stops = {free[0][5], free[2][2]}
    want = []
    for tokens in free:
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        want.append(tokens if cut is None else tokens[: cut + 1])  # the stop token kept, nothing after
    assert want != free, "the stops cut something"
    got = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=sorted(stops), start_steps=[0, 2, 0, 1])
    assert got == want
    assert got == generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=sorted(stops), cuda_graphs=False)


def test_a_chunk_never_passes_the_smallest_budget(model, chunked):
    got = generate(model, PROMPTS[:2], max_new_tokens=3, stop_token_ids=())
    assert EagerChunks.runs == [2]  # the prefill chose the first token; 2 more fit the budget of 3
    assert [len(g) for g in got] == [3, 3]
