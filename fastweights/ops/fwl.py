"""Fast Weight Layers (Clark et al. 2022): the functional op (SPEC §3, docs/fwl.md).

An FWL block sits between an LM body and its unembedding ``E`` (V, s):

    c = W1 h + b1        (4s)      h (d): the body's output for one token
    r = relu(c)²
    a = W2 r + b2        (s)
    u = γ ⊙ norm(a) + β  (s)       norm: LayerNorm without affine, eps
    logits = E u + e                (residual variant: logits = E (h + u) + e, needs s = d)

All six tensors θ = (W1, b1, W2, b2, γ, β) are fast. Token t is read with

    θ_t = θ − η ⊙ Σ_{s<t, same document} ∇_θ ℓ_s(θ)

where ``ℓ_s`` is the next-token cross entropy of token s at the *slow* weights θ, scaled by
the constant ``grad_scale``, and ``η`` holds one step size per tensor. The reference code of
Clark et al. takes the gradient of the *batch-mean* loss, i.e. ``grad_scale`` = 1 / (tokens
in the batch); a constant keeps rows independent and generation equal to the full forward.
A dense layer's per-token gradient is rank one, so each fast layer is strictly causal linear
attention (query: fast-path input, key: slow-path input, value: the slow-path gradient at the
layer's output ``g``):

    W_t x_t + b_t = W x_t + b − η_W Σ_{s<t} (x_t·x_s) g_s − η_b Σ_{s<t} g_s
    γ_t = γ − η_γ Σ_{s<t} g^u_s ⊙ n_s,   β_t = β − η_β Σ_{s<t} g^u_s

Two implementations compute the same function:

* :func:`fwl_reference`: explicit per-token gradient steps. For each token it forms θ_t
  from the summed per-token gradients (``torch.func.grad`` of ``ℓ_s``) and runs the block
  with θ_t. Slow; it is the definition.
* :func:`fwl_chunked`: one slow pass (forward plus an analytic per-token backward), then the
  fast pass as causal linear attention, chunked into blocks (quadratic inside a block, a
  carried (out, in) state between blocks); the bias, gain and LayerNorm-bias updates are
  per-document exclusive cumulative sums (:func:`causal_sum`). Differentiable: training backpropagates through
  the inner gradient (second order).

Targets are next tokens (B, N) long, ``-100`` where a token has no target (its gradient is
zero). Document boundaries come as ``cu_seqlens`` (K+1,) for one packed row (B == 1) or
``position_ids`` (B, N) that restart at 0; the fast weights reset at every document start.
Both functions return ``(logits (B, N, V), state)``; ``state`` (:class:`FWLState`) holds
the summed gradients of the document still open after the last token, and can be passed
back in (``state=``) to continue that document, as generation does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastweights.errors import check_float_tensors, check_number
from fastweights.ops.inplace_ttt import doc_starts

__all__ = [
    "FAST_TENSORS",
    "FWLParams",
    "FWLState",
    "causal_linear_attention",
    "causal_sum",
    "fwl",
    "fwl_chunked",
    "fwl_reference",
    "fwl_slow_pass",
]

FAST_TENSORS = ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias")
IGNORE = -100


class FWLParams(NamedTuple):
    """Slow FWL weights: w1 (4s, d), b1 (4s,), w2 (s, 4s), b2 (s,), ln_weight (s,), ln_bias (s,)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor


