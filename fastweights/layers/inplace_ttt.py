"""The In-Place TTT MLP: a gated MLP whose down-projection is a fast weight (SPEC §1).

:class:`InPlaceTTTMLP` wraps an existing gated MLP (``gate_proj``/``up_proj``/``down_proj``
and an activation) without copying its weights, and adds the two parameters of the official
release, with their names, shapes and initialisation:

* ``ttt_conv``: depthwise ``Conv1d(d, d, 5, groups=d, bias=False)``, weight (d, 1, 5), zero,
  so that a freshly converted MLP computes exactly what it did before;
* ``ttt_proj``: ``Linear(d, d, bias=False)``, weight P (d, d) diagonal with N(0, 0.02²)
  entries, applied as ``t @ P`` (no transpose).
"""

from __future__ import annotations

import torch
from torch import nn

from fastweights.errors import as_rate, check_positive_int
from fastweights.layers._weights import weight_of
from fastweights.ops.inplace_ttt import check_max_update_norm, inplace_ttt
from fastweights.ops.inplace_ttt_decode import InPlaceTTTState, StepPlan

__all__ = ["TARGETS", "InPlaceTTTMLP", "TTTContext", "normalize_target", "ttt_init_value"]

# Our names and the official config's names for the target source.
TARGETS = {"hidden": "hidden", "embed": "embed", "hidden_states": "hidden", "input_embed": "embed"}
OFFICIAL_TARGET = {"hidden": "hidden_states", "embed": "input_embed"}


def normalize_target(target: str) -> str:
    """Map ``hidden``/``hidden_states`` → ``hidden`` and ``embed``/``input_embed`` → ``embed``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    return TARGETS[target]


class TTTContext:
    """Per-forward inputs that a converted model's TTT MLPs share.

    Filled by instance hooks (see ``fastweights.models.inplace_ttt``): the token
    embeddings (B, N, d) for ``target="embed"``, and the ``position_ids`` (B, N) or
    ``cu_seqlens`` (K+1,) that mark document starts. For a call through a cache, or with
    padding, also the call's :class:`~fastweights.ops.inplace_ttt_decode.StepPlan` and, for the
    layer running now, its :class:`~fastweights.ops.inplace_ttt_decode.InPlaceTTTState`.
    """

    def __init__(self):
        self.embeds: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.plan: StepPlan | None = None
        self.state: InPlaceTTTState | None = None
        self.cache = None  # the model's InPlaceTTTCache during a cached call


def ttt_init_value(module: nn.Module) -> torch.Tensor:
    """The initial weight of an In-Place TTT MLP's conv (``ttt_init == "zeros"``: zero) or P
    (``"diag"``: diagonal with N(0, 0.02²) entries), in the module's dtype and device."""
    w = module.weight
    if module.ttt_init == "zeros":
        return torch.zeros_like(w)
    return torch.diag(torch.randn(w.shape[0], device=w.device) * 0.02).to(w.dtype)


