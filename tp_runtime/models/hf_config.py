"""Reading HF ``config.json`` dicts: the one place that knows how field names differ between
families and ``transformers`` versions (``rope_parameters`` in 5.x, ``rope_theta``/``rope_scaling``/
``rotary_pct`` before)."""

from __future__ import annotations

from ..config import RotaryScalingType

_MISSING = object()


def field(d: dict, *names: str, default=_MISSING):
    """The first of ``names`` present in ``d`` (and not None), else ``default``; raises naming them all."""
    for n in names:
        if d.get(n) is not None:
            return d[n]
    if default is _MISSING:
        raise ValueError(f"config.json: missing {' / '.join(names)} (model_type {d.get('model_type')!r})")
    return default


def rope(d: dict, *, default_pct: float = 1.0) -> dict:
    """Keyword arguments of ``ModelConfig`` for a rotary embedding: base, rotary fraction, scaling."""
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    supported = {
        "default": RotaryScalingType.none,
        "linear": RotaryScalingType.linear,
        "dynamic": RotaryScalingType.dynamic,
    }
    if kind not in supported:
        raise ValueError(f"config.json: rope type {kind!r} is not supported (supported: {sorted(supported)})")
    factor = float(params.get("factor") or legacy.get("factor") or 1.0)
    return dict(
        rotary_base=float(
            field(params, "rope_theta", default=None) or field(d, "rope_theta", "rotary_emb_base", default=10000.0)
        ),
        rotary_pct=float(
            field(params, "partial_rotary_factor", default=None)
            or field(d, "partial_rotary_factor", "rotary_pct", default=default_pct)
        ),
        rotary_scaling=supported[kind],
        rotary_scaling_factor=factor if kind != "default" else 1.0,
    )


def eos_ids(d: dict) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
