"""Real models on every rank of a TP group, against HF (the oracle, run on every rank alike).

usage: models_worker.py MODE DIR
  decoders: every decoder family (tests/hf_adapters/checkpoints.py) saved under DIR, half of them split
            into shards: greedy generation, a staggered batch over the paged and the contiguous cache,
            a stop token, all token for token against HF generate; sampled generation the same on every rank.
  loader:   a counting reader (safe_open wrapped) proves no rank reads any whole 2-D weight.
  minilm:   the real all-MiniLM-L6-v2 (DIR: its extracted folder) against HF BertModel + mean pooling.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: hf_adapters

from hf_adapters import checkpoints  # noqa: E402

import tp_runtime  # noqa: E402
from tp_runtime import Sampling, embed, generate, load_model  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [20, 21]]


def decoders(world, root: Path) -> None:
    comm, dev = world.tp_comm, world.device
    for k, family in enumerate(checkpoints.FAMILIES):
        hf = checkpoints.build(family, seed=k)
        folder = root / family
        if world.rank == 0:
            checkpoints.save(hf, folder, shards=3 if k % 2 else 1)
        comm.barrier()
        model = load_model(folder, comm=comm, device=dev)
        want = [checkpoints.hf_greedy(hf, p, 6) for p in PROMPTS]
        got = generate(model, PROMPTS, max_new_tokens=6, stop_token_ids=())
        assert got == want, f"{family} tp {world.tp_size}: greedy {got} != HF {want}"
        for cache in ("paged", "contiguous"):  # joins at steps 0, 2, 3, 7; at most 3 in flight; 4-token blocks
            got = generate(
                model,
                PROMPTS,
                max_new_tokens=6,
                stop_token_ids=(),
                start_steps=[0, 2, 3, 7],
                max_batch=3,
                cache=cache,
                block_size=4,
            )
            assert got == want, f"{family} tp {world.tp_size} staggered {cache}: {got} != HF {want}"
        stop = want[0][2]  # a token HF emits at step 3 of the first prompt: it must end there
        want_stop = [checkpoints.hf_greedy(hf, p, 6, eos=stop) for p in PROMPTS]
        got = generate(model, PROMPTS, max_new_tokens=6, stop_token_ids=[stop])
        assert got == want_stop, f"{family} tp {world.tp_size} stop {stop}: {got} != HF {want_stop}"
        sampled = generate(
            model, PROMPTS, max_new_tokens=6, sampling=Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=3)
        )
        flat = torch.tensor([t for s in sampled for t in s] + [len(s) for s in sampled], device=dev)
        everyone = comm.all_gather(flat)
        assert all(torch.equal(row, everyone[0]) for row in everyone), f"{family}: sampled tokens differ across ranks"
        world.log.info(f"{family}: tp {world.tp_size} equals HF generate")


def loader(world, root: Path) -> None:
    import tp_runtime.models.checkpoint as ckpt_mod

    comm, dev = world.tp_comm, world.device
    reads: list[tuple[str, tuple, tuple]] = []  # (name, full shape, shape read)
    real = ckpt_mod.safe_open

    class Counting:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            raise AssertionError(f"get_tensor({name!r}) reads a whole tensor")

        def get_slice(self, name):
            sl = self.f.get_slice(name)

            class Slice:
                def get_shape(self):
                    return sl.get_shape()

                def __getitem__(self, idx):
                    t = sl[idx]
                    reads.append((name, tuple(sl.get_shape()), tuple(t.shape)))
                    return t

            return Slice()

    ckpt_mod.safe_open = Counting
    for family in ("llama", "gpt_neox", "falcon_mqa"):
        folder = root / family
        if world.rank == 0:
            checkpoints.save(checkpoints.build(family), folder, shards=2)
        comm.barrier()
        reads.clear()
        load_model(folder, comm=comm, device=dev)
        matrices = [(n, full, got) for n, full, got in reads if len(full) == 2]
        assert matrices, "no 2-D weight was read"
        whole = [(n, full) for n, full, got in matrices if got == full]
        assert not whole, f"{family} rank {world.rank} read whole weights: {whole}"
        read = sum(torch.Size(got).numel() for _, _, got in matrices)
        full = sum(torch.Size(f).numel() for f in dict((n, f) for n, f, _ in matrices).values())
        world.log_all.info(f"{family}: rank {world.rank} read {read} of {full} weight elements")
        assert read < full, f"{family}: rank {world.rank} read {read} >= {full} elements"
    ckpt_mod.safe_open = real


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "A monkey is playing drums.",
]
# (i, j, k, l): sentences i and j are closer than k and l (food and eating vs unrelated scenes)
ORDERING = [(0, 1, 0, 2), (0, 1, 0, 4), (4, 5, 2, 5)]


def minilm(world, folder: Path) -> None:
    from transformers import BertModel

    model = load_model(folder, comm=world.tp_comm, device=world.device)
    ours = embed(model, SENTENCES).cpu()
    hf = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    enc = [model.tokenizer.encode(s).ids for s in SENTENCES]
    ref = []
    with torch.no_grad():
        for ids in enc:  # one sentence at a time: no padding in the oracle either
            h = hf(input_ids=torch.tensor([ids])).last_hidden_state[0]
            ref.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    ref = torch.stack(ref)
    cos = (ours * ref).sum(-1)
    assert cos.min() >= 0.99999, f"tp {world.tp_size}: cosine to HF {cos.tolist()}"
    sim = ours @ ours.T
    for a, b, c, d in ORDERING:
        assert sim[a, b] > sim[c, d], (
            f"similarity ordering: sim({a},{b})={sim[a, b]:.3f} <= sim({c},{d})={sim[c, d]:.3f}"
        )
    world.log.info(f"minilm tp {world.tp_size}: min cosine to HF {cos.min().item():.7f}")


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    world = tp_runtime.init()
    {"decoders": decoders, "loader": loader, "minilm": minilm}[mode](world, path)
    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
