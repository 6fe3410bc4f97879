"""Errors that the CLI shows as one line, without a traceback, and shared argument checks."""


class FastWeightsError(Exception):
    """A user-facing error: bad input, a missing path, an unsupported model."""


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
