"""HuggingFace attention oracles, one module per model family, re-exported here as one API.

Tiny ``transformers`` models with random weights, their weights converted to our fused layout,
and captured reference runs. ``import hf_adapters as hf`` gives the whole API: ``hf.llama(...)``,
``hf.run_decoder(...)``, ``hf.Oracle``, ...

Nothing is downloaded: every model is built from a config. Each ``Oracle`` names one
attention layer inside a one-layer (GPT-2: three-layer) HF model, the module whose input is
the attention's hidden states (``attn``), the dense projection whose output is the attention
output (``out``: output projection + bias, before any residual or LayerNorm), the matching
``AttentionConfig`` and the full weights for ``Attention.load_weights``.

References are captured with forward hooks while the *whole* HF model runs, so masks,
position ids, rotary tables, ALiBi tensors and caches are exactly what the model itself
builds (``Trace``). The tests then feed the captured hidden states to our layer and compare
with the captured outputs and the HF ``past_key_values``.

Modules: ``common`` (the version adapter, weight conversion, random weights, ``Oracle``),
``capture`` (the captured reference runs), and one per family: ``bloom``, ``mpt``, ``falcon``,
``gpt_neox``, ``gptj``, ``llama``, ``t5``, ``bert``, ``gpt2`` (each defines the builder of that name).

All config-name differences between ``transformers`` versions live in the "version adapter"
section of ``common.py`` (pinned: transformers==5.17.0 in the ``test`` extra).
"""

from __future__ import annotations

from .bert import bert
from .bloom import bloom
from .capture import Call, Trace, capture, random_ids, run_decoder, run_encoder, run_t5
from .common import TRANSFORMERS_VERSION, Oracle, cache_kv, deinterleave_qkv, fuse, randomize, rope_kwargs
from .falcon import falcon
from .gpt2 import gpt2
from .gpt_neox import gpt_neox
from .gptj import gptj
from .llama import llama
from .mpt import mpt
from .t5 import t5

__all__ = [
    "TRANSFORMERS_VERSION",
    "Call",
    "Oracle",
    "Trace",
    "bert",
    "bloom",
    "cache_kv",
    "capture",
    "deinterleave_qkv",
    "falcon",
    "fuse",
    "gpt2",
    "gpt_neox",
    "gptj",
    "llama",
    "mpt",
    "randomize",
    "rope_kwargs",
    "random_ids",
    "run_decoder",
    "run_encoder",
    "run_t5",
    "t5",
]
