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

Each path is checked first against the float64 product; both are timed replayed from a CUDA graph
(median of ``--iters``). Forward only: a fused path for training also needs the backward with
the same work as its epilogue, which is not written. ``--tiny`` runs small shapes on CPU (the
Triton kernel under ``TRITON_INTERPRET=1``; timings meaningless).

    python benchmarks/lact_grad_product.py                 # H100
    TRITON_INTERPRET=1 python benchmarks/lact_grad_product.py --tiny
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from lact_glue import time_ms  # benchmarks/, beside this script

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
            rows_h = h_ptr + (bh * L + t[:, None]) * (2 * D)
            rows_d = (bh * L + t[:, None]) * D
            # η column of matrix m: e1 (W1) takes η1, e3 (W3) η3, ev (W2) η2: columns 0, 2, 1
            eta = tl.load(lr_ptr + (bh * L + t) * 3 + (3 - m) % 3, mask=mt, other=0.0).to(tl.float32)[:, None]
            if m < 2:  # A = e1 or e3 over columns i; B = k over columns j
                msk = mt[:, None] & mi[None, :]
                h1 = tl.load(rows_h + i[None, :], mask=msk, other=0.0).to(tl.float32)
                dz = tl.load(dz_ptr + rows_d + i[None, :], mask=msk, other=0.0).to(tl.float32)
                sig = tl.sigmoid(h1)
                if m == 0:
                    h3 = tl.load(rows_h + D + i[None, :], mask=msk, other=0.0).to(tl.float32)
                    a_t = dz * h3 * (sig * (1.0 + h1 * (1.0 - sig))) * eta
                else:
                    a_t = dz * h1 * sig * eta
                b_t = tl.load(k_ptr + rows_d + j[None, :], mask=mt[:, None] & mj[None, :], other=0.0).to(tl.float32)
            else:  # A = ev over columns i; B = z over columns j
                a_t = -tl.load(v_ptr + rows_d + i[None, :], mask=mt[:, None] & mi[None, :],
                               other=0.0).to(tl.float32) * eta
                mskj = mt[:, None] & mj[None, :]
                h1j = tl.load(rows_h + j[None, :], mask=mskj, other=0.0).to(tl.float32)
                h3j = tl.load(rows_h + D + j[None, :], mask=mskj, other=0.0).to(tl.float32)
                b_t = h1j * tl.sigmoid(h1j) * h3j
            mm = k_ptr.dtype.element_ty  # the matmul dtype (bf16 in training)
            acc += tl.dot(tl.trans(a_t.to(mm)), b_t.to(mm))
        out = g_ptr + ((bh * 3 + m) * D + i[:, None]) * D + j[None, :]
        tl.store(out, acc, mask=mi[:, None] & mj[None, :])


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not HAVE_TRITON:
        p.error("needs triton")
    if args.tiny:
        dev, dt, (B, H, L, D) = torch.device("cpu"), torch.float32, (1, 2, 37, 24)
        configs, ref = [(16, 16, 16, 4)], operands_product
    else:
        if not torch.cuda.is_available():
            p.error("needs CUDA (or --tiny)")
        dev, dt, (B, H, L, D) = torch.device("cuda"), torch.bfloat16, (1, 4, 2048, 384)
        # (tile i, tile j, tokens per step, warps): the sm_90 builds without register spills (cuobjdump;
        # 128 x 128 tiles at 32 or 64 tokens per step, and 4-warp 128 x 128 tiles, spill)
        configs = [(128, 128, 16, 8), (64, 128, 16, 4), (64, 64, 16, 4), (64, 64, 32, 8)]
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