class InPlaceTTTMLP(nn.Module):
    """Gated MLP with In-Place TTT on its down-projection.

    Args:
        mlp: a module with ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear) and an
            activation (``act_fn``, ``activation_fn`` or ``act``). Its submodules are reused,
            so parameter names stay ``gate_proj.weight`` etc.
        chunk_size: C, tokens per fast-weight update.
        lr: inner learning rate η.
        target: ``"hidden"`` (the MLP input) or ``"embed"`` (token embeddings).
        proj: whether the target has the projection P (else P = I).
        max_update_norm: τ > 0 bounds each chunk's update ``η ΔW_i`` in Frobenius norm (SPEC §1:
            the paper's appendix clips at inference); None (default): no clipping. An attribute:
            it may be changed at any time.
    """

    def __init__(self, mlp: nn.Module, chunk_size: int = 4096, lr: float = 3.0, target: str = "hidden",
                 proj: bool = True, max_update_norm: float | None = None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        act = next((getattr(mlp, n) for n in ("act_fn", "activation_fn", "act") if hasattr(mlp, n)), None)
        if act is None:
            raise ValueError(f"{type(mlp).__name__} has no activation attribute (act_fn, activation_fn or act)")
        self.act_fn = act
        check_positive_int("chunk_size", chunk_size)
        self.chunk_size, self.lr, self.target = chunk_size, as_rate("lr", lr), normalize_target(target)
        self.max_update_norm = check_max_update_norm(max_update_norm)
        d = self.down_proj.out_features
        w = self.down_proj.weight
        self.ttt_conv = nn.Conv1d(d, d, 5, padding=2, groups=d, bias=False, device=w.device, dtype=w.dtype)
        self.ttt_proj = nn.Linear(d, d, bias=False, device=w.device, dtype=w.dtype) if proj else None
        # How a loader initialises these when a checkpoint lacks them (models.inplace_ttt.init_ttt_weights)
        self.ttt_conv.ttt_init = "zeros"
        if self.ttt_proj is not None:
            self.ttt_proj.ttt_init = "diag"
        self.ctx: TTTContext | None = None
        # Optional replacement of ``inplace_ttt`` with its signature, set per instance by wrappers
        # such as ``fastweights.distributed.apply_context_parallel``.
        self.ttt_op = None
        self.reset_ttt_parameters()

    def reset_ttt_parameters(self) -> None:
        """Official init: zero conv; P diagonal with N(0, 0.02²) entries (:func:`ttt_init_value`)."""
        with torch.no_grad():
            for m in (self.ttt_conv, self.ttt_proj):
                if m is not None:
                    m.weight.copy_(ttt_init_value(m))

    def _fast_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W0 (d, f), conv (d, 1, 5), P (d, d) or None), read directly by the op (adapters refused)."""
        proj = None if self.ttt_proj is None else weight_of(self.ttt_proj, "ttt_proj of an In-Place TTT MLP")
        return (weight_of(self.down_proj, "down_proj of an In-Place TTT MLP"),
                weight_of(self.ttt_conv, "ttt_conv of an In-Place TTT MLP"), proj)

    def extra_repr(self) -> str:
        clip = "" if self.max_update_norm is None else f", max_update_norm={self.max_update_norm}"
        return f"chunk_size={self.chunk_size}, lr={self.lr}, target={self.target!r}{clip}"

    def _clip(self) -> dict:
        """The op's clipping keyword: none when off, so that a replacement op (``ttt_op``) without it runs."""
        tau = check_max_update_norm(self.max_update_norm)
        return {} if tau is None else {"max_update_norm": tau}

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """z = act(x W_gateᵀ) * (x W_upᵀ): (B, N, d) → (B, N, f)."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def target_source(self, x: torch.Tensor, target_source: torch.Tensor | None) -> torch.Tensor:
        if target_source is not None:
            return target_source
        if self.target == "hidden":
            return x
        embeds = None if self.ctx is None else self.ctx.embeds
        if embeds is None or embeds.shape[:2] != x.shape[:2]:
            raise ValueError(
                "target='embed' needs the token embeddings: run the MLP inside its converted model "
                "or pass target_source=(B, N, d) embeddings"
            )
        return embeds

    def step(self, x: torch.Tensor, state: InPlaceTTTState, plan: StepPlan,
             target_source: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d) → o (B, N, d) by advancing ``state`` (streaming, as in generation): the
        call's tokens continue where the state's earlier calls stopped; ``plan`` marks padding
        and document starts (shared by all TTT layers of one model call)."""
        s = self.target_source(x, target_source)
        z = self.hidden(x)
        o = state.step(z, s, *self._fast_weights(), self.lr, plan, **self._clip())
        return o if self.down_proj.bias is None else o + self.down_proj.bias

    def forward(
        self,
        x: torch.Tensor,
        target_source: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, d) → o (B, N, d). Documents start where ``position_ids`` is 0, or at
        ``cu_seqlens``; without either, each row is one document. Explicit arguments win over
        what the model's hooks captured in ``self.ctx``.

        Inside a converted model called with a cache (or with padding in ``attention_mask``), the
        hooks hand over a fast-weight state: the output is then computed by advancing that state
        (``InPlaceTTTState.step``), which skips padding and continues from earlier calls."""
        if position_ids is not None and cu_seqlens is not None:  # the op refuses both; here one was dropped
            raise ValueError("give document boundaries as cu_seqlens or position_ids, not both")
        explicit = target_source is not None or position_ids is not None or cu_seqlens is not None
        if self.ctx is not None and self.ctx.plan is not None and not explicit:
            if self.ctx.cu_seqlens is not None:
                raise ValueError("packed sequences (cu_seqlens) cannot be combined with a cache or padding: "
                                 "pass use_cache=False and no attention_mask with zeros")
            # the cache's state of this layer, or (padding without a cache) one for this call only
            state = self.ctx.state if self.ctx.state is not None else InPlaceTTTState(self.chunk_size)
            return self.step(x, state, self.ctx.plan)
        if position_ids is None and cu_seqlens is None and self.ctx is not None:
            position_ids, cu_seqlens = self.ctx.position_ids, self.ctx.cu_seqlens
            if position_ids is not None and position_ids.shape[-1] != x.shape[1]:
                position_ids = None
        if cu_seqlens is not None:
            position_ids = None
        s = self.target_source(x, target_source)
        z = self.hidden(x)
        op = inplace_ttt if self.ttt_op is None else self.ttt_op
        o = op(z, s, *self._fast_weights(), self.lr, self.chunk_size, cu_seqlens=cu_seqlens, position_ids=position_ids,
               **self._clip())
        if self.down_proj.bias is not None:
            o = o + self.down_proj.bias
        return o
