"""Every attention operation in plain torch, fp32 accumulate: the executable specification.

Runs on any device (the CPU path, and the oracle for the CUDA kernels). Written for clarity,
sequence by sequence; see ``base.py`` for the interface.
"""

from __future__ import annotations

import torch

from ..batch.kv_cache import LayerKV
from ..batch.step import Step
from ..config import AttentionMaskType
from ..position import RopeSpec, apply_rope, relative_bucket
from ..quant import dequantize_kv, quantize_e4m3, quantize_kv, scale_from_amax
from ..sharding import HeadLayout
from .base import AttentionDesc, AttentionSpec, key_lengths

BIDIRECTIONAL_MASK_VALUE = -10000.0  # ChatGLM-6B's additive mask on the last context column


def prepare(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    step: Step,
    *,
    head_layout: HeadLayout,
    head_size: int,
    rope: RopeSpec | None,
    kv: LayerKV | None,
) -> torch.Tensor:
    h_r, kv_r, d = head_layout.num_heads_per_rank, head_layout.num_kv_heads_per_rank, head_size
    x = qkv.float() + (bias.float() if bias is not None else 0.0)
    x = x.to(qkv.dtype)
    q = x[:, : h_r * d].reshape(-1, h_r, d)  # [T, H_r, D]
    k = x[:, h_r * d : (h_r + kv_r) * d].reshape(-1, kv_r, d)  # [T, KV_r, D]
    v = x[:, (h_r + kv_r) * d :].reshape(-1, kv_r, d)  # [T, KV_r, D]
    if rope is not None:
        cos, sin = rope.cos_sin(step.positions, step.total_len)
        q, k = apply_rope(q, cos, sin, rope), apply_rope(k, cos, sin, rope)
    if kv is not None:
        write_kv(kv, k, v, step.slot[step.token_seq.long()], step.positions)
    return q.contiguous()


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
    """Store ``k, v [T, KV_r, D]`` of tokens at ``(slots, positions)`` ``[T]``."""
    rows, offs = kv.locate(slots, positions)
    if kv.cache_dtype.is_quantized:
        k, v = quantize_kv(k, kv.quant_scale, kv.cache_dtype), quantize_kv(v, kv.quant_scale, kv.cache_dtype)
    kv.data[rows, 0, :, offs, :] = k.to(kv.data.dtype)
    kv.data[rows, 1, :, offs, :] = v.to(kv.data.dtype)


