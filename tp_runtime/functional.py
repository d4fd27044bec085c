"""TensorRT-LLM's free attention helpers, in plain torch.

``generate_alibi_slopes``   this rank's ALiBi slopes ``[1, H_r, 1, 1]`` fp32.
``generate_alibi_biases``   ``slopes · arange(key_length)`` ``[1, H_r, 1, K]``, broadcast over batch and query.
``expand_mask``             ``[B, S]`` 0/1 mask -> additive ``[B, 1, tgt_len, S]`` (``-inf`` / ``0``).
``gather_last_token_logits`` the hidden state of each sequence's last token, ``[B, hidden]``.

No head arithmetic lives here: slopes come from ``position.alibi_slopes`` (all heads) and are
sliced by ``sharding.head_layout`` / ``sharding.slice_heads``, exactly like the weights.
"""

from __future__ import annotations

import math

import torch

from .position import alibi_slopes
from .sharding import head_layout, slice_heads

__all__ = ["expand_mask", "gather_last_token_logits", "generate_alibi_biases", "generate_alibi_slopes"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(name: str, value, minimum: int) -> int:
    """A Python int or a 0-d integer tensor, ``>= minimum``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(
                f"{name}: expected an int or a 0-d integer tensor, "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        value = int(value.item())
    if not _is_int(value):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def generate_alibi_slopes(num_heads: int, tp_size: int = 1, tp_rank: int = 0, alibi_scale: float = 1.0) -> torch.Tensor:
    """ALiBi slopes of rank ``tp_rank``'s query heads, ``[1, H_r, 1, 1]`` fp32.

    Computed for all ``num_heads`` heads with BLOOM's formula (correct for any head count,
    powers of two or not), multiplied by ``alibi_scale``, then sliced by the rank's head range.
    """
    if not (isinstance(alibi_scale, (int, float)) and not isinstance(alibi_scale, bool) and math.isfinite(alibi_scale)):
        raise ValueError(f"alibi_scale: expected a finite number, got {alibi_scale!r}")
    layout = head_layout(num_heads, num_heads, tp_size, tp_rank)  # validates num_heads, tp_size, tp_rank
    slopes = slice_heads(alibi_slopes(num_heads), layout)  # [H_r] fp32
    slopes = slopes * alibi_scale
    return slopes.to(torch.float32).reshape(1, layout.num_heads_per_rank, 1, 1)


def generate_alibi_biases(slopes: torch.Tensor, key_length) -> torch.Tensor:
    """``slopes · arange(key_length)``: ``[1, H_r, 1, key_length]`` fp32.

    ``slopes`` is ``[1, H_r, 1, 1]`` (``generate_alibi_slopes``) or ``[H_r]``. The bias only
    depends on the key position (softmax is shift-invariant per query row), so it broadcasts
    over batch and query length.
    """
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"slopes: expected a torch.Tensor, got {type(slopes).__name__}")
    if not slopes.dtype.is_floating_point:
        raise ValueError(f"slopes: expected a floating-point tensor, got {slopes.dtype}")
    if slopes.dim() == 1:
        slopes = slopes.reshape(1, -1, 1, 1)
    if slopes.dim() != 4 or slopes.shape[0] != 1 or slopes.shape[2] != 1 or slopes.shape[3] != 1:
        raise ValueError(f"slopes: expected shape [1, num_heads, 1, 1] or [num_heads], got {tuple(slopes.shape)}")
    n = _as_int("key_length", key_length, 0)
    positions = torch.arange(n, dtype=torch.float32, device=slopes.device).reshape(1, 1, 1, n)
    return slopes.to(torch.float32) * positions


def expand_mask(mask: torch.Tensor, tgt_len=None) -> torch.Tensor:
    """``mask [B, S]`` (0 = hidden key) -> additive fp32 mask ``[B, 1, tgt_len, S]``:
    ``-inf`` where ``mask == 0``, ``0`` elsewhere. ``tgt_len`` defaults to ``S``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask: expected shape [batch, src_len], got {tuple(mask.shape)}")
    b, s = mask.shape
    tgt = s if tgt_len is None else _as_int("tgt_len", tgt_len, 1)
    additive = torch.zeros(b, s, dtype=torch.float32, device=mask.device)
    additive = additive.masked_fill(mask == 0, float("-inf"))
    return additive[:, None, None, :].expand(b, 1, tgt, s).contiguous()


def gather_last_token_logits(
    hidden: torch.Tensor, last_token_ids: torch.Tensor, remove_input_padding: bool
) -> torch.Tensor:
    """Each sequence's last-token hidden state, ``[B, hidden]``.

    ``remove_input_padding=True``: ``hidden`` is packed ``[T, hidden]`` (or ``[1, T, hidden]``) and
    ``last_token_ids [B]`` are the inclusive prefix sums of the sequence lengths; row ``id − 1`` is
    picked. ``False``: ``hidden`` is padded ``[B, S, hidden]`` and ``last_token_ids [B]`` are the
    lengths; position ``length − 1`` of each sequence is picked.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(last_token_ids, torch.Tensor):
        raise TypeError(f"last_token_ids: expected a torch.Tensor, got {type(last_token_ids).__name__}")
    if last_token_ids.dim() != 1 or last_token_ids.numel() == 0:
        raise ValueError(
            f"last_token_ids: expected a non-empty 1-d tensor [batch], got shape {tuple(last_token_ids.shape)}"
        )
    if last_token_ids.dtype.is_floating_point or last_token_ids.dtype.is_complex or last_token_ids.dtype == torch.bool:
        raise ValueError(f"last_token_ids: expected an integer tensor, got {last_token_ids.dtype}")
    ids = last_token_ids.to(device=hidden.device, dtype=torch.long)
    if not isinstance(remove_input_padding, bool):
        raise ValueError(f"remove_input_padding: expected a bool, got {remove_input_padding!r}")
    host = ids.tolist()
    if remove_input_padding:
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2:
            raise ValueError(
                f"hidden: packed input (remove_input_padding=True) must be [tokens, hidden], got {tuple(hidden.shape)}"
            )
        t = hidden.shape[0]
        if host[0] < 1 or any(b <= a for a, b in zip(host, host[1:], strict=False)) or host[-1] > t:
            raise ValueError(
                "last_token_ids: with remove_input_padding=True they are the inclusive prefix sums of the "
                f"sequence lengths (strictly increasing, in [1, {t}] for {t} packed tokens), got {host}"
            )
        return hidden.index_select(0, ids - 1)
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden: padded input (remove_input_padding=False) must be [batch, seq_len, hidden], "
            f"got {tuple(hidden.shape)}"
        )
    b, s, _ = hidden.shape
    if len(host) != b:
        raise ValueError(f"last_token_ids: expected {b} lengths (one per sequence of hidden), got {len(host)}")
    bad = [n for n in host if not 1 <= n <= s]
    if bad:
        raise ValueError(
            f"last_token_ids: with remove_input_padding=False they are sequence lengths in [1, {s}], got {host}"
        )
    return hidden[torch.arange(b, device=hidden.device), ids - 1]
