"""In-Place Test-Time Training: the functional op (SPEC §1, docs/inplace_ttt.md).

One gated MLP's down-projection ``W0`` (d, f) is treated as fast weights. Within a document,
tokens are cut into chunks of ``C`` tokens aligned to the document start. With
``z`` (B, N, f) the MLP hidden and ``s`` (B, N, d) the target source:

    t = Conv_K(s)            depthwise, kernel 5, offsets -2..+2, zero outside the chunk
    v = t @ P                (P used without transpose, as the official code does)
    ΔW_i = v_iᵀ z_i          (d, f), the update of chunk i
    W_i = W0 + η Σ_{j<i} ΔW_j      (exclusive prefix: chunk 0 reads W0)
    o_i = z_i W_iᵀ

Two implementations compute the same function:

* :func:`inplace_ttt_reference`: the sequential semantics that generation uses. Token by
  token it applies the current weights and buffers the chunk; when the chunk completes it
  adds the chunk's update.
* :func:`inplace_ttt_chunked`: the parallel training form. It never builds per-chunk
  weights. Sequences are cut into blocks of ``block_size`` tokens. Inside a block the
  update is block-causal linear attention, ``η Σ_j (z_i·z_j) v_j`` over earlier chunks of
  the same document; between blocks a float32 (d, f) state is carried. Gradients come from
  autograd.

``max_update_norm`` τ (SPEC §1; the paper's appendix clips at inference, off by default)
bounds each chunk's update: ``η ΔW_i`` is scaled by ``min(1, τ / ‖η ΔW_i‖_F)``. As
``ΔW_i = v_iᵀ z_i`` is linear in ``v_i``, every implementation scales the chunk's targets
``v_i`` by that factor (:func:`clip_targets`); gradients flow through the factor.

Document boundaries are given either as ``cu_seqlens`` (K+1,) over the N tokens of a single
row (B must be 1, the flash-attention convention) or as ``position_ids`` (B, N) that restart
at 0 at each document start. Position 0 of every row always starts a document.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from fastweights.errors import check_float_tensors, check_positive_int

__all__ = [
    "KERNEL_SIZE",
    "chunk_ids",
    "chunked_scan",
    "clip_targets",
    "doc_starts",
    "inplace_ttt",
    "inplace_ttt_chunked",
    "inplace_ttt_reference",
    "ttt_target",
]

KERNEL_SIZE = 5
_HALF = KERNEL_SIZE // 2


# --------------------------------------------------------------------------- validation
def _check_chunk(chunk_size) -> int:
    check_positive_int("chunk_size", chunk_size)
    return chunk_size


def _conv_2d(conv_weight: torch.Tensor, d: int) -> torch.Tensor:
    """Accept the conv kernel as (d, 5) or as the Conv1d weight (d, 1, 5); return (d, 5)."""
    if conv_weight.dim() == 3 and conv_weight.shape[1] == 1:
        conv_weight = conv_weight[:, 0]
    if tuple(conv_weight.shape) != (d, KERNEL_SIZE):
        raise ValueError(
            f"conv_weight must have shape ({d}, {KERNEL_SIZE}) or ({d}, 1, {KERNEL_SIZE}), "
            f"got {tuple(conv_weight.shape)}"
        )
    return conv_weight


def _check_inputs(z, s, w0, conv_weight, proj, lr):
    check_float_tensors(z=z, s=s, w0=w0, conv_weight=conv_weight, proj=proj, lr=lr)
    if z.dim() != 3 or s.dim() != 3:
        raise ValueError(f"z and s must be (B, N, f) and (B, N, d), got {tuple(z.shape)} and {tuple(s.shape)}")
    B, N, f = z.shape
    if s.shape[:2] != (B, N):
        raise ValueError(f"z {tuple(z.shape)} and s {tuple(s.shape)} must share (B, N)")
    d = s.shape[2]
    if tuple(w0.shape) != (d, f):
        raise ValueError(f"w0 must have shape (d, f) = ({d}, {f}), got {tuple(w0.shape)}")
    if proj is not None and tuple(proj.shape) != (d, d):
        raise ValueError(f"proj must have shape ({d}, {d}), got {tuple(proj.shape)}")
    if torch.is_tensor(lr):
        if lr.numel() != 1:  # a per-row or per-token rate is not a documented input
            raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        # checked where it costs no device sync: a CPU tensor here (the fast path checks a GPU
        # rate where it reads it anyway); a GPU rate of the chunked form is not read on the host
        if lr.device.type == "cpu" and not math.isfinite(float(lr.detach())):
            raise ValueError(f"lr must be finite: a real number or a 1-element tensor, got {lr!r}")
    elif isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr):
        raise ValueError(f"lr must be finite: a real number or a 1-element tensor, got {lr!r}")
    return B, N, d, f, _conv_2d(conv_weight, d)


def check_max_update_norm(max_update_norm, name: str = "max_update_norm") -> float | None:
    """``max_update_norm`` as a float τ > 0, or None (no clipping); ValueError naming ``name`` otherwise."""
    if max_update_norm is None:
        return None
    if isinstance(max_update_norm, bool) or not isinstance(max_update_norm, Real) \
            or not math.isfinite(max_update_norm) or max_update_norm <= 0:
        raise ValueError(f"{name} must be None (no clipping) or a finite number > 0, got {max_update_norm!r}")
    return float(max_update_norm)


# --------------------------------------------------------------------------- documents
def _index_tensor(name: str, t, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    """``t`` (a tensor or a list) as a tensor, checked to be integer (not bool) with ``dims`` dims."""
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() not in dims:
        raise ValueError(f"{name} must be {shape} integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t


def doc_starts(
    batch: int,
    seqlen: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean (B, N) mask of document starts; column 0 is always a start.

    ``cu_seqlens`` (K+1,) int: cumulative document lengths of one row (requires B == 1),
    starting at 0 and ending at N. ``position_ids`` (B, N) or (1, N): a document starts
    wherever the position is 0.
    """
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("give document boundaries as cu_seqlens or position_ids, not both")
    starts = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        cu_seqlens = _index_tensor("cu_seqlens", cu_seqlens, (1,), "a 1-D")
    if position_ids is not None:
        position_ids = _index_tensor("position_ids", position_ids, (1, 2), "a (B, N) or (N,)")
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if batch != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed into one row), got batch {batch}")
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seqlen or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing, start at 0 and end at N={seqlen}, got {cu.tolist()}"
            )
        inner = cu[:-1][cu[:-1] < seqlen]
        starts[0, inner] = True
    elif position_ids is not None:
        pos = position_ids.to(device)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        if pos.shape[-1] != seqlen or pos.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (B, N) = ({batch}, {seqlen}), got {tuple(position_ids.shape)}")
        starts |= (pos == 0).expand(batch, seqlen)
    if seqlen:
        starts[:, 0] = True
    return starts


