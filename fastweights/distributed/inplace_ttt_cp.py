"""Context parallelism for the In-Place TTT op (docs/distributed.md, DESIGN "Context parallelism").

The sequence is split into contiguous shards, one per rank of a process group, in rank order.
Shards may have different lengths (at least 2 tokens each). Each rank holds ``z`` (B, n_r, f)
and ``s`` (B, n_r, d) of its shard and the tokens' in-document positions ``position_ids``
(B, n_r): 0 at a document start, the global token index when a row is one document. Chunks
are aligned to each document's start (a chunk starts where ``position % C == 0``), so
documents and chunks may straddle shard boundaries; both are handled exactly.

Per rank r, forward:

1. **Halo.** The target conv (kernel 5, inside a chunk) reads two tokens on each side: the
   edge tokens of ``s`` and their chunk-start flags are all-gathered (autograd carries their
   gradients back to their owners), so ``v = Conv(s) @ P`` is exact at shard edges.
2. **Local scan** from a zero state (:func:`~fastweights.ops.inplace_ttt.chunked_scan`). It
   also gives the local carry ``b_r = (F_r, O_r)`` of the document open at the shard's end:
   ``F_r`` the sum of ``vᵀz`` over its chunks completed in the shard, ``O_r`` its open chunk
   so far (both (B, d, f), float32).
3. **Segmented exclusive prefix over ranks.** The carry leaving rank r is affine in the carry
   entering it, ``out_r = b_r + A_r(in_r)`` with

       A_r(F, O) = (a·F + b·O, c·O),   (a, b, c) = (0, 0, 0)  the shard holds a document start
                                                   (1, 1, 0)  else, it holds a chunk start
                                                   (1, 0, 1)  else (one chunk spans it)

   The per-rank ``b_r`` (2·B·d·f floats) and coefficients are all-gathered and each rank
   folds those of the ranks before it: ``in_r = out_{r-1}``, ``in_0 = 0``.
4. **Correction.** Tokens of the document open at the shard start add
   ``z (F_in)ᵀ + [chunk advanced] z (O_in)ᵀ``.

Backward: autograd runs the local steps; :class:`_CarryScan` carries the state gradient back
across ranks. With ``G_r = ∂L/∂in_r`` gathered from all ranks, the gradient of ``out_j`` is
the exclusive suffix ``D_j = G_{j+1} + A_{j+1}ᵀ D_{j+1}`` (``D_{W-1} = 0``), again one
all-gather of 2·B·d·f floats per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

from fastweights.ops.inplace_ttt import (
    _HALF,
    _check_chunk,
    _check_inputs,
    chunked_scan,
    default_block_size,
    ttt_target,
)

__all__ = ["all_gather_autograd", "carry_bytes", "inplace_ttt_cp"]


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_autograd(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """All-gather ``x`` (same shape on every rank) as a list in rank order; the backward
    reduce-scatters the gradients back to their owners (PyTorch functional collectives)."""
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd  # torch < 2.13
    out = gather(x.unsqueeze(0).contiguous(), 0, group if group is not None else dist.group.WORLD)
    return list(out.unbind(0))


class _CarryScan(torch.autograd.Function):
    """Segmented exclusive prefix of the per-rank carries (module docstring, step 3).

    Inputs: ``full``, ``open_`` (B, d, f) this rank's local carry; ``coef`` (B, 3) its
    ``(a, b, c)``. Outputs: the carry entering this rank, ``(F_in, O_in)`` (B, d, f).
    """

    @staticmethod
    def forward(ctx, full, open_, coef, group):
        rank, world = _rank_world(group)
        B = full.shape[0]
        carries = [torch.empty(2, *full.shape, dtype=full.dtype, device=full.device) for _ in range(world)]
        dist.all_gather(carries, torch.stack([full, open_]), group=group)
        coefs = [torch.empty_like(coef) for _ in range(world)]
        dist.all_gather(coefs, coef.contiguous(), group=group)
        coefs = [c.t().reshape(3, B, 1, 1) for c in coefs]
        in_full, in_open = torch.zeros_like(full), torch.zeros_like(open_)
        for j in range(rank):
            a, b, c = coefs[j]
            in_full, in_open = carries[j][0] + a * in_full + b * in_open, carries[j][1] + c * in_open
        ctx.group, ctx.coefs, ctx.rank, ctx.world = group, coefs, rank, world
        return in_full, in_open

    @staticmethod
    def backward(ctx, g_full, g_open):
        group, coefs, rank, world = ctx.group, ctx.coefs, ctx.rank, ctx.world
        mine = torch.stack([g_full, g_open]).contiguous()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        d_full, d_open = torch.zeros_like(g_full), torch.zeros_like(g_open)
        for j in range(world - 2, rank - 1, -1):  # D_j = G_{j+1} + A_{j+1}ᵀ D_{j+1}
            a, b, c = coefs[j + 1]
            d_full, d_open = parts[j + 1][0] + a * d_full, parts[j + 1][1] + b * d_full + c * d_open
        return d_full, d_open, None, None


def _halo(s: torch.Tensor, cs: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two tokens of ``s`` (B, n, d) on each side of this shard and their chunk-start
    flags; zeros and ``True`` (a cut) where there is no neighbour. Differentiable."""
    rank, world = _rank_world(group)
    h = _HALF
    edges = torch.cat([s[:, :h], s[:, -h:]], dim=1)  # (B, 2h, d)
    flags = torch.cat([cs[:, :h], cs[:, -h:]], dim=1).to(s.dtype).unsqueeze(-1)  # (B, 2h, 1)
    parts = all_gather_autograd(torch.cat([edges, flags], dim=-1), group)
    B, _, d = s.shape
    none = (s.new_zeros(B, h, d), torch.ones(B, h, dtype=torch.bool, device=s.device))
    left = (parts[rank - 1][:, h:, :d], parts[rank - 1][:, h:, d] > 0.5) if rank > 0 else none
    right = (parts[rank + 1][:, :h, :d], parts[rank + 1][:, :h, d] > 0.5) if rank < world - 1 else none
    return left[0], left[1], right[0], right[1]


