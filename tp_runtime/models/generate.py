"""The generation loop, per rank: in-flight batching over a paged (or contiguous) KV cache.

Each step packs the prompts of the requests joining now (whole prompt, past 0) with one token of
every running request (past = its length so far), runs the model once, chooses one token per
sequence on the group's rank 0 (``Sampler``) and broadcasts them, so every rank appends the same
token (greedy graph steps, below, need no broadcast: every rank takes the same argmax). A request
leaves when it emits a stop token (kept in its output, as HF ``generate`` does) or
reaches ``max_new_tokens``; its cache slot (and, paged, its blocks) goes to the next waiting request.
``start_steps`` lets requests join at later steps (arrivals), so batches mix prefill and decode.

A request's cache is reserved for its whole length (prompt + ``max_new_tokens``) when it joins, so
that decode steps reserve nothing.

On CUDA, steps where every sequence decodes run as replayed graphs (one per set of slots, the most
recent ``MAX_GRAPHS`` kept). Greedy: a ``GreedyDecodeGraph`` of the whole step (embedding to argmax,
the token fed back on the device), replayed in chunks of up to ``GRAPH_CHUNK`` steps with one
read-back per chunk; stop tokens are checked when the chunk is read (``accept``), and tokens after
a stop are dropped, as are those past ``max_new_tokens`` (a chunk never runs past the smallest
remaining budget, nor past the next arrival, so requests join at their step). A request that stops
mid-chunk keeps its slot until the chunk ends: a request waiting for a slot may join up to
``GRAPH_CHUNK - 1`` steps later than it would eagerly (its tokens are the same). Sampling: a
``DecodeGraph`` of the blocks, with the embeddings, the head and rank 0's choice run eagerly around it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from ..batch.graphs import DecodeGraph, StepGraph, check_graphable
from ..batch.kv_cache import KVCache, PagedKVCache
from ..batch.step import Step
from ..distributed.consistency import check_same, fingerprint_text
from .decoder import DecoderModel
from .greedy_graph import GreedyDecodeGraph
from .sampling import Sampler, Sampling
from .tokenizer import token_ids

MAX_GRAPHS = 8
GRAPH_DECODE_SPLITS = 4  # key splits of the decode kernel inside a graph (fixed: a graph's launch shapes are)
# Greedy graph steps per read-back: the host syncs once per chunk. Longer chunks sync less but may run
# a stopped request up to GRAPH_CHUNK - 1 wasted steps (and hold its slot that long).
GRAPH_CHUNK = 16
CACHES = ("paged", "contiguous")


def _token_ids(model: DecoderModel, prompts: Sequence) -> list[list[int]]:
    return token_ids(model.tokenizer, model.config.vocab_size, prompts, "prompts")


def _make_cache(model: DecoderModel, kind: str, max_batch: int, max_len: int, block_size: int):
    common = dict(
        config=model.attention_config,
        head_layout=model.head_layout,
        num_layers=model.config.num_layers,
        device=model.device,
    )
    if kind == "contiguous":
        return KVCache(**common, max_batch=max_batch, max_seq_len=max_len)
    per_seq = -(-max_len // block_size)
    return PagedKVCache(
        **common, num_blocks=max_batch * per_seq, block_size=block_size, max_seqs=max_batch, max_blocks_per_seq=per_seq
    )


def _graphable(model: DecoderModel, enabled: bool) -> bool:
    """CUDA graphs for fp16/bf16 models on a GPU (their layers run the CUDA backend; fp32 layers run the
    reference backend, whose host-side work a graph cannot capture)."""
    if not enabled or model.device.type != "cuda" or model.config.dtype == torch.float32:
        return False
    try:
        check_graphable(model.attention_config)
    except ValueError:
        return False
    return True


@torch.no_grad()
def generate(
    model: DecoderModel,
    prompts: Sequence,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_token_ids: Sequence[int] | None = None,
    start_steps: Sequence[int] | None = None,
    cache: str = "paged",
    max_batch: int | None = None,
    block_size: int = 16,
    cuda_graphs: bool = True,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for each prompt (strings with a tokenizer, or token id
    lists); returns each request's new token ids, the same on every rank (collective over the model's
    group: every rank calls it with the same arguments, which is checked).

    ``stop_token_ids``: None for the checkpoint's ``eos_token_id``, ``()`` for none. ``start_steps``: the
    step at which each request joins (default all at 0). ``cache``: "paged" or "contiguous".
    ``max_batch``: sequences in flight at once (default: all requests); later ones wait for a slot."""
    # The ranks agree on the arguments (and on having a tokenizer) before any of them is validated, so
    # that a bad argument raises on every rank alike, never on one while the others wait.
    request = dict(
        prompts=prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=stop_token_ids,
        start_steps=start_steps, cache=cache, max_batch=max_batch, block_size=block_size, cuda_graphs=cuda_graphs,
        tokenizer=model.tokenizer is not None,
    )  # fmt: skip
    given = {name: fingerprint_text(repr(value)) for name, value in request.items()}
    check_same(model.comm, "generate() arguments", given, model.device)
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling: expected a Sampling, got {type(sampling).__name__}")
    ids = _token_ids(model, prompts)
    n = len(ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    stops = set(model.config.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    if start_steps is None:
        starts = [0] * n
    else:
        starts = [int(s) for s in start_steps]
        if len(starts) != n or min(starts) < 0:
            raise ValueError(f"start_steps: expected {n} steps >= 0 (one per prompt), got {list(start_steps)}")
    if cache not in CACHES:
        raise ValueError(f"cache: expected one of {CACHES}, got {cache!r}")
    max_batch = n if max_batch is None else max_batch
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
    max_len = max(len(p) for p in ids) + max_new_tokens
    limit = model.config.sliding_window or model.config.max_position_embeddings
    if max_len > limit and (model.config.sliding_window or model.config.learned_positions):
        what = "sliding_window" if model.config.sliding_window else "max_position_embeddings"
        raise ValueError(f"prompts + max_new_tokens: {max_len} tokens exceed the model's {what}={limit}")

    kv = _make_cache(model, cache, max_batch, max_len, block_size)
    sampler = Sampler(sampling)
    graphs: OrderedDict[tuple[int, ...], StepGraph] = OrderedDict()
    use_graphs = _graphable(model, cuda_graphs)
    tokens = [list(p) for p in ids]
    done: dict[int, list[int]] = {}  # request -> its new tokens, once it has left
    waiting = deque(sorted(range(n), key=lambda i: starts[i]))
    free_slots = list(range(max_batch - 1, -1, -1))
    running: dict[int, int] = {}  # request -> slot, in joining order
    fresh: set[int] = set()  # requests whose prompt has not run yet

    def accept(r: int, tok: int) -> None:
        """Append ``tok`` to request ``r``; it leaves on a stop token or at ``max_new_tokens``."""
        tokens[r].append(tok)
        if tok in stops or len(tokens[r]) - len(ids[r]) == max_new_tokens:
            done[r] = tokens[r][len(ids[r]) :]
            slot = running.pop(r)
            kv.free(slot)
            free_slots.append(slot)

    t = 0
    while waiting or running:
        while waiting and starts[waiting[0]] <= t and free_slots:
            r = waiting.popleft()
            running[r] = free_slots.pop()
            kv.reserve_slots([running[r]], [len(ids[r]) + max_new_tokens])  # its whole life, once
            fresh.add(r)
        if not running:
            t = starts[waiting[0]]
            continue
        order = list(running)
        slots = [running[r] for r in order]
        past = [0 if r in fresh else len(tokens[r]) - 1 for r in order]
        if use_graphs and not fresh and sampling.greedy:
            steps = min(GRAPH_CHUNK, *(max_new_tokens - (len(tokens[r]) - len(ids[r])) for r in order))
            if waiting and free_slots:
                steps = min(steps, starts[waiting[0]] - t)  # the next arrival joins at its step
            graph = _cached(graphs, slots, lambda slots=slots: _greedy_graph(model, kv, slots))
            chosen = graph.run([tokens[r][-1] for r in order], past, steps)  # [steps, B]
            for row in chosen.tolist():
                for r, tok in zip(order, row, strict=True):
                    if r in running:  # tokens after a request's stop (or its last) are dropped
                        accept(r, tok)
            t += steps
            continue
        step_ids = [tok for r in order for tok in (tokens[r] if r in fresh else tokens[r][-1:])]
        ids_dev = torch.tensor(step_ids, dtype=torch.long, device=model.device)
        if use_graphs and not fresh:
            logits = _graph_step(model, kv, graphs, ids_dev, slots, past)
        else:
            step = Step(
                new_lens=tuple(len(tokens[r]) if r in fresh else 1 for r in order),
                past_lens=tuple(past),
                slots=tuple(slots),
                device=model.device,
            )
            logits = model(ids_dev, step, kv)
        chosen_dev = (
            sampler(logits) if model.comm.rank == 0 else torch.empty(len(order), dtype=torch.long, device=model.device)
        )
        chosen_ids: list[int] = model.comm.broadcast(chosen_dev.contiguous(), root=0).tolist()
        fresh.clear()
        for r, tok in zip(order, chosen_ids, strict=True):
            accept(r, tok)
        t += 1
    return [done[r] for r in range(n)]


def _cached(graphs: OrderedDict, slots: list[int], make):
    """The graph for ``slots`` (made by ``make()`` the first time), most recently used last."""
    key = tuple(slots)
    graph = graphs.pop(key, None)
    if graph is None:
        graph = make()
        if len(graphs) >= MAX_GRAPHS:
            graphs.popitem(last=False)
    graphs[key] = graph
    return graph


def _greedy_graph(model: DecoderModel, kv, slots: list[int]) -> GreedyDecodeGraph:
    return GreedyDecodeGraph(model, slots=slots, cache=kv, chunk=GRAPH_CHUNK, decode_splits=GRAPH_DECODE_SPLITS)


def _graph_step(model: DecoderModel, kv, graphs: OrderedDict, ids: torch.Tensor, slots: list[int], past: list[int]):
    """One all-decode step through a replayed graph of the blocks: ``ids [B]`` -> logits ``[B, V]``."""
    graph = _cached(
        graphs,
        slots,
        lambda: DecodeGraph(
            lambda x, s: model.layers(x, s, kv, decode_splits=GRAPH_DECODE_SPLITS),
            config=model.attention_config,
            slots=slots,
            cache=kv,
            device=model.device,
        ),
    )
    x = model.embed_tokens(ids, torch.tensor(past, device=model.device))
    return model.head(graph(x, past))
