"""LaCT, large-chunk test-time training: the functional op (SPEC §2, docs/lact.md).

Per fast-weight head, a SwiGLU fast network with three matrices

    f_W(x) = W2 [SiLU(W1 x) * (W3 x)]       W1, W3 (Dh, D), W2 (D, Dh)

is trained while the model reads, one chunk of ``C`` tokens at a time. For chunk ``i`` with
keys ``k_t``, values ``v_t`` and per-token learning rates ``η_t = (η1_t, η2_t, η3_t)``:

    g_m = ∇_{W_m} ( -Σ_t η_{m,t} f_W(k_t)ᵀ v_t )        one gradient per matrix m = 1, 2, 3
    M_m ← β̄ M_m + g_m                                   β̄ = mean of β_t over the chunk
    U_m = g_m (gd) | M_m (momentum) | NS5(M_m) (muon)
    W_m ← RowNorm(W_m − U_m)                            rows rescaled to their initial norms

``NS5`` is Newton–Schulz orthogonalisation: ``X = M/‖M‖_F``, then five steps of
``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` and (a, b, c) = (3.4445, −4.7750, 2.0315). Rows are
those of the stored matrices (one per output unit): each row is renormalised to the norm of
the same row of the initial weights.

Order ``"apply_update"`` (default, causal) reads chunk i with the weights before its own
update: ``o_t = f_W(q_t)``. ``"update_apply"`` reads it with the updated weights; it sees the
whole chunk and is therefore not causal inside a chunk, and cannot be used for decoding.

Chunks are aligned to document starts. A document start resets the weights to their initial
values and the momentum to zero. A chunk that is cut short by the end of its document never
updates the state (nothing later in the document reads it); the partial last chunk of a
sequence is returned as a buffer in the final state, so that streaming, one piece at a time,
gives exactly the full forward pass. Document boundaries come as ``cu_seqlens`` (K+1,) over a
single row (B must be 1) or as ``position_ids`` (B, N) restarting at 0 at each document start.

Two implementations compute the same function:

* :func:`lact_reference`: plain loops over rows, heads, documents and chunks, in float32
  (float64 for float64 inputs). It uses the hand-derived gradients of
  :func:`lact_inner_grads`, which a test checks against autograd.
* :func:`lact_chunked`: the training form. Tokens are laid out on a (chunk, slot) grid per row,
  then one loop over chunks runs batched over batch and heads. Matmuls run in the input dtype
  (bf16 in training), the state (weights, momentum) stays float32. Any chunk length up to
  the sequence length. Outer gradients come from autograd; it can carry a :class:`LaCTState`.
  Rows without a document start after token 0, with no state in or out (the usual training
  call), take a fast path: chunks are plain slices, the three matrices are one stacked state
  when they are square (D = Dh = D2; else W1 and W3 are stacked) so that their gradients,
  momentum, Newton-Schulz and row norms run once for all three, the chunks' reads leave the
  sequential loop (one batched product over up to 16 chunks), and the per-chunk update
  (:func:`_contiguous_step`) is compiled with ``torch.compile`` on CUDA unless
  ``compile=False`` or ``FASTWEIGHTS_LACT_COMPILE=0`` (when gradients are taken, the whole
  chunk loop is compiled instead: ``compile_scope``). Rows of packed documents (the trainer's
  rows) take the same loop, compiled and graphed alike: only the chunks whose update is read
  (with apply-then-update, all but each document's last) are laid out on lanes of update slots
  (:class:`LaCTLanes`), the state reset where a document starts, and each document's first chunk
  is read with the initial weights outside the loop; only carried state (streaming, decoding)
  takes the general grid loop.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from fastweights.errors import check_float_tensors, check_positive_int
from fastweights.ops.inplace_ttt import doc_starts
from fastweights.ops.inplace_ttt_triton import on_device
from fastweights.ops.rows import move_rows

__all__ = [
    "NS_COEFFS",
    "ORDERS",
    "UPDATES",
    "LaCTLanes",
    "LaCTState",
    "LoopGraphs",
    "lact",
    "lact_chunked",
    "lact_inner_grads",
    "lact_lanes",
    "lact_reference",
    "newton_schulz5",
    "swiglu_fast",
]

UPDATES = ("gd", "momentum", "muon")
ORDERS = ("apply_update", "update_apply")
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-5


# --------------------------------------------------------------------------- building blocks
def swiglu_fast(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fast network on rows: ``x`` (..., L, D) -> (..., L, D2) with
    ``W2 [SiLU(W1 x) * (W3 x)]``; w1, w3 (..., Dh, D), w2 (..., D2, Dh)."""
    return (F.silu(x @ w1.mT) * (x @ w3.mT)) @ w2.mT


def lact_inner_grads(w1, w2, w3, k, v, lr):
    """Hand-derived gradients of the chunk loss, one per fast matrix.

    Args: w1, w3 (..., Dh, D); w2 (..., D2, Dh); k (..., L, D); v (..., L, D2); lr (..., L, 3).
    Returns ``(g1, g2, g3)`` shaped like the weights, with
    ``g_m = ∇_{W_m} ( -Σ_t lr[t, m] f_W(k_t)ᵀ v_t )``:

        h1 = k W1ᵀ, h3 = k W3ᵀ, a = SiLU(h1), z = a*h3, dz = -v W2
        g2 = -(η2 v)ᵀ z,  g1 = (η1 dz*h3*SiLU'(h1))ᵀ k,  g3 = (η3 dz*a)ᵀ k
    """
    h1 = k @ w1.mT
    h3 = k @ w3.mT
    sig = torch.sigmoid(h1)
    a = h1 * sig
    z = a * h3
    dz = -(v @ w2)
    dh1 = dz * h3 * (sig * (1 + h1 * (1 - sig)))
    dh3 = dz * a
    g1 = (dh1 * lr[..., 0:1]).mT @ k
    g2 = -((v * lr[..., 1:2]).mT @ z)
    g3 = (dh3 * lr[..., 2:3]).mT @ k
    return g1, g2, g3


def newton_schulz5(m: torch.Tensor, steps: int = 5, eps: float = 1e-7, *, manual_backward: bool = False
                   ) -> torch.Tensor:
    """Muon's orthogonalisation of (..., R, S) matrices: Frobenius-normalise, then ``steps``
    iterations ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, with :data:`NS_COEFFS`. Matmuls run in
    ``m.dtype``, three per iteration: ``A``, ``A²`` and ``B'X`` with ``B' = aI + bA + cA²``
    formed elementwise (in float32 at least). ``manual_backward``:
    the iterations' gradient comes from :class:`_NewtonSchulzIters` (4 matmuls per iteration
    instead of autograd's 6; same function)."""
    wide = m.shape[-2] > m.shape[-1]
    x = m.mT if wide else m
    shape = x.shape
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    x = x.reshape(-1, *shape[-2:])  # batched (P, R, S)
    x = _NewtonSchulzIters.apply(x, steps) if manual_backward else _ns_iterations(x, steps)[0]
    x = x.reshape(shape)
    return x.mT if wide else x


def _ns_iterations(x: torch.Tensor, steps: int):
    """``steps`` Newton-Schulz iterations on (P, R, S) ``x``; returns (x, [(X, A, B') per step]).

    ``X' = B'X`` with ``B' = aI + bA + cA²``: the ``aX`` term rides in ``B'``, whose elementwise
    sum torch.compile fuses into one kernel. (``baddbmm`` with ``beta`` copies its input first:
    dropping those copies made the H100 benchmark's Muon loop 6.7 % faster, docs/benchmarks.md.)"""
    a, b, c = NS_COEFFS
    acc = torch.promote_types(x.dtype, torch.float32)
    eye_a = a * torch.eye(x.shape[-2], dtype=acc, device=x.device)
    saved = []
    for _ in range(steps):
        A = torch.bmm(x, x.mT)
        B = (eye_a + b * A.to(acc) + c * torch.bmm(A, A).to(acc)).to(x.dtype)
        saved.append((x, A, B))
        x = torch.bmm(B, x)
    return x, saved


