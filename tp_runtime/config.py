"""Enums and the frozen attention config, validated once on construction.

Every invalid combination raises ``ValueError`` naming the field, the value and the rule.
Global names (``num_heads``) are kept apart from per-rank ones (``HeadLayout.num_heads_per_rank``);
nothing here is divided by the tensor-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch


class PositionEmbeddingType(str, Enum):
    learned_absolute = "learned_absolute"  # added to embeddings outside attention: nothing to do here
    rope_gptj = "rope_gptj"  # rotate adjacent pairs (2i, 2i+1)
    rope_gpt_neox = "rope_gpt_neox"  # rotate halves (i, i + rot/2)
    alibi = "alibi"  # scores·scale + slope·(k − q)
    alibi_with_scale = "alibi_with_scale"  # (scores + slope·(k − q))·scale
    relative = "relative"  # T5 bias: implicit bucket table, or an explicit [H_r, Q, K] table per call

    @property
    def is_rope(self) -> bool:
        return self in (PositionEmbeddingType.rope_gptj, PositionEmbeddingType.rope_gpt_neox)

    @property
    def is_alibi(self) -> bool:
        return self in (PositionEmbeddingType.alibi, PositionEmbeddingType.alibi_with_scale)


class RotaryScalingType(str, Enum):
    none = "none"
    linear = "linear"  # positions divided by the factor
    dynamic = "dynamic"  # NTK: base grows with each sequence's length past max_position_embeddings


class AttentionMaskType(str, Enum):
    padding = "padding"  # every query sees every key of its sequence (BERT, encoders)
    causal = "causal"  # query at position p sees keys 0..p
    bidirectional = "bidirectional"  # ChatGLM-6B: as padding, but the last key is hidden from earlier queries


class KVCacheDType(str, Enum):
    auto = "auto"  # same dtype as the activations
    int8 = "int8"
    fp8 = "fp8"  # float8 e4m3

    def storage_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        return {
            KVCacheDType.auto: activation_dtype,
            KVCacheDType.int8: torch.int8,
            KVCacheDType.fp8: torch.float8_e4m3fn,
        }[self]

    @property
    def is_quantized(self) -> bool:
        return self is not KVCacheDType.auto


class QuantMode(str, Enum):
    """How the QKV and dense projections compute (independent of the KV-cache dtype)."""

    none = "none"
    fp8_qdq = "fp8_qdq"  # FP8 weights and activations, fp32 accumulate (fp8.py)


class Fp8WeightScaling(str, Enum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"  # one scale per output row


class Fp8ActivationScaling(str, Enum):
    dynamic = "dynamic"  # amax of the current input
    static = "static"  # calibrated, given at load time


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, value, rule: str) -> None:
    raise ValueError(f"AttentionConfig.{name}={value!r}: {rule}")


def _enum(cls, name: str, value):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        _fail(name, value, f"must be one of {[m.value for m in cls]}")


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Everything that fixes an attention layer's behaviour (global, unsharded numbers)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None  # None: multi-head attention (= num_heads)
    head_size: int | None = None  # None: hidden_size // num_heads (T5 sets it explicitly)
    max_position_embeddings: int = 2048
    position_embedding: PositionEmbeddingType = PositionEmbeddingType.learned_absolute
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    rotary_scaling: RotaryScalingType = RotaryScalingType.none
    rotary_scaling_factor: float = 1.0
    mask_type: AttentionMaskType = AttentionMaskType.causal
    qkv_bias: bool = True
    dense_bias: bool = True
    q_scaling: float = 1.0
    apply_query_key_layer_scaling: bool = False
    num_layers: int = 1
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    relative_table: bool = True  # relative: the layer owns a [H, num_buckets] table (else bias given per call)
    cross_attention: bool = False
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: KVCacheDType = KVCacheDType.auto
    quant_mode: QuantMode = QuantMode.none
    fp8_weight_scaling: Fp8WeightScaling = Fp8WeightScaling.per_tensor
    fp8_activation_scaling: Fp8ActivationScaling = Fp8ActivationScaling.dynamic
    check_finite: bool = False  # raise if a layer's output holds NaN/Inf (costs one device sync per layer)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        set_("position_embedding", _enum(PositionEmbeddingType, "position_embedding", self.position_embedding))
        set_("rotary_scaling", _enum(RotaryScalingType, "rotary_scaling", self.rotary_scaling))
        set_("mask_type", _enum(AttentionMaskType, "mask_type", self.mask_type))
        set_("kv_cache_dtype", _enum(KVCacheDType, "kv_cache_dtype", self.kv_cache_dtype))
        set_("quant_mode", _enum(QuantMode, "quant_mode", self.quant_mode))
        set_("fp8_weight_scaling", _enum(Fp8WeightScaling, "fp8_weight_scaling", self.fp8_weight_scaling))
        set_(
            "fp8_activation_scaling", _enum(Fp8ActivationScaling, "fp8_activation_scaling", self.fp8_activation_scaling)
        )
        for name in ("hidden_size", "num_heads", "max_position_embeddings", "num_layers"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, v, "must be a positive int")
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if not _is_int(self.num_kv_heads) or self.num_kv_heads < 1:
            _fail("num_kv_heads", self.num_kv_heads, "must be a positive int")
        if self.num_heads % self.num_kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_size is None:
            if self.hidden_size % self.num_heads:
                _fail(
                    "hidden_size",
                    self.hidden_size,
                    f"must be divisible by num_heads={self.num_heads} unless head_size is given",
                )
            set_("head_size", self.hidden_size // self.num_heads)
        if not _is_int(self.head_size) or self.head_size < 1:
            _fail("head_size", self.head_size, "must be a positive int")
        if self.dtype not in SUPPORTED_DTYPES:
            _fail("dtype", self.dtype, f"must be one of {SUPPORTED_DTYPES}")
        if not (_is_number(self.q_scaling) and math.isfinite(self.q_scaling) and self.q_scaling > 0):
            _fail("q_scaling", self.q_scaling, "must be a finite number > 0")
        pe = self.position_embedding
        if pe.is_rope:
            if not 0.0 < self.rotary_pct <= 1.0:
                _fail("rotary_pct", self.rotary_pct, "must be in (0, 1]")
            if self.rotary_pct == 1.0 and self.head_size % 2:
                _fail("head_size", self.head_size, f"{pe.value} rotates pairs of channels: needs an even head size")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                _fail(
                    "rotary_pct",
                    self.rotary_pct,
                    f"int(head_size * rotary_pct)={self.rotary_dim} must be even and >= 2",
                )
            if not self.rotary_base > 0:
                _fail("rotary_base", self.rotary_base, "must be > 0")
        elif self.rotary_scaling is not RotaryScalingType.none:
            _fail("rotary_scaling", self.rotary_scaling.value, f"needs a RoPE position_embedding, got {pe.value}")
        if self.rotary_scaling is not RotaryScalingType.none and not self.rotary_scaling_factor > 1.0:
            _fail("rotary_scaling_factor", self.rotary_scaling_factor, "must be > 1 when rotary_scaling is set")
        if self.rotary_scaling is RotaryScalingType.dynamic and self.rotary_dim <= 2:
            _fail("rotary_pct", self.rotary_pct, "dynamic NTK scaling needs a rotary dimension > 2")
        if pe is PositionEmbeddingType.relative:
            if self.relative_num_buckets < 2:
                _fail("relative_num_buckets", self.relative_num_buckets, "must be >= 2")
            # T5's log-spaced buckets start after the exact ones (a quarter of the buckets in encoders,
            # which split them by direction, half in decoders) and must reach further than those.
            max_exact = self.relative_num_buckets // (2 if self.mask_type is AttentionMaskType.causal else 4)
            if self.relative_max_distance <= max_exact:
                _fail(
                    "relative_max_distance",
                    self.relative_max_distance,
                    f"must exceed the {max_exact} exactly-bucketed distances of relative_num_buckets="
                    f"{self.relative_num_buckets} with mask_type={self.mask_type.value}",
                )
        if (
            self.cross_attention
            and pe is not PositionEmbeddingType.learned_absolute
            and not (pe is PositionEmbeddingType.relative and not self.relative_table)
        ):
            _fail(
                "position_embedding",
                pe.value,
                "cross attention takes no position embedding (learned_absolute, or relative without a table)",
            )

        if self.quant_mode is QuantMode.fp8_qdq and self.dtype is torch.float32:
            _fail("quant_mode", self.quant_mode.value, "FP8 projections need fp16 or bf16 activations (dtype)")

    # ---- derived numbers (no state) -------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """``rot = int(D · rotary_pct)`` channels are rotated; 0 without RoPE."""
        if not self.position_embedding.is_rope:
            return 0
        return int(self.head_size * self.rotary_pct)

    @property
    def effective_q_scaling(self) -> float:
        return self.q_scaling * (self.num_layers if self.apply_query_key_layer_scaling else 1)

    @property
    def softmax_scale(self) -> float:
        """``scores = Q·Kᵀ · softmax_scale`` with ``softmax_scale = 1 / (q_scaling · √D)``."""
        return 1.0 / (self.effective_q_scaling * math.sqrt(self.head_size))

    @property
    def qkv_size(self) -> int:
        """Rows of the full fused ``[Q | K | V]`` weight."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_size