class FWLState(NamedTuple):
    """Summed per-token gradients of the open document, per row: each is (B, *param shape)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor


# --------------------------------------------------------------------------- validation
def _check(h, targets, p: FWLParams, step_sizes, unembed_weight, unembed_bias, state, residual=False,
           grad_scale=1.0):
    check_number("grad_scale", grad_scale, strict=True)
    check_float_tensors(h=h, step_sizes=step_sizes, unembed_weight=unembed_weight, unembed_bias=unembed_bias,
                        **{name: getattr(p, name) for name in p._fields})
    if h.dim() != 3:
        raise ValueError(f"h must be (B, N, d), got shape {tuple(h.shape)}")
    B, N, d = h.shape
    if targets.shape != (B, N) or targets.dtype != torch.long:
        raise ValueError(f"targets must be a (B, N) = ({B}, {N}) long tensor, got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if targets.device != h.device:
        raise ValueError(f"targets must lie on h's device {h.device}, got {targets.device}")
    f, s = p.w1.shape[0], p.w2.shape[0]
    if residual and s != d:
        raise ValueError(f"the residual variant needs the block width s = d = {d}, got s = {s}")
    shapes = {"w1": (f, d), "b1": (f,), "w2": (s, f), "b2": (s,), "ln_weight": (s,), "ln_bias": (s,)}
    for name, shape in shapes.items():
        got = tuple(getattr(p, name).shape)
        if got != shape:
            raise ValueError(f"{name} must have shape {shape} for h of width {d}, got {got}")
    if tuple(step_sizes.shape) != (len(FAST_TENSORS),):
        raise ValueError(f"step_sizes must have shape ({len(FAST_TENSORS)},), got {tuple(step_sizes.shape)}")
    if unembed_weight.dim() != 2 or unembed_weight.shape[1] != s:
        raise ValueError(f"unembed_weight must be (V, {s}), got {tuple(unembed_weight.shape)}")
    if unembed_bias is not None and tuple(unembed_bias.shape) != (unembed_weight.shape[0],):
        raise ValueError(
            f"unembed_bias must be ({unembed_weight.shape[0]},), got {tuple(unembed_bias.shape)}")
    V = unembed_weight.shape[0]
    bad = (targets != IGNORE) & ((targets < 0) | (targets >= V))
    # one host sync per eager call (none when compiled): out-of-range ids would index the wrong logits
    if not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"targets must be token ids in [0, {V}) or {IGNORE} (no target), got "
                         f"{targets[bad][:5].tolist()}")
    if state is not None:
        for name, shape in shapes.items():
            got = tuple(getattr(state, name).shape)
            if got != (B, *shape):
                raise ValueError(f"state.{name} must have shape {(B, *shape)}, got {got}")
    return B, N


def _starts(B, N, cu_seqlens, position_ids, continuing: bool, device) -> torch.Tensor:
    """(B, N) bool document starts. With ``continuing`` (a state is given) column 0 is a
    start only where ``position_ids`` is 0; otherwise column 0 always starts a document."""
    if continuing and cu_seqlens is not None:
        raise ValueError("a carried state continues a document: give position_ids, not cu_seqlens")
    starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=device)
    if continuing and N:
        starts[:, 0] = False if position_ids is None else (position_ids.expand(B, N)[:, 0] == 0)
    return starts


def _layer_norm(a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``a`` (..., s) and 1/σ (..., 1)."""
    mu = a.mean(-1, keepdim=True)
    rstd = torch.rsqrt(a.var(-1, unbiased=False, keepdim=True) + eps)
    return (a - mu) * rstd, rstd


def _block(h, p: FWLParams, unembed_weight, unembed_bias, eps, residual):
    """The FWL block at weights p for h (..., d): returns logits (..., V)."""
    c = F.linear(h, p.w1, p.b1)
    a = F.linear(F.relu(c).square(), p.w2, p.b2)
    u = _layer_norm(a, eps)[0] * p.ln_weight + p.ln_bias
    return F.linear(h + u if residual else u, unembed_weight, unembed_bias)


