"""Text <-> token ids through the ``tokenizers`` package, when the checkpoint has a ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's ``tokenizers.Tokenizer`` (its truncation and special tokens as saved), or None
    when there is no ``tokenizer.json`` (callers then pass token ids)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()  # sequences are packed, never padded
    return tok


def token_ids(tokenizer: Tokenizer | None, vocab_size: int, texts: Sequence, what: str) -> list[list[int]]:
    """Strings (tokenized with ``tokenizer``) or token id lists -> token id lists, each non-empty and
    inside ``[0, vocab_size)``: an id outside would embed silently as zeros on every rank."""
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"{what}: expected a non-empty list of strings or token id lists, got {type(texts).__name__}")
    out = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError(f"{what}[{i}]: a string needs the checkpoint's tokenizer.json; pass token ids instead")
            ids = tokenizer.encode(text).ids
        else:
            ids = [int(t) for t in text]
        if not ids:
            raise ValueError(f"{what}[{i}]: expected at least one token, got none")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{what}[{i}]: token ids {bad[:5]} outside [0, vocab_size={vocab_size})")
        out.append(ids)
    return out
