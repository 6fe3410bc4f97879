"""Optimiser and scheduler state without pickle: tensors in safetensors, the rest as JSON.

``flatten_state(obj)`` turns a nested ``state_dict`` (dicts with int or str keys, lists,
tuples, ``Counter``, tensors, numbers, strings, ``None``) into ``(tensors, meta)``: a flat
``{name: Tensor}`` and a JSON string in which each tensor is replaced by its name.
``unflatten_state`` inverts it exactly (floats round-trip through JSON's ``repr``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_META_KEY = "fastweights_state"


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Split ``obj`` into ``({name: tensor}, json_string)``; tensors are cloned to CPU."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(x, Counter):
            return {"__counter__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise ValueError(f"cannot store a {type(x).__name__} in an optimiser state without pickle: {x!r}")

    meta = json.dumps(enc(obj))
    return tensors, meta


def unflatten_state(tensors: dict[str, torch.Tensor] | None, meta: str) -> Any:
    """Inverse of :func:`flatten_state`; with ``tensors=None``, every tensor comes back as None
    (the state's structure alone)."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            ((tag, value),) = x.items()
            if tag == "__tensor__":
                if tensors is None:
                    return None
                if value not in tensors:
                    raise ValueError(f"state refers to tensor {value!r}, which the file does not hold")
                return tensors[value]
            if tag == "__dict__":
                return {dec(k): dec(v) for k, v in value}
            if tag == "__counter__":
                return Counter({dec(k): dec(v) for k, v in value})
            if tag == "__tuple__":
                return tuple(dec(v) for v in value)
            raise ValueError(f"unknown tag {tag!r} in stored state")
        return x

    return dec(json.loads(meta))


def save_state(path: str | Path, obj: Any) -> None:
    """Write a nested state (e.g. ``{"optimizer": opt.state_dict(), "scheduler": ...}``) to safetensors."""
    tensors, meta = flatten_state(obj)
    save_file(tensors, str(path), metadata={_META_KEY: meta})


def load_state(path: str | Path, device: str | torch.device = "cpu", tensors: bool = True) -> Any:
    """Read a state written by :func:`save_state` (no pickle involved); ``tensors=False`` reads
    its structure alone, every tensor None (nothing but the file's header is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_META_KEY)
    if meta is None:
        raise ValueError(f"{path} holds no fastweights state (metadata key {_META_KEY!r} missing)")
    return unflatten_state(load_file(str(path), device=str(device)) if tensors else None, meta)
