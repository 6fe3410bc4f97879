"""Optimisers for slow and fast weights."""

from fastweights.optim.factory import OPTIMIZERS, build_optimizer
from fastweights.optim.lookahead import SLRLA, Lookahead, stagewise_lr
from fastweights.optim.state import flatten_state, load_state, save_state, unflatten_state

__all__ = [
    "OPTIMIZERS",
    "SLRLA",
    "Lookahead",
    "build_optimizer",
    "flatten_state",
    "load_state",
    "save_state",
    "stagewise_lr",
    "unflatten_state",
]
