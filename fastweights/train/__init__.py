"""Training loop, checkpoints and callbacks."""

from fastweights.train.trainer import TrainConfig, causal_lm_loss, train

__all__ = ["TrainConfig", "causal_lm_loss", "train"]
