"""Decayed Hebbian fast weights (Ba et al. 2016, SPEC §4) and plastic-weight updates (SPEC §5).

Ba et al.'s fast-weights RNN keeps, per sequence, a matrix ``A`` (B, R, R)

    A(t) = λ A(t−1) + η h(t) h(t)ᵀ,     A(0) = 0

and reads it as ``A(t) h`` inside its inner loop. Two forms compute ``A(t) h``:

* matrix form (:func:`hebbian_update` then :func:`hebbian_read`): carry the (B, R, R) matrix;
* attention form (:func:`hebbian_read_attention`): never build ``A``; keep the past hidden
  states ``H`` (B, T, R) and their weights ``c`` (B, T), ``c_τ = η λ^{t−τ}``, and compute
  ``A(t) h = Σ_τ c_τ h(τ) (h(τ)ᵀ h)``. It costs O(t R) instead of O(R²) per read, so it is
  the cheaper one while t < R.

Masked (padding) steps neither decay nor write: :func:`hebbian_update` and
:func:`decay_weights` take a (B,) boolean ``valid``.

The plastic FFN of SPEC §5 uses :func:`plastic_update`, the neuromodulated rule
``w ← (1−η) w + η α ∘ (u pᵀ)``, ``b ← (1−η) b + η β ∘ u`` with ``u`` the layer's
pre-activation output (Hebbian rule) or ``∂L_int/∂q`` (gradient rule, Duan et al. 2023).
It too has two forms: the matrix form carries ``w`` (B, O, I); the attention form
(:func:`plastic_update_attention`, :func:`plastic_read_attention`) stores the past ``p_τ``,
``u_τ`` and their decayed rates ``c_τ = η'_τ Π_{τ<s≤t} (1−η'_s)`` and reads

    w(t) p = Σ_τ c_τ α ∘ (u_τ p_τᵀ) p = Σ_τ c_τ u_τ ∘ (α (p_τ ∘ p)),

which never builds a per-sequence (O, I) matrix: cheaper while t is small.
"""

from __future__ import annotations

import torch

__all__ = [
    "clip_scale",
    "decay_weights",
    "hebbian_read",
    "hebbian_read_attention",
    "hebbian_update",
    "plastic_read_attention",
    "plastic_update",
    "plastic_update_attention",
]


def _check_batch_vec(h: torch.Tensor, name: str = "h") -> None:
    if h.dim() != 2:
        raise ValueError(f"{name} must be (B, R), got shape {tuple(h.shape)}")


