"""Print a CUDA translation unit that instantiates a kernel family's variants, for nvcc.

    python launch/kernel_instances.py FAMILY > unit.cu

Compiling a kernel source alone checks only what does not depend on its template parameters;
errors in a particular variant show up only when it is instantiated. This unit is the family's
source (from ``compile.FAMILIES``) plus the address of every variant of a covering set: each
value of each parameter at least once, on top of the variant the CUDA backend picks by default
(tile shapes from ``cuda_context.tile_shape``), skipping combinations the table's own rule rejects.
``launch/check_kernels`` compiles it for sm_80 and sm_90, so CI catches such errors without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

from tp_runtime.backends import compile as kc  # noqa: E402
from tp_runtime.backends.cuda_context import tile_shape  # noqa: E402
from tp_runtime.resources import kernels_dir  # noqa: E402


def _defaults(family: str, params: dict) -> dict:
    """Per parameter, the backend's usual choice (the first allowed value where it has none)."""
    base = {name: next(iter(allowed)) for name, allowed in params.items()}
    base.update({k: v for k, v in {"head_size": 128, "heads": 4}.items() if k in params})
    if family == "context":
        base.update(tile_shape(base["head_size"]))
    return base


def covering_set(family: str) -> list[str]:
    """Name expressions of the covering set of ``family``'s variants."""
    fam = kc.FAMILIES[family]
    base = _defaults(family, fam.params)
    exprs: list[str] = []
    for name, allowed in fam.params.items():
        for value in allowed:
            p = dict(base, **{name: value})
            if family == "context" and name == "head_size":
                p.update(tile_shape(value))  # each head size with the tiles the backend picks for it
            try:
                _, _, expr = kc._resolve(family, p)
            except NotImplementedError:
                continue  # the table's rule rejects this combination: the runtime never compiles it
            if expr not in exprs:
                exprs.append(expr)
    return exprs


def unit(family: str) -> str:
    fam = kc.FAMILIES[family]
    source = (kernels_dir() / fam.source).read_text()
    refs = "\n".join(f"    (void*)&{e}," for e in covering_set(family))
    name = f"tp_instances_{family}"  # external linkage: kept, and no unused-variable warning
    return (
        f"{source}\n\n// Instantiations (launch/kernel_instances.py)\n"
        f"extern void* const {name}[];\nvoid* const {name}[] = {{\n{refs}\n}};\n"
    )


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("family", choices=sorted(kc.FAMILIES), help="the kernel family (compile.FAMILIES)")
    sys.stdout.write(unit(p.parse_args().family))
