"""Text <-> token ids through the ``tokenizers`` package, when the checkpoint has a ``tokenizer.json``."""

from __future__ import annotations

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
