"""tp_runtime: a tensor-parallel attention runtime for NVIDIA GPUs, launched with mpirun.

The front door: everything a launch script or model code needs is importable from here
(``from tp_runtime import init, Attention, AttentionConfig, Step, KVCache``). The rooms behind
it (``distributed``, ``layers``, ``batch``, ``backends``, ``models``) and what each may import are described
in the repository's ARCHITECTURE.md.
"""

from .batch.graphs import DecodeGraph
from .batch.kv_cache import CacheCapacityError, CacheStateError, KVCache, PagedKVCache
from .batch.step import Step
from .config import (
    AttentionConfig,
    AttentionMaskType,
    Fp8ActivationScaling,
    Fp8WeightScaling,
    KVCacheDType,
    PositionEmbeddingType,
    QuantMode,
    RotaryScalingType,
)
from .distributed.comm import Communicator, MpiComm, NcclComm, NoComm
from .distributed.consistency import StepMismatch
from .distributed.watchdog import CollectiveTimeout, collective_timeout, set_collective_timeout
from .distributed.world import World, init
from .layers.attention import Attention, BertAttention, precompile
from .layers.linear import ColumnLinear, RowLinear
from .models import BertEncoder, CheckpointError, DecoderModel, Sampling, embed, generate, load_model
from .sharding import HeadLayout, head_layout

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionConfig",
    "BertEncoder",
    "CheckpointError",
    "DecoderModel",
    "Sampling",
    "embed",
    "generate",
    "load_model",
    "AttentionMaskType",
    "BertAttention",
    "CacheCapacityError",
    "CacheStateError",
    "CollectiveTimeout",
    "ColumnLinear",
    "Communicator",
    "DecodeGraph",
    "Fp8ActivationScaling",
    "Fp8WeightScaling",
    "HeadLayout",
    "KVCache",
    "KVCacheDType",
    "MpiComm",
    "NcclComm",
    "NoComm",
    "PagedKVCache",
    "PositionEmbeddingType",
    "QuantMode",
    "RotaryScalingType",
    "RowLinear",
    "Step",
    "StepMismatch",
    "World",
    "__version__",
    "collective_timeout",
    "head_layout",
    "init",
    "precompile",
    "set_collective_timeout",
]
