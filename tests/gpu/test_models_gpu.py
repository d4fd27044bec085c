"""Models on one GPU at tp 1: a Llama-shaped random model (head size 64, GQA) in fp16 and bf16 against
HF transformers, and the real all-MiniLM-L6-v2 in fp32 (head size 32 has no CUDA kernel: its layers run
the reference backend on the GPU).

Tolerances (stated): prefill logits within the accuracy rule of tests/gpu/conftest.py, i.e. at most
twice HF's own error in the same dtype against HF in fp32, plus one unit of the dtype at the largest
logit; greedy generation (CUDA-graph decode steps) equal to HF's greedy generation in fp32 for the
first 4 tokens of every prompt (random O(1) weights keep the top logits far apart), and equal to our
eager greedy steps token for token (the same kernels; a graph only replays them); MiniLM cosine to
HF >= 0.99999.
"""

from __future__ import annotations

import pytest
import torch
from hf_adapters import checkpoints
from hf_adapters.common import randomize

from tp_runtime import NoComm, Step, embed, generate, load_model
from tp_runtime.batch.kv_cache import KVCache

DEV = torch.device("cuda:0")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import transformers as t

    cfg = t.LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        attention_bias=True,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = t.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    randomize(hf, 0)
    folder = tmp_path_factory.mktemp("llama_gpu")
    checkpoints.save(hf, folder)
    return hf, folder


def _hf_last_logits(hf, dtype) -> torch.Tensor:
    model = hf.to(DEV, dtype)
    with torch.no_grad():
        out = torch.stack([model(torch.tensor([p], device=DEV)).logits[0, -1].float() for p in PROMPTS])
    hf.to("cpu", torch.float32)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_logits_within_the_accuracy_rule(llama, dtype):
    hf, folder = llama
    ref, same = _hf_last_logits(hf, torch.float32), _hf_last_logits(hf, dtype)
    model = load_model(folder, comm=NoComm(), device=DEV, dtype=dtype)
    cache = KVCache(
        config=model.attention_config,
        head_layout=model.head_layout,
        num_layers=2,
        max_batch=3,
        max_seq_len=32,
        device=DEV,
    )
    step = Step(new_lens=[len(p) for p in PROMPTS], device=DEV)
    with torch.no_grad():
        ours = model(torch.tensor([t for p in PROMPTS for t in p], device=DEV), step, cache)
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    err, budget = (ours - ref).abs().max().item(), 2 * (same - ref).abs().max().item() + floor
    assert err <= budget, f"{dtype}: logits error {err:.3g} > {budget:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache", ["paged", "contiguous"])
def test_greedy_generation_with_graphs_follows_hf(llama, dtype, cache):
    hf, folder = llama
    want = [checkpoints.hf_greedy(hf, p, 4) for p in PROMPTS]  # fp32, on the CPU
    model = load_model(folder, comm=NoComm(), device=DEV, dtype=dtype)
    got = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=(), cache=cache, start_steps=[0, 0, 2])
    assert [g[:4] for g in got] == want, f"{dtype} {cache}: {got} vs HF fp32 {want}"
    eager = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=(), cache=cache, cuda_graphs=False)
    assert [g[:4] for g in eager] == want


@pytest.mark.parametrize("cache", ["paged", "contiguous"])
def test_one_graph_greedy_steps_equal_eager_steps(llama, cache, monkeypatch):
    """The whole greedy step in one graph (embedding to argmax, tokens fed back on the device, read back
    per chunk) gives eager generation's tokens, with stop tokens inside chunks, arrivals and a slot
    shortage; and the graph path did run."""
    import importlib

    gen = importlib.import_module("tp_runtime.models.generate")
    made = []
    real = gen._greedy_graph
    monkeypatch.setattr(gen, "_greedy_graph", lambda *a: made.append(1) or real(*a))
    hf, folder = llama
    model = load_model(folder, comm=NoComm(), device=DEV, dtype=torch.float16)
    prompts = [*PROMPTS, [3, 1, 4, 1, 5, 9, 2, 6]]
    kw = dict(max_new_tokens=40, cache=cache, start_steps=[0, 0, 5, 21], max_batch=3)
    free = generate(model, prompts, stop_token_ids=(), cuda_graphs=False, **kw)
    assert generate(model, prompts, stop_token_ids=(), **kw) == free
    assert made, "greedy decode steps ran eagerly"
    stops = sorted({free[0][9], free[1][20]})  # stops mid-chunk (chunks of 16 after the prefill token)
    eager = generate(model, prompts, stop_token_ids=stops, cuda_graphs=False, **kw)
    assert generate(model, prompts, stop_token_ids=stops, **kw) == eager
    assert eager != free and all(g[-1] in stops or len(g) == 40 for g in eager)
    assert [g[:4] for g in free[:3]] == [checkpoints.hf_greedy(hf, p, 4) for p in PROMPTS]


def test_minilm_fp32_on_the_gpu(minilm_dir):
    from transformers import BertModel

    model = load_model(minilm_dir, comm=NoComm(), device=DEV)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A woman is playing violin."]
    ours = embed(model, sentences).cpu()
    hf = BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = torch.stack(
            [
                torch.nn.functional.normalize(
                    hf(input_ids=torch.tensor([model.tokenizer.encode(s).ids])).last_hidden_state[0].mean(0), dim=0
                )
                for s in sentences
            ]
        )
    assert (ours * ref).sum(-1).min() >= 0.99999
