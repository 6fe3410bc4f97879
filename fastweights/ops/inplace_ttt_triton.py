"""Triton kernels for fast In-Place TTT: the target's chunk-local conv and the weight casts.

* :func:`chunk_conv` / :func:`chunk_conv_backward`: the depthwise conv (kernel 5) in one pass
  over (B, N, d), and its backward (∂s and ∂w together) in one more, instead of a handful of
  PyTorch passes.
* :func:`build_weights`: the backward scan's per-chunk casts of its two float32 states,
  ``W0 + η S_i`` and ``G = η U``, to half precision, in one pass.

For the conv: Token ``n`` reads ``n + off`` (offsets -2..2) only inside its
own chunk, given by the chunk ids ``g`` (B, N) of :func:`fastweights.ops.inplace_ttt.chunk_ids`.

Triton is optional: :data:`HAVE_TRITON` says whether it imports. The kernels also run on CPU
tensors under ``TRITON_INTERPRET=1`` (that is how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the `triton` extra is not installed
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "IMPLS", "build_weights", "chunk_conv", "chunk_conv_backward", "on_device", "pick_impl",
           "usable"]

IMPLS = ("auto", "torch", "triton")  # how an op with a Triton kernel runs

# (tokens, channels) per program; measured on an H100 at d=4096, N=32768 (scripts/tune_conv.py)
FWD_BLOCK = (16, 256)
BWD_BLOCK = (128, 64)


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: CUDA, or CPU under TRITON_INTERPRET=1."""
    if not HAVE_TRITON:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def pick_impl(impl: str, x: torch.Tensor, dtypes: tuple | None = None) -> str:
    """``torch`` or ``triton`` for ``impl`` in :data:`IMPLS` and a tensor on the target device:
    ``auto`` takes Triton for CUDA tensors (of ``dtypes``, when given) outside torch.compile."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        fast = x.is_cuda and (dtypes is None or x.dtype in dtypes) and usable(x) and not torch.compiler.is_compiling()
        return "triton" if fast else "torch"
    if impl == "triton" and not HAVE_TRITON:
        raise ValueError("impl='triton' needs the triton package: pip install 'fastweights[triton]' (or use "
                         "impl='auto' or 'torch')")
    if impl == "triton" and not usable(x):
        raise ValueError(f"impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got one on {x.device}")
    return impl


def on_device(x: torch.Tensor):
    """A context for a kernel launch on ``x``'s device. Triton launches on the *current* CUDA
    device, not on its arguments' (triton-lang/triton#2441), so a model spread over several
    GPUs (``device_map``) needs ``x``'s device made current; a no-op when it already is, and on
    CPU (the interpreter)."""
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


if HAVE_TRITON:

    @triton.jit
    def _conv_kernel(
        x_ptr, w_ptr, g_ptr, out_ptr, s_ptr, dw_ptr,
        N, D, n_blocks,
        TRANSPOSE: tl.constexpr, WITH_DW: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """out[n] = Σ_k w[:, k] x[n ± (k-2)] within the chunk of n; x, out, s are (B, N, D)
        contiguous, w (D, 5), g (B, N) int32. With WITH_DW (and TRANSPOSE), x is ∂t and each
        program also writes its partial ∂w[k] = Σ_n s[n] x[n-(k-2)] to dw (B·n_blocks, 5, D)."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = tl.program_id(2)
        n = pid_n * BN + tl.arange(0, BN)
        dd = pid_d * BD + tl.arange(0, BD)
        mn = n < N
        md = dd < D
        row = b.to(tl.int64) * N
        gn = tl.load(g_ptr + row + n, mask=mn, other=-1)
        if WITH_DW:
            s_at = s_ptr + (row + n)[:, None] * D + dd[None, :]
            sv = tl.load(s_at, mask=mn[:, None] & md[None, :], other=0.0).to(tl.float32)
        acc = tl.zeros((BN, BD), dtype=tl.float32)
        for k in tl.static_range(5):
            if TRANSPOSE:
                src = n - (k - 2)
            else:
                src = n + (k - 2)
            ok = mn & (src >= 0) & (src < N)
            gs = tl.load(g_ptr + row + src, mask=ok, other=-2)
            ok = ok & (gs == gn)
            x_at = x_ptr + (row + src)[:, None] * D + dd[None, :]
            xv = tl.load(x_at, mask=ok[:, None] & md[None, :], other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + dd * 5 + k, mask=md, other=0.0).to(tl.float32)
            acc += xv * wk[None, :]
            if WITH_DW:
                part = tl.sum(xv * sv, axis=0)
                tl.store(dw_ptr + ((b * n_blocks + pid_n) * 5 + k) * D + dd, part, mask=md)
        tl.store(out_ptr + (row + n)[:, None] * D + dd[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mn[:, None] & md[None, :])


def _grid(B: int, N: int, D: int, block):
    return (triton.cdiv(N, block[0]), triton.cdiv(D, block[1]), B)


def chunk_conv(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """t (B, N, d): the chunk-local conv of x (B, N, d) with w (d, 5); g (B, N) chunk ids."""
    x = x.contiguous()
    B, N, D = x.shape
    out = torch.empty_like(x)
    if x.numel():
        gi = g.to(torch.int32).contiguous()
        with on_device(x):
            _conv_kernel[_grid(B, N, D, FWD_BLOCK)](x, w.contiguous(), gi, out, x, out, N, D, 1, TRANSPOSE=False,
                                                    WITH_DW=False, BN=FWD_BLOCK[0], BD=FWD_BLOCK[1])
    return out


def chunk_conv_backward(dt: torch.Tensor, s: torch.Tensor, w: torch.Tensor, g: torch.Tensor, need_dw: bool):
    """(∂s (B, N, d), ∂w (d, 5) float32 or None) of t = chunk_conv(s, w, g), given ∂t."""
    dt, s = dt.contiguous(), s.contiguous()
    B, N, D = dt.shape
    ds = torch.empty_like(dt)
    nb = triton.cdiv(N, BWD_BLOCK[0])
    dw_part = torch.empty(B * nb if need_dw else 1, 5, D, dtype=torch.float32, device=dt.device)
    if dt.numel():
        with on_device(dt):
            _conv_kernel[_grid(B, N, D, BWD_BLOCK)](dt, w.contiguous(), g.to(torch.int32).contiguous(), ds, s,
                                                    dw_part, N, D, nb, TRANSPOSE=True, WITH_DW=need_dw,
                                                    BN=BWD_BLOCK[0], BD=BWD_BLOCK[1])
    elif need_dw:
        dw_part.zero_()
    return ds, (dw_part.sum(0).t() if need_dw else None)


if HAVE_TRITON:

    @triton.jit
    def _weights_kernel(
        s_ptr, w_ptr, u_ptr, ul_ptr, R, Cn, ld_s, ld_w, ld_u, ld_ul, sigma,
        BR: tl.constexpr, BC: tl.constexpr,
    ):
        """w = low(s) and ul = low(sigma·u); all (R, Cn) with row strides ld_*."""
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        m = (r < R)[:, None] & (c < Cn)[None, :]
        r64 = r.to(tl.int64)[:, None]
        s = tl.load(s_ptr + r64 * ld_s + c[None, :], mask=m, other=0.0)
        tl.store(w_ptr + r64 * ld_w + c[None, :], s.to(w_ptr.dtype.element_ty), mask=m)
        u = tl.load(u_ptr + r64 * ld_u + c[None, :], mask=m, other=0.0)
        tl.store(ul_ptr + r64 * ld_ul + c[None, :], (sigma * u).to(ul_ptr.dtype.element_ty), mask=m)


def build_weights(s, out_w, u, sigma: float, out_u) -> None:
    """``out_w = s`` and ``out_u = sigma·u`` in one pass (float32 states to low precision).
    All are (R, C) matrices whose columns are contiguous."""
    R, Cn = s.shape
    if not R * Cn:
        return
    for t in (s, out_w, u, out_u):
        assert t.stride(1) == 1, "columns must be contiguous"
    grid = (triton.cdiv(R, 32), triton.cdiv(Cn, 256))
    with on_device(s):
        _weights_kernel[grid](
            s, out_w, u, out_u, R, Cn, s.stride(0), out_w.stride(0), u.stride(0), out_u.stride(0), float(sigma),
            BR=32, BC=256,
        )
