"""``load_model(folder, comm=..., device=..., dtype=...)``: the family from ``config.json``'s
``architectures``, the model built and each rank's shards read from the checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..distributed.comm import Communicator
from ..distributed.consistency import check_same, fingerprint_tensors, fingerprint_text
from . import bert, bloom, falcon, gpt2, gpt_neox, llama
from .bert import BertEncoder
from .checkpoint import Checkpoint, CheckpointError
from .decoder import DecoderModel
from .tokenizer import load_tokenizer

_DECODERS = (llama, gpt2, gpt_neox, bloom, falcon)
FAMILIES = {arch: family for family in (*_DECODERS, bert) for arch in family.ARCHITECTURES}
SUPPORTED = tuple(sorted(FAMILIES))


def family_of(config: dict):
    """The family module for a ``config.json`` dict; ``ValueError`` listing the supported architectures."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ValueError(
        f"config.json: architectures {archs} (model_type {config.get('model_type')!r}) are not supported; "
        f"supported: {', '.join(SUPPORTED)}"
    )


@torch.no_grad()
def load_model(
    folder: str | Path, *, comm: Communicator, device, dtype: torch.dtype = torch.float32
) -> DecoderModel | BertEncoder:
    """Build the model of a local HF checkpoint folder and load this rank's shards (collective over
    ``comm``: every rank of the group calls it with the same folder). ``dtype``: the weights' and
    activations' dtype (float32, float16 or bfloat16), whatever the checkpoint stores.

    Every rank checks that the group agrees on the checkpoint (config, tensor names, file sizes) before
    reading, and on the replicated tensors (norms) after: a mismatch raises on every rank. The model's
    ``tokenizer`` is the folder's ``tokenizer.json`` (``tokenizers``), or None."""
    device = torch.device(device)
    error = None
    try:  # what can fail on one rank alone (a file missing on one node) is told to all before they go on
        ckpt = Checkpoint(folder)
        family = family_of(ckpt.config)
        cfg = replace(family.config(ckpt.config), dtype=dtype)
        identity = {"tensors": fingerprint_text(ckpt.fingerprint()), "config": fingerprint_text(repr(cfg))}
    except (CheckpointError, ValueError, OSError) as exc:
        error = exc
    failed = [rank for rank, row in enumerate(comm.host_allgather([int(error is not None)], "load_model")) if row[0]]
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"checkpoint {folder}: reading it failed on ranks {failed} of the group")
    check_same(comm, f"checkpoint {folder}", identity, device)
    model: DecoderModel | BertEncoder
    if family is bert:
        ckpt.base_prefix = bert.BASE_PREFIX
        model = BertEncoder(cfg, comm=comm, device=device)
        replicated = model.load(ckpt)
    else:
        names = family.names(ckpt.config) if hasattr(family, "names") else family.NAMES
        ckpt.base_prefix = names.base_prefix
        model = DecoderModel(cfg, comm=comm, device=device)
        replicated = model.load(ckpt, names)
    model.tokenizer = load_tokenizer(folder)
    agreed = {"replicated": fingerprint_tensors(*replicated), "tokenizer": int(model.tokenizer is not None)}
    check_same(comm, f"replicated weights and tokenizer read from {folder}", agreed, device)
    model.eval()
    return model
