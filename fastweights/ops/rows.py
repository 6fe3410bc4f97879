"""Row moves: each row of an output taken from one of two sources by an index map, or zero.

The LaCT lanes (:class:`fastweights.ops.lact.LaCTLanes`) lay packed documents out this way and
back: tokens of (B, H, N, F) tensors go to (chunk, slot) rows of (L, H, U·C, F) lanes, and the
loop's outputs return to token order. :func:`move_rows` does one such move, as plain torch
indexing (``impl="torch"``, any device) or as one Triton kernel (``impl="triton"``) whose
backward is the same kernel run on the inverse map. A map is one-to-one (no source row goes
to two output rows), so a move's backward is again a move, with no accumulation.

Maps (int32 or int64, on the tensors' device): ``index`` (Bo·No,) gives each output row (flat over
(Bo, No)) its source: ``i >= 0`` row ``i`` of ``a`` (flat over its (Ba, Na)), ``i <= -2`` row
``-i - 2`` of ``b``, ``-1`` zeros. ``inverse_a`` (Ba·Na,) gives each row of ``a`` the output
row it went to, or -1 (``inverse_b`` likewise for ``b``).
"""

from __future__ import annotations

import torch

from fastweights.ops.inplace_ttt_triton import HAVE_TRITON, IMPLS, on_device, pick_impl

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["IMPLS", "move_rows", "move_rows_reference", "pick_impl"]

BLOCK_R, BLOCK_F, WARPS = 16, 128, 4  # rows and channels per program and tile, warps


def _check(a, b, index, rows):
    if a.dim() != 4:
        raise ValueError(f"a must be (B, H, N, F), got shape {tuple(a.shape)}")
    if b is not None and (b.dim() != 4 or b.shape[1] != a.shape[1] or b.shape[-1] != a.shape[-1]
                          or b.dtype != a.dtype or b.device != a.device):
        raise ValueError(f"b must be (B, H, N, F) with a's H, F, dtype and device: a {tuple(a.shape)} {a.dtype} "
                         f"{a.device}, b {tuple(b.shape)} {b.dtype} {b.device}")
    Bo, No = rows
    if index.shape != (Bo * No,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32 or int64 of shape ({Bo * No},) for rows {rows}, got "
                         f"{tuple(index.shape)} {index.dtype}")


def move_rows_reference(a: torch.Tensor, index: torch.Tensor, rows: tuple[int, int],
                        b: torch.Tensor | None = None) -> torch.Tensor:
    """The move in torch indexing (autograd's backward): a (Ba, H, Na, F), b (Bb, H, Nb, F) or
    None -> (Bo, H, No, F) for ``rows = (Bo, No)`` (module docstring)."""
    H, F_ = a.shape[1], a.shape[-1]
    srcs = [a.transpose(0, 1).reshape(H, -1, F_), a.new_zeros(H, 1, F_)]
    if b is not None:
        srcs.append(b.transpose(0, 1).reshape(H, -1, F_))
    na = srcs[0].shape[1]
    # -1 -> the zero row (na), -2 - j -> row j of b (na + 1 + j)
    src = torch.cat(srcs, 1).index_select(1, torch.where(index >= 0, index, na - 1 - index))
    return src.view(H, *rows, F_).transpose(0, 1)


