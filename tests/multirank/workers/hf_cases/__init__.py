"""The HF oracle cases of hf_worker.py, one module per model family or theme; importing this registers them all."""

from __future__ import annotations

# Importing a module registers its cases (common.CASES): this order is the order of CASES, so
# of the pytest items and of the cases in an mpirun job.
# isort: off
from . import decoders, t5, bert, gpt2, tp8, metamorphic  # noqa: F401
# isort: on
