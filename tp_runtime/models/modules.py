"""The pieces around attention: norms, vocabulary-parallel embeddings and LM head, the TP MLP.

Choices: token (and position / token-type) embeddings are vocabulary-parallel: rank ``r`` keeps the
rows ``sharding.ceil_range(V, tp, r)`` and returns a partial lookup (zeros for ids outside its rows);
the caller sums the partials of all tables with one all-reduce. The LM head is vocabulary-parallel
too: each rank multiplies its rows, then one all-gather gives every rank the whole logits. So no
rank ever holds a whole embedding or head. Norm scales and shifts are small and replicated.
"""

from __future__ import annotations

import torch

from ..distributed.comm import Communicator
from ..layers.linear import ColumnLinear, RowLinear
from ..sharding import ceil_range, gate_up_rows
from .spec import Activation, Norm


class TPNorm(torch.nn.Module):
    """LayerNorm (scale and shift) or RMSNorm (scale), replicated; RMSNorm computes in fp32, LayerNorm
    in the input dtype (as HF does)."""

    def __init__(self, kind: Norm, size: int, eps: float, *, dtype, device):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        bias = torch.zeros(size, dtype=dtype, device=device) if kind is Norm.layernorm else None
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if self.kind is Norm.layernorm:
            return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class VocabEmbedding(torch.nn.Module):
    """This rank's rows ``[V_r, hidden]`` of an embedding table; ``forward`` gives the partial lookup."""

    def __init__(self, num: int, hidden: int, *, comm: Communicator, dtype, device):
        super().__init__()
        self.num = num
        self.rows = ceil_range(num, comm.size, comm.rank)
        self.weight = torch.nn.Parameter(
            torch.empty(len(self.rows), hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden], zeros for other ranks' ids
        n = len(self.rows)
        if n == 0:
            return self.weight.new_zeros(ids.shape[0], self.weight.shape[1])
        local = ids - self.rows.start
        mine = (local >= 0) & (local < n)
        out = torch.nn.functional.embedding(local.clamp(0, n - 1), self.weight)
        return out * mine[:, None].to(out.dtype)


class LMHead(torch.nn.Module):
    """Vocabulary-parallel head: local logits ``[B, V_r]``, all-gathered to ``[B, V]`` fp32 on every rank."""

    def __init__(self, vocab: int, hidden: int, *, comm: Communicator, dtype, device):
        super().__init__()
        self.vocab, self.comm = vocab, comm
        self.rows = ceil_range(vocab, comm.size, comm.rank)
        self.chunk = -(-vocab // comm.size)
        self.weight = torch.nn.Parameter(
            torch.empty(len(self.rows), hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, V] fp32
        local = torch.nn.functional.linear(x, self.weight).float()
        if self.comm.size == 1:
            return local
        padded = local.new_zeros(x.shape[0], self.chunk)
        padded[:, : local.shape[1]] = local
        gathered = self.comm.all_gather(padded.contiguous())  # [tp, B, chunk] or [tp·B, chunk]
        return (
            gathered.reshape(self.comm.size, x.shape[0], self.chunk)
            .permute(1, 0, 2)
            .reshape(x.shape[0], -1)[:, : self.vocab]
        )


def activate(kind: Activation, x: torch.Tensor) -> torch.Tensor:
    if kind is Activation.gelu:
        return torch.nn.functional.gelu(x)
    if kind is Activation.gelu_tanh:
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind is Activation.silu:
        return torch.nn.functional.silu(x)
    return torch.nn.functional.relu(x)


class TPMLP(torch.nn.Module):
    """Column (up, or fused ``[gate | up]``) -> activation (SwiGLU when gated) -> Row (down, one all-reduce)."""

    def __init__(
        self, hidden: int, intermediate: int, *, activation: Activation, gated: bool, bias: bool, comm, dtype, device
    ):
        super().__init__()
        self.activation, self.gated = activation, gated
        kw = dict(comm=comm, bias=bias, dtype=dtype, device=device)
        rows = gate_up_rows(intermediate, comm.size, comm.rank) if gated else None
        self.up = ColumnLinear(hidden, (2 if gated else 1) * intermediate, rows=rows, **kw)
        self.down = RowLinear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        h = self.up(x)  # [T, I_r] or [T, 2·I_r] as [gate_r | up_r]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = activate(self.activation, gate) * up
        else:
            h = activate(self.activation, h)
        return self.down(h)
