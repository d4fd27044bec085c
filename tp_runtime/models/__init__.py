"""Tensor-parallel models built from the runtime's layers, loaded shard by shard from local HF checkpoints.

``load_model(folder, comm=..., device=..., dtype=...)`` -> a ``DecoderModel`` (GPT-2, GPT-NeoX, Llama /
Mistral / Qwen2, BLOOM, Falcon) or a ``BertEncoder``; ``generate(model, prompts, ...)`` for decoders,
``embed(model, sentences)`` for BERT. One file per family (``llama.py``, ...) maps its ``config.json``
and tensor names; ``decoder.py`` is the skeleton every decoder shares; ``mapping.py`` the one place
where checkpoint layouts become this rank's shards.
"""

from __future__ import annotations

from .bert import BertEncoder
from .checkpoint import Checkpoint, CheckpointError
from .decoder import DecoderModel
from .embed import embed
from .generate import generate
from .registry import SUPPORTED, load_model
from .sampling import Sampling
from .spec import ModelConfig

__all__ = [
    "SUPPORTED",
    "BertEncoder",
    "Checkpoint",
    "CheckpointError",
    "DecoderModel",
    "ModelConfig",
    "Sampling",
    "embed",
    "generate",
    "load_model",
]
