"""Active and temporary forgetting (Chen et al. 2023; Anand et al. 2025; SPEC §7).

Every ``every`` optimiser steps, re-initialise the token-embedding rows and reset the
optimiser state of those rows only; temporary forgetting does so only while
``step <= until``. The callback is a plain object: call ``on_step_end(step)`` after each
optimiser step (``step`` counts completed steps, starting at 1).

**Tied output embeddings.** When the output projection shares its weight with the input
embedding (``output.weight is embedding.weight``, as in BERT's MLM head), the shared matrix
is one parameter: resetting it resets the output projection too. That is unavoidable, and
we make it explicit: with a tied output, the output projection's per-token bias (if any)
is reset to zero with its optimiser state, so that no per-token knowledge survives a reset
on the output side either. An untied output layer is left alone, as in Chen et al., who
reset only the input embeddings; pass ``output=None`` or an untied layer for that.

Optimiser state: for each reset parameter, every state tensor of the parameter's shape
(Adam moments, SGD momentum) has the reset rows zeroed; when all rows are reset, the
parameter's state is cleared (step counts too), so the optimiser re-initialises it lazily.
A :class:`~fastweights.optim.Lookahead` wrapper's slow weights for those rows are set to the
new values, so the next synchronisation does not pull the old rows back.
"""

from __future__ import annotations

import torch
from torch import nn

from fastweights.errors import check_number, check_positive_int, is_int
from fastweights.optim.lookahead import Lookahead


class EmbeddingForgetting:
    """Re-initialise token embeddings every ``every`` steps (active forgetting), optionally only
    while ``step <= until`` (temporary forgetting).

    Args:
        embedding: the input embedding, weight ``[V, d]``.
        optimizer: the optimiser training it (plain or :class:`Lookahead`); its param_groups must
            hold the embedding weight (and a tied output's bias).
        every: steps between resets, ``>= 1``.
        until: last step at which a reset may happen (``None``: active forgetting, forever).
        output: the output projection (weight ``[V, d]``, bias ``[V]``); only used when tied.
        rows: token ids to reset (``None``: all ``V`` rows).
        init_std: std of the normal re-initialisation (e.g. ``config.initializer_range``).
        padding_idx_zero: keep ``embedding.padding_idx``'s row at zero, as ``nn.Embedding`` does.
        seed: seed of the re-initialisation generator (``None``: torch's global RNG).
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        optimizer: torch.optim.Optimizer,
        every: int,
        until: int | None = None,
        output: nn.Module | None = None,
        rows: torch.Tensor | None = None,
        init_std: float = 0.02,
        padding_idx_zero: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_positive_int("every", every)
        if until is not None and (not is_int(until) or until < 0):
            raise ValueError(f"until must be None or an integer >= 0, got {until!r}")
        check_number("init_std", init_std, strict=True)
        weight = embedding.weight
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long).flatten().unique()
            if rows.numel() and (rows.min() < 0 or rows.max() >= weight.shape[0]):
                raise ValueError(f"rows must be token ids in [0, {weight.shape[0]}), got {rows.min()}..{rows.max()}")
        self.tied = output is not None and getattr(output, "weight", None) is weight
        self.output_bias = output.bias if self.tied and getattr(output, "bias", None) is not None else None
        trained = {id(q) for group in optimizer.param_groups for q in group["params"]}
        for name, param in (("embedding weight", weight), ("tied output bias", self.output_bias)):
            if param is not None and id(param) not in trained:
                raise ValueError(f"the {name} (shape {tuple(param.shape)}) is not trained by the optimizer "
                                 f"({type(optimizer).__name__}): pass the optimizer whose param_groups hold it")
        self.embedding = embedding
        self.optimizer = optimizer
        self.every = every
        self.until = until
        self.rows = rows
        self.init_std = float(init_std)
        self.padding_idx = embedding.padding_idx if padding_idx_zero else None
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.resets = 0

    @classmethod
    def from_model(cls, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, **kwargs):
        """Build from a Hugging Face model: its input and output embeddings, ``initializer_range``."""
        config = getattr(model, "config", None)
        kwargs.setdefault("init_std", getattr(config, "initializer_range", 0.02))
        return cls(model.get_input_embeddings(), optimizer, every, output=model.get_output_embeddings(), **kwargs)

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh values ``N(0, init_std²)`` of ``like``'s shape, dtype and device."""
        out = torch.empty(like.shape, dtype=torch.float32).normal_(0.0, self.init_std, generator=self.generator)
        return out.to(like)

    def active(self, step: int) -> bool:
        """Whether a reset happens after completed step ``step``."""
        return step % self.every == 0 and (self.until is None or step <= self.until)

    def on_step_end(self, step: int) -> bool:
        """Call after optimiser step ``step`` (1-based); returns whether it reset the embeddings."""
        if not self.active(step):
            return False
        self.reset()
        return True

    @torch.no_grad()
    def reset(self) -> None:
        """Re-initialise the rows now and reset their optimiser state."""
        weight = self.embedding.weight
        rows = self.rows
        if rows is None:
            weight.copy_(self._draw(weight))
        else:
            weight[rows] = self._draw(weight[rows])
        if self.padding_idx is not None and (rows is None or bool((rows == self.padding_idx).any())):
            weight[self.padding_idx].zero_()
        self._reset_state(weight, rows)
        if self.output_bias is not None:
            if rows is None:
                self.output_bias.zero_()
            else:
                self.output_bias[rows] = 0.0
            self._reset_state(self.output_bias, rows)
        self.resets += 1

    def _reset_state(self, param: torch.Tensor, rows: torch.Tensor | None) -> None:
        opt = self.optimizer
        if isinstance(opt, Lookahead):
            slow = opt.slow_param(param)
            if rows is None:
                slow.copy_(param)
            else:
                slow[rows] = param[rows]
            opt = opt.optimizer
        state = opt.state.get(param)
        if not state:
            return
        if rows is None:
            state.clear()
            return
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[rows] = 0.0


FORGETTING = ("none", "active", "temporary")


def build_forgetting(
    kind: str, model: nn.Module, optimizer: torch.optim.Optimizer, every: int = 1000, until: int | None = None, **kwargs
) -> EmbeddingForgetting | None:
    """The callback a training config names: ``none`` (returns ``None``), ``active`` (reset every
    ``every`` steps) or ``temporary`` (also needs ``until``). ``model`` is a Hugging Face model."""
    if kind not in FORGETTING:
        raise ValueError(f"unknown forgetting {kind!r}; choose one of {', '.join(FORGETTING)}")
    if kind == "none":
        return None
    if kind == "temporary" and until is None:
        raise ValueError("temporary forgetting needs until (the last step with resets)")
    if kind == "active" and until is not None:
        raise ValueError(f"active forgetting resets forever; got until={until} (use kind='temporary')")
    if kind == "temporary" and until < every:
        raise ValueError(f"temporary forgetting with until={until} < every={every} never resets (the first reset "
                         f"is at step {every})")
    return EmbeddingForgetting.from_model(model, optimizer, every, until=until, **kwargs)