def inplace_ttt_cp(
    z: torch.Tensor,
    s: torch.Tensor,
    w0: torch.Tensor,
    conv_weight: torch.Tensor,
    proj: torch.Tensor | None,
    lr,
    chunk_size: int,
    *,
    position_ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """In-Place TTT over a sequence sharded across the ranks of ``group``; returns this rank's
    o (B, n_r, d). Equals the rank's slice of :func:`~fastweights.ops.inplace_ttt.inplace_ttt`
    on the whole sequence, forward and backward (module docstring).

    Args:
        z: (B, n_r, f) this shard's MLP hidden; s: (B, n_r, d) its target source.
        w0, conv_weight, proj, lr, chunk_size: as in ``inplace_ttt`` (the same on every rank).
        position_ids: (B, n_r) or (1, n_r) in-document positions of the shard's tokens (0 at
            each document start; the global index for one document per row). Rank 0's first
            token must start a document (position 0; others raise a ValueError on every rank).
        group: the context-parallel process group (default: the world). Shards are in rank
            order; every rank must call this with the same B, d, f.
        block_size: tokens per block of the local scan.
    """
    chunk_size = _check_chunk(chunk_size)
    B, n, d, f, w = _check_inputs(z, s, w0, conv_weight, proj, lr)
    if n < _HALF:
        raise ValueError(f"each context-parallel shard needs at least {_HALF} tokens, got {n}")
    if position_ids is None:
        raise ValueError("context parallelism needs position_ids (in-document positions of the shard's tokens)")
    pos = position_ids.to(device=z.device, dtype=torch.long)
    pos = pos.unsqueeze(0) if pos.dim() == 1 else pos
    if pos.shape[-1] != n or pos.shape[0] not in (1, B):
        allowed = f"(B, n) = ({B}, {n})" + ("" if B == 1 else f" or (1, {n})")
        raise ValueError(f"position_ids must be {allowed}, got {tuple(position_ids.shape)}")
    if bool((pos < 0).any()):
        raise ValueError("position_ids must be >= 0")
    pos = pos.expand(B, n)
    rank, _ = _rank_world(group)
    # chunks are counted from each document's start (position 0): a row whose first document
    # started earlier (rank 0's first position > 0) would be cut on another grid than the
    # one-process op's, which counts that document's chunks from the row's first token. Rank 0
    # sends its first positions, so that every rank refuses the row together (no rank left
    # waiting in a collective).
    first = pos[:, 0].contiguous() if rank == 0 else torch.empty(B, dtype=torch.long, device=z.device)
    dist.broadcast(first, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if bool((first != 0).any()):
        raise ValueError(f"context parallelism needs each row to start a document: rank 0's first position_ids are "
                         f"{first.tolist()}, allowed: 0 (give positions counted from the row's first token)")
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32

    starts = pos == 0  # (B, n) document starts
    cs = pos % chunk_size == 0  # chunk starts (every document start is one)
    if rank == 0:
        starts, cs = starts.clone(), cs.clone()
        starts[:, 0] = cs[:, 0] = True

    # 1. target with halos: chunk ids over [left halo, shard, right halo]
    left, cs_left, right, cs_right = _halo(s.to(acc), cs, group)
    g_ext = torch.cumsum(torch.cat([cs_left, cs, cs_right], dim=1).long(), dim=1)
    s_ext = torch.cat([left, s.to(acc), right], dim=1)
    v = ttt_target(s_ext, w.to(acc), None if proj is None else proj.to(acc), g_ext)[:, _HALF:_HALF + n]

    # 2. local scan from zero; ids numbered from the shard's first chunk
    first = torch.zeros_like(cs)
    first[:, 0] = True
    g = torch.cumsum((cs | first).long(), dim=1) - 1
    g0 = torch.cummax(torch.where(starts, g, torch.zeros_like(g)), dim=1).values
    g_prev = torch.where(cs[:, 0], -1, 0)  # chunk id of the token before the shard
    g0_prev = torch.where(starts[:, 0], -1, 0)  # its document's first chunk id
    za = z.to(acc)
    L = default_block_size(d, f, chunk_size) if block_size is None else int(block_size)
    if L < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    u, full, open_ = chunked_scan(za, v, g, g0, L, final_state=True)

    # 3. carry entering this rank
    same = g0[:, -1] == g0_prev  # the shard holds no document start
    adv = g[:, -1] > g_prev  # ... and a chunk starts inside it
    coef = torch.stack([same, same & adv, same & ~adv], dim=1).to(acc)
    in_full, in_open = _CarryScan.apply(full, open_, coef, group)

    # 4. tokens of the document open at the shard start read the carry
    same_doc = (g0 == g0_prev.unsqueeze(1)).to(acc).unsqueeze(-1)
    later = (g > g_prev.unsqueeze(1)).to(acc).unsqueeze(-1)
    u = u + same_doc * torch.matmul(za, in_full.transpose(1, 2))
    u = u + same_doc * later * torch.matmul(za, in_open.transpose(1, 2))
    base = F.linear(z, w0.to(z.dtype))
    return (base.to(acc) + lr * u).to(z.dtype)


def carry_bytes(batch: int, d: int, f: int, world: int, dtype_bytes: int = 4) -> int:
    """Bytes one rank receives per TTT layer and training step: the forward all-gather of
    carries and the backward all-gather of their gradients (2·B·d·f floats each per peer);
    the halos (B·4·(d+1) per peer) are negligible and left out."""
    return 2 * 2 * batch * d * f * dtype_bytes * (world - 1)
