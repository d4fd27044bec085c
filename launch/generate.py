"""Generate text from a local decoder checkpoint (HF ``config.json`` + safetensors), tensor-parallel.

    launch/tp_run -n 2 launch/generate.py --model DIR [--prompt TEXT ...] [--max-new-tokens 32]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--dtype bfloat16]

Families: GPT-2, GPT-NeoX, Llama (Mistral, Qwen2), BLOOM, Falcon. Prompts are text when the folder has a
``tokenizer.json``, else comma-separated token ids (``--prompt 1,2,3``). Greedy unless ``--temperature``
> 0. Rank 0 prints each prompt and its continuation.
"""

from __future__ import annotations

import argparse

import torch

import tp_runtime
from tp_runtime import Sampling, generate, load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local HF decoder checkpoint folder")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPUs, else float32")
    args = parser.parse_args()
    world = tp_runtime.init()
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if world.device.type == "cuda" else torch.float32
    model = load_model(args.model, comm=world.tp_comm, device=world.device, dtype=dtype)
    text = model.tokenizer is not None
    prompts = args.prompt or (["Once upon a time"] if text else ["1,2,3"])
    inputs = prompts if text else [[int(t) for t in p.split(",")] for p in prompts]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    outputs = generate(model, inputs, max_new_tokens=args.max_new_tokens, sampling=sampling)
    for prompt, out in zip(prompts, outputs, strict=True):
        shown = model.tokenizer.decode(out) if text else ",".join(map(str, out))
        world.log.info(f"{prompt!r} -> {shown!r}")


if __name__ == "__main__":
    main()
