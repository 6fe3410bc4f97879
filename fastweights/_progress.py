"""Progress bars (tqdm) that suit a log file as well as a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# the fewest seconds between two updates of a bar whose stderr is not a terminal (a log file)
LOG_INTERVAL = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``; when stderr is not a terminal (a job's log file) outside a
    Jupyter kernel, at most one update per :data:`LOG_INTERVAL` seconds, where a terminal's redraws
    would fill the file."""
    isatty = getattr(sys.stderr, "isatty", None)
    notebook = "ipykernel" in sys.modules  # a Jupyter kernel: tqdm.auto draws a widget, not to stderr
    if not (isatty and isatty()) and not notebook:
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
