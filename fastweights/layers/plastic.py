"""Plastic linear layer and plastic FFN (Chaudhary 2025, SPEC §5).

A plastic linear layer computes ``q = (W̃ + w) p + (b̃ + b)``: slow ``W̃`` (O, I), ``b̃`` (O,)
trained by the outer loop, and per-sequence fast ``w`` (B, O, I), ``b`` (B, O) that start at
0 for each sequence and follow the neuromodulated rule of :func:`fastweights.ops.hebbian.
plastic_update`. The plasticity coefficients ``α`` (O, I) and ``β`` (O,) (initialised to
0.02) are ordinary parameters: the outer loop trains them through the unrolled updates.

``form="matrix"`` carries ``(w, b)``; ``form="attention"`` carries ``(P, U, c, b)`` (the past
inputs, post signals and decayed rates, see :mod:`fastweights.ops.hebbian`) and computes the
same function without a per-sequence (O, I) matrix. The attention form is much faster on CPU
for the short sequences of SPEC §5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastweights.errors import check_positive_int, is_real
from fastweights.ops.hebbian import plastic_read_attention, plastic_update, plastic_update_attention

__all__ = ["PlasticFFN", "PlasticLinear"]

FORMS = ("matrix", "attention")


class PlasticLinear(nn.Module):
    """``q = (W̃ + w) p + b̃ + b`` with fast ``(w, b)`` passed in and returned by :meth:`update`.

    ``alpha_init`` (any finite number, 0.02 by default) is the initial value of every entry of
    the plasticity coefficients α and β."""

    def __init__(
        self, in_features: int, out_features: int, alpha_init: float = 0.02, form: str = "attention"
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if not is_real(alpha_init) or not math.isfinite(alpha_init):  # NaN/inf α: NaN after one update
            raise ValueError(f"alpha_init must be a finite number, got {alpha_init!r}")
        self.in_features, self.out_features, self.form = in_features, out_features, form
        self.slow = nn.Linear(in_features, out_features)
        self.alpha = nn.Parameter(torch.full((out_features, in_features), float(alpha_init)))
        self.beta = nn.Parameter(torch.full((out_features,), float(alpha_init)))

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        """Fresh (empty) fast state: matrix (w (B, O, I), b (B, O)) zeros, or attention
        (P (B, 0, I), U (B, 0, O), c (B, 0), b (B, O))."""
        kw = {"device": device, "dtype": dtype or self.slow.weight.dtype}
        O, I = self.out_features, self.in_features
        b = torch.zeros(batch, O, **kw)
        if self.form == "matrix":
            return torch.zeros(batch, O, I, **kw), b
        return torch.zeros(batch, 0, I, **kw), torch.zeros(batch, 0, O, **kw), torch.zeros(batch, 0, **kw), b

    def forward(self, p: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """p (B, I) and the fast state -> q (B, O) = (W̃ + w) p + b̃ + b."""
        if p.dim() != 2 or p.shape[1] != self.in_features or state[-1].shape[0] != p.shape[0]:
            raise ValueError(f"p must be (B, {self.in_features}) matching the state's batch "
                             f"{state[-1].shape[0]}, got {tuple(p.shape)}")
        if self.form == "matrix":
            fast = torch.bmm(state[0], p.unsqueeze(2)).squeeze(2)
        else:
            fast = plastic_read_attention(*state[:3], self.alpha, p)
        return self.slow(p) + fast + state[-1]

    def update(self, state, p: torch.Tensor, u: torch.Tensor, eta: torch.Tensor, max_norm: float):
        """New fast state after one step; u (B, O) is q (Hebbian) or ∂L_int/∂q (gradient)."""
        if self.form == "matrix":
            return plastic_update(*state, p, u, self.alpha, self.beta, eta, max_norm)
        return plastic_update_attention(*state, p, u, self.alpha, self.beta, eta, max_norm)

    def fast_weight(self, state) -> torch.Tensor:
        """The fast weight ``w`` (B, O, I) that a state stands for (built for attention form)."""
        if self.form == "matrix":
            return state[0]
        P, U, c = state[:3]
        return torch.einsum("bt,bto,bti->boi", c, U, P) * self.alpha


class PlasticFFN(nn.Module):
    """``fc2(gelu(fc1(x)))`` with both linears plastic. :meth:`forward` also returns the
    (input, pre-activation output) pair of each linear, which the update rules need."""

    def __init__(self, d_model: int, d_ff: int, form: str = "attention"):
        super().__init__()
        self.fc1 = PlasticLinear(d_model, d_ff, form=form)
        self.fc2 = PlasticLinear(d_ff, d_model, form=form)

    def init_state(self, batch: int, device=None, dtype=None):
        return [self.fc1.init_state(batch, device, dtype), self.fc2.init_state(batch, device, dtype)]

    def forward(self, x: torch.Tensor, state) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """x (B, d), state [fc1 (w, b), fc2 (w, b)] -> y (B, d), [(p1, q1), (p2, q2)]."""
        q1 = self.fc1(x, state[0])
        a1 = F.gelu(q1)
        q2 = self.fc2(a1, state[1])
        return q2, [(x, q1), (a1, q2)]

    def update(self, state, records, us, eta: torch.Tensor, max_norm: float):
        """Apply one plastic step to both linears; ``us`` holds each linear's post signal."""
        return [lin.update(s, p, u, eta, max_norm)
                for lin, s, (p, _), u in zip((self.fc1, self.fc2), state, records, us, strict=True)]
