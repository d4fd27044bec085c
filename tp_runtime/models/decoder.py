"""The decoder skeleton every causal family shares: embeddings -> blocks (attention + MLP) -> final
norm -> LM head, and its loading from a checkpoint through the family's ``DecoderNames``.

Per rank, one forward over a ``Step`` (packed prompts and decode tokens mixed):
``ids [T]`` -> partial embeddings, one all-reduce -> ``[T, hidden]`` -> per block the attention's and
the MLP's all-reduce -> last token of each sequence ``[B, hidden]`` -> head -> ``[B, V]`` logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from ..batch.kv_cache import KVCache, PagedKVCache
from ..batch.step import Step
from ..config import AttentionConfig, AttentionMaskType
from ..distributed.comm import Communicator
from ..layers.attention import Attention
from ..sharding import even_range
from .checkpoint import Checkpoint
from .mapping import QkvLayout, Source, read_column, read_gate_up, read_qkv, read_replicated, read_row
from .modules import TPMLP, LMHead, TPNorm, VocabEmbedding
from .spec import Block, ModelConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass(frozen=True)
class DecoderNames:
    """A family's checkpoint names. Layer names are relative to ``layer.format(i=...)``; norms and
    projections are prefixes (``.weight``/``.bias`` appended)."""

    base_prefix: str  # e.g. "model.": stripped when the checkpoint is of the base model
    embed: str
    final_norm: str
    lm_head: str  # read only when the embeddings are not tied
    layer: str  # e.g. "model.layers.{i}."
    ln1: str
    ln2: str | None  # None: one norm feeds attention and MLP (Block.parallel_shared_norm)
    qkv_layout: QkvLayout
    qkv: tuple[str, ...]
    dense: str
    up: str
    down: str
    gate: str | None = None  # gated MLPs
    positions: str | None = None  # learned position table
    embed_norm: str | None = None
    conv1d: bool = False  # GPT-2: projections stored [in, out]


def attention_config(cfg: ModelConfig, layer: int) -> AttentionConfig:
    return AttentionConfig(
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_size=cfg.head_size,
        max_position_embeddings=cfg.max_position_embeddings,
        position_embedding=cfg.position_embedding,
        rotary_pct=cfg.rotary_pct,
        rotary_base=cfg.rotary_base,
        rotary_scaling=cfg.rotary_scaling,
        rotary_scaling_factor=cfg.rotary_scaling_factor,
        mask_type=AttentionMaskType.causal,
        qkv_bias=cfg.qkv_bias,
        dense_bias=cfg.dense_bias,
        q_scaling=float(layer + 1) if cfg.inverse_layer_scaling else 1.0,
        dtype=cfg.dtype,
    )


class DecoderBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, comm: Communicator, device):
        super().__init__()
        self.block = cfg.block
        kw = dict(dtype=cfg.dtype, device=device)
        self.ln1 = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **kw)
        shared = cfg.block is Block.parallel_shared_norm
        self.ln2 = None if shared else TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **kw)
        self.attn = Attention(attention_config(cfg, layer), comm=comm, layer_idx=layer, device=device)
        self.mlp = TPMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            activation=cfg.activation,
            gated=cfg.gated_mlp,
            bias=cfg.mlp_bias,
            comm=comm,
            **kw,
        )

    def forward(self, h: torch.Tensor, step: Step, cache, decode_splits: int | None) -> torch.Tensor:
        a = self.attn(self.ln1(h), step, cache, decode_splits=decode_splits)
        ln2 = self.ln1 if self.ln2 is None else self.ln2  # None only for parallel_shared_norm
        if self.block is Block.sequential:
            h = h + a
            return h + self.mlp(ln2(h))
        return h + a + self.mlp(ln2(h))


class DecoderModel(torch.nn.Module):
    """A causal language model, tensor-parallel over ``comm``. ``forward(ids, step, cache)`` -> ``[B, V]``
    fp32 logits of each sequence's last token, the same on every rank."""

    tokenizer: Tokenizer | None  # set by load_model: the checkpoint's tokenizer.json, or None

    def __init__(self, cfg: ModelConfig, *, comm: Communicator, device):
        super().__init__()
        self.config, self.comm, self.device = cfg, comm, torch.device(device)
        kw = dict(comm=comm, dtype=cfg.dtype, device=device)
        self.embed = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.positions = (
            VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size, **kw) if cfg.learned_positions else None
        )
        norm = dict(dtype=cfg.dtype, device=device)
        self.embed_norm = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **norm) if cfg.embedding_norm else None
        self.blocks = torch.nn.ModuleList(DecoderBlock(cfg, i, comm=comm, device=device) for i in range(cfg.num_layers))
        self.final_norm = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **norm)
        self.head = LMHead(cfg.vocab_size, cfg.hidden_size, **kw)

    def _blocks(self) -> Iterable[DecoderBlock]:
        return cast("Iterable[DecoderBlock]", self.blocks)  # a ModuleList types its items as Module

    @property
    def attention_config(self) -> AttentionConfig:
        return cast(DecoderBlock, self.blocks[0]).attn.config

    @property
    def head_layout(self):
        return cast(DecoderBlock, self.blocks[0]).attn.head_layout

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``ids [T]``, ``positions [T]`` -> ``[T, hidden]`` (one all-reduce of the summed partial lookups)."""
        x = self.embed(ids)
        if self.positions is not None:
            x = x + self.positions(positions.long())
        x = self.comm.all_reduce(x.contiguous()) if self.comm.size > 1 else x
        return x if self.embed_norm is None else self.embed_norm(x)

    def layers(self, x: torch.Tensor, step: Step, cache, decode_splits: int | None = None) -> torch.Tensor:
        """The blocks and the final norm: ``[T, hidden]`` -> ``[T, hidden]``."""
        for blk in self.blocks:
            x = blk(x, step, cache, decode_splits)
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor, step: Step, cache: KVCache | PagedKVCache) -> torch.Tensor:
        if ids.dim() != 1 or ids.shape[0] != step.num_tokens:
            raise ValueError(f"ids: expected [{step.num_tokens}] packed token ids, got shape {tuple(ids.shape)}")
        x = self.layers(self.embed_tokens(ids, step.positions), step, cache)
        return self.head(x[step.cu_seqlens[1:].long() - 1])  # each sequence's last token

    @torch.no_grad()
    def load(self, ckpt: Checkpoint, names: DecoderNames) -> list[torch.Tensor]:
        """Read this rank's shards from ``ckpt``; returns the replicated tensors (for the cross-rank check)."""
        cfg, tp, rank, dt = self.config, self.comm.size, self.comm.rank, self.config.dtype
        H, D, hid, inter = cfg.num_heads, cfg.head_size, cfg.hidden_size, cfg.intermediate_size
        replicated: list[torch.Tensor] = []

        def norm(mod: TPNorm, prefix: str) -> None:
            mod.weight.copy_(read_replicated(ckpt, prefix + ".weight", (hid,), dt))
            if mod.bias is not None:
                mod.bias.copy_(read_replicated(ckpt, prefix + ".bias", (hid,), dt))
            replicated.extend(p for p in (mod.weight, mod.bias) if p is not None)

        def table(mod: VocabEmbedding | LMHead, name: str, rows: int) -> None:
            mod.weight.copy_(ckpt.read(name, (rows, hid), rows=mod.rows, dtype=dt))

        table(self.embed, names.embed, cfg.vocab_size)
        if self.positions is not None:
            assert names.positions is not None, "a family with learned positions names their table"
            table(self.positions, names.positions, cfg.max_position_embeddings)
        if self.embed_norm is not None:
            assert names.embed_norm is not None, "a family with an embedding norm names it"
            norm(self.embed_norm, names.embed_norm)
        norm(self.final_norm, names.final_norm)
        table(self.head, names.embed if cfg.tied_embeddings else names.lm_head, cfg.vocab_size)
        for i, blk in enumerate(self._blocks()):
            p = names.layer.format(i=i)
            src = lambda n, p=p: Source(p + n, conv1d=names.conv1d)  # noqa: E731
            norm(blk.ln1, p + names.ln1)
            if blk.ln2 is not None:
                assert names.ln2 is not None, "a family with a second norm per layer names it"
                norm(blk.ln2, p + names.ln2)
            qkv_w, qkv_b = read_qkv(
                ckpt,
                names.qkv_layout,
                tuple(src(n) for n in names.qkv),
                blk.attn.head_layout,
                D,
                hid,
                bias=cfg.qkv_bias,
                dtype=dt,
            )
            dense_w, dense_b = read_row(ckpt, src(names.dense), (hid, H * D), tp, rank, bias=cfg.dense_bias, dtype=dt)
            blk.attn.load_shard(qkv_weight=qkv_w, qkv_bias=qkv_b, dense_weight=dense_w, dense_bias=dense_b)
            if cfg.gated_mlp:
                up = read_gate_up(
                    ckpt, src(names.gate), src(names.up), inter, hid, tp, rank, bias=cfg.mlp_bias, dtype=dt
                )
            else:
                rows = even_range(inter, tp, rank, "intermediate_size")
                up = read_column(ckpt, src(names.up), (inter, hid), rows, bias=cfg.mlp_bias, dtype=dt)
            blk.mlp.up.load_shard(*up)
            blk.mlp.down.load_shard(
                *read_row(ckpt, src(names.down), (hid, inter), tp, rank, bias=cfg.mlp_bias, dtype=dt)
            )
        return replicated