def move_rows(a: torch.Tensor, index: torch.Tensor, inverse_a: torch.Tensor, rows: tuple[int, int],
              b: torch.Tensor | None = None, inverse_b: torch.Tensor | None = None,
              impl: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``a`` (Ba, H, Na, F) and ``b`` (Bb, H, Nb, F) or None moved by ``index`` to a
    (Bo, H, No, F) tensor, ``rows = (Bo, No)``; the inverses (module docstring) give the
    backward. ``impl``: ``auto`` | ``torch`` | ``triton``. ``out``: a contiguous (Bo, H, No, F)
    tensor of a's dtype and device to write into (and return), such as a CUDA graph's input."""
    _check(a, b, index, rows)
    want = (torch.Size((rows[0], a.shape[1], rows[1], a.shape[-1])), a.dtype, a.device)
    if out is not None and ((out.shape, out.dtype, out.device) != want or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {tuple(want[0])} {want[1]} tensor on {want[2]}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}")
    if (b is None) != (inverse_b is None):
        raise ValueError("give b and inverse_b together")
    for name, x, src in (("inverse_a", inverse_a, a), ("inverse_b", inverse_b, b)):
        if x is not None and x.shape != (src.shape[0] * src.shape[2],):
            raise ValueError(f"{name} must have one entry per row of its source, "
                             f"{src.shape[0] * src.shape[2]}, got shape {tuple(x.shape)}")
    if pick_impl(impl, a) == "torch":
        moved = move_rows_reference(a, index, rows, b)
        return moved if out is None else out.copy_(moved)
    return _MoveRows.apply(a, b, index, inverse_a, inverse_b, rows, out)


if HAVE_TRITON:

    @triton.jit
    def _move_kernel(out_ptr, a_ptr, b_ptr, idx_ptr, R, No, Na, Nb, F,
                     so_b, so_h, so_n, sa_b, sa_h, sa_n, sb_b, sb_h, sb_n,
                     HAS_B: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr):
        h = tl.program_id(1)
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        live = r < R
        i = tl.load(idx_ptr + r, mask=live, other=-1).to(tl.int64)
        o_off = (r // No) * so_b + h * so_h + (r % No) * so_n
        from_a = live & (i >= 0)
        ia = tl.where(from_a, i, 0)
        a_off = (ia // Na) * sa_b + h * sa_h + (ia % Na) * sa_n
        if HAS_B:
            from_b = live & (i <= -2)
            ib = tl.where(from_b, -i - 2, 0)
            b_off = (ib // Nb) * sb_b + h * sb_h + (ib % Nb) * sb_n
        for f0 in range(0, F, BF):
            f = f0 + tl.arange(0, BF)
            cols = (f < F)[None, :]
            x = tl.load(a_ptr + a_off[:, None] + f[None, :], mask=from_a[:, None] & cols, other=0.0)
            if HAS_B:
                x += tl.load(b_ptr + b_off[:, None] + f[None, :], mask=from_b[:, None] & cols, other=0.0)
            tl.store(out_ptr + o_off[:, None] + f[None, :], x, mask=live[:, None] & cols)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(a, b, index, rows, out=None):
    """The kernel: ``out`` or a new contiguous (Bo, H, No, F) tensor."""
    a, b = _unit_last(a), None if b is None else _unit_last(b)
    Bo, No = rows
    H, F_ = a.shape[1], a.shape[-1]
    out = a.new_empty(Bo, H, No, F_) if out is None else out
    if out.numel() == 0:
        return out
    bb = a if b is None else b  # a stand-in pointer when there is no b
    bf = min(BLOCK_F, triton.next_power_of_2(F_))
    with on_device(a):
        _move_kernel[(triton.cdiv(Bo * No, BLOCK_R), H)](
            out, a, bb, index, Bo * No, No, a.shape[2], bb.shape[2], F_,
            out.stride(0), out.stride(1), out.stride(2), a.stride(0), a.stride(1), a.stride(2),
            bb.stride(0), bb.stride(1), bb.stride(2),
            HAS_B=b is not None, BR=BLOCK_R, BF=bf, num_warps=WARPS)
    return out


class _MoveRows(torch.autograd.Function):
    """The Triton move; its backward moves the output's gradient back by the inverse maps."""

    @staticmethod
    def forward(ctx, a, b, index, inverse_a, inverse_b, rows, out):
        ctx.save_for_backward(inverse_a, inverse_b)
        ctx.shapes = (a.shape[0], a.shape[2]), None if b is None else (b.shape[0], b.shape[2])
        return _launch(a, b, index, rows, out)

    @staticmethod
    def backward(ctx, g):
        inv_a, inv_b = ctx.saved_tensors
        ga = _launch(g, None, inv_a, ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        gb = _launch(g, None, inv_b, ctx.shapes[1]) if inv_b is not None and ctx.needs_input_grad[1] else None
        return ga, gb, None, None, None, None, None
