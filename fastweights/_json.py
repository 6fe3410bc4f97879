"""Strict JSON for results: non-finite numbers (NaN, ±inf) become null, which every JSON reader
accepts (bare ``NaN`` and ``Infinity`` are not JSON), and are named so that callers can warn."""

from __future__ import annotations

import json
import math

__all__ = ["finite_or_null", "strict_dumps"]


def finite_or_null(obj, path: str = "") -> tuple[object, list[str]]:
    """``(copy, named)``: ``obj`` (dicts, lists, tuples, scalars) with each non-finite float
    replaced by None, and ``"key.sub[i] = nan"`` for each one replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{path or 'value'} = {obj}"]
    named: list[str] = []
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], n = finite_or_null(v, f"{path}.{k}" if path else str(k))
            named += n
        return out, named
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            x, n = finite_or_null(v, f"{path}[{i}]")
            out.append(x)
            named += n
        return out, named
    return obj, named


def strict_dumps(obj, **kw) -> tuple[str, list[str]]:
    """``(text, named)``: ``obj`` as strict JSON (``allow_nan=False``), its non-finite numbers
    written as null and named as by :func:`finite_or_null`."""
    clean, named = finite_or_null(obj)
    return json.dumps(clean, allow_nan=False, **kw), named
