"""The CUDA backend: the operations of ``reference.py`` (same signatures) as CuPy RawKernel launches.

One launcher per file: ``cuda_prepare`` (bias, RoPE, cache write), ``cuda_context`` (prefill),
``cuda_decode`` (generation), ``cuda_fp8`` (FP8 projections); ``cuda_plan`` holds what they derive
from a step once for all layers, ``cuda_common`` what they share, ``capabilities`` what each kernel
serves and ``compile`` the variants it is compiled in. ``attend`` routes the step's sequences: the
generation phase to the decode kernel, everything else to the context kernel. Activations are fp16
or bf16 (fp32 layers run on ``backend='reference'``). Kernels run on torch's current stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from . import cuda_common, cuda_context, cuda_context_hopper, cuda_decode, cuda_fp8, cuda_prepare, reference
from .base import AttentionDesc, AttentionSpec, ScoreBias
from .capabilities import CAPABILITIES, check
from .cuda_common import check_activation
from .cuda_plan import route


def attend(
    q: torch.Tensor, kv: LayerKV, step: Step, spec: AttentionSpec, *, decode_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_activation(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, head_size], got shape {tuple(q.shape)}")
    t, h_r, d = q.shape
    if t != step.num_tokens:
        raise ValueError(f"q: expected {step.num_tokens} tokens (the step's), got {t}")
    if q.stride(2) != 1 or q.stride(1) != d or q.stride(0) % 8 or q.data_ptr() % 16:
        q = q.contiguous()
    out = cuda_common.new((t, h_r, d), q.dtype, q.device)
    lse = cuda_common.new((t, h_r), torch.float32, q.device)
    if t == 0:
        return out, lse
    plan = route(step, spec.cross)
    if plan.decode_ids:
        cuda_decode.decode(q, kv, step, plan.decode_ids, spec, out, lse, decode_splits)
    if plan.context_ids:
        cuda_context.context(q, kv, step, spec, plan.context_ids, out, lse)
    return out, lse


@dataclass(frozen=True)
class _CacheKind:
    """What the variant choosers read of a cache: its storage dtype and layout (no data needed)."""

    cache_dtype: object
    cache_layout: CacheLayout


def _unique(variants: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return list({(f, tuple(sorted((k, str(v)) for k, v in p.items()))): (f, p) for f, p in variants}.values())


def variants(desc: AttentionDesc, *, fp8_units: bool = True, hopper: bool = False) -> list[tuple[str, dict]]:
    """Every kernel variant a layer described by ``desc`` can launch: each cache layout it may be
    given, both context tile shapes (and the Hopper context kernel where it serves the layer, on
    a Hopper GPU: ``hopper``), the decode kernel for its head grouping, and the FP8 quantizer where
    its projections use it (on a GPU with FP8 matrix units: ``fp8_units``)."""
    bias = {
        ScoreBias.none: "none",
        ScoreBias.alibi: "alibi",
        ScoreBias.relative_table: "table",
        ScoreBias.relative_explicit: "table",
    }[desc.bias]
    mask = "padding" if desc.cross else desc.mask.value
    out: list[tuple[str, dict]] = []
    for layout in desc.cache_layouts:
        kv = _CacheKind(desc.cache_dtype, layout)
        if desc.cross:  # the encoder's K/V written into the cache, the decoder's queries alone
            out += [("prepare", cuda_prepare.variant(desc.dtype, None, kv))]
            out += [("prepare", cuda_prepare.variant(desc.dtype, None, None))]
        else:
            out.append(("prepare", cuda_prepare.variant(desc.dtype, desc.rope, kv)))
        for max_new in (0, cuda_context.WIDE_CAUSAL_MIN_LEN):
            out.append(("context", cuda_context.variant(desc.dtype, desc.head_size, mask, bias, kv, max_new)))
        fast = cuda_context_hopper.variant(desc.dtype, desc.head_size, mask, bias, desc.cache_dtype, layout)
        if hopper and not desc.cross and fast is not None:
            out.append(("context_hopper", fast))
        if desc.keeps_cache:
            group = desc.head_layout.group_size
            out.append(("decode", cuda_decode.variant(desc.dtype, kv, desc.head_size, group)))
            if cuda_decode.heads_per_block(group, desc.head_size) >= cuda_decode.SEPARATE_MERGE_HEADS:
                out.append(("decode_merge", cuda_decode.merge_variant(desc.dtype, desc.head_size)))
    if desc.fp8_projections and fp8_units:
        out += cuda_fp8.variants(desc.dtype)
    return _unique(out)


class CudaBackend:
    """The CUDA backend of one device (see ``base.py`` for the operations)."""

    name = "cuda"
    prepare = staticmethod(cuda_prepare.prepare)
    attend = staticmethod(attend)

    def __init__(self, device: torch.device):
        self.device = device
        self.capability = torch.cuda.get_device_capability(device)
        # FP8 projections run on the FP8 matrix units where the GPU has them, else as the reference's
        # exact emulation (same numbers, slower).
        self.fp8_units = CAPABILITIES["fp8_quantize"].problem(capability=self.capability) is None

    def fp8_quantize(self, x: torch.Tensor, static_scale: torch.Tensor | None = None):
        return (cuda_fp8 if self.fp8_units else reference).fp8_quantize(x, static_scale)

    def fp8_matmul(self, xq, x_scale, weight, weight_scale, *, per_channel: bool, out_dtype: torch.dtype):
        impl = cuda_fp8 if self.fp8_units else reference
        return impl.fp8_matmul(xq, x_scale, weight, weight_scale, per_channel=per_channel, out_dtype=out_dtype)

    def check_fp8_weight(self, out_features: int, in_features: int) -> None:
        """The FP8 GEMM's shape rule for a rank's local weight ``[out, in]``."""
        if self.fp8_units and (out_features % 16 or in_features % 16):
            raise ValueError(
                f"FP8 GEMM: local weight shape {(out_features, in_features)} must have both sides divisible by 16"
            )

    def check(self, desc: AttentionDesc) -> None:
        """Raise ``NotImplementedError`` naming what of ``desc`` no kernel here serves."""
        check("prepare", dtype=desc.dtype, capability=self.capability)
        if desc.head_size % 2:
            raise NotImplementedError(
                f"head_size={desc.head_size}: the CUDA prepare kernel needs an even head size; use backend='reference'"
            )
        families = ("context", "decode") if desc.keeps_cache else ("context",)
        for family in families:
            for layout in desc.cache_layouts:
                check(family, dtype=desc.dtype, head_size=desc.head_size, cache_dtype=desc.cache_dtype,
                      cache_layout=layout, capability=self.capability)  # fmt: skip

    def variants(self, desc: AttentionDesc) -> list[tuple[str, dict]]:
        return variants(desc, fp8_units=self.fp8_units, hopper=cuda_context_hopper.hopper_gpu(self.capability))

    def precompile(self, descs, local_comm=None) -> None:
        """Compile every variant ``descs`` can launch before the first step. Under mpirun, pass the
        node-local communicator (``World.local_comm``): one rank per node compiles (in parallel
        processes), the others wait, then load the binaries from the disk cache. Collective over it."""
        from .compile import precompile

        precompile(_unique([v for desc in descs for v in self.variants(desc)]), local_comm)
