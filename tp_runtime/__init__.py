"""tp_runtime: a tensor-parallel attention runtime for NVIDIA GPUs, launched with mpirun."""

from .comm import Communicator, NoComm
from .linear import ColumnLinear, RowLinear
from .sharding import HeadLayout, head_layout
from .world import World, init

__all__ = [
    "ColumnLinear",
    "Communicator",
    "HeadLayout",
    "NoComm",
    "RowLinear",
    "World",
    "head_layout",
    "init",
]
