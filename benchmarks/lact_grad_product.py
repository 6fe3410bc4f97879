"""Study: the LaCT chunk update's gradient product with its elementwise prologue fused (issue 9).

In the fast path's chunk step (``fastweights.ops.lact._contiguous_step``) the three fast-weight
gradients of a chunk come from one batched product of stacked operands,

    g = [e1, e3, ev]ᵀ @ [k, k, z]          (B, H, 3, D, D), K = chunk length L
    e1 = η1 · dz * h3 * SiLU'(h1),  e3 = η3 · dz * SiLU(h1),  ev = -η2 · v,  z = SiLU(h1) * h3

with ``h = k [W1; W3]ᵀ`` (B, H, L, 2D) and ``dz = -v W2`` (B, H, L, D). Compiled, the operands
are formed by memory-bound kernels that write both stacks (6 (L, D) tensors per head) before the
product reads them back: about 0.8 ms of the H100 step's forward and 1.4 ms of its backward
(docs/benchmarks.md, sixteenth measurement). This script times, for one chunk's forward at the
benchmark's shapes (B 1, 4 heads of 384, L 2048, bf16):

* ``torch (compiled)``: the operands and the product as the chunk step computes them;
* ``triton (fused prologue)``: one Triton kernel that forms each operand tile from h, dz, v, k and
  η as it loads it (float32 arithmetic, products in the inputs' dtype) and writes only g.

and then forward and backward: the compiled path through autograd against the fused forward
plus two Triton kernels for the backward (:func:`fused_product_backward`: ∂e and ∂z from products
over the 384 columns with the elementwise chain to ∂h, ∂dz, ∂v, ∂η as their epilogue, and ∂k
with e1, e3 formed in its prologue). Each path is checked first against float64 (the product,
then every gradient); all are timed replayed from a CUDA graph (median of ``--iters``). Result
on the H100 (docs/benchmarks.md, seventeenth measurement): the fused kernels took 2.9× the
compiled path's time forward and 3.7× forward + backward (the non-spilling tiles reduce 16 tokens
per step), so they were not wired into the chunk loop; the script is kept as the record.
``--tiny`` runs small shapes on CPU (the Triton kernels under ``TRITON_INTERPRET=1``; timings
meaningless). The tile settings swept are those whose sm_90 build does not spill registers
(cuobjdump).

    python benchmarks/lact_grad_product.py                 # H100
    TRITON_INTERPRET=1 python benchmarks/lact_grad_product.py --tiny
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: its kernels run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools

import torch
import torch.nn.functional as F
from lact_glue import time_ms, timing_args  # benchmarks/, beside this script

from fastweights.ops.inplace_ttt_triton import HAVE_TRITON, on_device
from fastweights.ops.lact import _compiled

if HAVE_TRITON:
    import triton
    import triton.language as tl


def operands_product(h, dz, v, k, lr):
    """g (B, H, 3, D, D) as the chunk step computes it: h (B, H, L, 2D), dz, v, k (B, H, L, D),
    lr (B, H, L, 3), all in the matmul dtype."""
    D = dz.shape[-1]
    h1, h3 = h[..., :D], h[..., D:]
    sig = torch.sigmoid(h1)
    a = h1 * sig
    e1 = dz * h3 * (sig * (1 + h1 * (1 - sig))) * lr[..., 0:1]
    e3 = dz * a * lr[..., 2:3]
    ev = -(v * lr[..., 1:2])
    return torch.stack([e1, e3, ev], 2).mT @ torch.stack([k, k, a * h3], 2)


if HAVE_TRITON:

    @triton.jit
    def _h_tiles(h_ptr, bh, L, D, t, cols, mask):
        """h1, h3 (float32) of tokens t and columns ``cols`` from h (BH, L, 2D) = [h1, h3]."""
        rows = h_ptr + (bh * L + t[:, None]) * (2 * D) + cols[None, :]
        return (tl.load(rows, mask=mask, other=0.0).to(tl.float32),
                tl.load(rows + D, mask=mask, other=0.0).to(tl.float32))

    @triton.jit
    def _grad_product_kernel(h_ptr, dz_ptr, v_ptr, k_ptr, lr_ptr, g_ptr, L, D, n_i, n_j,
                             BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
        """Grid (B·H·3·n_i·n_j,): one (BI, BJ) tile of g[bh, m]; h (BH, L, 2D), dz, v, k (BH, L, D),
        lr (BH, L, 3) contiguous; g (BH, 3, D, D) float32."""
        pid = tl.program_id(0)
        tj = pid % n_j
        ti = (pid // n_j) % n_i
        m = (pid // (n_j * n_i)) % 3
        bh = (pid // (n_j * n_i * 3)).to(tl.int64)
        i = ti * BI + tl.arange(0, BI)
        j = tj * BJ + tl.arange(0, BJ)
        mi, mj = i < D, j < D
        acc = tl.zeros((BI, BJ), dtype=tl.float32)
        for k0 in range(0, L, BK):
            t = k0 + tl.arange(0, BK)
            mt = t < L
            rows_d = (bh * L + t[:, None]) * D
            # η column of matrix m: e1 (W1) takes η1, e3 (W3) η3, ev (W2) η2: columns 0, 2, 1
            eta = tl.load(lr_ptr + (bh * L + t) * 3 + (3 - m) % 3, mask=mt, other=0.0).to(tl.float32)[:, None]
            if m < 2:  # A = e1 or e3 over columns i; B = k over columns j
                msk = mt[:, None] & mi[None, :]
                h1, h3 = _h_tiles(h_ptr, bh, L, D, t, i, msk)
                dz = tl.load(dz_ptr + rows_d + i[None, :], mask=msk, other=0.0).to(tl.float32)
                sig = tl.sigmoid(h1)
                if m == 0:
                    a_t = dz * h3 * (sig * (1.0 + h1 * (1.0 - sig))) * eta
                else:
                    a_t = dz * h1 * sig * eta
                b_t = tl.load(k_ptr + rows_d + j[None, :], mask=mt[:, None] & mj[None, :], other=0.0).to(tl.float32)
            else:  # A = ev over columns i; B = z over columns j
                a_t = -tl.load(v_ptr + rows_d + i[None, :], mask=mt[:, None] & mi[None, :],
                               other=0.0).to(tl.float32) * eta
                mskj = mt[:, None] & mj[None, :]
                h1j, h3j = _h_tiles(h_ptr, bh, L, D, t, j, mskj)
                b_t = h1j * tl.sigmoid(h1j) * h3j
            mm = k_ptr.dtype.element_ty  # the matmul dtype (bf16 in training)
            acc += tl.dot(tl.trans(a_t.to(mm)), b_t.to(mm))
        out = g_ptr + ((bh * 3 + m) * D + i[:, None]) * D + j[None, :]
        tl.store(out, acc, mask=mi[:, None] & mj[None, :])


if HAVE_TRITON:

    @triton.jit
    def _row_tiles(n_t, n_c):
        """This program's (token tile, column tile, row b·h) on a grid of B·H·n_t·n_c programs."""
        pid = tl.program_id(0)
        return (pid // n_c) % n_t, pid % n_c, (pid // (n_c * n_t)).to(tl.int64)

    @triton.jit
    def _grad_product_bwd_a(h_ptr, dz_ptr, v_ptr, k_ptr, lr_ptr, dg_ptr, dh_ptr, ddz_ptr, dv_ptr, dlr_ptr,
                            L, D, n_t, n_i, n_bh, BT: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr):
        """Grid (B·H·n_t·n_i,) with n_bh = B·H: tokens T (BT) by columns I (BI) of the product's backward except ∂k.
        With dg (BH, 3, D, D) float32: ∂e1 = k dg0ᵀ, ∂e3 = k dg1ᵀ, ∂ev = z dg2ᵀ, ∂z = ev dg2, then
        their elementwise chain to ∂h (BH, L, 2D), ∂dz, ∂v (BH, L, D) and this column block's
        partial ∂η sums, dlr (n_i, BH, L, 3) float32."""
        tt, ti, bh = _row_tiles(n_t, n_i)
        t = tt * BT + tl.arange(0, BT)
        i = ti * BI + tl.arange(0, BI)
        mt, mi = t < L, i < D
        mm = k_ptr.dtype.element_ty
        eta2 = tl.load(lr_ptr + (bh * L + t) * 3 + 1, mask=mt, other=0.0).to(tl.float32)[:, None]
        d_e1 = tl.zeros((BT, BI), dtype=tl.float32)
        d_e3 = tl.zeros((BT, BI), dtype=tl.float32)
        d_ev = tl.zeros((BT, BI), dtype=tl.float32)
        d_z = tl.zeros((BT, BI), dtype=tl.float32)
        dg = dg_ptr + bh * 3 * D * D
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            mc = c < D
            mtc = mt[:, None] & mc[None, :]
            k_t = tl.load(k_ptr + (bh * L + t[:, None]) * D + c[None, :], mask=mtc, other=0.0)
            h1c, h3c = _h_tiles(h_ptr, bh, L, D, t, c, mtc)
            z_t = (h1c * tl.sigmoid(h1c) * h3c).to(mm)
            ev_t = (-tl.load(v_ptr + (bh * L + t[:, None]) * D + c[None, :], mask=mtc, other=0.0).to(tl.float32)
                    * eta2).to(mm)
            mic = mi[:, None] & mc[None, :]
            rows = i[:, None] * D + c[None, :]  # dg_m[i, c]
            dg0 = tl.load(dg + rows, mask=mic, other=0.0).to(mm)
            dg1 = tl.load(dg + D * D + rows, mask=mic, other=0.0).to(mm)
            dg2 = tl.load(dg + 2 * D * D + rows, mask=mic, other=0.0).to(mm)
            dg2t = tl.load(dg + 2 * D * D + c[:, None] * D + i[None, :], mask=mc[:, None] & mi[None, :],
                           other=0.0).to(mm)  # dg2[c, i]
            d_e1 += tl.dot(k_t, tl.trans(dg0))
            d_e3 += tl.dot(k_t, tl.trans(dg1))
            d_ev += tl.dot(z_t, tl.trans(dg2))
            d_z += tl.dot(ev_t, dg2t)
        mti = mt[:, None] & mi[None, :]
        rh = (bh * L + t[:, None]) * (2 * D) + i[None, :]
        rd = (bh * L + t[:, None]) * D + i[None, :]
        h1, h3 = _h_tiles(h_ptr, bh, L, D, t, i, mti)
        dz = tl.load(dz_ptr + rd, mask=mti, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rd, mask=mti, other=0.0).to(tl.float32)
        eta1 = tl.load(lr_ptr + (bh * L + t) * 3, mask=mt, other=0.0).to(tl.float32)[:, None]
        eta3 = tl.load(lr_ptr + (bh * L + t) * 3 + 2, mask=mt, other=0.0).to(tl.float32)[:, None]
        s = tl.sigmoid(h1)
        si = h1 * s  # SiLU
        sp = s * (1.0 + h1 * (1.0 - s))  # SiLU'
        spp = s * (1.0 - s) * (2.0 + h1 * (1.0 - 2.0 * s))  # SiLU''
        out = dh_ptr.dtype.element_ty
        tl.store(ddz_ptr + rd, (d_e1 * eta1 * h3 * sp + d_e3 * eta3 * si).to(out), mask=mti)
        tl.store(dh_ptr + rh + D, (d_e1 * eta1 * dz * sp + d_z * si).to(out), mask=mti)
        tl.store(dh_ptr + rh, (d_e1 * eta1 * dz * h3 * spp + d_e3 * eta3 * dz * sp + d_z * h3 * sp).to(out), mask=mti)
        tl.store(dv_ptr + rd, (-eta2 * d_ev).to(out), mask=mti)
        base = ((ti.to(tl.int64) * n_bh + bh) * L + t) * 3
        tl.store(dlr_ptr + base, tl.sum(d_e1 * dz * h3 * sp, axis=1), mask=mt)
        tl.store(dlr_ptr + base + 1, -tl.sum(d_ev * v, axis=1), mask=mt)
        tl.store(dlr_ptr + base + 2, tl.sum(d_e3 * dz * si, axis=1), mask=mt)

    @triton.jit
    def _grad_product_bwd_k(h_ptr, dz_ptr, lr_ptr, dg_ptr, dk_ptr, L, D, n_t, n_j,
                            BT: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr):
        """Grid (B·H·n_t·n_j,): ∂k[T, J] = e1 dg0 + e3 dg1 over the columns i of e1, e3, which are
        formed from h, dz and η as they are loaded."""
        tt, tj, bh = _row_tiles(n_t, n_j)
        t = tt * BT + tl.arange(0, BT)
        j = tj * BJ + tl.arange(0, BJ)
        mt, mj = t < L, j < D
        mm = dz_ptr.dtype.element_ty
        eta1 = tl.load(lr_ptr + (bh * L + t) * 3, mask=mt, other=0.0).to(tl.float32)[:, None]
        eta3 = tl.load(lr_ptr + (bh * L + t) * 3 + 2, mask=mt, other=0.0).to(tl.float32)[:, None]
        acc = tl.zeros((BT, BJ), dtype=tl.float32)
        dg = dg_ptr + bh * 3 * D * D
        for c0 in range(0, D, BC):
            c = c0 + tl.arange(0, BC)
            mc = c < D
            mtc = mt[:, None] & mc[None, :]
            h1, h3 = _h_tiles(h_ptr, bh, L, D, t, c, mtc)
            dz = tl.load(dz_ptr + (bh * L + t[:, None]) * D + c[None, :], mask=mtc, other=0.0).to(tl.float32)
            s = tl.sigmoid(h1)
            e1 = (dz * h3 * (s * (1.0 + h1 * (1.0 - s))) * eta1).to(mm)
            e3 = (dz * h1 * s * eta3).to(mm)
            mcj = mc[:, None] & mj[None, :]
            dg0 = tl.load(dg + c[:, None] * D + j[None, :], mask=mcj, other=0.0).to(mm)
            dg1 = tl.load(dg + D * D + c[:, None] * D + j[None, :], mask=mcj, other=0.0).to(mm)
            acc += tl.dot(e1, dg0)
            acc += tl.dot(e3, dg1)
        tl.store(dk_ptr + (bh * L + t[:, None]) * D + j[None, :], acc.to(dk_ptr.dtype.element_ty),
                 mask=mt[:, None] & mj[None, :])


def fused_product_backward(h, dz, v, k, lr, dg, bt: int = 64, bi: int = 32, bc: int = 16, warps: int = 8):
    """∂h, ∂dz, ∂v, ∂k, ∂lr of :func:`operands_product` for ∂g = ``dg`` (B, H, 3, D, D), from
    :func:`_grad_product_bwd_a` and :func:`_grad_product_bwd_k` (ready for an autograd.Function;
    the gradient of k through h = k [W1; W3]ᵀ is outside this op)."""
    B, H, L, D = k.shape
    dg = dg.float().contiguous()
    dh, ddz, dv, dk = torch.empty_like(h), torch.empty_like(dz), torch.empty_like(v), torch.empty_like(k)
    n_t, n_i = triton.cdiv(L, bt), triton.cdiv(D, bi)
    dlr = torch.empty(n_i, B * H, L, 3, device=k.device, dtype=torch.float32)
    with on_device(k):
        _grad_product_bwd_a[(B * H * n_t * n_i,)](h, dz, v, k, lr, dg, dh, ddz, dv, dlr, L, D, n_t, n_i, B * H,
                                                  BT=bt, BI=bi, BC=bc, num_warps=warps)
        _grad_product_bwd_k[(B * H * n_t * n_i,)](h, dz, lr, dg, dk, L, D, n_t, n_i, BT=bt, BJ=bi, BC=bc,
                                                  num_warps=warps)
    return dh, ddz, dv, dk, dlr.sum(0).view(B, H, L, 3).to(lr.dtype)


def fused_product(h, dz, v, k, lr, bi: int = 128, bj: int = 128, bk: int = 32, warps: int = 8):
    """:func:`operands_product` from :func:`_grad_product_kernel` (float32 out)."""
    B, H, L, D = k.shape
    g = torch.empty(B, H, 3, D, D, device=k.device, dtype=torch.float32)
    n_i, n_j = triton.cdiv(D, bi), triton.cdiv(D, bj)
    with on_device(k):
        _grad_product_kernel[(B * H * 3 * n_i * n_j,)](h, dz, v, k, lr, g, L, D, n_i, n_j, BI=bi, BJ=bj, BK=bk,
                                                      num_warps=warps)
    return g


def make(B, H, L, D, dev, dt, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, device=dev, generator=gen)).to(dt)

    return r(B, H, L, 2 * D), r(B, H, L, D), r(B, H, L, D), F.normalize(r(B, H, L, D).float(), dim=-1).to(dt), \
        F.softplus(r(B, H, L, 3).float() - 3).to(dt)


