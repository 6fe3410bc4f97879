"""Errors that the CLI shows as one line, without a traceback, warnings, and shared argument checks."""

import math
import warnings
from numbers import Integral, Real


class FastWeightsError(Exception):
    """A user-facing error: bad input, a missing path, an unsupported model."""


class FastWeightsWarning(UserWarning):
    """A user-facing warning (a setting that does nothing, an ignored flag): a program quiets them with
    ``warnings.filterwarnings("ignore", category=FastWeightsWarning)``; the CLI prints ``warning: ...``."""


def warn(message: str) -> None:
    """Issue ``message`` as a :class:`FastWeightsWarning`, attributed to the caller's caller."""
    warnings.warn(message, FastWeightsWarning, stacklevel=3)


def named_by_flag(err: Exception, flags: dict[str, str]) -> FastWeightsError:
    """The CLI's error for a ValueError that names a parameter (``"alpha must be ..."``), with
    the parameter replaced by its command-line flag (``flags``: parameter -> flag)."""
    msg = str(err)
    name = msg.split(" ", 1)[0]
    return FastWeightsError(flags[name] + msg[len(name):] if name in flags else msg)


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = (f" (type {type(value).__name__}, not a Python int: pass int({name}))"
                if isinstance(value, Integral) and not isinstance(value, bool | int) else "")
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}{hint}")


def is_real(value) -> bool:
    """A real number that is not a bool (JSON's and YAML's true/false are not numbers here)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value, low: float = 0.0, strict: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite real number ``>= low``
    (``> low`` with ``strict``; a bool is not a number here)."""
    ok = is_real(value) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def as_rate(name: str, value) -> float:
    """``value`` as a float rate >= 0: a real number or a 1-element real tensor (a bool or a
    string is not one); raises ValueError naming ``name`` otherwise."""
    import torch  # here: the CLI imports this module before it needs torch

    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype not in (torch.bool,) \
            and not value.dtype.is_complex:
        value = value.item()
    check_number(name, value)
    return float(value)


def check_at_least(name: str, value, low: int) -> None:
    """Raise the CLI's one-line :class:`FastWeightsError` naming ``name`` unless ``value >= low``."""
    if value < low:
        raise FastWeightsError(f"{name} must be >= {low}, got {value}")


def check_file_path(flag: str, path) -> None:
    """Raise the CLI's :class:`FastWeightsError` naming ``--flag`` unless ``path`` can become a
    file: not an existing directory, and no file where a parent directory should be."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise FastWeightsError(f"--{flag} {path} is a directory: give a file path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise FastWeightsError(f"--{flag} {path}: {parent} is a file, not a directory")


def check_float_tensors(**tensors) -> None:
    """Raise ValueError naming the tensors unless every given tensor (None and non-tensors are
    skipped) is floating point and all of them lie on one device."""
    import torch  # here: the CLI imports this module before it needs torch

    given = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    bad = [f"{name} {t.dtype}" for name, t in given.items() if not t.is_floating_point()]
    if bad:
        raise ValueError(f"inputs must be floating point, got {', '.join(bad)}")
    if len({t.device for t in given.values()}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"inputs must lie on one device, got {where}")