# --------------------------------------------------------------------------- reference
def fwl_reference(
    h: torch.Tensor,
    targets: torch.Tensor,
    params: FWLParams,
    step_sizes: torch.Tensor,
    unembed_weight: torch.Tensor,
    unembed_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    state: FWLState | None = None,
    residual: bool = False,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, FWLState]:
    """Explicit per-token gradient steps (the definition). Returns logits (B, N, V) and state.

    For each row and token t: θ_t = θ − η ⊙ G, where G sums ``∇_θ (grad_scale · ℓ_s)(θ)``
    over the earlier tokens s of t's document (each from ``torch.func.grad``);
    logits_t = block(h_t; θ_t). Differentiable end to end (the per-token gradients keep
    their graph).
    """
    B, N = _check(h, targets, params, step_sizes, unembed_weight, unembed_bias, state, residual, grad_scale)
    starts = _starts(B, N, cu_seqlens, position_ids, state is not None, h.device)

    def token_loss(theta: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _block(x, FWLParams(*theta), unembed_weight, unembed_bias, eps, residual)
        return grad_scale * F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

    grad_fn = torch.func.grad(token_loss)
    zeros = tuple(torch.zeros_like(t) for t in params)
    rows, finals = [], []
    for b in range(B):
        G = zeros if state is None else tuple(t[b] for t in state)
        outs = []
        for n in range(N):
            if starts[b, n]:
                G = zeros
            theta = tuple(t - step_sizes[i] * g for i, (t, g) in enumerate(zip(params, G, strict=True)))
            outs.append(_block(h[b, n], FWLParams(*theta), unembed_weight, unembed_bias, eps, residual))
            if int(targets[b, n]) != IGNORE:
                g_n = grad_fn(tuple(params), h[b, n], targets[b, n])
                G = tuple(a + g for a, g in zip(G, g_n, strict=True))
        rows.append(torch.stack(outs) if outs else h.new_zeros(0, unembed_weight.shape[0]))
        finals.append(G)
    if not rows:  # B = 0
        return (h.new_zeros(0, N, unembed_weight.shape[0]),
                FWLState(*(t.new_zeros(0, *t.shape) for t in params)))
    logits = torch.stack(rows)
    return logits, FWLState(*(torch.stack([f[i] for f in finals]) for i in range(len(FAST_TENSORS))))


# --------------------------------------------------------------------------- parallel form
def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    state: torch.Tensor | None = None,
    block_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly causal linear attention with document resets, chunked into blocks.

    ``out_t = Σ_{s<t, doc_s = doc_t} (q_t·k_s) v_s + [doc_t = 0] · S0 q_t``.

    Args:
        q, k: (B, N, Dk); v: (B, N, Dv).
        doc: (B, N) long, non-decreasing document ids; id 0 continues the document of
            ``state``.
        state: (B, Dv, Dk) summed ``v kᵀ`` of the continued document, or None (zeros).
        block_size: tokens per block: an (L, L) score matrix inside a block, a carried
            (Dv, Dk) state between blocks.
    Returns:
        out (B, N, Dv) and the final state (B, Dv, Dk) of the document open at the end.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    B, N, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, Dv, Dk) if state is None else state
    cur = torch.zeros(B, dtype=torch.long, device=q.device)
    outs = []
    for lo in range(0, N, block_size):
        hi = min(lo + block_size, N)
        qb, kb, vb, db = q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], doc[:, lo:hi]
        L = hi - lo
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
        mask = causal & (db.unsqueeze(2) == db.unsqueeze(1))
        out = torch.matmul(torch.matmul(qb, kb.transpose(1, 2)) * mask.to(qb.dtype), vb)
        carried = (db == cur.unsqueeze(1)).to(qb.dtype).unsqueeze(-1)
        outs.append(out + carried * torch.matmul(qb, S.transpose(1, 2)))
        new = db[:, -1]
        in_last = (db == new.unsqueeze(1)).to(qb.dtype).unsqueeze(-1)
        keep = (new == cur).to(qb.dtype).view(B, 1, 1)
        S = torch.matmul((vb * in_last).transpose(1, 2), kb) + keep * S
        cur = new
    out = torch.cat(outs, dim=1) if outs else v.new_zeros(B, 0, Dv)
    return out, S


