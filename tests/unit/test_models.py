"""tp_runtime.models at tp 1 in one process: every decoder family against HF generate (single-file and
sharded checkpoints), the loader's errors, sampling filters, and the sharding helpers it adds."""

from __future__ import annotations

import json

import pytest
import torch
from hf_adapters import checkpoints

from tp_runtime import CheckpointError, NoComm, Sampling, generate, load_model
from tp_runtime.models.sampling import Sampler
from tp_runtime.sharding import ceil_range, gate_up_rows

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("family", checkpoints.FAMILIES)
@pytest.mark.parametrize("shards", [1, 3])
def test_greedy_generation_equals_hf(family, shards, tmp_path):
    hf = checkpoints.build(family, seed=1)
    model = load_model(checkpoints.save(hf, tmp_path, shards), comm=NoComm(), device="cpu")
    want = [checkpoints.hf_greedy(hf, p, 6) for p in PROMPTS]
    assert generate(model, PROMPTS, max_new_tokens=6, stop_token_ids=()) == want
    staggered = generate(model, PROMPTS, max_new_tokens=6, stop_token_ids=(), start_steps=[0, 1, 4], max_batch=2)
    assert staggered == want


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    checkpoints.save(checkpoints.build("llama"), folder)
    return folder


def test_unsupported_architecture_lists_the_supported(tmp_path, llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"MambaForCausalLM.*supported: .*BertModel.*LlamaForCausalLM"):
        load_model(tmp_path, comm=NoComm(), device="cpu")


def _rewrite(src, dst, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_tensor_names_it_and_the_files(tmp_path, llama_dir):
    _rewrite(llama_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        load_model(tmp_path, comm=NoComm(), device="cpu")


def test_misshapen_tensor_names_it_the_file_and_both_shapes(tmp_path, llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8].clone()

    _rewrite(llama_dir, tmp_path, edit)
    with pytest.raises(
        CheckpointError, match=r"k_proj\.weight.*model\.safetensors: expected shape \(32, 64\), got \(8, 64\)"
    ):
        load_model(tmp_path, comm=NoComm(), device="cpu")


def test_dtype_is_the_users(llama_dir):
    model = load_model(llama_dir, comm=NoComm(), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_generate_validates_its_arguments(llama_dir):
    model = load_model(llama_dir, comm=NoComm(), device="cpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids \[500\]"):
        generate(model, [[500]], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer.json"):
        generate(model, ["text"], max_new_tokens=2)
    with pytest.raises(ValueError, match="start_steps"):
        generate(model, [[1]], max_new_tokens=2, start_steps=[0, 1])
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_sampler_keeps_only_top_k_and_top_p_tokens():
    # probabilities 0.5, 0.25, 0.125, ... (log-probs as logits): top_p 0.7 keeps the first two, top_k 3 three
    logits = torch.log(torch.tensor([[2.0**-i for i in range(1, 9)]]))
    for sampling, allowed in (
        (Sampling(temperature=1.0, top_p=0.7), {0, 1}),
        (Sampling(temperature=1.0, top_k=3), {0, 1, 2}),
    ):
        sampler = Sampler(sampling)
        seen = {int(sampler(logits)) for _ in range(300)}
        assert seen == allowed, (sampling, seen)
    assert int(Sampler(Sampling())(logits)) == 0  # greedy


def test_ceil_range_and_gate_up_rows():
    for total in (1, 2, 7, 30522):
        for tp in (1, 2, 3, 4):
            ranges = [ceil_range(total, tp, r) for r in range(tp)]
            assert [i for r in ranges for i in r] == list(range(total))
    assert gate_up_rows(8, 2, 1).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
