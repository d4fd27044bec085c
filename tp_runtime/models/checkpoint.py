"""A local HuggingFace checkpoint folder: ``config.json`` and safetensors (one file, or shards with
``model.safetensors.index.json``), read slice by slice.

Every read goes through ``read(name, rows=..., cols=...)``: ``safe_open(...).get_slice`` reads only
the requested rows or columns from the file, so a rank never holds a whole sharded weight. A
missing tensor or one of an unexpected shape raises ``CheckpointError`` naming the tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor, or holds one of another shape than the config implies."""


class Checkpoint:
    """``Checkpoint(folder)``: the config dict (``.config``) and slice reads of its tensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{config}: no config.json in the checkpoint folder {self.folder}")
        self.config = json.loads(config.read_text())
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(self.folder / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX} nor {SINGLE} (only safetensors checkpoints load)")
        self.files = weight_map  # tensor name -> file name
        self._open: dict[str, safe_open] = {}
        self.base_prefix = ""  # set by the family that reads it (e.g. "model.")

    def _candidates(self, name: str) -> list[str]:
        """The name, and without the family's base-model prefix (``ForCausalLM`` models save
        ``model.layers.0...``, base models ``layers.0...``)."""
        p = self.base_prefix
        return [name, name[len(p) :]] if p and name.startswith(p) else [name]

    def where(self, name: str) -> str:
        """The stored name of tensor ``name``."""
        names = self._candidates(name)
        for name in names:
            if name in self.files:
                return name
        raise CheckpointError(
            f"tensor {names[0]!r} is missing from the checkpoint {self.folder} "
            f"(looked for {list(names)} in {sorted(set(self.files.values()))})"
        )

    def _slice(self, name: str):
        file = self.files[name]
        if file not in self._open:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"tensor {name!r}: its file {path} (from {INDEX}) does not exist")
            self._open[file] = safe_open(path, framework="pt")
        return self._open[file].get_slice(name)

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        *,
        rows: range | None = None,
        cols: range | None = None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Rows ``rows`` (dim 0) or columns ``cols`` (dim 1) of the tensor, checked against the full
        ``shape`` the config implies, cast to ``dtype``. Only the slice is read from the file."""
        name = self.where(name)
        sl = self._slice(name)
        got = tuple(sl.get_shape())
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.folder / self.files[name]}: expected shape {tuple(shape)}, got {got}"
            )
        if rows is not None:
            t = sl[rows.start : rows.stop]
        elif cols is not None:
            t = sl[:, cols.start : cols.stop]
        else:
            t = sl[:]
        return t.to(dtype)

    def fingerprint(self) -> str:
        """A digest of the checkpoint's identity (config, tensor names, their files' sizes): the same on
        every rank that reads the same checkpoint, cheap (no tensor data read)."""
        missing = [f for f in sorted(set(self.files.values())) if not (self.folder / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {self.folder}: files {missing} (from {INDEX}) do not exist")
        sizes = {f: (self.folder / f).stat().st_size for f in sorted(set(self.files.values()))}
        text = json.dumps([self.config, sorted(self.files.items()), sizes], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()
