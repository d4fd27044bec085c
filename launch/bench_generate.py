"""Decode tokens/s of a TinyLlama-1.1B-shaped random model on one GPU: ours (tp 1, bf16, paged cache,
CUDA-graph decode steps) against HF transformers' generate (eager; static cache + torch.compile where it
runs) in the same process, and against the memory bound.

    python launch/bench_generate.py [--quick] [--out FILE.json]

Decode tokens/s at batch B: ``B·(N−2) / (t(N) − t(2))``, where ``t(n)`` is the median wall time of a
generate call producing ``n`` new tokens from the same prompts (so prefill and the first decode step,
which captures our graphs, cancel out). Memory bound:
per step every weight but the embedding table is read once, plus the KV cache of the batch at its
mean length; ``bound = B / (bytes per step / copy bandwidth)``, the bandwidth measured here with a
device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import benchlib
import torch

from tp_runtime import NoComm, generate, load_model

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def copy_bandwidth(dev) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = benchlib.median_ms(lambda: dst.copy_(src), 10, device=dev)
    return 2 * src.numel() / (ms / 1e3)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (synchronised; ``generate`` returns host lists)."""
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def decode_rate(run, batch: int, new: int, repeats: int) -> float:
    """Tokens/s of the decode steps: ``t(2)`` as the base (not ``t(1)``) so that what a call pays once
    for its first decode step (our graph's warm-up and capture: each ``generate`` call has its own
    cache, hence its own graphs) cancels out as the prefill does."""
    return batch * (new - 2) / (timed(lambda: run(new), repeats) - timed(lambda: run(2), repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats; compile only at batch 1")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip HF's static cache + torch.compile baseline (its compile takes minutes; it fails on some stacks)",
    )
    args = parser.parse_args()
    import transformers as t

    dev, dt = torch.device("cuda:0"), torch.bfloat16
    prompt_len, new, repeats = (64, 33, 2) if args.quick else (128, 129, 3)
    batches = (1, 16, 64)
    cfg = t.LlamaConfig(**SHAPE, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = t.LlamaForCausalLM._from_config(cfg, dtype=dt).to(dev).eval()
    folder = tempfile.mkdtemp(prefix="tinyllama_random_")
    hf.save_pretrained(folder)
    ours = load_model(folder, comm=NoComm(), device=dev, dtype=dt)
    bw = copy_bandwidth(dev)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    kv_per_token = 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * 64 * 2  # K and V, bf16
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        prompts = torch.randint(0, SHAPE["vocab_size"], (b, prompt_len), generator=g)
        lists = prompts.tolist()
        row = {"batch": b}
        row["ours"] = decode_rate(
            lambda n, lists=lists: generate(ours, lists, max_new_tokens=n, stop_token_ids=()), b, new, repeats
        )
        ids = prompts.to(dev)

        def hf_run(n, ids=ids, **kw):
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

        row["hf_eager"] = decode_rate(hf_run, b, new, repeats)
        if not args.no_compile and (b == 1 or not args.quick):
            eager_forward = hf.forward
            try:
                hf.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=True)

                def hf_static(n, ids=ids):
                    with torch.no_grad():
                        return hf.generate(
                            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static"
                        )

                hf_static(new)  # compile
                row["hf_static_compile"] = decode_rate(hf_static, b, new, repeats)
            except Exception as e:  # noqa: BLE001 - the baseline may not run on every stack; record why
                row["hf_static_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                hf.forward = eager_forward
        mean_len = prompt_len + new / 2
        step_bytes = weight_bytes + b * mean_len * kv_per_token
        row["memory_bound"] = b / (step_bytes / bw)
        row["ours_vs_bound"] = row["ours"] / row["memory_bound"]
        row["ours_vs_hf_eager"] = row["ours"] / row["hf_eager"]
        if "hf_static_compile" in row:
            row["ours_vs_hf_static_compile"] = row["ours"] / row["hf_static_compile"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{torch.cuda.get_device_name(dev)}, TinyLlama-1.1B shape (random bf16), prompt {prompt_len}, "
        f"{new} new tokens; copy bandwidth {bw / 1e9:.0f} GB/s"
    )
    print(
        f"{'batch':>5} {'ours tok/s':>11} {'HF eager':>9} {'HF st+comp':>10} {'bound':>9} {'of bound':>8} "
        f"{'x eager':>7} {'x comp':>7}"
    )
    for r in rows:
        comp = r.get("hf_static_compile", float("nan"))
        print(
            f"{r['batch']:>5} {r['ours']:>11.0f} {r['hf_eager']:>9.0f} {comp:>10.0f} {r['memory_bound']:>9.0f} "
            f"{r['ours_vs_bound']:>8.2f} {r['ours_vs_hf_eager']:>7.2f} {r['ours'] / comp:>7.2f}"
        )
    if args.out:
        result = dict(
            device=torch.cuda.get_device_name(dev),
            shape=SHAPE,
            dtype="bfloat16",
            prompt_len=prompt_len,
            new_tokens=new,
            copy_bandwidth_bytes_per_s=bw,
            weight_bytes=weight_bytes,
            rows=rows,
        )
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
