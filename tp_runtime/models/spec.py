"""What a model is, independent of its checkpoint's names: ``ModelConfig`` (frozen, validated once).

Each family module (``llama.py``, ``gpt2.py``, ...) turns an HF ``config.json`` into one of these;
the shared skeletons (``decoder.py``, ``bert.py``) build the tensor-parallel model from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..config import PositionEmbeddingType, RotaryScalingType


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(str, Enum):
    gelu = "gelu"  # exact (erf)
    gelu_tanh = "gelu_tanh"  # GPT-2's gelu_new, BLOOM's gelu
    silu = "silu"
    relu = "relu"


class Block(str, Enum):
    """How a decoder layer combines attention and MLP (``h`` the layer input)."""

    sequential = "sequential"  # h += attn(ln1(h)); h += mlp(ln2(h))          (GPT-2, Llama, BLOOM)
    parallel = "parallel"  # h += attn(ln1(h)) + mlp(ln2(h))                    (GPT-NeoX parallel residual)
    parallel_shared_norm = "parallel_shared_norm"  # n = ln1(h); h += attn(n) + mlp(n)  (Falcon-7B)


def _fail(field: str, value, rule: str) -> None:
    raise ValueError(f"ModelConfig.{field}: {rule}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A transformer as the runtime builds it (global, unsharded numbers)."""

    family: str  # "llama", "gpt2", "gpt_neox", "bloom", "falcon", "bert"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    norm: Norm
    norm_eps: float
    activation: Activation
    gated_mlp: bool = False  # SwiGLU: down(act(gate(x)) * up(x))
    block: Block = Block.sequential
    position_embedding: PositionEmbeddingType = PositionEmbeddingType.learned_absolute
    max_position_embeddings: int = 2048
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    rotary_scaling: RotaryScalingType = RotaryScalingType.none
    rotary_scaling_factor: float = 1.0
    learned_positions: bool = False  # a position-embedding table added to the token embeddings
    type_vocab_size: int = 0  # BERT's token-type table (0: none)
    embedding_norm: bool = False  # a norm right after the embeddings (BLOOM, BERT)
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    inverse_layer_scaling: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx: q_scaling = layer + 1
    tied_embeddings: bool = True
    sliding_window: int | None = None  # Mistral/Qwen2: sequences may not grow past it (no windowed attention)
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive int")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            _fail("intermediate_size", self.intermediate_size, "must be a positive int")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            _fail("dtype", self.dtype, "must be torch.float32, torch.float16 or torch.bfloat16")
        if self.sliding_window is not None and self.sliding_window < 1:
            _fail("sliding_window", self.sliding_window, "must be None or a positive int")
