"""``embed(model, sentences)``: sentence embeddings from a ``BertEncoder`` (sentence-transformers style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bert import BertEncoder
from .tokenizer import token_ids


def embed(model: BertEncoder, sentences: Sequence) -> torch.Tensor:
    """``[B, hidden]`` fp32 unit vectors, the same on every rank: each sentence (a string, tokenized with
    the checkpoint's ``tokenizer.json`` and its truncation, or a token id list) mean-pooled over its tokens."""
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: embed needs a BERT encoder, got {type(model).__name__}")
    return model.embed(token_ids(model.tokenizer, model.config.vocab_size, sentences, "sentences"))
