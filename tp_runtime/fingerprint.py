"""One word for a piece of state, to compare across ranks without sending the state itself."""

from __future__ import annotations

import hashlib


def fingerprint_text(text: str) -> int:
    """A 63-bit digest of ``text`` (fits an int64 on every rank)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
