"""BERT (encoder): word + position + token-type embeddings and a LayerNorm, post-norm layers
(``BertAttention`` with a padding mask, gelu MLP), and ``embed`` for sentence embeddings: mean
pooling over each sentence's tokens, then L2 normalization, as sentence-transformers does for
all-MiniLM-L6-v2.

Per rank: ``ids [T]`` packed by sentence -> partial lookups of the three vocabulary-parallel tables,
one all-reduce -> ``[T, hidden]`` -> per layer two all-reduces -> ``[T, hidden]`` on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch

from ..config import AttentionConfig, AttentionMaskType
from ..distributed.comm import Communicator
from ..layers.attention import BertAttention
from ..sharding import even_range
from .checkpoint import Checkpoint
from .hf_config import field
from .mapping import QkvLayout, Source, read_column, read_qkv, read_replicated, read_row
from .modules import TPMLP, TPNorm, VocabEmbedding
from .spec import Activation, ModelConfig, Norm

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
BASE_PREFIX = "bert."
_ACTIVATIONS = {"gelu": Activation.gelu, "gelu_new": Activation.gelu_tanh, "relu": Activation.relu}


def config(d: dict) -> ModelConfig:
    hidden, heads, act = d["hidden_size"], d["num_attention_heads"], field(d, "hidden_act", default="gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} not supported (supported: {sorted(_ACTIVATIONS)})")
    if field(d, "position_embedding_type", default="absolute") != "absolute":
        raise ValueError(f"config.json: position_embedding_type {d['position_embedding_type']!r} (only absolute)")
    return ModelConfig(
        family="bert",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_size=hidden // heads,
        intermediate_size=d["intermediate_size"],
        norm=Norm.layernorm,
        norm_eps=field(d, "layer_norm_eps", default=1e-12),
        activation=_ACTIVATIONS[act],
        max_position_embeddings=d["max_position_embeddings"],
        learned_positions=True,
        type_vocab_size=field(d, "type_vocab_size", default=2),
        embedding_norm=True,
        qkv_bias=True,
        dense_bias=True,
        mlp_bias=True,
    )


class BertLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, *, comm: Communicator, device):
        super().__init__()
        kw = dict(dtype=cfg.dtype, device=device)
        att = AttentionConfig(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            mask_type=AttentionMaskType.padding,
            max_position_embeddings=cfg.max_position_embeddings,
            dtype=cfg.dtype,
        )
        self.attn = BertAttention(att, comm=comm, device=device)
        self.ln_attn = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **kw)
        self.mlp = TPMLP(
            cfg.hidden_size, cfg.intermediate_size, activation=cfg.activation, gated=False, bias=True, comm=comm, **kw
        )
        self.ln_mlp = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, **kw)

    def forward(self, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        h = self.ln_attn(h + self.attn(h, lengths))
        return self.ln_mlp(h + self.mlp(h))


class BertEncoder(torch.nn.Module):
    """``forward(ids [T], lengths)`` -> ``[T, hidden]`` last hidden states; ``embed(ids_per_sentence)`` ->
    ``[B, hidden]`` unit-norm sentence embeddings. Both the same on every rank."""

    tokenizer: Tokenizer | None  # set by load_model: the checkpoint's tokenizer.json, or None

    def __init__(self, cfg: ModelConfig, *, comm: Communicator, device):
        super().__init__()
        self.config, self.comm, self.device = cfg, comm, torch.device(device)
        kw = dict(comm=comm, dtype=cfg.dtype, device=device)
        self.words = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.positions = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.types = VocabEmbedding(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.embed_norm = TPNorm(cfg.norm, cfg.hidden_size, cfg.norm_eps, dtype=cfg.dtype, device=device)
        self.layers = torch.nn.ModuleList(BertLayer(cfg, comm=comm, device=device) for _ in range(cfg.num_layers))

    def forward(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if ids.dim() != 1 or ids.shape[0] != sum(lengths):
            raise ValueError(f"ids: expected [{sum(lengths)}] packed token ids, got shape {tuple(ids.shape)}")
        if max(lengths) > self.config.max_position_embeddings:
            raise ValueError(
                f"lengths: the longest sentence has {max(lengths)} tokens, the model holds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        positions = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
        x = self.words(ids) + self.positions(positions) + self.types(torch.zeros_like(ids))
        x = self.comm.all_reduce(x.contiguous()) if self.comm.size > 1 else x
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, lengths)
        return x

    @torch.no_grad()
    def embed(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Sentence embeddings ``[B, hidden]`` fp32: mean of each sentence's last hidden states, L2-normalized."""
        if not token_ids or any(len(t) == 0 for t in token_ids):
            raise ValueError("token_ids: expected a non-empty list of non-empty token id lists")
        lengths = [len(t) for t in token_ids]
        ids = torch.tensor([i for t in token_ids for i in t], dtype=torch.long, device=self.device)
        h = self.forward(ids, lengths).float()
        seq = torch.repeat_interleave(
            torch.arange(len(lengths), device=self.device), torch.tensor(lengths, device=self.device)
        )
        sums = torch.zeros(len(lengths), h.shape[1], device=self.device).index_add_(0, seq, h)
        mean = sums / torch.tensor(lengths, device=self.device, dtype=torch.float32)[:, None]
        return torch.nn.functional.normalize(mean, p=2, dim=1)

    @torch.no_grad()
    def load(self, ckpt: Checkpoint) -> list[torch.Tensor]:
        """Read this rank's shards; returns the replicated tensors (for the cross-rank check)."""
        cfg, tp, rank, dt = self.config, self.comm.size, self.comm.rank, self.config.dtype
        hid, inter = cfg.hidden_size, cfg.intermediate_size
        replicated: list[torch.Tensor] = []

        def norm(mod: TPNorm, prefix: str) -> None:
            assert mod.bias is not None  # BERT's norms are LayerNorms (scale and shift)
            mod.weight.copy_(read_replicated(ckpt, prefix + ".weight", (hid,), dt))
            mod.bias.copy_(read_replicated(ckpt, prefix + ".bias", (hid,), dt))
            replicated.extend((mod.weight, mod.bias))

        for mod, name, rows in (
            (self.words, "word_embeddings", cfg.vocab_size),
            (self.positions, "position_embeddings", cfg.max_position_embeddings),
            (self.types, "token_type_embeddings", cfg.type_vocab_size),
        ):
            mod.weight.copy_(ckpt.read(f"bert.embeddings.{name}.weight", (rows, hid), rows=mod.rows, dtype=dt))
        norm(self.embed_norm, "bert.embeddings.LayerNorm")
        # a ModuleList types its items as Module
        for i, layer in enumerate(cast("Iterable[BertLayer]", self.layers)):
            p = f"bert.encoder.layer.{i}."
            qkv = tuple(Source(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            qkv_w, qkv_b = read_qkv(
                ckpt, QkvLayout.separate, qkv, layer.attn.head_layout, cfg.head_size, hid, bias=True, dtype=dt
            )
            dense_w, dense_b = read_row(
                ckpt, Source(p + "attention.output.dense"), (hid, hid), tp, rank, bias=True, dtype=dt
            )
            layer.attn.load_shard(qkv_weight=qkv_w, qkv_bias=qkv_b, dense_weight=dense_w, dense_bias=dense_b)
            norm(layer.ln_attn, p + "attention.output.LayerNorm")
            up_rows = even_range(inter, tp, rank, "intermediate_size")
            layer.mlp.up.load_shard(
                *read_column(ckpt, Source(p + "intermediate.dense"), (inter, hid), up_rows, bias=True, dtype=dt)
            )
            layer.mlp.down.load_shard(
                *read_row(ckpt, Source(p + "output.dense"), (hid, inter), tp, rank, bias=True, dtype=dt)
            )
            norm(layer.ln_mlp, p + "output.LayerNorm")
        return replicated
