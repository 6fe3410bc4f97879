"""Errors that the CLI shows as one line, without a traceback."""


class FastWeightsError(Exception):
    """A user-facing error: bad input, a missing path, an unsupported model."""