def causal_sum(v: torch.Tensor, doc: torch.Tensor, state: torch.Tensor | None = None,
               block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly causal per-document sum: ``out_t = Σ_{s<t, doc_s = doc_t} v_s + [doc_t = 0] · S0``.

    The bias, gain and LayerNorm-bias updates of FWL (linear attention with unit keys and
    queries), computed as an exclusive cumulative sum per block with a carried (B, D) state.
    v: (B, N, D); doc: (B, N) as in :func:`causal_linear_attention`; state: (B, D) or None.
    Returns out (B, N, D) and the final state (B, D) of the document open at the end.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    B, N, D = v.shape
    S = v.new_zeros(B, D) if state is None else state
    cur = torch.zeros(B, dtype=torch.long, device=v.device)
    outs = []
    for lo in range(0, N, block_size):
        vb, db = v[:, lo:lo + block_size], doc[:, lo:lo + block_size]
        L = vb.shape[1]
        excl = torch.cumsum(vb, dim=1) - vb  # Σ_{s<t} within the block
        ar = torch.arange(L, device=v.device).expand(B, L)
        first = torch.ones_like(db, dtype=torch.bool)
        first[:, 1:] = db[:, 1:] != db[:, :-1]
        start = torch.cummax(torch.where(first, ar, torch.zeros_like(ar)), dim=1).values  # doc's first index
        out = excl - torch.gather(excl, 1, start.unsqueeze(-1).expand(B, L, D))
        carried = (db == cur.unsqueeze(1)).to(v.dtype).unsqueeze(-1)
        outs.append(out + carried * S.unsqueeze(1))
        new = db[:, -1]
        in_last = (db == new.unsqueeze(1)).to(v.dtype).unsqueeze(-1)
        S = (vb * in_last).sum(1) + (new == cur).to(v.dtype).unsqueeze(-1) * S
        cur = new
    return (torch.cat(outs, dim=1) if outs else v.new_zeros(B, 0, D)), S


def fwl_slow_pass(h, targets, params: FWLParams, unembed_weight, unembed_bias=None, eps: float = 1e-5,
                  residual: bool = False, grad_scale: float = 1.0):
    """Slow forward and analytic per-token backward of ``grad_scale · Σ_s ℓ_s`` (differentiable).

    Returns a dict of keys and values, all (B, N, ·): ``r`` (4s) and ``n`` (s) the slow
    inputs of W2 and of the LayerNorm affine; ``g_c`` (4s), ``g_a`` (s), ``g_u`` (s) the
    gradients at c, a and u. Tokens whose target is ``-100`` get zero gradients.
    """
    c = F.linear(h, params.w1, params.b1)
    r = F.relu(c).square()
    a = F.linear(r, params.w2, params.b2)
    n, rstd = _layer_norm(a, eps)
    u = n * params.ln_weight + params.ln_bias
    logits = F.linear(h + u if residual else u, unembed_weight, unembed_bias)
    valid = targets != IGNORE
    half = logits.dtype in (torch.float16, torch.bfloat16)  # softmax in float32 for half inputs
    g_logits = torch.softmax(logits.float() if half else logits, -1).to(logits.dtype)
    g_logits = g_logits - F.one_hot(targets.clamp_min(0), logits.shape[-1]).to(logits.dtype)
    g_logits = g_logits * (valid.unsqueeze(-1).to(logits.dtype) * grad_scale)
    g_u = g_logits @ unembed_weight
    g_n = g_u * params.ln_weight
    g_a = rstd * (g_n - g_n.mean(-1, keepdim=True) - n * (g_n * n).mean(-1, keepdim=True))
    g_c = (g_a @ params.w2) * 2 * F.relu(c)
    return {"r": r, "n": n, "g_c": g_c, "g_a": g_a, "g_u": g_u}


def fwl_chunked(
    h: torch.Tensor,
    targets: torch.Tensor,
    params: FWLParams,
    step_sizes: torch.Tensor,
    unembed_weight: torch.Tensor,
    unembed_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    state: FWLState | None = None,
    block_size: int = 256,
    residual: bool = False,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, FWLState]:
    """Parallel FWL: one slow pass, then the fast pass as causal linear attention.

    Same arguments and results as :func:`fwl_reference`; ``block_size`` is the chunk of
    :func:`causal_linear_attention`. Cost beyond the plain block: one more unembedding
    (slow logits), its backward product ``g_logits E``, and the linear attention.
    """
    B, N = _check(h, targets, params, step_sizes, unembed_weight, unembed_bias, state, residual, grad_scale)
    starts = _starts(B, N, cu_seqlens, position_ids, state is not None, h.device)
    doc = torch.cumsum(starts.long(), dim=1)
    slow = fwl_slow_pass(h, targets, params, unembed_weight, unembed_bias, eps, residual, grad_scale)
    st = state if state is not None else FWLState(*(None,) * len(FAST_TENSORS))

    def attend(q, k, v, s0):
        return causal_linear_attention(q, k, v, doc, s0, block_size)

    def accumulate(v, s0):
        return causal_sum(v, doc, s0, block_size)

    eta = step_sizes.to(h.dtype)
    aw1, s_w1 = attend(h, h, slow["g_c"], st.w1)
    ab1, s_b1 = accumulate(slow["g_c"], st.b1)
    c = F.linear(h, params.w1, params.b1) - eta[0] * aw1 - eta[1] * ab1
    r = F.relu(c).square()
    aw2, s_w2 = attend(r, slow["r"], slow["g_a"], st.w2)
    ab2, s_b2 = accumulate(slow["g_a"], st.b2)
    a = F.linear(r, params.w2, params.b2) - eta[2] * aw2 - eta[3] * ab2
    n = _layer_norm(a, eps)[0]
    ag, s_g = accumulate(slow["g_u"] * slow["n"], st.ln_weight)
    ab, s_b = accumulate(slow["g_u"], st.ln_bias)
    u = (params.ln_weight - eta[4] * ag) * n + params.ln_bias - eta[5] * ab
    logits = F.linear(h + u if residual else u, unembed_weight, unembed_bias)
    return logits, FWLState(s_w1, s_b1, s_w2, s_b2, s_g, s_b)


def fwl(*args, impl: str = "chunked", **kwargs) -> tuple[torch.Tensor, FWLState]:
    """Dispatch to :func:`fwl_chunked` (``impl="chunked"``) or :func:`fwl_reference`."""
    if impl == "chunked":
        return fwl_chunked(*args, **kwargs)
    if impl == "reference":
        return fwl_reference(*args, **kwargs)
    raise ValueError(f"impl must be 'chunked' or 'reference', got {impl!r}")
