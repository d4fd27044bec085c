"""``Attention`` (GPT-style, with KV cache, self or cross) and ``BertAttention`` (encoder, no cache).

Per rank: QKV ColumnLinear (no communication) -> backend.prepare (bias, RoPE, cache write)
-> backend.attend -> dense RowLinear (local GEMM, all-reduce, bias once). Weights arrive full
and are sliced here through ``sharding``; ALiBi slopes are computed for all heads and sliced
by the same head range as the weights.
"""

from __future__ import annotations

import operator
from dataclasses import fields

import torch

from ..backends import get_backend
from ..backends.base import AttentionDesc, AttentionSpec, ScoreBias
from ..batch.kv_cache import CacheCapacityError, CacheLayout, KVCache, LayerKV, PagedKVCache
from ..batch.step import Step, padding_to_packed
from ..config import (
    AttentionConfig,
    AttentionMaskType,
    Fp8ActivationScaling,
    KVCacheDType,
    PositionEmbeddingType,
    QuantMode,
)
from ..devices import as_device
from ..distributed.comm import Communicator
from ..distributed.consistency import check_same, check_step_agreement, fingerprint_tensors
from ..fingerprint import fingerprint_text
from ..position import RopeSpec, alibi_slopes
from ..sharding import head_layout, qkv_rows, slice_heads
from .fp8 import FP8ColumnLinear, FP8RowLinear, check_scale
from .linear import ColumnLinear, RowLinear, check_shape
from .placement import refuse_move