class _NewtonSchulzIters(torch.autograd.Function):
    """The Newton-Schulz iterations with a hand-derived backward (docs/lact.md). Per iteration,
    with ``X' = B'X``, ``B' = aI + bA + cA²``, ``A = XXᵀ`` (A, B' symmetric) and ``G = ∂L/∂X'``:

        dB = G Xᵀ,   S = dB + dBᵀ,   T = S A,   P = bS + c(T + Tᵀ),   ∂L/∂X = B'G + PX

    (``dA + dAᵀ = bS + c(SA + AS)`` and ``AS = (SA)ᵀ``): four matmuls where autograd uses six."""

    @staticmethod
    def forward(ctx, x, steps: int):
        y, saved = _ns_iterations(x, steps)
        ctx.save_for_backward(*(t for step in saved for t in step))
        return y

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        return _ns_backward(g, [saved[i:i + 3] for i in range(0, len(saved), 3)]), None


def _ns_backward(g: torch.Tensor, saved) -> torch.Tensor:
    """∂L/∂X of the iterations from ``g`` = ∂L/∂Y and their saved [(X, A, B') per step]
    (:class:`_NewtonSchulzIters`'s formulas)."""
    _, b, c = NS_COEFFS
    for x, A, B in reversed(saved):
        dB = torch.bmm(g, x.mT)
        S = dB + dB.mT
        T = torch.bmm(S, A)
        P = b * S + c * (T + T.mT)
        g = torch.baddbmm(torch.bmm(B, g), P, x)
    return g


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.norm(dim=-1, keepdim=True)


def _step(ws, ms, grads, beta_bar, update, norms0, mm_dtype):
    """One update of the three fast matrices. ws, ms, grads: tuples of (..., R, S) float
    tensors (ms None for gd); beta_bar broadcastable to (..., 1, 1) or None; returns (ws, ms)."""
    new_w, new_m = [], []
    for i, (w, g) in enumerate(zip(ws, grads, strict=True)):
        if update == "gd":
            u, m = g, None
        else:
            m = g if (ms is None or beta_bar is None) else beta_bar * ms[i] + g
            u = m if update == "momentum" else newton_schulz5(m.to(mm_dtype)).to(w.dtype)
        w = w - u
        new_w.append(w / (_row_norms(w) + NORM_EPS) * norms0[i])
        new_m.append(m)
    return tuple(new_w), (None if update == "gd" else tuple(new_m))


def _check(q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order):
    check_float_tensors(q=q, k=k, v=v, lr=lr, beta=beta, w1=w1, w2=w2, w3=w3)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, N, D = q.shape
    if N < 1:
        raise ValueError("LaCT needs at least one token (N >= 1)")
    if w1.dim() != 3 or w1.shape[0] != H or w1.shape[2] != D or w3.shape != w1.shape:
        raise ValueError(
            f"w1 and w3 must be (H, Dh, D) with H={H}, D={D}, got {tuple(w1.shape)}, {tuple(w3.shape)}"
        )
    Dh = w1.shape[1]
    if w2.dim() != 3 or w2.shape[0] != H or w2.shape[2] != Dh:
        raise ValueError(f"w2 must be (H, D2, Dh) with H={H}, Dh={Dh}, got {tuple(w2.shape)}")
    if v.shape != (B, H, N, w2.shape[1]):
        raise ValueError(f"v must be (B, H, N, D2) = {(B, H, N, w2.shape[1])}, got {tuple(v.shape)}")
    if lr.shape != (B, H, N, 3):
        raise ValueError(f"lr must be (B, H, N, 3) = {(B, H, N, 3)}, got {tuple(lr.shape)}")
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if update == "momentum" and beta is None:
        raise ValueError("update='momentum' needs beta (B, H, N)")
    if beta is not None and beta.shape != (B, H, N):
        raise ValueError(f"beta must be (B, H, N) = {(B, H, N)}, got {tuple(beta.shape)}")
    check_positive_int("chunk_size", chunk_size)
    return B, H, N, D


