"""Reading a linear layer's weight directly (fused and fast-weight products do), refusing
wrappers whose forward adds to it."""

from __future__ import annotations

import torch
from torch import nn

from fastweights.errors import FastWeightsError


def weight_of(module: nn.Module, where: str) -> torch.Tensor:
    """``module.weight``; a wrapper that adds to its forward (a peft LoRA layer holds the linear
    as ``base_layer``) raises, naming ``where``: reading ``.weight`` would drop the adapter silently."""
    if hasattr(module, "base_layer"):
        raise FastWeightsError(
            f"{where} is wrapped by {type(module).__name__} (an adapter such as peft's LoRA): fastweights reads "
            "its weight directly, so the adapter would be ignored; leave this module out of the adapter's "
            "target_modules")
    return module.weight