def _check_tensor(name: str, t: torch.Tensor, *, dtype: torch.dtype, device: torch.device, last: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if t.dim() not in (2, 3) or t.shape[-1] != last:
        raise ValueError(f"{name}: expected shape [tokens, {last}] or [batch, seq_len, {last}], got {tuple(t.shape)}")


class _AttentionBase(torch.nn.Module):
    """Shared construction: sharded projections, per-rank position-embedding state."""

    def __init__(self, config: AttentionConfig, *, comm: Communicator, backend: str | None, device, keeps_cache: bool):
        super().__init__()
        self.config, self.comm = config, comm
        self.device = as_device(device)
        self.head_layout = head_layout(config.num_heads, config.num_kv_heads, comm.size, comm.rank)
        self.backend = get_backend(backend, self.device, config.dtype)
        d, dt = config.head_size, config.dtype
        kw = dict(comm=comm, dtype=dt, device=self.device)
        column, row = ColumnLinear, RowLinear
        fp8 = config.quant_mode is QuantMode.fp8_qdq
        if fp8:
            column, row = FP8ColumnLinear, FP8RowLinear
            kw.update(
                weight_scaling=config.fp8_weight_scaling,
                activation_scaling=config.fp8_activation_scaling,
                backend=self.backend,
            )
        self.qkv = column(
            config.hidden_size, config.qkv_size, bias=config.qkv_bias, rows=qkv_rows(self.head_layout, d), **kw
        )
        self.dense = row(config.num_heads * d, config.hidden_size, bias=config.dense_bias, **kw)
        self.rope = RopeSpec.from_config(config)
        pe = config.position_embedding
        slopes = None
        if pe.is_alibi:
            slopes = slice_heads(alibi_slopes(config.num_heads), self.head_layout)
            if pe is PositionEmbeddingType.alibi_with_scale:
                slopes = slopes * config.softmax_scale  # (QKᵀ + bias)·scale == QKᵀ·scale + bias·scale
        self.register_buffer("alibi_slopes", None if slopes is None else slopes.to(self.device), persistent=False)
        self.relative_table = None
        if pe is PositionEmbeddingType.relative and config.relative_table:
            table = torch.zeros(self.head_layout.num_heads_per_rank, config.relative_num_buckets, device=self.device)
            self.relative_table = torch.nn.Parameter(table, requires_grad=False)
        self.desc = self._describe(keeps_cache=keeps_cache, fp8=fp8)
        self.backend.check(self.desc)

    def _apply(self, fn, recurse=True):
        refuse_move(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        c, h = self.config, self.head_layout
        return (
            f"tp_rank={self.comm.rank}/{self.comm.size}, heads={h.num_heads_per_rank} of {c.num_heads}, "
            f"kv_heads={h.num_kv_heads_per_rank} of {c.num_kv_heads}, head_size={c.head_size}, "
            f"position_embedding={c.position_embedding.value}, dtype={c.dtype}, device={self.device}, "
            f"backend={self.backend.name}"
        )

    def _describe(self, *, keeps_cache: bool, fp8: bool) -> AttentionDesc:
        """What this layer asks of its backend (fixed here, at construction)."""
        c, pe = self.config, self.config.position_embedding
        if pe.is_alibi:
            bias = ScoreBias.alibi
        elif pe is PositionEmbeddingType.relative:
            bias = ScoreBias.relative_table if c.relative_table else ScoreBias.relative_explicit
        else:
            bias = ScoreBias.none
        return AttentionDesc(
            head_layout=self.head_layout,
            head_size=c.head_size,
            dtype=c.dtype,
            mask=c.mask_type,
            rope=self.rope,
            bias=bias,
            cache_dtype=c.kv_cache_dtype,
            cross=c.cross_attention,
            keeps_cache=keeps_cache,
            fp8_projections=fp8,
        )

    def _check_config_across_ranks(self) -> None:
        """Every rank built its layer from the same config (else ``ValueError`` naming the field)."""
        config = {f.name: fingerprint_text(repr(getattr(self.config, f.name))) for f in fields(self.config)}
        check_same(self.comm, f"config of {type(self).__name__}", config, self.device)

    @torch.no_grad()
    def load_weights(
        self,
        *,
        qkv_weight: torch.Tensor,
        dense_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None = None,
        dense_bias: torch.Tensor | None = None,
        relative_table: torch.Tensor | None = None,
        qkv_input_scale: float | None = None,
        dense_input_scale: float | None = None,
    ) -> None:
        """Load this rank's shard from full weights: fused ``[Q | K | V]`` ``[(H + 2KV)·D, hidden]``,
        dense ``[hidden, H·D]``, and (relative attention) the table ``[H, num_buckets]``.
        FP8 projections with static activation scaling also take the calibrated input scales."""
        self._check_config_across_ranks()
        given = dict(
            qkv_weight=qkv_weight,
            dense_weight=dense_weight,
            qkv_bias=qkv_bias,
            dense_bias=dense_bias,
            relative_table=relative_table,
        )
        weights = {name: fingerprint_tensors(t) for name, t in given.items()}
        check_same(self.comm, f"weights given to {type(self).__name__}.load_weights", weights, self.device)
        # Check everything before changing anything: a bad argument leaves the layer as it was.
        self.qkv.check_weights(qkv_weight, qkv_bias, names=("qkv_weight", "qkv_bias"))
        self.dense.check_weights(dense_weight, dense_bias, names=("dense_weight", "dense_bias"))
        static = (
            self.config.quant_mode is QuantMode.fp8_qdq
            and self.config.fp8_activation_scaling is Fp8ActivationScaling.static
        )
        scales = {"qkv_input_scale": qkv_input_scale, "dense_input_scale": dense_input_scale}
        for name, scale in scales.items():
            if static and scale is None:
                raise ValueError(f"{name}: FP8 with static activation scaling needs a calibrated scale, got None")
            if not static and scale is not None:
                raise ValueError(f"{name}: only for quant_mode=fp8_qdq with fp8_activation_scaling=static")
            if static:
                check_scale(name, scale)
        if (relative_table is None) != (self.relative_table is None):
            raise ValueError(
                "relative_table: expected "
                + (
                    f"a [{self.config.num_heads}, {self.config.relative_num_buckets}] table"
                    if self.relative_table is not None
                    else "None"
                )
                + f" for position_embedding={self.config.position_embedding.value}, got "
                + ("None" if relative_table is None else f"shape {tuple(relative_table.shape)}")
            )
        if relative_table is not None:
            check_shape("relative_table", relative_table, (self.config.num_heads, self.config.relative_num_buckets))
        self.qkv.load_weights(qkv_weight, qkv_bias)
        self.dense.load_weights(dense_weight, dense_bias)
        if static:
            self.qkv.set_input_scale(qkv_input_scale)
            self.dense.set_input_scale(dense_input_scale)
        if relative_table is not None:
            self.relative_table.copy_(slice_heads(relative_table, self.head_layout))

    @torch.no_grad()
    def load_shard(
        self,
        *,
        qkv_weight: torch.Tensor,
        dense_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None = None,
        dense_bias: torch.Tensor | None = None,
    ) -> None:
        """Load this rank's shard as already sliced by a checkpoint reader: ``qkv_weight``
        ``[(H_r + 2·KV_r)·D, hidden]`` as ``[Q_r | K_r | V_r]`` (rows ``sharding.qkv_rows`` of the fused
        weight), ``dense_weight [hidden, H_r·D]``, the biases likewise (``dense_bias`` whole). The
        weights differ per rank, so their cross-rank check is the loader's (it checks the checkpoint);
        the config is checked here. No relative tables or FP8 scales (``load_weights`` for those)."""
        self._check_config_across_ranks()
        if self.relative_table is not None:
            raise ValueError("load_shard: relative attention tables load through load_weights (full table)")
        self.qkv.check_shard(qkv_weight, qkv_bias)
        self.dense.check_shard(dense_weight, dense_bias)
        self.qkv.load_shard(qkv_weight, qkv_bias)
        self.dense.load_shard(dense_weight, dense_bias)

    def _agree(self, step: Step, kv_cache=None) -> None:
        """Once per step and group, before anything is written: every rank holds the same step (and the
        same cache state for its slots: blocks, positions held), else ``StepMismatch`` on every rank. A
        host exchange of one word: the device is not synchronized, and every later layer skips it."""
        key = ("agreement", id(self.comm))
        if self.comm.size == 1 or key in step.checked:
            return
        fields = step.fingerprint()
        if kv_cache is not None:
            fields["cache_slots"] = kv_cache.slot_fingerprint(step.slots)
        check_step_agreement(self.comm, fields)
        step.checked.add(key)

    def _spec(self, step: Step, *, cross: bool, position_bias: torch.Tensor | None) -> AttentionSpec:
        c = self.config
        if position_bias is not None:
            if c.position_embedding is not PositionEmbeddingType.relative or c.relative_table:
                raise ValueError(
                    "position_bias: only for position_embedding=relative with relative_table=False, "
                    f"got position_embedding={c.position_embedding.value}, relative_table={c.relative_table}"
                )
            h_r = self.head_layout.num_heads_per_rank
            need_q = max(step.total_lens)
            need_k = max(step.encoder_lens) if cross else need_q
            if (
                position_bias.dim() != 3
                or position_bias.shape[0] != h_r
                or position_bias.shape[1] < need_q
                or position_bias.shape[2] < need_k
            ):
                raise ValueError(
                    f"position_bias: expected shape [{h_r} (heads on this rank), >= {need_q} (query positions), "
                    f">= {need_k} (key positions)], "
                    f"got {tuple(position_bias.shape)}"
                )
        return AttentionSpec(
            mask=c.mask_type,
            softmax_scale=c.softmax_scale,
            alibi_slopes=self.alibi_slopes,
            relative_table=self.relative_table,
            relative_bias=position_bias,
            num_buckets=c.relative_num_buckets,
            max_distance=c.relative_max_distance,
            cross=cross,
        )

    def _pack(self, hidden: torch.Tensor, step: Step, attention_mask: torch.Tensor | None):
        """``[T, hidden]`` or ``[B, S, hidden]`` -> packed ``[T, hidden]`` and the flat indices to unpack."""
        _check_tensor(
            "hidden_states", hidden, dtype=self.config.dtype, device=self.device, last=self.config.hidden_size
        )
        if step.device != self.device:
            raise ValueError(f"step.device: expected {self.device}, got {step.device}")
        if hidden.dim() == 2:
            if attention_mask is not None:
                raise ValueError("attention_mask: only for padded [batch, seq_len, hidden] input, got packed input")
            if hidden.shape[0] != step.num_tokens:
                raise ValueError(
                    f"hidden_states: expected {step.num_tokens} packed tokens (sum of step.new_lens), "
                    f"got {hidden.shape[0]}"
                )
            return hidden, None
        b, s, _ = hidden.shape
        if b != step.num_seqs:
            raise ValueError(f"hidden_states: expected batch {step.num_seqs} (sequences in the step), got {b}")
        if attention_mask is None:
            if max(step.new_lens) > s:
                raise ValueError(
                    f"hidden_states: seq_len {s} is shorter than the longest step.new_lens {max(step.new_lens)}"
                )
            attention_mask = (
                torch.arange(s, device=hidden.device)[None, :]
                < torch.tensor(step.new_lens, device=hidden.device)[:, None]
            )
        elif tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask: expected shape {(b, s)}, got {tuple(attention_mask.shape)}")
        idx, lens = padding_to_packed(attention_mask.to(hidden.device))
        if lens != step.new_lens:
            raise ValueError(
                f"attention_mask: real tokens per row {list(lens)} differ from step.new_lens {list(step.new_lens)}"
            )
        return hidden.reshape(b * s, -1).index_select(0, idx), idx

    def _finish(self, ctx: torch.Tensor, shape: torch.Size, idx: torch.Tensor | None) -> torch.Tensor:
        out = self.dense(ctx.reshape(ctx.shape[0], -1))  # [T, hidden], all-reduced
        # After the all-reduce every rank holds the same values, so this raises on all ranks or none.
        if self.config.check_finite and not torch.isfinite(out).all():
            raise FloatingPointError(f"{type(self).__name__}: output holds NaN or Inf (config.check_finite)")
        if idx is None:
            return out
        padded = torch.zeros(shape[0] * shape[1], out.shape[-1], dtype=out.dtype, device=out.device)
        padded.index_copy_(0, idx, out)
        return padded.reshape(shape[0], shape[1], -1)


class Attention(_AttentionBase):
    """GPT-style attention with a KV cache; ``config.cross_attention`` makes it a cross-attention layer.

    ``forward(hidden, step, kv_cache, ...)``: ``hidden`` packed ``[T, hidden]`` or padded
    ``[B, S, hidden]`` (with ``attention_mask [B, S]``, 1 = real token, padding on either side;
    without a mask, right padding to ``step.new_lens``). ``kv_cache`` holds this layer's
    ``layer_idx``: the self-attention cache, or for cross attention the cross cache, written
    from ``encoder_output [T_enc, hidden]`` (packed by ``step.encoder_lens``) when it is given
    (the first decoder step) and reused afterwards.
    """

    def __init__(
        self,
        config: AttentionConfig,
        *,
        comm: Communicator,
        layer_idx: int = 0,
        backend: str | None = None,
        device=None,
    ):
        if config.mask_type is AttentionMaskType.padding and not config.cross_attention:
            raise ValueError(
                "AttentionConfig.mask_type='padding': use BertAttention for encoder (padding-mask) attention"
            )
        super().__init__(config, comm=comm, backend=backend, device=device, keeps_cache=True)
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        step: Step,
        kv_cache: KVCache | PagedKVCache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        encoder_output: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        decode_splits: int | None = None,
    ) -> torch.Tensor:
        x, idx = self._pack(hidden_states, step, attention_mask)
        # The QKV GEMM is launched before the rest of the checks: it writes only its own output,
        # and the GPU runs it while the host validates the step and the cache (an eager decode step
        # of a wide model otherwise starts with the GPU idle for the whole of that Python).
        qkv = self.qkv(x, with_bias=False)
        self._agree(step, kv_cache)
        spec = self._spec(step, cross=self.config.cross_attention, position_bias=position_bias)
        kv = self._layer_kv(kv_cache, step, encoder_output)
        common = dict(head_layout=self.head_layout, head_size=self.config.head_size)
        if self.config.cross_attention:
            if encoder_output is not None:
                enc_step = step.encoder_step()
                self.backend.prepare(
                    self.qkv(encoder_output, with_bias=False), self.qkv.bias, enc_step, rope=None, kv=kv, **common
                )
            q = self.backend.prepare(qkv, self.qkv.bias, step, rope=None, kv=None, **common)
        else:
            q = self.backend.prepare(qkv, self.qkv.bias, step, rope=self.rope, kv=kv, **common)
        ctx, _ = self.backend.attend(q, kv, step, spec, decode_splits=decode_splits)
        return self._finish(ctx, hidden_states.shape, idx)

    def _layer_kv(self, kv_cache, step: Step, encoder_output):
        c = self.config
        if kv_cache is None:
            raise ValueError(f"kv_cache: Attention (layer {self.layer_idx}) needs a KVCache or PagedKVCache, got None")
        if kv_cache.device != self.device:
            raise ValueError(f"kv_cache: expected a cache on the layer's device {self.device}, got {kv_cache.device}")
        if (
            kv_cache.config.kv_cache_dtype != c.kv_cache_dtype
            or kv_cache.storage_dtype != c.kv_cache_dtype.storage_dtype(c.dtype)
        ):
            raise ValueError(
                f"kv_cache: built for kv_cache_dtype={kv_cache.cache_dtype.value}, storage {kv_cache.storage_dtype}; "
                f"the layer needs {c.kv_cache_dtype.value}"
            )
        if kv_cache.head_layout != self.head_layout or kv_cache.config.head_size != c.head_size:
            raise ValueError(
                f"kv_cache: built for {kv_cache.head_layout}, head_size {kv_cache.config.head_size}; "
                f"the layer has {self.head_layout}, head_size {c.head_size}"
            )
        if not 0 <= self.layer_idx < kv_cache.num_layers:
            raise ValueError(f"layer_idx: {self.layer_idx} is outside the cache's {kv_cache.num_layers} layers")
        if c.cross_attention:
            enc = step.require_encoder_lens("cross attention")
            if encoder_output is not None:
                _check_tensor("encoder_output", encoder_output, dtype=c.dtype, device=self.device, last=c.hidden_size)
                if encoder_output.dim() != 2 or encoder_output.shape[0] != sum(enc):
                    raise ValueError(
                        f"encoder_output: expected [{sum(enc)} (sum of step.encoder_lens), {c.hidden_size}], "
                        f"got {tuple(encoder_output.shape)}"
                    )
                try:  # the encoder's tokens are written from position 0
                    kv_cache.check_step_once(step, enc, past=(0,) * len(enc))
                except CacheCapacityError as e:
                    raise CacheCapacityError(
                        f"{e}; a cross-attention cache holds the encoder's positions: "
                        "cache.reserve(step.encoder_step()) makes room for them"
                    ) from None
            else:
                kv_cache.check_read_once(step, enc, "cross attention (encoder_output given on an earlier step)")
        else:
            if encoder_output is not None:
                raise ValueError("encoder_output: only for cross-attention layers (config.cross_attention=True)")
            kv_cache.check_step_once(step)
        return kv_cache.layer(self.layer_idx)


class BertAttention(_AttentionBase):
    """Encoder self-attention: packed ``[T, hidden]`` or padded ``[B, S, hidden]`` input with
    ``input_lengths``, padding mask (or bidirectional), optional relative attention, no cache.

    The step's K/V go through a contiguous buffer ``[B, 2, KV_r, S, D]`` that the layer keeps and
    grows when a larger batch comes (never zero-filled: the kernels read only the positions the
    step wrote)."""

    def __init__(self, config: AttentionConfig, *, comm: Communicator, backend: str | None = None, device=None):
        if config.mask_type is AttentionMaskType.causal:
            raise ValueError(
                "AttentionConfig.mask_type='causal': BertAttention is bidirectional, use padding or bidirectional"
            )
        if config.position_embedding.is_rope or config.cross_attention or config.kv_cache_dtype.is_quantized:
            raise ValueError("BertAttention: no RoPE, cross attention or quantized KV cache (it keeps no cache)")
        super().__init__(config, comm=comm, backend=backend, device=device, keeps_cache=False)
        self._kv_buffer: torch.Tensor | None = None

    def _step_kv(self, num_seqs: int, max_len: int) -> LayerKV:
        """A contiguous ``[B, 2, KV_r, S, D]`` view for this step's K/V, in the kept buffer."""
        kv_r, d = self.head_layout.num_kv_heads_per_rank, self.config.head_size
        buf = self._kv_buffer
        if buf is None or buf.numel() < num_seqs * 2 * kv_r * max_len * d:
            buf = self._kv_buffer = torch.empty(
                num_seqs * 2 * kv_r * max_len * d, dtype=self.config.dtype, device=self.device
            )
        data = buf[: num_seqs * 2 * kv_r * max_len * d].view(num_seqs, 2, kv_r, max_len, d)
        return LayerKV(CacheLayout.contiguous, data, KVCacheDType.auto, 1.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_lengths=None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` packed ``[T, hidden]`` with ``input_lengths``, or padded ``[B, S, hidden]``
        with ``attention_mask [B, S]`` (1 = real token, padding on either side) or right-padded to
        ``input_lengths``. A sequence of length 0 (a row of padding) gets zeros."""
        c = self.config
        _check_tensor("hidden_states", hidden_states, dtype=c.dtype, device=self.device, last=c.hidden_size)
        lengths = None
        if input_lengths is not None:
            lengths = tuple(input_lengths.tolist() if isinstance(input_lengths, torch.Tensor) else input_lengths)
        x, idx, lengths = self._pack_encoder(hidden_states, lengths, attention_mask)
        # every rank must pack the same sequences (an encoder step has no cache to check)
        check_step_agreement(self.comm, {"input_lengths": fingerprint_text(repr(lengths))})
        real = tuple(n for n in lengths if n > 0)
        if not real:  # nothing but padding: every output row is zero
            return torch.zeros_like(hidden_states)
        step = Step(new_lens=real, device=self.device)
        kv = self._step_kv(step.num_seqs, max(step.new_lens))
        q = self.backend.prepare(
            self.qkv(x, with_bias=False),
            self.qkv.bias,
            step,
            head_layout=self.head_layout,
            head_size=c.head_size,
            rope=None,
            kv=kv,
        )
        ctx, _ = self.backend.attend(q, kv, step, self._spec(step, cross=False, position_bias=position_bias))
        return self._finish(ctx, hidden_states.shape, idx)

    def _pack_encoder(self, hidden: torch.Tensor, lengths, attention_mask):
        """-> packed ``[T, hidden]``, the flat indices to unpack (None when packed) and the lengths."""
        if lengths is not None:
            try:
                lengths = tuple(operator.index(n) for n in lengths)  # numpy ints too; 2.5 is refused
            except TypeError:
                raise ValueError(f"input_lengths: expected ints >= 0, got {list(lengths)}") from None
            if min(lengths, default=0) < 0:
                raise ValueError(f"input_lengths: expected ints >= 0, got {list(lengths)}")
        if hidden.dim() == 2:
            if attention_mask is not None:
                raise ValueError("attention_mask: only for padded [batch, seq_len, hidden] input, got packed input")
            if lengths is None:
                raise ValueError("input_lengths: required with packed [tokens, hidden] input, got None")
            if sum(lengths) != hidden.shape[0]:
                raise ValueError(
                    f"hidden_states: expected {sum(lengths)} packed tokens (sum of input_lengths), "
                    f"got {hidden.shape[0]}"
                )
            return hidden, None, lengths
        b, s, _ = hidden.shape
        if attention_mask is None:
            if lengths is None:
                raise ValueError("attention_mask or input_lengths: padded input needs one of them, got neither")
            if len(lengths) != b or max(lengths) > s:
                raise ValueError(f"input_lengths: expected {b} lengths <= seq_len {s}, got {list(lengths)}")
            attention_mask = (
                torch.arange(s, device=hidden.device)[None, :] < torch.tensor(lengths, device=hidden.device)[:, None]
            )
        elif tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask: expected shape {(b, s)}, got {tuple(attention_mask.shape)}")
        idx, mask_lengths = padding_to_packed(attention_mask.to(hidden.device))
        if lengths is not None and tuple(lengths) != mask_lengths:
            raise ValueError(
                f"input_lengths: {list(lengths)} differ from the attention_mask's real tokens per row "
                f"{list(mask_lengths)}"
            )
        return hidden.reshape(b * s, -1).index_select(0, idx), idx, mask_lengths


def precompile(layers, local_comm=None) -> None:
    """Compile ahead of the first step every kernel variant the layers can launch (the CUDA backend's;
    nothing for the reference backend). Under mpirun pass ``World.local_comm``: one rank per node
    compiles, the others then load the binaries from the disk cache. Collective over it."""
    by_backend: dict = {}
    for layer in layers:
        by_backend.setdefault(id(layer.backend), (layer.backend, []))[1].append(layer.desc)
    for backend, descs in by_backend.values():
        backend.precompile(descs, local_comm)