def main(argv=None) -> int:
    p, args = timing_args(__doc__, argv)
    if not HAVE_TRITON:
        p.error("needs triton")
    if args.tiny:
        dev, dt, (B, H, L, D) = torch.device("cpu"), torch.float32, (1, 2, 37, 24)
        configs, bwd_configs, ref = [(16, 16, 16, 4)], [(16, 16, 16, 4)], operands_product
    else:
        if not torch.cuda.is_available():
            p.error("needs CUDA (or --tiny)")
        dev, dt, (B, H, L, D) = torch.device("cuda"), torch.bfloat16, (1, 4, 2048, 384)
        # (tile i, tile j, tokens per step, warps): the sm_90 builds without register spills (cuobjdump;
        # 128 x 128 tiles at 32 or 64 tokens per step, and 4-warp 128 x 128 tiles, spill)
        configs = [(128, 128, 16, 8), (64, 128, 16, 4), (64, 64, 16, 4), (64, 64, 32, 8)]
        # (tokens, columns, columns per step, warps) of the backward kernels
        bwd_configs = [(64, 32, 16, 8), (32, 64, 16, 8), (32, 32, 16, 8)]
        ref = _compiled(operands_product, "bench-grad-product", "default")
    x = make(B, H, L, D, dev, dt)
    want = operands_product(*(t.double() for t in x))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{name}, {dt}, B {B}, {H} heads of {D}, chunk {L}; one chunk's gradient product, forward; "
          f"median of {args.iters}, replayed from a CUDA graph on CUDA")
    print("| path | tile (i, j, k), warps | rel. err. vs float64 | µs | × torch |")
    print("|---|---|---|---|---|")

    def err(g):
        return float((g.double() - want).norm() / want.norm())

    base, _ = time_ms(lambda: ref(*x), dev, args.warmup, args.iters)
    print(f"| torch ({'compiled' if dev.type == 'cuda' else 'eager'}) | - | {err(ref(*x)):.1e} | {base * 1e3:.1f} "
          f"| 1.00 |")
    for bi, bj, bk, w in configs:
        fn = functools.partial(fused_product, *x, bi=bi, bj=bj, bk=bk, warps=w)
        e = err(fn())
        ms, _ = time_ms(fn, dev, args.warmup, args.iters)
        print(f"| triton (fused prologue) | {bi}, {bj}, {bk}, {w} | {e:.1e} | {ms * 1e3:.1f} | {ms / base:.2f} |")

    leaves = [t.double().requires_grad_() for t in x]
    dg = torch.randn(B, H, 3, D, D, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    want_grads = torch.autograd.grad(operands_product(*leaves), leaves, dg.double())
    xr = [t.detach().requires_grad_() for t in x]

    def grad_err(grads):
        return max(float((a.double() - b).norm() / b.norm()) for a, b in zip(grads, want_grads, strict=True))

    def torch_both():
        return [t.detach() for t in torch.autograd.grad(ref(*xr), xr, dg.to(dt))]

    print("\n| forward + backward | forward tile / backward tile (tokens, columns, step, warps) "
          "| worst rel. err. of the gradients | µs | × torch |")
    print("|---|---|---|---|---|")
    base, _ = time_ms(torch_both, dev, args.warmup, args.iters)
    print(f"| torch ({'compiled' if dev.type == 'cuda' else 'eager'}), autograd | - | {grad_err(torch_both()):.1e} "
          f"| {base * 1e3:.1f} | 1.00 |")
    fwd = configs[0]
    for bt, bi, bc, w in bwd_configs:
        def both(bt=bt, bi=bi, bc=bc, w=w):
            g = fused_product(*x, bi=fwd[0], bj=fwd[1], bk=fwd[2], warps=fwd[3])
            return [g, *fused_product_backward(*x, dg, bt=bt, bi=bi, bc=bc, warps=w)]
        e = grad_err(both()[1:])
        ms, _ = time_ms(both, dev, args.warmup, args.iters)
        print(f"| triton (fused) | {fwd} / {bt}, {bi}, {bc}, {w} | {e:.1e} | {ms * 1e3:.1f} | {ms / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
