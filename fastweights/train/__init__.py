"""Training loop, checkpoints and callbacks."""
