"""Choosing the next token from the logits: greedy, or temperature / top-k / top-p sampling.

The same token on every rank: for sampling, the group's rank 0 chooses and broadcasts (``generate``
does that), so no shared random state is needed. Greedy steps replayed as one graph
(``greedy_graph``) broadcast nothing: every rank takes the argmax of the same all-gathered logits,
which are the same bytes on every rank (an all-gather copies, it does not reduce).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """``temperature == 0``: greedy (argmax). Otherwise logits / temperature, then the ``top_k`` most
    likely tokens (0: all), then the smallest set whose probability reaches ``top_p`` (1.0: all),
    sampled with a generator seeded by ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"Sampling.temperature: must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"Sampling.top_k: must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"Sampling.top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"Sampling.seed: must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """``sampler(logits [B, V] fp32) -> [B]`` token ids (int64, on the logits' device)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)  # on the host: the same stream anywhere

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float().cpu() / s.temperature
        if s.top_k and s.top_k < scores.shape[-1]:
            kth = scores.topk(s.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            cum = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - ordered.softmax(dim=-1) >= s.top_p  # keep tokens until the mass before them reaches top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).to(logits.device)
