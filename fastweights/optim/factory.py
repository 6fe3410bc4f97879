"""``build_optimizer(name, params, **kw)``: the optimisers a training config can name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fastweights.optim.lookahead import SLRLA, Lookahead

OPTIMIZERS = ("adamw", "sgd", "lookahead_adamw", "slrla_adamw", "lookahead_sgd", "slrla_sgd")


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
    k: int = 5,
    alpha: float = 0.5,
    beta: float = 0.2,
) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS`.

    ``adamw`` / ``sgd`` use ``lr, weight_decay`` plus ``betas, eps`` (AdamW) or ``momentum,
    nesterov`` (SGD). ``lookahead_*`` wraps them in :class:`Lookahead` (``k, alpha``);
    ``slrla_*`` in :class:`SLRLA` (``k, alpha, beta``). ``params`` may be param groups.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    wrapper, _, base = name.rpartition("_")
    if base == "adamw":
        inner = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        inner = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if wrapper == "lookahead":
        return Lookahead(inner, k=k, alpha=alpha)
    if wrapper == "slrla":
        return SLRLA(inner, k=k, alpha=alpha, beta=beta)
    return inner