def hebbian_update(
    A: torch.Tensor, h: torch.Tensor, eta: float, lam: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Matrix form of the fast-weight write: ``λ A + η h hᵀ``.

    A: (B, R, R); h: (B, R); valid: optional (B,) bool, rows where it is False keep ``A``.
    Returns the new (B, R, R) matrix (out of place, so autograd sees every step).
    """
    _check_batch_vec(h)
    if A.shape != (h.shape[0], h.shape[1], h.shape[1]):
        want = (h.shape[0], h.shape[1], h.shape[1])
        raise ValueError(f"A must be (B, R, R) = {want}, got {tuple(A.shape)}")
    new = lam * A + eta * h.unsqueeze(2) * h.unsqueeze(1)
    if valid is None:
        return new
    return torch.where(valid.view(-1, 1, 1), new, A)


def hebbian_read(A: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Matrix form of the read, ``A h``. A: (B, R, R); h: (B, R) -> (B, R)."""
    _check_batch_vec(h)
    return torch.bmm(A, h.unsqueeze(2)).squeeze(2)


def decay_weights(
    c: torch.Tensor, eta: float, lam: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention-form bookkeeping for one write: decay the weights of the stored states by λ
    and give the newly stored state weight η.

    c: (B, T) weights of the T states stored so far (T may be 0). Returns (B, T+1); on rows
    where ``valid`` (B,) is False nothing decays and the new state gets weight 0.
    """
    if c.dim() != 2:
        raise ValueError(f"c must be (B, T), got shape {tuple(c.shape)}")
    B = c.shape[0]
    new = torch.cat([lam * c, c.new_full((B, 1), eta)], dim=1)
    if valid is None:
        return new
    old = torch.cat([c, c.new_zeros(B, 1)], dim=1)
    return torch.where(valid.view(-1, 1), new, old)


def hebbian_read_attention(H: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Attention form of the read: ``Σ_τ c_τ H_τ (H_τᵀ h)``.

    H: (B, T, R) stored hidden states; c: (B, T) their weights (``η λ^{t−τ}``, 0 for padding);
    h: (B, R). Returns (B, R), equal to ``hebbian_read(A, h)`` for the matching ``A``.
    """
    _check_batch_vec(h)
    if H.dim() != 3 or H.shape[0] != h.shape[0] or H.shape[2] != h.shape[1]:
        raise ValueError(f"H must be (B, T, R) matching h {tuple(h.shape)}, got {tuple(H.shape)}")
    if c.shape != H.shape[:2]:
        raise ValueError(f"c must be (B, T) = {tuple(H.shape[:2])}, got {tuple(c.shape)}")
    # Products and sums rather than batched matrix-vector bmm: on a CPU, bmm of B (T, R) @ (R, 1)
    # products is dominated by per-batch call overhead (the associative-retrieval training step
    # of the 100-unit fast-weights RNN, 11 tokens, is 15-25 % faster this way).
    scores = (H * h.unsqueeze(1)).sum(2) * c  # (B, T)
    return (scores.unsqueeze(2) * H).sum(1)


def clip_scale(delta_w: torch.Tensor, delta_b: torch.Tensor | None, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / ||δ||)`` per batch row, with ``||δ||`` the Frobenius norm of the
    whole update of one layer (weight (B, O, I) and bias (B, O) together). Returns (B,)."""
    sq = delta_w.flatten(1).pow(2).sum(1)
    if delta_b is not None:
        sq = sq + delta_b.pow(2).sum(1)
    norm = sq.clamp_min(1e-24).sqrt()
    return torch.clamp(max_norm / norm, max=1.0)


def plastic_update(
    w: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One neuromodulated plastic step of a linear layer (SPEC §5).

    w: (B, O, I) fast weight; b: (B, O) fast bias; p: (B, I) layer input; u: (B, O) the
    post-synaptic signal (``q`` for Hebbian, ``∂L_int/∂q`` for the gradient rule);
    alpha: (O, I); beta: (O,); eta: (B,) the modulated rate ``η0 σ(η̃)`` before clipping.

        δ_w = α ∘ (u pᵀ),  δ_b = β ∘ u,  η' = η · min(1, max_norm / ||δ||)
        w ← (1−η') w + η' δ_w,   b ← (1−η') b + η' δ_b
    """
    if p.dim() != 2 or u.dim() != 2 or w.shape != (p.shape[0], u.shape[1], p.shape[1]):
        raise ValueError(
            f"shapes disagree: w {tuple(w.shape)}, p {tuple(p.shape)}, u {tuple(u.shape)}"
        )
    delta_w = alpha * (u.unsqueeze(2) * p.unsqueeze(1))
    delta_b = beta * u
    eta = (eta * clip_scale(delta_w, delta_b, max_norm)).view(-1, 1)
    w = (1 - eta.unsqueeze(2)) * w + eta.unsqueeze(2) * delta_w
    b = (1 - eta) * b + eta * delta_b
    return w, b


def _clip_scale_outer(p: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      max_norm: float) -> torch.Tensor:
    """:func:`clip_scale` of ``δ_w = α ∘ (u pᵀ)``, ``δ_b = β ∘ u`` without building δ_w:
    ``||δ_w||² = (u²)ᵀ (α²) (p²)``. Returns (B,)."""
    sq = ((u * u) @ (alpha * alpha) * (p * p)).sum(1) + (beta * u).pow(2).sum(1)
    return torch.clamp(max_norm / sq.clamp_min(1e-24).sqrt(), max=1.0)


def plastic_read_attention(P: torch.Tensor, U: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                           p: torch.Tensor) -> torch.Tensor:
    """Attention form of ``w p``. P: (B, T, I) stored inputs; U: (B, T, O) stored post signals;
    c: (B, T) their decayed rates; alpha: (O, I); p: (B, I). Returns (B, O)."""
    if P.shape[:2] != U.shape[:2] or c.shape != P.shape[:2] or p.shape != (P.shape[0], P.shape[2]):
        raise ValueError(f"shapes disagree: P {tuple(P.shape)}, U {tuple(U.shape)}, c {tuple(c.shape)}, "
                         f"p {tuple(p.shape)}")
    g = (P * p.unsqueeze(1)) @ alpha.t()  # (B, T, O): α (p_τ ∘ p)
    return (c.unsqueeze(2) * U * g).sum(1)


def plastic_update_attention(
    P: torch.Tensor,
    U: torch.Tensor,
    c: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention form of :func:`plastic_update`: append (p, u), decay the stored rates by
    (1−η') and give the new pair rate η'. Returns the new (P, U, c, b)."""
    eta = (eta * _clip_scale_outer(p, u, alpha, beta, max_norm)).view(-1, 1)
    P = torch.cat([P, p.unsqueeze(1)], 1)
    U = torch.cat([U, u.unsqueeze(1)], 1)
    c = torch.cat([(1 - eta) * c, eta], 1)
    b = (1 - eta) * b + eta * (beta * u)
    return P, U, c, b
