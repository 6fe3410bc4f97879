"""What the entry points set process-wide, given back to their caller."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def caller_globals() -> Iterator[None]:
    """Restore, on exit, the Python, NumPy and torch random states (the CUDA ones too when CUDA was
    initialised before) and torch's CPU thread count: ``train``, ``evaluate`` and ``generate`` seed
    and set them for their own work, and a calling program (a random search over rates) must not
    find its own generators re-seeded."""
    py, npy, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if torch.get_num_threads() != threads:  # only when changed: setting even the same count reconfigures
            torch.set_num_threads(threads)      # the thread pool (a default pool and a set one sum differently)
