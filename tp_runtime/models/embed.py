"""``embed(model, sentences)``: sentence embeddings from a ``BertEncoder`` (sentence-transformers style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bert import BertEncoder


def embed(model: BertEncoder, sentences: Sequence) -> torch.Tensor:
    """``[B, hidden]`` fp32 unit vectors, the same on every rank: each sentence (a string, tokenized with
    the checkpoint's ``tokenizer.json`` and its truncation, or a token id list) mean-pooled over its tokens."""
    if not isinstance(model, BertEncoder):
        raise ValueError(f"model: embed needs a BERT encoder, got {type(model).__name__}")
    if not isinstance(sentences, (list, tuple)) or not sentences:
        raise ValueError(f"sentences: expected a non-empty list, got {type(sentences).__name__}")
    ids = []
    for i, s in enumerate(sentences):
        if isinstance(s, str):
            if model.tokenizer is None:
                raise ValueError(f"sentences[{i}]: a string needs the checkpoint's tokenizer.json")
            ids.append(model.tokenizer.encode(s).ids)
        else:
            ids.append([int(t) for t in s])
    return model.embed(ids)
