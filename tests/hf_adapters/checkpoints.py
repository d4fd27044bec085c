"""Tiny random-weight HF causal LMs of every supported decoder family, saved with ``save_pretrained``
(safetensors; ``shards`` > 1 splits them with an index), and HF ``generate`` as the oracle.

Heads are 4 (or 8) and KV heads 1, 2 or 4, so every model shards at tp 1, 2 and 4. Weights come from
``randomize`` (O(1) scales, so logits are well separated and greedy decoding is not decided by
rounding). The tied-embedding families are saved untied too where the tied head would make a random
model repeat its input token, except GPT-2, which keeps its tied head (that path needs a test too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import randomize

VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bloom", "falcon_mqa", "falcon_alibi")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny HF model of ``family`` (eval, fp32, random O(1) weights)."""
    import transformers as t

    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    attn = "eager"
    if family in ("llama", "mistral", "qwen2"):
        cls, cfg_cls = {
            "llama": (t.LlamaForCausalLM, t.LlamaConfig),
            "mistral": (t.MistralForCausalLM, t.MistralConfig),
            "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config),
        }[family]
        extra = {"attention_bias": True, "mlp_bias": True} if family == "llama" else {}
        if family == "mistral":
            extra = {"sliding_window": None}
        cfg = cfg_cls(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2 if family != "mistral" else 1,
            max_position_embeddings=128,
            **extra,
            **common,
        )
    elif family == "gpt2":
        cls = t.GPT2LMHeadModel
        cfg = t.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=64, scale_attn_by_inverse_layer_idx=True, **common
        )
    elif family == "gpt_neox":
        cls = t.GPTNeoXForCausalLM
        cfg = t.GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            use_parallel_residual=True,
            **common,
        )
    elif family == "bloom":
        cls = t.BloomForCausalLM
        cfg = t.BloomConfig(hidden_size=64, n_layer=2, n_head=8, tie_word_embeddings=False, **common)
    elif family == "falcon_mqa":
        cls = t.FalconForCausalLM
        cfg = t.FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "falcon_alibi":
        # Multi-head (head-interleaved QKV), sequential blocks with two norms, ALiBi, biases. SDPA: the
        # eager FalconAttention counts ALiBi twice in transformers 5.17 (see hf_adapters.falcon).
        cls, attn = t.FalconForCausalLM, "sdpa"
        cfg = t.FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
            parallel_attn=False,
            alibi=True,
            bias=True,
            tie_word_embeddings=False,
            **common,
        )
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    model = cls._from_config(cfg, attn_implementation=attn).eval()
    randomize(model, seed)
    return model


def save(model: torch.nn.Module, folder: Path, shards: int = 1) -> Path:
    """``save_pretrained`` as safetensors; ``shards`` > 1 splits the weights into about that many files."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    kw = {} if shards == 1 else {"max_shard_size": max(size // shards, 1)}
    model.save_pretrained(folder, **kw)
    return Path(folder)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """HF ``generate``'s greedy continuation of one prompt (its new tokens, the stop token included)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
