"""The Fast Weight Layer block (SPEC §3, docs/fwl.md) as an ``nn.Module``.

``Dense(d→4s) → squared-ReLU → Dense(4s→s) → LayerNorm → unembed``; every dense kernel and
bias and the LayerNorm gain and bias are fast weights, updated token by token with the
per-token gradients of the next-token loss, scaled by ``grad_scale`` (see
:mod:`fastweights.ops.fwl`). Each of the six tensors has a learnable step size, initialised
to 0.01.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastweights.errors import check_number, is_real
from fastweights.ops.fwl import FAST_TENSORS, FWLParams, FWLState, fwl

__all__ = ["DEFAULT_GRAD_SCALE", "DEFAULT_STEP_SIZE", "FastWeightLayer"]

DEFAULT_STEP_SIZE = 0.01
# The reference code differentiates the batch-mean loss: its per-token gradients carry a factor
# 1/(tokens per batch). 1/8192 is that factor for a batch of 8 rows of 1024 tokens.
DEFAULT_GRAD_SCALE = 1.0 / 8192


class FastWeightLayer(nn.Module):
    """FWL block between an LM body (width ``hidden_size`` d) and an unembedding of width s.

    Args:
        hidden_size: d, the width of the body's output.
        width: s, the unembedding's input width (usually d).
        expansion: the hidden width is ``expansion * s`` (4 in the paper).
        eps: LayerNorm epsilon.
        step_size: initial value of every per-tensor step size (any finite number).
        block_size: chunk length of the parallel form.
        grad_scale: constant factor on each token's loss before its gradient is taken (the
            reference code's batch-mean loss is 1/(tokens per batch)). With ``step_size`` it
            sets the size of the fast update: only their product matters at init, but the
            optimiser moves the step sizes by about its learning rate per step, so a
            ``grad_scale`` that makes the useful step sizes O(0.01–1) trains well.
        residual: a variant, not in the paper: the unembedding reads ``h + block(h)`` (needs
            width = hidden_size) and the LayerNorm gain starts at 0, so a fresh block adds 0
            at the slow weights; with ``step_size=0`` as well it is an exact identity.
    """

    def __init__(self, hidden_size: int, width: int | None = None, *, expansion: int = 4, eps: float = 1e-5,
                 step_size: float = DEFAULT_STEP_SIZE, block_size: int = 256, residual: bool = False,
                 grad_scale: float = DEFAULT_GRAD_SCALE):
        super().__init__()
        width = hidden_size if width is None else width
        for name, val in (("hidden_size", hidden_size), ("width", width), ("expansion", expansion),
                          ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if residual and width != hidden_size:
            raise ValueError(f"residual needs width == hidden_size, got {width} and {hidden_size}")
        # any sign; a 1-element tensor is taken as its value, as before (a string or a bool is not a number)
        step = step_size.item() if isinstance(step_size, torch.Tensor) and step_size.numel() == 1 else step_size
        if not is_real(step) or not math.isfinite(step):
            raise ValueError(f"step_size must be a finite number, got {step_size!r}")
        check_number("eps", eps, strict=True)
        check_number("grad_scale", grad_scale, strict=True)
        self.hidden_size, self.width, self.expansion = hidden_size, width, expansion
        self.eps, self.block_size, self.step_size_init = float(eps), block_size, float(step)
        self.residual, self.grad_scale = bool(residual), float(grad_scale)
        inner = expansion * width
        self.w1 = nn.Parameter(torch.empty(inner, hidden_size))
        self.b1 = nn.Parameter(torch.empty(inner))
        self.w2 = nn.Parameter(torch.empty(width, inner))
        self.b2 = nn.Parameter(torch.empty(width))
        self.ln_weight = nn.Parameter(torch.empty(width))
        self.ln_bias = nn.Parameter(torch.empty(width))
        self.step_sizes = nn.Parameter(torch.empty(len(FAST_TENSORS)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Dense kernels N(0, 1/fan_in), zero biases, LayerNorm gain 1 (0 if residual) and bias 0,
        step sizes ``step_size``."""
        with torch.no_grad():
            self.w1.normal_(0.0, self.hidden_size ** -0.5)
            self.w2.normal_(0.0, self.w2.shape[1] ** -0.5)
            self.b1.zero_()
            self.b2.zero_()
            self.ln_weight.fill_(0.0 if self.residual else 1.0)
            self.ln_bias.zero_()
            self.step_sizes.fill_(self.step_size_init)

    def params(self) -> FWLParams:
        return FWLParams(self.w1, self.b1, self.w2, self.b2, self.ln_weight, self.ln_bias)

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        unembed_weight: torch.Tensor,
        unembed_bias: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: FWLState | None = None,
        impl: str = "chunked",
    ) -> tuple[torch.Tensor, FWLState]:
        """Logits (B, N, V) for body outputs h (B, N, d) and next-token targets (B, N).

        ``targets[b, t]`` is the token that follows t (``-100``: none). Returns the logits
        and the state of the document open at the end (see :func:`fastweights.ops.fwl.fwl`).
        """
        dt = h.dtype
        return fwl(h, targets, FWLParams(*(t.to(dt) for t in self.params())), self.step_sizes.to(dt),
                   unembed_weight.to(dt), None if unembed_bias is None else unembed_bias.to(dt),
                   eps=self.eps, position_ids=position_ids, cu_seqlens=cu_seqlens, state=state,
                   residual=self.residual, grad_scale=self.grad_scale, impl=impl,
                   **({"block_size": self.block_size} if impl == "chunked" else {}))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, width={self.width}, expansion={self.expansion}, "
                f"step_size_init={self.step_size_init}, grad_scale={self.grad_scale:g}, residual={self.residual}")
