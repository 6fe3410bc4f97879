"""Evaluation: perplexity, loss by position, retrieval."""

from fastweights.eval.lm import loss_by_position, perplexity, position_edges, token_losses
from fastweights.eval.passkey import passkey_eval, passkey_sample
from fastweights.eval.plot import plot_passkey, plot_position_losses

__all__ = [
    "loss_by_position",
    "passkey_eval",
    "passkey_sample",
    "perplexity",
    "plot_passkey",
    "plot_position_losses",
    "position_edges",
    "token_losses",
]