def read_kv(kv: LayerKV, step: Step, i: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[L, KV_r, D]`` (fp32) of sequence ``i``, positions ``0..length-1``.

    Beam search: a cached position ``t < past`` of slot ``s = b·W + j`` is read from beam
    ``cache_indirection[b, j, t]``; the step's own new tokens come from the sequence's slot.
    """
    dev = kv.data.device
    pos = torch.arange(length, device=dev)
    slot = step.slots[i]
    slots = torch.full((length,), slot, dtype=torch.long, device=dev)
    if step.beam_width > 1:
        w, past = step.beam_width, step.past_lens[i]
        b, j = divmod(slot, w)
        beams = step.cache_indirection[b, j, :length].long().to(dev)
        slots = torch.where(pos < past, b * w + beams, slots)
    rows, offs = kv.locate(slots, pos)
    k = dequantize_kv(kv.data[rows, 0, :, offs, :], kv.dequant_scale)
    v = dequantize_kv(kv.data[rows, 1, :, offs, :], kv.dequant_scale)
    return k, v


def score_bias(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Additive fp32 bias ``[H_r, Q, K]`` of position embeddings and the bidirectional mask."""
    rel = (k_pos[None, :] - q_pos[:, None]).long()  # [Q, K]
    bias = torch.zeros(num_heads, *rel.shape, dtype=torch.float32, device=q_pos.device)
    if spec.alibi_slopes is not None:
        bias = bias + spec.alibi_slopes.float().to(bias.device)[:, None, None] * rel
    if spec.relative_table is not None:
        bucket = relative_bucket(
            rel, bidirectional=spec.bidirectional_buckets, num_buckets=spec.num_buckets, max_distance=spec.max_distance
        )
        bias = bias + spec.relative_table.float().to(bias.device)[:, bucket]
    if spec.relative_bias is not None:
        bias = bias + spec.relative_bias.float().to(bias.device)[:, q_pos.long()][:, :, k_pos.long()]
    if spec.mask is AttentionMaskType.bidirectional and not spec.cross:
        last = k_pos.numel() - 1
        hide = (k_pos[None, :] == last) & (q_pos[:, None] < last)
        bias = bias + hide.float() * BIDIRECTIONAL_MASK_VALUE
    return bias


def visible(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean ``[Q, K]``: which keys each query may see."""
    if spec.mask is AttentionMaskType.causal and not spec.cross:
        return k_pos[None, :] <= q_pos[:, None]
    return torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)


def attend(
    q: torch.Tensor, kv: LayerKV, step: Step, spec: AttentionSpec, *, decode_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    del decode_splits  # one pass over all keys here; splitting only changes rounding
    t, h_r, d = q.shape
    group = h_r // kv.num_kv_heads
    out = torch.zeros(t, h_r, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t, h_r), float("-inf"), dtype=torch.float32, device=q.device)
    for i, n_keys in enumerate(key_lengths(step, spec)):
        rows = step.token_range(i)
        if n_keys == 0:
            continue  # no key at all: zeros, lse -inf
        k, v = read_kv(kv, step, i, n_keys)  # [L, KV_r, D]
        k = k.repeat_interleave(group, dim=1)  # [L, H_r, D]: query head h reads KV head h // group
        v = v.repeat_interleave(group, dim=1)
        qi = q[rows.start : rows.stop].float()  # [n, H_r, D]
        q_pos = torch.arange(step.past_lens[i], step.total_lens[i], device=q.device)
        k_pos = torch.arange(n_keys, device=q.device)
        s = torch.einsum("qhd,khd->hqk", qi, k) * spec.softmax_scale + score_bias(spec, q_pos, k_pos, h_r)
        s = s.masked_fill(~visible(spec, q_pos, k_pos)[None], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [H_r, n]
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)  # fully masked rows: exp(nan) -> 0
        out[rows.start : rows.stop] = torch.einsum("hqk,khd->qhd", p, v)
        lse[rows.start : rows.stop] = row_lse.transpose(0, 1)
    return out.to(q.dtype), lse


# ---- FP8 projections -------------------------------------------------------------------------
def fp8_quantize(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (``e4m3(x / scale)``, ``scale`` fp32 [1]); ``static_scale`` None: the dynamic
    scale of ``x``'s amax (``quant.scale_from_amax``)."""
    scale = scale_from_amax(x.abs().amax()).reshape(1) if static_scale is None else static_scale
    return quantize_e4m3(x, scale), scale


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    per_channel: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq · x_scale) · (weight · weight_scale)ᵀ`` with fp32 accumulation: ``xq [M, K]``,
    ``weight [N, K]`` e4m3, ``weight_scale`` [1] or (``per_channel``) [N]; the exact emulation of an
    FP8 GEMM."""
    del per_channel  # the broadcast below serves both
    w = weight.float() * weight_scale[:, None]
    return ((xq.float() * x_scale) @ w.t()).to(out_dtype)


class ReferenceBackend:
    """The reference backend: the operations above, whatever the layer (see ``base.py``)."""

    name = "reference"
    prepare = staticmethod(prepare)
    attend = staticmethod(attend)
    fp8_quantize = staticmethod(fp8_quantize)
    fp8_matmul = staticmethod(fp8_matmul)

    def check(self, desc: AttentionDesc) -> None:
        """Serves every layer a config can describe."""

    def check_fp8_weight(self, out_features: int, in_features: int) -> None:
        """The emulated FP8 GEMM takes any shape."""

    def variants(self, desc: AttentionDesc) -> list[tuple[str, dict]]:
        return []  # nothing to compile

    def precompile(self, descs, local_comm=None) -> None:
        """Nothing to compile."""


BACKEND = ReferenceBackend()