# --------------------------------------------------------------------------- reference
def lact_reference(
    q, k, v, lr, beta, w1, w2, w3, *, chunk_size: int, update: str = "gd", order: str = "apply_update",
    cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequential LaCT: for each row and head, documents in order, chunks in order.

    Args: q, k (B, H, N, D); v (B, H, N, D2); lr (B, H, N, 3) learning rates (η1, η2, η3);
    beta (B, H, N) momentum coefficients or None; w1, w3 (H, Dh, D), w2 (H, D2, Dh) initial
    fast weights. Returns o (B, H, N, D2) in q's dtype.
    """
    B, H, N, _ = _check(q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order)
    starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=q.device)
    if B == 0 or H == 0:  # no rows or no heads: an empty output
        return q.new_zeros(B, H, N, v.shape[-1])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = []
    for b in range(B):
        bounds = [n for n in range(N) if starts[b, n]] + [N]
        chunks = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            chunks += [(c, min(c + chunk_size, hi), c == lo) for c in range(lo, hi, chunk_size)]
        heads = []
        for h in range(H):
            init = tuple(w[h].to(acc) for w in (w1, w2, w3))
            norms0 = tuple(_row_norms(w) for w in init)
            outs = []
            for lo, hi, first in chunks:
                if first:
                    ws, ms = init, (None if update == "gd" else tuple(torch.zeros_like(w) for w in init))
                qc, kc, vc, lc = (t[b, h, lo:hi].to(acc) for t in (q, k, v, lr))
                beta_bar = None if beta is None else beta[b, h, lo:hi].to(acc).mean()
                grads = lact_inner_grads(*ws, kc, vc, lc)
                new_ws, new_ms = _step(ws, ms, grads, beta_bar, update, norms0, acc)
                outs.append(swiglu_fast(*(ws if order == "apply_update" else new_ws), qc))
                if hi - lo == chunk_size:
                    ws, ms = new_ws, new_ms
            heads.append(torch.cat(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows).to(q.dtype)


# --------------------------------------------------------------------------- state
@dataclass
class LaCTState:
    """Streaming state of one LaCT op, batch ``B``, heads ``H``, chunk ``C``.

    w1, w2, w3: (B, H, ., .) float32 fast weights after the last complete chunk;
    m1, m2, m3: the momentum, same shapes (None for ``gd``);
    buf_k (B, H, C, D), buf_v (B, H, C, D2), buf_lr (B, H, C, 3), buf_beta (B, H, C) or None:
    the tokens of the open (partial) chunk, the first ``buf_len`` (B,) slots of each row valid.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    m1: torch.Tensor | None
    m2: torch.Tensor | None
    m3: torch.Tensor | None
    buf_k: torch.Tensor
    buf_v: torch.Tensor
    buf_lr: torch.Tensor
    buf_beta: torch.Tensor | None
    buf_len: torch.Tensor
    update: str = ""  # the rule that made it ("" in states made before it was recorded)

    def select(self, index: torch.Tensor) -> LaCTState:
        """The state of rows ``index`` (for beam search and batch reordering)."""
        return LaCTState(**{
            f.name: t.index_select(0, index) if torch.is_tensor(t := getattr(self, f.name)) else t
            for f in fields(self)
        })


def _check_state(state: LaCTState, B: int, H: int, C: int, update: str, widths: tuple[int, int, int]) -> None:
    """Raise unless ``state`` is a :class:`LaCTState` made by a call with this batch, heads,
    chunk, update and head widths ``(D, Dh, D2)`` (q, k (.., D), w1 (H, Dh, D), v (.., D2))."""
    if not isinstance(state, LaCTState):
        raise ValueError(f"state must be a LaCTState (from output_final_state=True) or None, "
                         f"got {type(state).__name__}")
    got = (state.buf_k.shape[0], state.buf_k.shape[1], state.buf_k.shape[2])
    if got != (B, H, C):
        raise ValueError(f"the state holds (batch, heads, chunk_size) = {got}, this call has {(B, H, C)}")
    D, Dh, D2 = widths
    held = (state.buf_k.shape[-1], state.w1.shape[-2], state.buf_v.shape[-1])
    if held != widths or state.w1.shape[-1] != D or state.w2.shape[-2:] != (D2, Dh):
        raise ValueError(f"the state holds head widths (D, Dh, D2) = {held}, this call has {widths} "
                         f"(q, k (..., D), w1 (H, Dh, D), v (..., D2))")
    if (state.m1 is None) != (update == "gd") or state.update not in ("", update):
        made = state.update or ("gd" if state.m1 is None else "momentum or muon")
        raise ValueError(f"the state was made with update={made!r}, this call has update={update!r}")


# --------------------------------------------------------------------------- fast path
# The common training case (no carried state, no document start after token 0) needs no grid:
# chunks are contiguous slices. The state is held stacked so that each kernel serves all three
# matrices: when they are all square (D = Dh = D2, the LaCT layer's case) as one (3, D, D) tensor
# [W1, W3, W2] per head, whose three gradients come from one batched product and whose
# Newton-Schulz, momentum and row norms run once; otherwise as [W1; W3] (2Dh, D) and W2. The
# per-chunk step is one function that torch.compile can fuse.
def _contiguous_step(ws, ams, ms, norms, k, v, lr, beta_bar, update: str):
    """One chunk's update on the contiguous fast path (the chunk's read is deferred: see
    :func:`_read_chunks`).

    ws: the float state, ``(w,)`` with w (B, H, 3, D, D) = [W1, W3, W2] when D = Dh = D2, else
    ``(w13, w2)`` with w13 (B, H, 2Dh, D) = [W1; W3] and w2 (B, H, D2, Dh); ams: the same in the
    matmul dtype (cast once per state by the loop, which also reads with them); ms: the momentum,
    shaped like ws (None: zero, or not kept); norms: the initial row norms, (H, ..., 1) per tensor
    of ws; k (B, H, L, D), v (B, H, L, D2), lr (B, H, L, 3) in the matmul dtype; beta_bar (B, H)
    or None. Returns the updated (ws, ms).
    """
    mm = k.dtype
    a13, a2 = _read_weights(ams)
    Dh = a2.shape[-1]
    h = k @ a13.mT  # (B, H, L, 2Dh): [h1, h3]
    h1, h3 = h[..., :Dh], h[..., Dh:]
    sig = torch.sigmoid(h1)
    a = h1 * sig
    dz = -(v @ a2)
    e1 = dz * h3 * (sig * (1 + h1 * (1 - sig))) * lr[..., 0:1]
    e3 = dz * a * lr[..., 2:3]
    ev = -(v * lr[..., 1:2])
    if len(ws) == 1:  # g1 = e1ᵀk, g3 = e3ᵀk, g2 = evᵀz: one product of three (L, D) pairs
        gs = ((torch.stack([e1, e3, ev], 2).mT @ torch.stack([k, k, a * h3], 2)).to(ws[0].dtype),)
    else:
        gs = ((torch.cat([e1, e3], -1).mT @ k).to(ws[0].dtype), (ev.mT @ (a * h3)).to(ws[1].dtype))
    if update == "gd":
        us = gs
    else:
        if beta_bar is not None:
            bb = tuple(beta_bar.view(*beta_bar.shape, *[1] * (g.dim() - 2)) for g in gs)
            if ms is not None:
                gs = tuple(b * m + g for b, m, g in zip(bb, ms, gs, strict=True))
            ms = gs  # without beta there is no momentum to keep
        us = gs if update == "momentum" else _ns_stacked(gs, mm)
    ws = tuple(w - u for w, u in zip(ws, us, strict=True))
    ws = tuple(w / (_row_norms(w) + NORM_EPS) * n for w, n in zip(ws, norms, strict=True))
    return ws, ms


def _read_weights(ams):
    """(a13 (..., 2Dh, D), a2 (..., D2, Dh)) from the fast path's stacked weights (views); ``ams``
    as ``ws`` in :func:`_contiguous_step`, with any leading dimensions."""
    if len(ams) == 1:
        return ams[0][..., :2, :, :].flatten(-3, -2), ams[0][..., 2, :, :]
    return ams


def _ns_stacked(gs, mm):
    """Newton-Schulz of the fast path's stacked updates (``gs`` as ``ws`` in
    :func:`_contiguous_step`): one batched chain for [W1, W3, W2], else one for W1 and W3 and
    one for W2."""
    if len(gs) == 1:
        return (newton_schulz5(gs[0].to(mm), manual_backward=True).to(gs[0].dtype),)
    g13, g2 = gs
    B, H, R, S = g13.shape
    y13 = newton_schulz5(g13.to(mm).view(B, H, 2, R // 2, S), manual_backward=True)
    y2 = newton_schulz5(g2.to(mm), manual_backward=True)
    return y13.reshape(B, H, R, S).to(g13.dtype), y2.to(g2.dtype)


# Chunks read in one batched product on the fast path (a bound on the weights kept for it).
READ_GROUP = 16


def _read_chunks(q, a13, a2, chunk_size: int):
    """The reads ``f_W(q_t)`` of ``g`` consecutive chunks at once.

    q (B, H, L, D) holds their tokens (L ≤ g·C, only the last chunk may be short); a13
    (B, H, g, 2Dh, D) and a2 (B, H, g, D2, Dh) the weights each chunk reads, in the matmul dtype.
    Returns o (B, H, L, D2). The read of a chunk depends on nothing but its weights, so it
    leaves the sequential chain of updates: one product over g chunks instead of g small ones.
    """
    B, H, L, D = q.shape
    g, C = a13.shape[2], chunk_size
    x = F.pad(q, (0, 0, 0, g * C - L)) if g * C > L else q  # zero rows read 0; sliced off below
    Dh = a2.shape[-1]
    h = x.unflatten(2, (g, C)) @ a13.mT  # (B, H, g, C, 2Dh)
    o = (F.silu(h[..., :Dh]) * h[..., Dh:]) @ a2.mT
    return o.flatten(2, 3)[:, :, :L]


_COMPILED: dict[tuple[str, str], object] = {}
COMPILE_ENV = "FASTWEIGHTS_LACT_COMPILE"
SCOPE_ENV = "FASTWEIGHTS_LACT_COMPILE_SCOPE"
SCOPES = ("step", "loop")


def _compiled(fn, scope: str, compile_mode: str):
    """``fn`` compiled with torch.compile in ``compile_mode``, once per (scope, mode). Its calls run
    with dynamo's recompile limit at 64 at least (one graph per update, order, shapes and dtype:
    several layers' configurations); the process's own setting stays as it is outside them."""
    key = (scope, compile_mode)
    if key not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        kw = {} if compile_mode == "default" else {"mode": compile_mode}
        compiled = torch.compile(fn, dynamic=False, fullgraph=True, **kw)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced inside another compiled region: no config change
                return compiled(*args, **kwargs)
            with dynamo_config.patch(**{limit: max(getattr(dynamo_config, limit), 64)}):
                return compiled(*args, **kwargs)

        _COMPILED[key] = call
    return _COMPILED[key]


def _resolve_compile(compile, device) -> str | None:
    """``compile``: None (read :data:`COMPILE_ENV`, default ``auto``), ``auto`` (compile on CUDA),
    True/False, or a torch.compile mode name. Returns the mode to use or None for eager."""
    source = "compile"
    if compile is None:
        compile, source = os.environ.get(COMPILE_ENV, "auto"), COMPILE_ENV
    if compile in ("0", "off", "false", "eager"):
        compile = False
    elif compile in ("1", "on", "true"):
        compile = True
    if compile == "auto":
        compile = device.type == "cuda" and not torch.compiler.is_compiling()
    if compile is False:
        return None
    if compile is True:
        return "default"
    if compile == "graphs":  # CUDA graphs of the compiled loop, captured per call site: CUDA only
        return "graphs" if device.type == "cuda" else None
    if compile in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        return compile
    raise ValueError(f"{source} must be None, 'auto', a bool, 'graphs' or a torch.compile mode, got {compile!r}")


def _resolve_scope(scope, training: bool = False) -> str:
    """``scope``: None (read :data:`SCOPE_ENV`, default ``auto``), ``auto`` (``loop`` when
    ``training``, else ``step``), ``step`` (compile the chunk step, one graph called once per
    chunk: a new sequence length recompiles at most the last chunk's step) or ``loop`` (compile
    the whole chunk loop: one graph forward and one backward, the chunks unrolled; 21% less time
    per training step on the H100 benchmark, but each new sequence length compiles it anew)."""
    source = "compile scope" if scope is not None else SCOPE_ENV
    scope = os.environ.get(SCOPE_ENV, "auto") if scope is None else scope
    if scope == "auto":
        scope = "loop" if training else "step"
    if scope not in SCOPES:
        raise ValueError(f"{source} must be one of {SCOPES} or 'auto', got {scope!r}")
    return scope


def _initial_state(w1, w2, w3, D: int, acc):
    """The fast path's initial state (see :func:`_contiguous_step`) and its row norms."""
    if w1.shape[-2] == D and w2.shape[-2] == D:  # D = Dh = D2: one (3, D, D) tensor per head
        init = (torch.stack([w1, w3, w2], 1).to(acc),)
    else:
        init = (torch.cat([w1, w3], 1).to(acc), w2.to(acc))
    return init, tuple(_row_norms(w) for w in init)


def _contiguous_loop(q, k, v, lr, beta, w1, w2, w3, chunk_size: int, update: str, order: str,
                     step=_contiguous_step, resets=None, beta_bars=None):
    """LaCT over rows that are single documents (or lanes of them), no carried state: o (B, H, N, D2).
    ``step``: the chunk update (:func:`_contiguous_step`, or its compiled form). The loop runs
    only the updates; the reads go batched to :func:`_read_chunks`, up to :data:`READ_GROUP`
    chunks at once.

    Packed documents come laid out on lanes (:class:`LaCTLanes`, with ``order="update_apply"``:
    chunk j of q reads the weights after update j): ``resets`` (B, G) bool marks the chunks
    that start a document, where a row returns to the initial state (and zero momentum);
    ``beta_bars`` (B, H, G) gives each chunk's mean β over its tokens (else the mean of ``beta``
    over the chunk)."""
    B, H, N, D = q.shape
    mm = q.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    init, norms = _initial_state(w1, w2, w3, D, acc)
    ws = tuple(w.expand(B, *w.shape).contiguous() for w in init)
    ms = None  # zero momentum: the first update sets it to the gradient
    G = -(-N // chunk_size)
    # split, not per-chunk slicing: its backward is one cat, where each slice's backward would
    # write a zero-filled tensor of the whole sequence and add it to the others
    parts = [x.split(chunk_size, dim=2) for x in (k, v, lr)]
    q_groups = q.split(READ_GROUP * chunk_size, dim=2)
    betas = None if beta is None or beta_bars is not None else beta.to(acc).split(chunk_size, dim=2)
    outs, reads = [], []
    cur = tuple(w.to(mm) for w in ws)  # the current weights in the matmul dtype
    for j in range(G):
        if resets is not None and j > 0:  # rows whose document starts here: the initial state
            r = resets[:, j]
            ws = tuple(torch.where(_rows(r, w), i, w) for w, i in zip(ws, init, strict=True))
            ms = None if ms is None else tuple(m.masked_fill(_rows(r, m), 0) for m in ms)
            cur = tuple(w.to(mm) for w in ws)
        if order == "apply_update":  # chunk j reads the weights before its own update
            reads.append(_read_weights(cur))
        # apply-then-update never reads the last chunk's update
        if order == "update_apply" or j < G - 1:
            if beta_bars is not None:
                bb = beta_bars[:, :, j]
            else:
                bb = None if betas is None else betas[j].mean(-1)
            kj, vj, lj = (x[j] for x in parts)
            ws, ms = step(ws, cur, ms, norms, kj, vj, lj, bb, update)
            cur = tuple(w.to(mm) for w in ws)
        if order == "update_apply":
            reads.append(_read_weights(cur))
        if len(reads) == READ_GROUP or j == G - 1:
            a13, a2 = (torch.stack(t, 2) for t in zip(*reads, strict=True))
            outs.append(_read_chunks(q_groups[j // READ_GROUP], a13, a2, chunk_size))
            reads = []
    return torch.cat(outs, 2).to(q.dtype)


def _row_map(src: np.ndarray, dst: np.ndarray, index: np.ndarray, inverse: np.ndarray):
    """Writes a one-to-one map of rows ``src[i] -> dst[i]`` as
    :func:`fastweights.ops.rows.move_rows` takes it: ``index`` (destinations): each
    destination's source or -1; ``inverse`` (sources): each source's destination or -1."""
    index.fill(-1)
    index[dst] = src
    inverse.fill(-1)
    inverse[src] = dst


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) ``mask`` viewed to broadcast over (B, ...) ``like``."""
    return mask.view(-1, *[1] * (like.dim() - 1))


class LaCTLanes:
    """Packed documents laid out on lanes, for :func:`_contiguous_loop`.

    The loop runs only the updates that some chunk reads: with ``order="apply_update"`` every
    chunk of a document but its last (a document of one chunk updates nothing), with
    ``"update_apply"`` every chunk. Each document's update chunks take consecutive chunk slots
    of one of ``L`` lanes of ``U`` slots, first fit, longest first (documents of different rows
    share lanes: rows are independent). The loop runs the U slots in sequence, batched over the
    lanes, resetting a lane's state where a document starts. ``U`` is the most update chunks of
    one document or per row, whichever is larger, rounded up to a multiple of a quarter of
    ``ceil(N / C)`` (at least that quarter): with apply-then-update a row never needs more than
    ``ceil(N / C) - 1``, so one row of documents keeps one lane (a batch of two costs about
    twice as much per chunk on the H100: docs/benchmarks.md), and a training run meets few
    shapes (the compiled loop and its CUDA graphs are made per shape).

    Reads: the chunk that reads the weights after update slot u (the next chunk of the same
    document with apply-then-update, the same chunk with update-then-apply) lies on slot u of
    the read lanes, so that the loop reads slot u right after updating it
    (:func:`_contiguous_loop` with ``order="update_apply"``). With apply-then-update, each
    document's first chunk reads the initial weights: those tokens are read apart, outside the
    loop (:meth:`first`). Slots without a token hold zeros (no gradient); the updates of empty
    slots are never read.

    The rows move by one-to-one maps (:func:`fastweights.ops.rows.move_rows`; ``impl``: ``auto``
    is one Triton kernel each way on CUDA, torch indexing elsewhere), int32: upd_index (L·U·C,) each
    update slot's token (flat B·N order) or -1, upd_inverse (B·N,) each token's update slot or -1;
    read_index, read_inverse: the same for the tokens read after an update; first_tokens (T0,)
    the tokens read with the initial weights, first_inverse (B·N,) their places; token_index
    (B·N,) each token's read slot, or -2 - its place among the first tokens; resets (L, U) bool:
    the slots that start a document; upd_count (L, 1, U): tokens per update slot (at least 1). All
    on ``device`` (default: that of ``starts``, (B, N) bool).
    """

    def __init__(self, starts: torch.Tensor, chunk_size: int, order: str = "apply_update", device=None,
                 impl: str = "auto"):
        B, N = starts.shape
        if B * N >= 2**31:
            raise ValueError(f"lanes index tokens in int32: B·N = {B * N} must be below 2**31")
        C, G0 = chunk_size, -(-N // chunk_size)
        cut = starts.cpu().numpy().copy()
        cut[:, 0] = True
        begin = np.flatnonzero(cut)  # documents in flat token order
        length = np.diff(np.append(begin, B * N))  # every row starts one: none crosses a row's end
        shift = int(order == "apply_update")  # chunk i reads the weights after update i - shift
        updates = -(-length // C) - shift  # update chunks per document
        quarter = max(1, G0 // 4)
        need = max(-(-int(updates.sum()) // B), int(updates.max()), 1)
        U = -(-need // quarter) * quarter
        used: list[int] = []  # slots taken per lane
        lane, first = np.zeros_like(updates), np.zeros_like(updates)
        for d in np.argsort(-updates, kind="stable"):
            n = int(updates[d])
            if n == 0:
                break  # this document and the rest update nothing
            slot = next((i for i, u in enumerate(used) if u + n <= U), len(used))
            if slot == len(used):
                used.append(0)
            lane[d], first[d], used[slot] = slot, used[slot], used[slot] + n
        L = max(1, len(used))
        if L * U * C >= 2**31:
            raise ValueError(f"lanes index slots in int32: L·U·C = {L * U * C} must be below 2**31")
        dev = torch.device(starts.device if device is None else device)
        resets = np.zeros((L, U), dtype=bool)
        has = updates > 0
        resets[lane[has], first[has]] = True
        i32 = np.int32  # B·N, L·U·C < 2**31 (checked): half the bytes of int64 to build and copy
        doc = np.repeat(np.arange(len(begin), dtype=i32), length)  # each token's document
        within = np.arange(B * N, dtype=i32) - np.repeat(begin.astype(i32), length)
        chunk = within // C
        base = (lane * (U * C) + first * C).astype(i32)[doc] + (within - chunk * C)
        upd = chunk < updates.astype(i32)[doc]
        read = chunk >= shift
        upd_tok, read_tok, first_tok = np.flatnonzero(upd), np.flatnonzero(read), np.flatnonzero(~read)
        upd_slots = base[upd] + chunk[upd] * C
        count = np.bincount(upd_slots // C, minlength=L * U)
        S, T0 = L * U * C, len(first_tok)
        sizes = [S, B * N, S, B * N, T0, B * N, B * N, L * U, L * U]
        # the index maps are written straight into one (pinned) host buffer and copied in one go
        host = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=dev.type == "cuda")
        parts = np.split(host.numpy(), np.cumsum(sizes)[:-1])
        _row_map(upd_tok, upd_slots, *parts[0:2])
        _row_map(read_tok, base[read] + (chunk[read] - shift) * C, *parts[2:4])
        # the tokens read with the initial weights, in token order, and their places
        _row_map(first_tok, np.arange(T0, dtype=i32), *parts[4:6])
        # back to token order: a read slot (>= 0), or -2 - j for the j-th first token
        np.copyto(parts[6], np.where(parts[3] >= 0, parts[3], -2 - parts[5]))
        parts[7][:], parts[8][:] = resets.ravel(), np.maximum(count, 1)
        # pinned: a copy that does not wait for the device (a pageable one would)
        flat = host.to(dev, non_blocking=True).split(sizes)
        self.B, self.N, self.C, self.L, self.U, self.order = B, N, C, L, U, order
        self.device = flat[0].device  # with its index: "cuda" becomes "cuda:0"
        self.impl = impl
        (self.upd_index, self.upd_inverse, self.read_index, self.read_inverse, self.first_tokens,
         self.first_inverse, self.token_index) = flat[:7]
        self.resets = flat[7].view(L, U).bool()
        self.upd_count = flat[8].view(L, 1, U)

    def to_updates(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, N, F) -> (L, H, U·C, F): the tokens of update chunks on their slots, empty
        slots zero (written into ``out`` if given)."""
        return move_rows(x, self.upd_index, self.upd_inverse, (self.L, self.U * self.C), impl=self.impl, out=out)

    def to_reads(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, N, F) -> (L, H, U·C, F): the tokens read after an update, on its slot."""
        return move_rows(x, self.read_index, self.read_inverse, (self.L, self.U * self.C), impl=self.impl, out=out)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, F) -> (1, H, T0, F): the tokens read with the initial weights."""
        T0 = self.first_tokens.numel()
        return move_rows(x, self.first_tokens, self.first_inverse, (1, T0), impl=self.impl)

    def tokens(self, o: torch.Tensor, o_first: torch.Tensor | None) -> torch.Tensor:
        """The reads back in token order: o (L, H, U·C, F) from :meth:`to_reads`' slots and
        ``o_first`` (1, H, T0, F) from :meth:`first` (None when there are none) -> (B, H, N, F)."""
        b, inv_b = (None, None) if o_first is None else (o_first.to(o.dtype), self.first_tokens)
        return move_rows(o, self.token_index, self.read_index, (self.B, self.N), b, inv_b, impl=self.impl)

    def beta_bars(self, beta: torch.Tensor) -> torch.Tensor:
        """Each update slot's mean β over its tokens: (B, H, N) -> (L, H, U), float32 at least."""
        acc = torch.promote_types(beta.dtype, torch.float32)
        b = self.to_updates(beta.to(acc).unsqueeze(-1))[..., 0]
        return b.unflatten(2, (self.U, -1)).sum(-1) / self.upd_count


def lact_lanes(starts: torch.Tensor, chunk_size: int, order: str = "apply_update", device=None) -> LaCTLanes | None:
    """The lanes that :func:`lact_chunked` lays packed rows out on, built once to be shared by
    the calls over the same documents (``lanes=``; the layers of one forward pass). ``starts``
    (B, N) bool: where documents start (column 0 always counts as one), best on the CPU: a
    device tensor is copied to the host, which waits for the device. ``device``: where the
    lanes' index tensors go (default: that of ``starts``). None when every row is one document
    (nothing to lay out)."""
    if starts.dim() != 2 or starts.dtype != torch.bool:
        raise ValueError(f"starts must be a (B, N) bool tensor, got {tuple(starts.shape)} {starts.dtype}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_positive_int("chunk_size", chunk_size)
    with torch.profiler.record_function("fastweights::lact_lanes"):  # host work: named in profiles
        host = starts.cpu()
        if not bool(host[:, 1:].any()):
            return None
        return LaCTLanes(host, chunk_size, order, device=starts.device if device is None else device)


def _lact_contiguous(q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order, compile_mode, scope="step",
                     resets=None, beta_bars=None):
    """The fast path: :func:`_contiguous_loop` eager, with a compiled step, or compiled whole."""
    args = (q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order)
    lanes = dict(resets=resets, beta_bars=beta_bars)
    if compile_mode is None:
        return _contiguous_loop(*args, **lanes)
    if scope == "loop":
        return _compiled(_contiguous_loop, "loop", compile_mode)(*args, **lanes)
    return _contiguous_loop(*args, _compiled(_contiguous_step, "step", compile_mode), **lanes)


class LoopGraphs:
    """CUDA graphs of the fast path's compiled chunk loop for one call site (one layer).

    The forward and the backward of :func:`_contiguous_loop` (compiled whole) are captured once
    per input signature (shapes, dtypes, devices, which inputs need gradients, autocast, chunk,
    update, order) and replayed, so the host no longer launches the loop's ~800 kernels per
    layer one by one. Opt in with ``compile="graphs"`` (or ``FASTWEIGHTS_LACT_COMPILE=graphs``);
    the LaCT layer owns one. Costs and rules: each capture keeps its activations in its own
    memory pool while it is kept; a new forward of a signature overwrites the saved tensors of the
    previous one, so the backward of an earlier forward raises (it never returns wrong
    gradients); inputs are copied into the capture's buffers and outputs and gradients are
    returned as fresh tensors (safe to keep and to accumulate). At most ``max_captures``
    signatures are kept (least recently used dropped first; a pending backward keeps its own).

    ``reuse_outputs=True`` skips the copies out (the output and each input's gradient, one
    (B, H, N, D) tensor each, about 67 µs apiece on the H100 benchmark): the output is then the
    capture's own buffer, overwritten by the next forward of its signature, and the gradients of
    inputs that are not leaves are the capture's buffers, overwritten by the next backward. Only
    for a caller that consumes both at once, as the LaCT layer does (its merge and its glue);
    leaves' gradients (the fast weights' parameters) are still returned as copies. The copies in
    can go too: :meth:`input_buffers` gives the capture's buffers for q, k, v, for the caller's
    producer to write into (``fastweights.ops.lact_glue.fast_inputs(out=...)``); an input that
    already lies in its buffer is not copied.
    """

    def __init__(self, max_captures: int = 4, reuse_outputs: bool = False):
        if max_captures < 1:
            raise ValueError(f"max_captures must be >= 1, got {max_captures}")
        self.max_captures = max_captures
        self.reuse_outputs = bool(reuse_outputs)
        self._entries: OrderedDict = OrderedDict()

    def __deepcopy__(self, memo):  # captures are not copied: a copy captures its own
        return LoopGraphs(self.max_captures, self.reuse_outputs)

    def __getstate__(self):
        return {"max_captures": self.max_captures, "reuse_outputs": self.reuse_outputs}

    def __setstate__(self, state):
        self.__init__(**state)

    def input_buffers(self, shape, dtype, device) -> tuple[torch.Tensor, ...] | None:
        """The q, k, v input buffers of the most recently used capture whose q, k and v are
        ``shape`` (B, H, N, D) tensors of ``dtype`` on ``device`` (new tensor objects on the
        buffers' memory), or None. The caller will write into them, which changes the inputs of
        that capture's pending backward, if any: that backward now raises, as after a new forward."""
        want = (torch.Size(shape), dtype, torch.device(device))
        for entry in reversed(self._entries.values()):
            qkv = entry.static[:3]
            if all((t.shape, t.dtype, t.device) == want for t in qkv):
                entry.calls += 1
                with torch.no_grad():
                    return tuple(_alias(t.detach()) for t in qkv)
        return None

    def __call__(self, q, k, v, lr, beta, w1, w2, w3, chunk_size: int, update: str, order: str,
                 resets=None, beta_bars=None):
        if q.device.type != "cuda":
            raise ValueError(f"LoopGraphs needs CUDA tensors, got device {q.device}")
        given = (beta, resets, beta_bars)
        inputs = tuple(t for t in (q, k, v, lr, beta, w1, w2, w3, resets, beta_bars) if t is not None)
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        key = (chunk_size, update, order, tuple(t is None for t in given), autocast,
               tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in inputs))
        with on_device(q):  # capture and replay on the inputs' GPU, current or not
            if key in self._entries:
                self._entries.move_to_end(key)
            else:
                while len(self._entries) >= self.max_captures:
                    self._entries.popitem(last=False)
                self._entries[key] = _GraphEntry(_loop_fn(chunk_size, update, order, given), inputs)
            return _GraphedLoop.apply(self._entries[key], self.reuse_outputs, *inputs)


def _loop_fn(chunk_size, update, order, given):
    """The compiled loop on the inputs present: q, k, v, lr, [beta], w1, w2, w3, [resets],
    [beta_bars], those in brackets where ``given`` (beta, resets, beta_bars) is not None."""
    loop = _compiled(_contiguous_loop, "loop", "default")
    present = [t is not None for t in given]

    def fn(*t):
        it = iter(t)
        q, k, v, lr = next(it), next(it), next(it), next(it)
        beta = next(it) if present[0] else None
        w1, w2, w3 = next(it), next(it), next(it)
        resets = next(it) if present[1] else None
        beta_bars = next(it) if present[2] else None
        return loop(q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order, resets=resets, beta_bars=beta_bars)

    return fn


class _GraphEntry:
    """One captured forward/backward pair (see :class:`LoopGraphs`)."""

    def __init__(self, fn, inputs, warmup: int = 3):
        self.static = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        self.needs = [i for i, t in enumerate(self.static) if t.requires_grad]
        wrt = [self.static[i] for i in self.needs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.enable_grad(), torch.cuda.stream(side):  # compile and settle the allocator
            for _ in range(warmup):
                out = fn(*self.static)
                torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        del out
        pool = torch.cuda.graph_pool_handle()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(self.fwd, pool=pool):
            self.out = fn(*self.static)
        self.gout = torch.empty_like(self.out)
        with torch.cuda.graph(self.bwd, pool=pool):
            self.gin = torch.autograd.grad(self.out, wrt, self.gout, allow_unused=True)
        self.out = self.out.detach()
        self.calls = 0


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A new tensor object on ``t``'s memory (not a view: autograd gives it its own history)."""
    return t.new_empty(0).set_(t)


class _GraphedLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry, reuse: bool, *inputs):
        for buf, t in zip(entry.static, inputs, strict=True):
            if t.data_ptr() != buf.data_ptr() or t.stride() != buf.stride():  # not already in place
                buf.detach().copy_(t)
        entry.fwd.replay()
        entry.calls += 1
        ctx.entry, ctx.call, ctx.n = entry, entry.calls, len(inputs)
        # gradients of leaves (parameters) may reach the caller as they are: always copies
        ctx.reuse = [reuse and not t.is_leaf for t in inputs]
        return _alias(entry.out) if reuse else entry.out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        entry = ctx.entry
        if ctx.call != entry.calls:
            raise RuntimeError("LaCT CUDA graphs: this forward's saved tensors were overwritten by a later forward "
                               "of the same layer and shapes before its backward ran; run backward before the next "
                               "forward, or use compile='default'")
        entry.gout.copy_(g)
        entry.bwd.replay()
        grads = [None] * ctx.n
        for i, gi in zip(entry.needs, entry.gin, strict=True):
            grads[i] = None if gi is None else (gi if ctx.reuse[i] else gi.clone())
        return (None, None, *grads)


# --------------------------------------------------------------------------- training form
def _grid(starts_f, cont, buf_len, chunk_size):
    """Slot layout: per token its flat grid slot (B, N); per slot its source index (B, S)
    into [buffer (C if a state is given), tokens (N), pad (1)]; G chunks per row."""
    B, N = starts_f.shape
    dev = starts_f.device
    ar = torch.arange(N, device=dev).expand(B, N)
    start_pos = torch.cummax(torch.where(starts_f, ar, torch.zeros_like(ar)), dim=1).values
    held = torch.zeros(B, dtype=torch.long, device=dev) if buf_len is None else buf_len * cont
    offset = torch.where(start_pos == 0, held.unsqueeze(1), torch.zeros_like(ar))
    in_doc = ar - start_pos + offset
    new_chunk = starts_f | (in_doc % chunk_size == 0)
    g = torch.cumsum(new_chunk.long(), dim=1) - 1
    flat = g * chunk_size + in_doc % chunk_size
    G = int(g.max()) + 1
    S = G * chunk_size
    nbuf = chunk_size if buf_len is not None else 0
    pad = nbuf + N
    inv = torch.full((B, S), pad, dtype=torch.long, device=dev)
    inv.scatter_(1, flat, ar + nbuf)
    if nbuf:
        j = torch.arange(chunk_size, device=dev)
        in_buf = j.unsqueeze(0) < held.unsqueeze(1)
        inv[:, :chunk_size] = torch.where(in_buf, j.expand(B, -1), inv[:, :chunk_size])
    reset = torch.zeros(B, G, dtype=torch.bool, device=dev)
    is_reset = starts_f.clone()
    is_reset[:, 0] &= ~cont
    bi, ni = is_reset.nonzero(as_tuple=True)
    reset[bi, g[bi, ni]] = True
    valid = inv != pad
    return flat, inv, valid, reset, G, g[:, -1]


# The general loop skips the update of a chunk column that no row completes (apply-then-update:
# nothing reads it). False runs every update and discards the unused ones (the old path; tests).
SKIP_OPEN_CHUNK_UPDATES = True


def lact_chunked(
    q, k, v, lr, beta, w1, w2, w3, *, chunk_size: int, update: str = "gd", order: str = "apply_update",
    cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    state: LaCTState | None = None, output_final_state: bool = False, compile=None, compile_scope=None,
    graphs: LoopGraphs | None = None, lanes: LaCTLanes | None = None,
):
    """LaCT training form; same arguments as :func:`lact_reference`, plus streaming.

    ``state``: a :class:`LaCTState` to continue from. Row b continues it unless
    ``position_ids[b, 0] == 0`` (a new document). ``output_final_state``: also return the
    state after the last token. ``compile``: how the fast path (one document per row, no state
    in or out) runs its per-chunk step: None reads ``FASTWEIGHTS_LACT_COMPILE`` (default
    ``auto``: torch.compile on CUDA, eager elsewhere); True/False; or a torch.compile mode such
    as ``"reduce-overhead"``; or ``"graphs"``: when gradients are taken on CUDA, the compiled
    loop replayed from CUDA graphs held by ``graphs`` (a :class:`LoopGraphs`, one per call site;
    without it, or without gradients, as ``"default"``). ``compile_scope``: what is compiled,
    ``"step"`` (the chunk step), ``"loop"`` (the whole chunk loop) or ``"auto"`` (the loop when
    gradients are taken, else the step); None reads ``FASTWEIGHTS_LACT_COMPILE_SCOPE`` (default
    ``auto``). Without a state in or out, rows of packed documents take the same path, the
    chunks whose update is read laid out on lanes of update slots (:class:`LaCTLanes`; with
    apply-then-update one row never needs more than ceil(N / C) - 1 of them; a new shape of
    lanes compiles and captures anew). ``lanes``: those lanes, built once by :func:`lact_lanes`
    for every call over the same documents (without it the call copies the document starts to
    the host, which waits for the device); they replace ``cu_seqlens`` and ``position_ids`` and
    need no state in or out. ``lr`` of another dtype than q's is cast to q's (the matmul dtype:
    float32 learning rates with bf16 q, k, v read as bf16, as the reference reads them in
    float32 with float32 inputs); ``beta`` is read in float32 (float64 for float64 inputs).
    Returns o (B, H, N, D2), or ``(o, state)``.
    """
    B, H, N, D = _check(q, k, v, lr, beta, w1, w2, w3, chunk_size, update, order)
    if lr.dtype != q.dtype:  # the learning rates scale the matmuls' operands: the matmul dtype
        lr = lr.to(q.dtype)
    C = chunk_size
    dev = q.device
    streaming = state is not None or output_final_state
    if streaming and order != "apply_update":
        raise ValueError("order='update_apply' is not causal inside a chunk; it cannot stream or decode")
    if state is not None and cu_seqlens is not None:
        raise ValueError("continuing a state needs position_ids (cu_seqlens always starts a document at 0)")
    if state is not None:
        _check_state(state, B, H, C, update, (D, w1.shape[1], v.shape[-1]))
    if state is not None and (beta is None) != (state.buf_beta is None):
        raise ValueError("beta must be given iff the state was built with beta")
    if lanes is not None:
        if not isinstance(lanes, LaCTLanes):
            raise ValueError(f"lanes must be a LaCTLanes (from lact_lanes) or None, got {type(lanes).__name__}")
        if streaming:
            raise ValueError("lanes lay out a whole pass: they take no state in or out")
        if cu_seqlens is not None or position_ids is not None:
            raise ValueError("give document boundaries as lanes, or as cu_seqlens or position_ids, not both")
        built, call = (lanes.B, lanes.N, lanes.C, lanes.order), (B, N, C, order)
        if built != call:
            raise ValueError(f"lanes were built for (B, N, chunk_size, order) = {built}, this call has {call}")
        if lanes.device != dev:
            raise ValueError(f"lanes are on {lanes.device}, the inputs on {dev}")
    if not streaming:  # the fast path: no state in or out
        if H == 0:  # no heads: an empty output (lanes would lay out nothing)
            return q.new_zeros(B, 0, N, v.shape[-1])
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, lr, beta, w1, w2, w3))
        extra, loop_order, o_first = {}, order, None
        mode = _resolve_compile(compile, dev)
        if lanes is None and (cu_seqlens is not None or position_ids is not None):
            starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=dev)
            lanes = lact_lanes(starts, C, order)  # None when every row is one document
        if lanes is not None:  # packed documents: the updates laid out on lanes
            if lanes.first_tokens.numel():  # first chunks, read with the initial weights
                o_first = swiglu_fast(w1.to(q.dtype), w2.to(q.dtype), w3.to(q.dtype), lanes.first(q))
            bufs = None  # the graphed loop's q, k, v buffers: the moves write straight into them
            if mode == "graphs" and training and graphs is not None:
                bufs = graphs.input_buffers((lanes.L, H, lanes.U * C, D), q.dtype, dev)
            bufs = bufs or (None, None, None)
            q = lanes.to_reads(q, out=bufs[0])
            k, v = lanes.to_updates(k, out=bufs[1]), lanes.to_updates(v, out=bufs[2])
            lr = lanes.to_updates(lr)
            extra = dict(resets=lanes.resets, beta_bars=None if beta is None else lanes.beta_bars(beta))
            beta, loop_order = None, "update_apply"  # slot u of q reads the weights after update u
        if mode == "graphs" and training and graphs is not None:
            o = graphs(q, k, v, lr, beta, w1, w2, w3, C, update, loop_order, **extra)
        else:
            o = _lact_contiguous(q, k, v, lr, beta, w1, w2, w3, C, update, loop_order,
                                 "default" if mode == "graphs" else mode, _resolve_scope(compile_scope, training),
                                 **extra)
        return o if lanes is None else lanes.tokens(o, o_first)
    if B == 0:  # no rows: an empty output and state (the grid below needs a row)
        return _empty_rows(q, k, v, lr, beta, w1, w2, w3, C, update)
    if state is not None:
        explicit0 = torch.zeros(B, dtype=torch.bool, device=dev)
        if position_ids is not None:
            explicit0 = (position_ids.reshape(-1, N)[:, 0] == 0).expand(B).to(dev)
        cont = ~explicit0
        buf_len = state.buf_len.to(dev)
    else:
        cont = torch.zeros(B, dtype=torch.bool, device=dev)
        buf_len = None
    starts_f = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=dev)
    flat, inv, valid, reset, G, g_last = _grid(starts_f, cont, buf_len, C)

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm = q.dtype
    S = G * C

    def grid(x, buf, width):  # (B, H, N, F) -> (B, H, G, C, F)
        parts = ([buf.to(x.dtype)] if state is not None else []) + [x, x.new_zeros(B, H, 1, width)]
        src = torch.cat(parts, dim=2)
        return src.gather(2, inv.view(B, 1, S, 1).expand(B, H, S, width)).view(B, H, G, C, width)

    D2 = v.shape[-1]
    kg = grid(k, None if state is None else state.buf_k, D)
    vg = grid(v, None if state is None else state.buf_v, D2)
    lg = grid(lr, None if state is None else state.buf_lr, 3)
    bg = None if beta is None else grid(
        beta.unsqueeze(-1), None if state is None else state.buf_beta.unsqueeze(-1), 1
    )[..., 0]
    qg = torch.cat([q, q.new_zeros(B, H, 1, D)], 2)  # queries only for tokens, not the buffer
    q_inv = (inv - (C if state is not None else 0)).clamp(min=0, max=N)
    q_inv = torch.where(valid & (inv >= (C if state is not None else 0)), q_inv, torch.full_like(q_inv, N))
    qg = qg.gather(2, q_inv.view(B, 1, S, 1).expand(B, H, S, D)).view(B, H, G, C, D)
    count = valid.view(B, G, C).sum(-1).to(acc)  # (B, G)
    full = count == C

    init = tuple(w.to(acc).unsqueeze(0) for w in (w1, w2, w3))  # (1, H, ., .)
    norms0 = tuple(_row_norms(w) for w in init)
    has_m = update != "gd"
    if state is not None:
        c4 = cont.view(B, 1, 1, 1)
        prev = (state.w1, state.w2, state.w3)
        ws = tuple(torch.where(c4, s.to(acc), i) for s, i in zip(prev, init, strict=True))
        ms = None if not has_m else tuple(
            torch.where(c4, s.to(acc), torch.zeros_like(s, dtype=acc)) for s in (state.m1, state.m2, state.m3)
        )
    else:
        ws = tuple(i.expand(B, -1, -1, -1) for i in init)
        ms = None if not has_m else tuple(torch.zeros_like(w) for w in ws)

    # With apply-then-update a chunk is read with the weights before its update, and only a
    # complete chunk keeps its update: a chunk column that no row completes changes nothing, so
    # its gradients, momentum and Newton-Schulz are skipped (decoding one token into an open
    # chunk then costs no update). Which columns some row completes: one host sync per call.
    skip = SKIP_OPEN_CHUNK_UPDATES and order == "apply_update"
    completes = full.any(0).tolist() if skip else [True] * G
    outs = []
    for j in range(G):
        r = reset[:, j].view(B, 1, 1, 1)
        ws = tuple(torch.where(r, i, w) for w, i in zip(ws, init, strict=True))
        if has_m:
            ms = tuple(torch.where(r, torch.zeros_like(m), m) for m in ms)
        w_mm = tuple(w.to(mm) for w in ws)
        if not completes[j]:  # no row keeps this chunk's update: read only
            outs.append(swiglu_fast(*w_mm, qg[:, :, j]))
            continue
        grads = tuple(g.to(acc) for g in lact_inner_grads(*w_mm, kg[:, :, j], vg[:, :, j], lg[:, :, j]))
        beta_bar = None
        if bg is not None:
            beta_bar = (bg[:, :, j].to(acc).sum(-1) / count[:, j].clamp(min=1).view(B, 1)).view(B, H, 1, 1)
        new_ws, new_ms = _step(ws, ms, grads, beta_bar, update, norms0, mm)
        read = w_mm if order == "apply_update" else tuple(w.to(mm) for w in new_ws)
        outs.append(swiglu_fast(*read, qg[:, :, j]))
        u = full[:, j].view(B, 1, 1, 1)
        ws = tuple(torch.where(u, n, w) for n, w in zip(new_ws, ws, strict=True))
        if has_m:
            ms = tuple(torch.where(u, n, m) for n, m in zip(new_ms, ms, strict=True))
    o = torch.stack(outs, dim=2).reshape(B, H, S, D2)
    o = o.gather(2, flat.view(B, 1, N, 1).expand(B, H, N, D2)).to(q.dtype)
    if not output_final_state:
        return o
    # the open chunk: the last chunk of each row, unless it is complete
    last = (g_last * C).view(B, 1) + torch.arange(C, device=dev)  # (B, C) slots
    n_open = torch.where(full.gather(1, g_last.view(B, 1))[:, 0], 0, count.gather(1, g_last.view(B, 1))[:, 0])

    def take(xg, width):
        x = xg.reshape(B, H, S, width)
        return x.gather(2, last.view(B, 1, C, 1).expand(B, H, C, width))

    new_state = LaCTState(
        w1=ws[0], w2=ws[1], w3=ws[2],
        m1=ms[0] if has_m else None, m2=ms[1] if has_m else None, m3=ms[2] if has_m else None,
        buf_k=take(kg, D), buf_v=take(vg, D2), buf_lr=take(lg, 3),
        buf_beta=None if bg is None else take(bg.unsqueeze(-1), 1)[..., 0],
        buf_len=n_open.long(), update=update,
    )
    return o, new_state


def _empty_rows(q, k, v, lr, beta, w1, w2, w3, C: int, update: str):
    """:func:`lact_chunked`'s ``(o, state)`` for a batch of no rows."""
    _, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ws = tuple(q.new_zeros(0, *w.shape, dtype=acc) for w in (w1, w2, w3))
    ms = (None,) * 3 if update == "gd" else tuple(torch.zeros_like(w) for w in ws)
    state = LaCTState(*ws, *ms, buf_k=k.new_zeros(0, H, C, D), buf_v=v.new_zeros(0, H, C, v.shape[-1]),
                      buf_lr=lr.new_zeros(0, H, C, 3), buf_beta=None if beta is None else beta.new_zeros(0, H, C),
                      buf_len=torch.zeros(0, dtype=torch.long, device=q.device), update=update)
    return q.new_zeros(0, H, N, v.shape[-1]), state


# --------------------------------------------------------------------------- dispatch
def lact(q, k, v, lr, beta, w1, w2, w3, *, chunk_size: int, update: str = "gd", order: str = "apply_update",
         cu_seqlens=None, position_ids=None, impl: str = "chunked"):
    """LaCT output o (B, H, N, D2); ``impl`` is ``"chunked"`` (training form) or ``"reference"``."""
    if impl not in ("chunked", "reference"):
        raise ValueError(f"impl must be 'chunked' or 'reference', got {impl!r}")
    fn = lact_chunked if impl == "chunked" else lact_reference
    return fn(q, k, v, lr, beta, w1, w2, w3, chunk_size=chunk_size, update=update, order=order,
              cu_seqlens=cu_seqlens, position_ids=position_ids)
