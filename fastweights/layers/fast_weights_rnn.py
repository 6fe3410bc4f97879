"""Recurrent layers of Ba et al. 2016 (SPEC §4): the fast-weights RNN and its baselines.

All layers take ``x`` (B, T, I) and an optional boolean ``mask`` (B, T) (True = real token)
and return ``(outputs, last)``: outputs (B, T, R) and ``last`` (B, R), the output at each
row's last real token. With ``outputs=False`` they return ``(None, last)``, which lets the
A-LSTM skip its read-out at every other step. Masked steps leave the recurrent state
untouched, so a padded batch gives the same result as its sequences run one at a time (left
or right padding).

* :class:`FastWeightsRNN`: ``A(t) = λA(t−1) + η h(t)h(t)ᵀ``, ``z = W h(t) + C x(t)``,
  ``h_0 = f(LN(z))``, ``h_s = f(LN(z + A(t) h_{s−1}))`` for s = 1..S. ``form`` picks the matrix
  form, the attention form or ``"auto"`` (attention while t < R, then the matrix built from
  the stored states). ``fast_weights=False`` is the control with the same S-step inner loop
  and A ≡ 0 (the inner loop then repeats ``f(LN(z))``, so it is computed once).
* :class:`IRNN`: ReLU RNN with identity-initialised recurrence (Le et al. 2015).
* :class:`LSTM`: ``torch.nn.LSTM``, stepped with masks when a mask is given.
* :class:`AttentionLSTM` (A-LSTM): an LSTM whose output at step t also attends (scaled dot
  product) over its own hidden states at steps ≤ t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastweights.errors import as_rate, check_number, check_positive_int, is_int
from fastweights.ops.hebbian import decay_weights, hebbian_read, hebbian_read_attention, hebbian_update

__all__ = ["AttentionLSTM", "FastWeightsRNN", "IRNN", "LSTM", "last_valid"]

FORMS = ("matrix", "attention", "auto")


def _check_inputs(x: torch.Tensor, mask: torch.Tensor | None, input_size: int) -> torch.Tensor:
    if x.dim() != 3 or x.shape[2] != input_size or x.shape[1] < 1:
        raise ValueError(f"x must be (B, T >= 1, {input_size}), got shape {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return mask


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last True position. mask (B, T) -> (B,) long."""
    if not bool(mask.any(1).all()):
        raise ValueError("every row of mask needs at least one True position")
    return (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(1)


def last_valid(outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Output at each row's last True position. outputs (B, T, R), mask (B, T) -> (B, R)."""
    return outputs[torch.arange(outputs.shape[0], device=outputs.device), _last_index(mask)]


def _check_sizes(input_size, hidden_size) -> None:
    check_positive_int("input_size", input_size)
    check_positive_int("hidden_size", hidden_size)


class FastWeightsRNN(nn.Module):
    """Fast-weights RNN layer (Ba et al. 2016), f = ReLU, A reset to 0 for each sequence.

    Args: input_size I, hidden_size R (integers >= 1), eta η (0.5, a finite number >= 0),
    lam λ (0.95, a number in [0, 1]), inner_steps S (1, an integer >= 0), layer_norm (True),
    form ("matrix" | "attention" | "auto"), fast_weights (False: A ≡ 0).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        eta: float = 0.5,
        lam: float = 0.95,
        inner_steps: int = 1,
        layer_norm: bool = True,
        form: str = "auto",
        fast_weights: bool = True,
    ):
        super().__init__()
        _check_sizes(input_size, hidden_size)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not is_int(inner_steps) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
        check_number("eta", eta)
        try:  # a number or a 1-element tensor, as before; a string or a bool is not one
            lam_value = as_rate("lam", lam)
        except ValueError:
            lam_value = math.nan
        if not 0.0 <= lam_value <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.eta, self.lam, self.inner_steps = float(eta), lam_value, inner_steps
        self.form, self.fast_weights = form, fast_weights
        self.W = nn.Parameter(0.05 * torch.eye(hidden_size))
        self.C = nn.Linear(input_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, T, I), mask (B, T) bool -> outputs (B, T, R) (None if not ``outputs``), last (B, R)."""
        mask = _check_inputs(x, mask, self.input_size)
        B, T, _ = x.shape
        R = self.hidden_size
        cx = self.C(x)
        h = x.new_zeros(B, R)
        use_matrix = self.form == "matrix"
        A = x.new_zeros(B, R, R) if use_matrix else None
        H, c = x.new_zeros(B, 0, R), x.new_zeros(B, 0)
        outs = []
        for t in range(T):
            valid = mask[:, t]
            if self.fast_weights:
                if self.form == "auto" and not use_matrix and t >= R:
                    # Past R stored states the matrix is cheaper: build it once from them.
                    A = torch.einsum("bt,btr,bts->brs", c, H, H)
                    use_matrix = True
                if use_matrix:
                    A = hebbian_update(A, h, self.eta, self.lam, valid)
                else:
                    H = torch.cat([H, h.unsqueeze(1)], dim=1)
                    c = decay_weights(c, self.eta, self.lam, valid)
            z = h @ self.W.t() + cx[:, t]
            hs = F.relu(self.norm(z))
            # A ≡ 0 (the control): every inner step reads 0 and gives f(LN(z)) again
            for _ in range(self.inner_steps if self.fast_weights else 0):
                read = hebbian_read(A, hs) if use_matrix else hebbian_read_attention(H, c, hs)
                hs = F.relu(self.norm(z + read))
            h = torch.where(valid.unsqueeze(1), hs, h)
            outs.append(h)
        ys = torch.stack(outs, 1)
        return (ys if outputs else None), last_valid(ys, mask)


class IRNN(nn.Module):
    """ReLU RNN, ``h = relu(W h + C x)``, W initialised to the identity (Le et al. 2015)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.W = nn.Parameter(torch.eye(hidden_size))
        self.C = nn.Linear(input_size, hidden_size)
        nn.init.normal_(self.C.weight, std=0.001)
        nn.init.zeros_(self.C.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, T, I), mask (B, T) bool -> outputs (B, T, R) (None if not ``outputs``), last (B, R)."""
        mask = _check_inputs(x, mask, self.input_size)
        cx = self.C(x)
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outs = []
        for t in range(x.shape[1]):
            h = torch.where(mask[:, t : t + 1], F.relu(h @ self.W.t() + cx[:, t]), h)
            outs.append(h)
        ys = torch.stack(outs, 1)
        return (ys if outputs else None), last_valid(ys, mask)


class LSTM(nn.Module):
    """One-layer LSTM. Without a mask it runs the fused ``nn.LSTM``; with one it steps the
    same weights and keeps (h, c) on masked steps."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, T, I), mask (B, T) bool -> outputs (B, T, R) (None if not ``outputs``), last (B, R)."""
        full = _check_inputs(x, mask, self.input_size)
        if mask is None:
            ys, _ = self.lstm(x)
            return (ys if outputs else None), ys[:, -1]
        B = x.shape[0]
        h = x.new_zeros(1, B, self.hidden_size)
        c = torch.zeros_like(h)
        outs = []
        for t in range(x.shape[1]):
            o, (h2, c2) = self.lstm(x[:, t : t + 1], (h, c))
            v = full[:, t].view(1, B, 1)
            h, c = torch.where(v, h2, h), torch.where(v, c2, c)
            outs.append(h[0])
        ys = torch.stack(outs, 1)
        return (ys if outputs else None), last_valid(ys, full)


class AttentionLSTM(nn.Module):
    """A-LSTM: LSTM hidden states ``h_t``, then ``o_t = tanh(W_o [h_t; Σ_τ a_tτ h_τ])`` with
    ``a_t = softmax_{τ≤t, real}((W_q h_t)·h_τ / √R)``. The attention reads the LSTM's past
    states; it does not feed back into the recurrence."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lstm = LSTM(input_size, hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, T, I), mask (B, T) bool -> outputs (B, T, R) (None if not ``outputs``), last (B, R)."""
        full = _check_inputs(x, mask, self.input_size)
        hs, _ = self.lstm(x, mask)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal.unsqueeze(0) & full.unsqueeze(1)
        # A padded query row still has τ = its own index only if real; give it one safe key.
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device).unsqueeze(0)
        if not outputs:  # read out at each row's last real step only
            last_t, rows = _last_index(full), torch.arange(x.shape[0], device=x.device)
            return None, self._read_out(hs[rows, last_t].unsqueeze(1), hs, allowed[rows, last_t].unsqueeze(1))[:, 0]
        ys = self._read_out(hs, hs, allowed)
        return ys, last_valid(ys, full)

    def _read_out(self, h: torch.Tensor, hs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h (B, Q, R) queries, hs (B, T, R) past states, allowed (B, Q, T) bool -> (B, Q, R)."""
        scores = self.query(h) @ hs.transpose(1, 2) / math.sqrt(self.hidden_size)  # (B, Q, T)
        attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.tanh(self.out(torch.cat([h, attn @ hs], dim=-1)))