def chunk_ids(starts: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token chunk ids from a (B, N) document-start mask.

    Returns ``(g, g0)``, both (B, N) long: ``g`` numbers the chunks of a row in order (chunks
    are aligned to their document's start), ``g0`` is the id of the first chunk of the
    token's document. Token k feeds the update seen by token q iff ``g0[q] <= g[k] < g[q]``.
    """
    B, N = starts.shape
    ar = torch.arange(N, device=starts.device).expand(B, N)
    start_pos = torch.cummax(torch.where(starts, ar, torch.zeros_like(ar)), dim=1).values
    in_doc = ar - start_pos
    new_chunk = starts | (in_doc % chunk_size == 0)
    g = torch.cumsum(new_chunk.long(), dim=1) - 1
    g0 = torch.cummax(torch.where(starts, g, torch.zeros_like(g)), dim=1).values
    return g, g0


# --------------------------------------------------------------------------- target
def ttt_target(s: torch.Tensor, conv_weight: torch.Tensor, proj: torch.Tensor | None, g: torch.Tensor):
    """The next-token aligned target ``v = Conv_K(s) @ P`` (B, N, d).

    The depthwise conv (kernel 5, centred) sees only tokens of the same chunk (``g`` equal);
    everything outside the chunk counts as zero.
    """
    B, N, d = s.shape
    w = _conv_2d(conv_weight, d).to(s.dtype)
    t = s * w[:, _HALF]
    for off in range(-_HALF, _HALF + 1):
        if off == 0 or abs(off) >= N:
            continue
        if off > 0:  # token n reads n + off
            shifted = F.pad(s[:, off:], (0, 0, 0, off))
            same = F.pad(g[:, off:] == g[:, :-off], (0, off), value=False)
        else:
            shifted = F.pad(s[:, :off], (0, 0, -off, 0))
            same = F.pad(g[:, -off:] == g[:, :off], (-off, 0), value=False)
        t = t + shifted * same.unsqueeze(-1).to(s.dtype) * w[:, off + _HALF]
    return t if proj is None else t @ proj.to(t.dtype)


def clip_targets(v: torch.Tensor, z: torch.Tensor, g: torch.Tensor, lr, max_norm: float | None) -> torch.Tensor:
    """``v`` (B, N, d) with each chunk's targets scaled so that its update ``η Σ_t v_tᵀ z_t``
    (z (B, N, f)) has Frobenius norm at most ``max_norm``; chunks are the runs of equal ``g``
    (B, N) (:func:`chunk_ids`). The squared norm of a chunk's ``VᵀZ`` is ``Σ (V Vᵀ) ⊙ (Z Zᵀ)``
    (C × C products) when that is cheaper than the (d, f) product, computed in float32 (float64
    for float64) one chunk at a time; a chunk within the bound keeps factor 1 exactly. Autograd
    differentiates the factor."""
    B, N, d = v.shape
    if max_norm is None or N == 0 or B == 0:
        return v
    f = z.shape[2]
    acc = torch.float64 if v.dtype == torch.float64 or z.dtype == torch.float64 else torch.float32
    new = torch.ones(B, N, dtype=torch.bool, device=g.device)
    new[:, 1:] = g[:, 1:] != g[:, :-1]
    firsts = [row.nonzero().flatten().tolist() for row in new.cpu()]
    sq, lengths = [], []
    for b in range(B):
        for a, e in zip(firsts[b], firsts[b][1:] + [N], strict=True):
            vc, zc = v[b, a:e].to(acc), z[b, a:e].to(acc)
            if (e - a) * (d + f) < d * f:
                sq.append(((vc @ vc.T) * (zc @ zc.T)).sum())
            else:
                sq.append((vc.T @ zc).square().sum())
            lengths.append(e - a)
    sq = torch.stack(sq)
    eta = lr.to(acc).reshape(()).abs() if torch.is_tensor(lr) else abs(float(lr))  # |η|: the update keeps its sign
    # factor τ / (|η| ‖ΔW‖) where η²‖ΔW‖² > τ², else 1; the unused branch divides by 1, never by 0
    # (nor by η = 0, whose gradient would be NaN)
    big = sq * eta * eta > max_norm * max_norm
    one = torch.ones_like(sq)
    norm = torch.where(big, eta * torch.where(big, sq, one).sqrt(), one)  # 1 where unused: never 0 or inf
    factor = torch.where(big, max_norm / norm, one)
    per_token = factor.repeat_interleave(torch.tensor(lengths, device=factor.device)).view(B, N, 1)
    return v * per_token.to(v.dtype)


# --------------------------------------------------------------------------- reference
def inplace_ttt_reference(
    z: torch.Tensor,
    s: torch.Tensor,
    w0: torch.Tensor,
    conv_weight: torch.Tensor,
    proj: torch.Tensor | None,
    lr,
    chunk_size: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    max_update_norm: float | None = None,
) -> torch.Tensor:
    """Sequential In-Place TTT, one token at a time, as in generation. Returns o (B, N, d).

    Each row keeps one (d, f) state (float64 for float64 inputs, else float32). A token is
    multiplied by the current weights on arrival; its ``z`` and ``s`` are buffered; when the
    chunk is full, or the document ends, the chunk's target is computed from the buffer and
    ``W += η vᵀ z`` (scaled down to Frobenius norm ``max_update_norm`` if it is larger). A
    document start resets the state to ``W0``.
    """
    chunk_size = _check_chunk(chunk_size)
    tau = check_max_update_norm(max_update_norm)
    B, N, d, f, w = _check_inputs(z, s, w0, conv_weight, proj, lr)
    starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=z.device)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    w0a, wa = w0.to(acc), w.to(acc)
    pa = None if proj is None else proj.to(acc)
    if torch.is_tensor(lr):  # a (1,) float64 rate would promote the float32 state to float64
        lr = lr.to(acc).reshape(())
    rows = []
    for b in range(B):
        outs = []
        W = w0a
        buf_z, buf_s = [], []
        for n in range(N):
            if starts[b, n]:
                W, buf_z, buf_s = w0a, [], []
            zt, st = z[b, n].to(acc), s[b, n].to(acc)
            outs.append(W @ zt)
            buf_z.append(zt)
            buf_s.append(st)
            doc_ends = n + 1 == N or bool(starts[b, n + 1])
            if len(buf_z) == chunk_size or doc_ends:
                L = len(buf_s)
                t_rows = []
                for c in range(L):  # centred conv, zero outside the chunk
                    tc = torch.zeros(d, dtype=acc, device=z.device)
                    for k in range(KERNEL_SIZE):
                        j = c + k - _HALF
                        if 0 <= j < L:
                            tc = tc + wa[:, k] * buf_s[j]
                    t_rows.append(tc)
                t = torch.stack(t_rows)
                v = t if pa is None else t @ pa
                step = lr * (v.T @ torch.stack(buf_z))
                if tau is not None and float(torch.linalg.matrix_norm(step.detach())) > tau:
                    step = step * (tau / torch.linalg.matrix_norm(step))
                W = W + step
                buf_z, buf_s = [], []
        rows.append(torch.stack(outs) if outs else z.new_zeros(0, d, dtype=acc))
    return torch.stack(rows).to(z.dtype) if rows else z.new_zeros(0, N, d)


# --------------------------------------------------------------------------- chunked
def default_block_size(d: int, f: int, chunk_size: int) -> int:
    """Tokens per block: ~sqrt(2·d·f) balances the (L, L) attention and the (d, f) states."""
    return max(chunk_size, int(math.sqrt(2 * d * f)))


def chunked_scan(
    za: torch.Tensor, v: torch.Tensor, g: torch.Tensor, g0: torch.Tensor, block_size: int, *, final_state: bool = False
):
    """The fast-weight term of :func:`inplace_ttt_chunked`, with the chunk ids given.

    ``za`` (B, N, f) and ``v`` (B, N, d) in the accumulation dtype; ``g``, ``g0`` (B, N) from
    :func:`chunk_ids` (token k feeds q iff ``g0[q] <= g[k] < g[q]``). Returns ``(u, s_full,
    s_open)``: ``u`` (B, N, d) = Σ over the earlier chunks of each token's document of
    ``(z_q·z_k) v_k``; with ``final_state`` the (B, d, f) carry of the document open at the
    last token (its completed chunks, and its open chunk so far), else ``None, None``.
    """
    B, N = g.shape
    acc, L = za.dtype, block_size
    if N == 0:
        return v.new_zeros(v.shape), None, None
    outs = []
    s_full = s_open = None  # (B, d, f) carried states
    g_last = g0_last = None  # (B,) chunk id and doc-start id of the last token before the block
    for lo in range(0, N, L):
        hi = min(lo + L, N)
        zb, vb, gb, g0b = za[:, lo:hi], v[:, lo:hi], g[:, lo:hi], g0[:, lo:hi]
        # intra-block: token k feeds q iff g0[q] <= g[k] < g[q]
        mask = (gb.unsqueeze(1) < gb.unsqueeze(2)) & (gb.unsqueeze(1) >= g0b.unsqueeze(2))
        scores = torch.matmul(zb, zb.transpose(1, 2)) * mask.to(acc)
        u = torch.matmul(scores, vb)
        if s_full is not None:
            same_doc = (g0b == g0_last.unsqueeze(1)).to(acc).unsqueeze(-1)  # (B, l, 1)
            later = (gb > g_last.unsqueeze(1)).to(acc).unsqueeze(-1)
            u = u + same_doc * torch.matmul(zb, s_full.transpose(1, 2))
            u = u + same_doc * later * torch.matmul(zb, s_open.transpose(1, 2))
        if hi < N or final_state:  # carry the state of the document open at the block's end
            g_new, g0_new = gb[:, -1], g0b[:, -1]
            m_full = ((gb >= g0_new.unsqueeze(1)) & (gb < g_new.unsqueeze(1))).to(acc).unsqueeze(-1)
            m_open = (gb == g_new.unsqueeze(1)).to(acc).unsqueeze(-1)
            new_full = torch.matmul((vb * m_full).transpose(1, 2), zb)
            new_open = torch.matmul((vb * m_open).transpose(1, 2), zb)
            if s_full is not None:
                same = (g0_new == g0_last).to(acc).view(B, 1, 1)
                adv = (g_new > g_last).to(acc).view(B, 1, 1)
                new_full = new_full + same * (s_full + adv * s_open)
                new_open = new_open + same * (1 - adv) * s_open
            s_full, s_open, g_last, g0_last = new_full, new_open, g_new, g0_new
        outs.append(u)
    return torch.cat(outs, dim=1), s_full, s_open


def inplace_ttt_chunked(
    z: torch.Tensor,
    s: torch.Tensor,
    w0: torch.Tensor,
    conv_weight: torch.Tensor,
    proj: torch.Tensor | None,
    lr,
    chunk_size: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    max_update_norm: float | None = None,
) -> torch.Tensor:
    """Parallel In-Place TTT for training; autograd gives every gradient. Returns o (B, N, d).

    ``o = z W0ᵀ + η · u`` where ``u`` is accumulated in float32 (float64 for float64
    inputs). Per block of ``block_size`` tokens, ``u`` is block-causal linear attention over
    the block plus the carried states of the block's open document:

        S_full: the sum of vᵀz over chunks of that document that end before the block's
                first chunk; S_open: the part of the straddling chunk read so far.

    Memory: two (B, d, f) states per block and one (B, L, L) score matrix, never per chunk.
    ``max_update_norm``: :func:`clip_targets` scales the targets first.
    """
    chunk_size = _check_chunk(chunk_size)
    tau = check_max_update_norm(max_update_norm)
    B, N, d, f, w = _check_inputs(z, s, w0, conv_weight, proj, lr)
    starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=z.device)
    g, g0 = chunk_ids(starts, chunk_size)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32

    base = F.linear(z, w0.to(z.dtype))
    if N == 0:
        return base
    v = ttt_target(s.to(acc), w.to(acc), None if proj is None else proj.to(acc), g)
    za = z.to(acc)
    v = clip_targets(v, za, g, lr, tau)
    L = default_block_size(d, f, chunk_size) if block_size is None else int(block_size)
    if L < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")

    u, _, _ = chunked_scan(za, v, g, g0, L)
    return (base.to(acc) + lr * u).to(z.dtype)


# --------------------------------------------------------------------------- dispatch
def inplace_ttt(
    z: torch.Tensor,
    s: torch.Tensor,
    w0: torch.Tensor,
    conv_weight: torch.Tensor,
    proj: torch.Tensor | None,
    lr,
    chunk_size: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    impl: str = "auto",
    max_update_norm: float | None = None,
) -> torch.Tensor:
    """In-Place TTT MLP output o (B, N, d); see the module docstring for the equations.

    Args:
        z: (B, N, f) MLP hidden ``act(x W_gateᵀ) * (x W_upᵀ)``.
        s: (B, N, d) target source (token embeddings or the MLP input).
        w0: (d, f) slow down-projection (``down_proj.weight``).
        conv_weight: (d, 5) or (d, 1, 5) depthwise conv kernel.
        proj: (d, d) target projection P, or None for the identity.
        lr: inner learning rate η (float or 0-d tensor).
        chunk_size: C >= 1.
        cu_seqlens / position_ids: optional document boundaries (module docstring).
        impl: ``"auto"`` (CUDA tensors: ``"fast"``, else ``"chunked"``) | ``"fast"``
            (:func:`fastweights.ops.inplace_ttt_fast.inplace_ttt_fast`) | ``"chunked"`` |
            ``"reference"``.
        max_update_norm: τ > 0 bounds each chunk's update ``η ΔW_i`` in Frobenius norm
            (SPEC §1; None, the default: no clipping).
    """
    if impl == "auto":
        impl = "fast" if z.is_cuda else "chunked"
    if impl == "fast":
        from fastweights.ops.inplace_ttt_fast import inplace_ttt_fast as fn
    elif impl == "chunked":
        fn = inplace_ttt_chunked
    elif impl == "reference":
        fn = inplace_ttt_reference
    else:
        raise ValueError(f"impl must be 'auto', 'fast', 'chunked' or 'reference', got {impl!r}")
    return fn(z, s, w0, conv_weight, proj, lr, chunk_size, cu_seqlens=cu_seqlens, position_ids=position_ids,
              max_update_norm=max_update_norm)
