"""Lookahead (Zhang et al. 2019) and SLRLA (Zhou et al. 2021): slow weights in the outer loop.

Equations (docs: ``../shared/SPEC.md`` §6):

- Lookahead: the inner optimiser takes k steps on the fast weights θ from the slow weights φ;
  then ``φ ← φ + α(θ − φ)`` and ``θ ← φ``.
- SLRLA: the inner loss is ``F(θ) = loss(θ) + β‖θ − φ‖²`` with φ the current slow weights.
  Its extra gradient ``2β(θ − φ)`` is added inside :meth:`SLRLA.step`, so no extra forward
  pass is needed. The stagewise learning rate comes from :func:`stagewise_lr`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import MultiStepLR

from fastweights.errors import as_rate, check_number, check_positive_int, is_real

_SLOW = "slow_param"


class Lookahead(Optimizer):
    """Wrap ``optimizer`` (any ``torch.optim.Optimizer``) with Lookahead slow weights.

    The wrapper's ``param_groups`` are the inner optimiser's (a property), so
    learning-rate schedulers built on the wrapper drive the inner optimiser. ``self.state[p]``
    holds the slow weights (``"slow_param"``, same shape and dtype as ``p``); the inner
    optimiser's moments stay in ``self.optimizer.state``. The synchronisation uses
    ``torch.lerp``, so ``k = 1, α = 1`` reproduces the inner optimiser bit for bit.

    Args:
        optimizer: the inner ("fast") optimiser.
        k: inner steps between synchronisations, ``k >= 1``.
        alpha: slow-weight step size, ``0 < alpha <= 1``.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, Lookahead):
            raise ValueError("optimizer is already a Lookahead; wrap its inner optimiser instead")
        check_positive_int("k", k)
        try:  # a number or a 1-element tensor, as before; a string or a bool is not one
            alpha_value = as_rate("alpha", alpha)
        except ValueError:
            alpha_value = math.nan
        if not 0.0 < alpha_value <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha_value
        self.fast_steps = 0  # inner steps taken since construction (a sync every k of them)
        self._wrapping = True  # Optimizer.__init__ sets up hooks; the groups stay the inner ones
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._wrapping = False
        for group in self.param_groups:
            self._init_slow(group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Everything (the inner optimiser, k, α, the step count), where torch's keeps only its
        defaults, state and groups: ``copy.deepcopy`` and pickling keep a working wrapper."""
        return dict(self.__dict__)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimiser's groups (also after its ``load_state_dict`` replaces the list)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if not self._wrapping:  # Optimizer.__init__ assigns an empty list: ignore it
            self.optimizer.param_groups = groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimiser; its slow weights start at the current values."""
        if self._wrapping:  # Optimizer.__init__ re-adds the inner optimiser's own groups: skip
            return
        self.optimizer.add_param_group(param_group)
        self._init_slow(self.optimizer.param_groups[-1])

    @torch.no_grad()
    def _init_slow(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self.state[p][_SLOW] = p.detach().clone()

    def slow_param(self, p: torch.Tensor) -> torch.Tensor:
        """The slow weights φ of parameter ``p`` (same shape; edit in place to change them)."""
        state = self.state.get(p)
        if not state or _SLOW not in state:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in this {type(self).__name__}'s "
                             "param_groups: it has no slow weights")
        return state[_SLOW]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _inner_step(self, closure):
        return self.optimizer.step(closure)

    @torch.no_grad()
    def sync(self) -> None:
        """``φ ← φ + α(θ − φ)``, then ``θ ← φ`` for every parameter."""
        for p in self._params():
            slow = self.state[p][_SLOW]
            slow.lerp_(p.detach(), self.alpha)
            p.copy_(slow)

    def step(self, closure=None):
        """One inner step; every k-th inner step is followed by :meth:`sync`."""
        loss = self._inner_step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            self.sync()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Evaluate with the slow weights: swap φ into the parameters, swap θ back on exit."""
        params = self._params()
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]
            for p in params:
                p.copy_(self.state[p][_SLOW])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, f in zip(params, fast, strict=True):
                    p.copy_(f)

    def _meta(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "fast_steps": self.fast_steps}

    def state_dict(self) -> dict[str, Any]:
        """``{"inner": inner.state_dict(), "slow": {index: φ}, "lookahead": {k, alpha, ...}}``.

        Indices follow the order of parameters in ``param_groups`` (as torch's own optimisers).
        The hooks of ``register_state_dict_pre_hook``/``_post_hook`` run as in torch's: a post
        hook may return a replacement dict.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        slow = {i: self.state[p][_SLOW].clone() for i, p in enumerate(self._params())}
        state_dict = {"inner": self.optimizer.state_dict(), "slow": slow, "lookahead": self._meta()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the hooks of ``register_load_state_dict_pre_hook`` (which
        may return a replacement dict) and ``_post_hook`` run as in torch's."""
        state_dict = state_dict.copy()  # shallow, as torch's: a pre hook may edit its keys
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("inner", "slow", "lookahead"):
            if key not in state_dict:
                raise ValueError(f"not a {type(self).__name__} state dict: missing key {key!r}")
        meta = state_dict["lookahead"]
        if set(meta) != set(self._meta()):
            raise ValueError(
                f"{type(self).__name__} state dict has settings {sorted(meta)}, "
                f"expected {sorted(self._meta())}"
            )
        params = self._params()
        slow = {int(i): t for i, t in state_dict["slow"].items()}
        if sorted(slow) != list(range(len(params))):
            raise ValueError(
                f"state dict has slow weights for {len(slow)} parameters, optimiser has {len(params)}"
            )
        for i, p in enumerate(params):  # every check before anything is loaded
            if slow[i].shape != p.shape:
                raise ValueError(f"slow weight {i} has shape {tuple(slow[i].shape)}, parameter {tuple(p.shape)}")
        self.optimizer.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for i, p in enumerate(params):
                self.state[p][_SLOW].copy_(slow[i])
        for name, value in meta.items():
            setattr(self, name, value)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class SLRLA(Lookahead):
    """Lookahead whose inner loss is ``loss(θ) + β‖θ − φ‖²`` (φ: the current slow weights).

    :meth:`step` adds ``2β(θ − φ)`` to each parameter's gradient for the inner step only
    (``p.grad`` is restored afterwards); parameters without a gradient are skipped, as the
    inner optimiser skips them. With a closure, each of the inner optimiser's evaluations gets
    the pull and returns ``F(θ)`` (LBFGS and its line search). Use :func:`stagewise_lr` for the
    stagewise schedule.

    Args:
        optimizer, k, alpha: as :class:`Lookahead`.
        beta: regulariser strength, ``beta >= 0``.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5, beta: float = 0.2) -> None:
        check_number("beta", beta)
        self.beta = float(beta)
        super().__init__(optimizer, k=k, alpha=alpha)

    def __repr__(self) -> str:
        return f"SLRLA(k={self.k}, alpha={self.alpha}, beta={self.beta}, optimizer={self.optimizer!r})"

    def regularizer(self) -> torch.Tensor:
        """``β Σ_p ‖θ_p − φ_p‖²`` as a differentiable scalar (for logging; step adds its gradient)."""
        params = self._params()
        total = sum(((p - self.state[p][_SLOW]) ** 2).sum() for p in params)
        return self.beta * total

    @torch.no_grad()
    def _pull(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Add ``2β(θ − φ)`` to every gradient; return the ``(param, original grad)`` pairs."""
        originals = []
        for p in self._params():
            if p.grad is None:
                continue
            originals.append((p, p.grad))
            # the pull toward φ is dense, so a sparse gradient (nn.Embedding(sparse=True)) becomes dense
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            p.grad = g + (2.0 * self.beta) * (p.detach() - self.state[p][_SLOW])
        return originals

    def _inner_step(self, closure):
        """The inner step on ``F``'s gradient. With a closure, the inner optimiser calls a wrapped
        one, so every evaluation (LBFGS makes several) gets the pull and returns ``F(θ)``; the
        step returns the first evaluation's loss, as the closure gave it."""
        originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        losses = []

        def regularised():
            for p, grad in originals:  # the previous evaluation's gradients, as the closure left them
                p.grad = grad
            originals.clear()
            with torch.enable_grad():
                loss = closure()
            losses.append(loss)
            originals.extend(self._pull())
            if loss is None:
                return None
            with torch.no_grad():
                reg = sum(((p - self.state[p][_SLOW]) ** 2).sum() for p, _ in originals)
                return (loss.detach() if torch.is_tensor(loss) else loss) + self.beta * reg

        try:
            if closure is None:
                originals.extend(self._pull())
                self.optimizer.step()
            else:
                self.optimizer.step(regularised)
        finally:
            for p, grad in originals:
                p.grad = grad
        return losses[0] if losses else None

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "beta": self.beta}


def stagewise_lr(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (0.3, 0.6, 0.8),
    gamma: float = 0.2,
) -> MultiStepLR:
    """Stagewise schedule (SLRLA): multiply the LR by ``gamma`` at these fractions of training.

    Call ``scheduler.step()`` once per optimiser step; ``total_steps`` is an integer >= 1 and the
    milestones are ``max(1, int(f * total_steps))`` (the first step always runs at the base rate).
    """
    check_positive_int("total_steps", total_steps)
    bad = ValueError(f"milestones must be a sequence of increasing fractions in (0, 1), got {milestones!r}")
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise bad
    fractions = list(milestones)
    if not all(is_real(f) and 0.0 < f < 1.0 for f in fractions) or fractions != sorted(fractions):
        raise bad
    check_number("gamma", gamma, strict=True)  # <= 0 would zero the rate or turn descent into ascent
    # at least step 1: with few steps a milestone rounded to 0 lowered the rate before the first step
    return MultiStepLR(optimizer, milestones=[max(1, int(f * total_steps)) for f in fractions], gamma=gamma)
