"""Decoder-only pre-LN Transformer with plastic FFNs, fed step by step (Chaudhary 2025, SPEC §5).

At every step t the model reads ``x_t``, attends over its key/value cache, and its head
outputs ``y_t = [logits (n_out); η̃_t; y_aux (4)]``. Then every plastic FFN linear updates its
fast weights (used from step t+1 on):

    η(t) = η0 · σ(η̃_t) · min(1, max_norm / ||δ_t||)       (clip per layer and sequence)
    w ← (1−η) w + η α ∘ (u pᵀ),   b ← (1−η) b + η β ∘ u

with ``u = q`` (``rule="hebbian"``) or ``u = ∂L_int/∂q``, ``L_int = ||W_int y_t||² / d_o``
(``rule="gradient"``, Duan et al. 2023). ``rule="none"`` is the plain Transformer. The fast
weights and the cache start empty for every call of :meth:`PlasticTransformer.forward`.

Unlike the official code, nothing is detached: α, β, the η̃ head and W_int get gradients
from the task loss through the unrolled updates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from fastweights.errors import check_number, check_positive_int, is_int
from fastweights.layers.plastic import PlasticFFN

__all__ = ["PlasticConfig", "PlasticState", "PlasticTransformer", "RULES"]

RULES = ("none", "hebbian", "gradient")


@dataclass
class PlasticConfig:
    input_size: int
    output_size: int
    rule: str = "hebbian"
    d_model: int = 128
    d_ff: int = 256
    n_heads: int = 4
    n_layers: int = 2
    max_len: int = 64
    n_aux: int = 4  # auxiliary head outputs y_aux, >= 0
    eta0: float = 0.2  # >= 0
    max_norm: float = 1.0  # > 0: the clip of each plastic step (see the module docstring)
    form: str = "attention"  # how plastic linears hold their fast weights (same function)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        for name in ("input_size", "output_size", "d_model", "d_ff", "n_heads", "n_layers", "max_len"):
            check_positive_int(name, getattr(self, name))
        if not is_int(self.n_aux) or self.n_aux < 0:  # a negative count shrank the head below its η̃ column
            raise ValueError(f"n_aux must be an integer >= 0, got {self.n_aux!r}")
        check_number("eta0", self.eta0)
        # η is scaled by min(1, max_norm / ||δ||): max_norm 0 turned every plastic update off
        check_number("max_norm", self.max_norm, strict=True)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")


@dataclass
class PlasticState:
    """Per-sequence state: the KV cache (per layer, (B, H, t, d_head)) and the fast weights
    (per layer, [fc1 state, fc2 state], see :class:`~fastweights.layers.plastic.PlasticLinear`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    fast: list[list[tuple[torch.Tensor, ...]]]
    position: int = 0


class Block(nn.Module):
    def __init__(self, cfg: PlasticConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ffn = PlasticFFN(cfg.d_model, cfg.d_ff, cfg.form)

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, fast):
        """h (B, d) for one step; keys/values (B, H, t, dh) cached -> h, keys, values, records."""
        B, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, 3, self.n_heads, 1, d // self.n_heads).unbind(1)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        # The query sees every cached step. Plain softmax attention, not SDPA: the gradient rule
        # differentiates twice, which CPU flash attention does not support.
        scores = (q @ keys.transpose(-1, -2)) * (d // self.n_heads) ** -0.5  # (B, H, 1, t)
        att = torch.softmax(scores, dim=-1) @ values
        h = h + self.proj(att.reshape(B, d))
        y, records = self.ffn(self.ln2(h), fast)
        return h + y, keys, values, records


class PlasticTransformer(nn.Module):
    def __init__(self, cfg: PlasticConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.input_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.d_out = cfg.output_size + 1 + cfg.n_aux  # [logits; η̃; y_aux]
        self.head = nn.Linear(cfg.d_model, self.d_out)
        self.W_int = nn.Linear(self.d_out, self.d_out, bias=False) if cfg.rule == "gradient" else None

    def init_state(self, batch: int, device=None, dtype=None) -> PlasticState:
        """Empty cache and zero fast weights for a batch of fresh sequences."""
        cfg = self.cfg
        dtype = dtype or self.inp.weight.dtype
        empty = torch.zeros(batch, cfg.n_heads, 0, cfg.d_model // cfg.n_heads, device=device, dtype=dtype)
        return PlasticState(
            keys=[empty] * cfg.n_layers, values=[empty] * cfg.n_layers,
            fast=[blk.ffn.init_state(batch, device, dtype) for blk in self.blocks])

    def step(self, x: torch.Tensor, state: PlasticState) -> tuple[torch.Tensor, PlasticState]:
        """One step. x (B, input_size) -> outputs (B, output_size) and the next state."""
        cfg = self.cfg
        if x.dim() != 2 or x.shape[1] != cfg.input_size:
            raise ValueError(f"x must be (B, {cfg.input_size}), got {tuple(x.shape)}")
        if state.position >= cfg.max_len:
            raise ValueError(f"sequence longer than max_len={cfg.max_len}: step {state.position + 1}")
        if state.keys and state.keys[0].shape[0] != x.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]}, the state {state.keys[0].shape[0]}")
        outer_grad = torch.is_grad_enabled()
        if cfg.rule == "gradient" and torch.is_inference_mode_enabled():
            raise RuntimeError("the gradient rule differentiates L_int at every step, which "
                               "torch.inference_mode() forbids: run it under torch.no_grad() instead")
        # The gradient rule differentiates L_int even when the caller runs without autograd.
        with torch.enable_grad() if cfg.rule == "gradient" else contextlib.nullcontext():
            h = self.inp(x) + self.pos.weight[state.position]
            if cfg.rule == "gradient" and not h.requires_grad:  # frozen model: the q's still need a graph
                h = h.detach().requires_grad_()
            keys, values, records = [], [], []
            for blk, k, v, fast in zip(self.blocks, state.keys, state.values, state.fast, strict=True):
                h, k, v, rec = blk(h, k, v, fast)
                keys.append(k)
                values.append(v)
                records.append(rec)
            y = self.head(self.ln_f(h))
            fast = state.fast
            if cfg.rule != "none":
                eta = cfg.eta0 * torch.sigmoid(y[:, cfg.output_size])
                qs = [q for rec in records for _, q in rec]
                if cfg.rule == "hebbian":
                    us = qs
                else:
                    l_int = self.W_int(y).pow(2).sum(-1) / self.d_out  # (B,); rows independent
                    us = torch.autograd.grad(l_int.sum(), qs, create_graph=outer_grad)
                us = [us[2 * i : 2 * i + 2] for i in range(len(self.blocks))]
                fast = [blk.ffn.update(f, rec, u, eta, cfg.max_norm)
                        for blk, f, rec, u in zip(self.blocks, state.fast, records, us, strict=True)]
        out = y[:, : cfg.output_size]
        if not outer_grad:
            out, keys, values = out.detach(), [k.detach() for k in keys], [v.detach() for v in values]
            fast = [[tuple(s.detach() for s in lin) for lin in f] for f in fast]
        return out, PlasticState(keys, values, fast, state.position + 1)

    def forward(self, inputs: torch.Tensor, return_state: bool = False):
        """inputs (B, T, input_size) -> outputs (B, T, output_size), run step by step from a
        fresh state (fast weights reset for every sequence). With ``return_state`` also the
        final :class:`PlasticState`."""
        if inputs.dim() != 3 or inputs.shape[1] < 1 or inputs.shape[2] != self.cfg.input_size:
            raise ValueError(f"inputs must be (B, T >= 1, {self.cfg.input_size}), got {tuple(inputs.shape)}")
        state = self.init_state(inputs.shape[0], inputs.device, inputs.dtype)
        outs = []
        for t in range(inputs.shape[1]):
            o, state = self.step(inputs[:, t], state)
            outs.append(o)
        outputs = torch.stack(outs, 1)
        return (outputs, state) if return_state else outputs
