"""What fused kernels would buy LaCT-Muon's Newton-Schulz chain (issue 9; docs/benchmarks.md,
"Sixth measurement").

The chain is five iterations ``X <- aX + (bA + cA^2)X``, ``A = XX^T``, on the (12, 384, 384)
batch of the 760M benchmark (3 fast matrices x 4 heads), forward and the hand-derived backward
of ``fastweights.ops.lact._NewtonSchulzIters`` (``_ns_backward``). This script times, from CUDA graphs (median):

* ``torch eager``: the library's chain (cuBLAS ``bmm``; since the tenth session the ``aX`` term
  rides in ``B' = aI + bA + cA²``, formed elementwise), eager;
* ``torch compiled``: the same under torch.compile, as it runs inside the compiled chunk loop;
* ``triton fused``: one Triton kernel per product with the scalings and additions fused,
  ``out = alpha (P1 Q1 [+ P2 Q2]) + beta R``: three launches per iteration each way (the
  backward's ``S = GX^T + XG^T``, ``P = bS + c(SA + AS)`` and ``G' = aG + BG + PX`` each become
  one product with two terms), for several tile shapes;
* ``triton persistent``: each direction in ONE launch: one program per 128x128 output tile,
  the programs of a matrix meeting at a barrier in global memory (atomics) between the
  products, so no kernel boundary at all (CUDA only: the programs must all be resident).

Each is first checked against the float64 chain (relative error of the output and of the
input gradient) and its timing is not printed if it is off by more than the torch bf16
chain's error allows. These kernels are a study, not library code: the chunk loop keeps
torch's chain (see the docs for why).

With ``--in-loop`` it then times one layer's compiled Muon chunk loop
(``benchmarks/lact_loop_profile.py``'s, the 760M shapes) in the same process with torch's
chain and with the fused Triton chain put in its place (the module's ``_NewtonSchulzIters``
swapped for this run only), in bf16 and in float32, and prints how far apart the loops' outputs
and gradients are: fused vs torch in each dtype, and torch's bf16 loop vs its float32 loop.

    python benchmarks/lact_newton_schulz.py          # H100
    python benchmarks/lact_newton_schulz.py --in-loop
    python benchmarks/lact_newton_schulz.py --tiny   # CPU smoke test: Triton interpreter, no timing
"""

from __future__ import annotations

import argparse
import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: its kernels run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from lact_loop_profile import _loop, _timer  # noqa: E402  (benchmarks/, beside this script)

from fastweights.ops.lact import NS_COEFFS, _ns_backward, _ns_iterations  # noqa: E402

STEPS = 5
TILES = [  # (BM, BN, BK, warps, stages) for the fused kernels
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
]


@triton.jit
def _tile_mm(acc, p, spm, spk, q, sqk, sqn, rm, rn, M, N, K, BK: tl.constexpr):
    """acc + P[rm, :K] @ Q[:K, rn] for one tile; P, Q given by pointer and strides (float32
    inputs multiply in full float32, not TF32, like torch's default)."""
    rk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(p + rm[:, None] * spm + kk[None, :] * spk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        y = tl.load(q + kk[:, None] * sqk + rn[None, :] * sqn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if x.dtype == tl.float32:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _tile_out(out, som, son, r, srm, srn, p1, sp1m, sp1k, q1, sq1k, sq1n, p2, sp2m, sp2k, q2, sq2k, sq2n,
              alpha, beta, rm, rn, M, N, K, TWO: tl.constexpr, HAS_R: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    """Store ``alpha (P1 Q1 [+ P2 Q2]) + beta R`` on the tile (rm, rn) of the (M, N) ``out``,
    products over K, float32 accumulation; every matrix by pointer and strides."""
    acc = _tile_mm(tl.zeros((BM, BN), tl.float32), p1, sp1m, sp1k, q1, sq1k, sq1n, rm, rn, M, N, K, BK)
    if TWO:
        acc = _tile_mm(acc, p2, sp2m, sp2k, q2, sq2k, sq2n, rm, rn, M, N, K, BK)
    acc = acc * alpha
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_R:
        acc += beta * tl.load(r + rm[:, None] * srm + rn[None, :] * srn, mask=msk, other=0.0).to(tl.float32)
    tl.store(out + rm[:, None] * som + rn[None, :] * son, acc.to(out.dtype.element_ty), mask=msk)


@triton.jit
def _mm_kernel(p1, q1, p2, q2, r, out, M, N, K, alpha, beta,
               sp1b, sp1m, sp1k, sq1b, sq1k, sq1n, sp2b, sp2m, sp2k, sq2b, sq2k, sq2n,
               srb, srm, srn, sob, som, son,
               TWO: tl.constexpr, HAS_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[b] = alpha (P1[b] Q1[b] [+ P2[b] Q2[b]]) + beta R[b], (M, K) x (K, N); grid (M/BM, N/BN, batch)."""
    b = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    _tile_out(out + b * sob, som, son, r + b * srb, srm, srn, p1 + b * sp1b, sp1m, sp1k, q1 + b * sq1b, sq1k, sq1n,
              p2 + b * sp2b, sp2m, sp2k, q2 + b * sq2b, sq2k, sq2n, alpha, beta, rm, rn, M, N, K, TWO, HAS_R,
              BM, BN, BK)


def _mm(p1, q1, p2=None, q2=None, r=None, alpha=1.0, beta=0.0, tile=TILES[3]):
    """Batched ``alpha (p1 @ q1 [+ p2 @ q2]) + beta r`` in one launch; any strides (views)."""
    bm, bn, bk, warps, stages = tile
    P, M, K = p1.shape
    N = q1.shape[-1]
    out = torch.empty(P, M, N, device=p1.device, dtype=p1.dtype)
    p2_, q2_, r_ = (p1 if p2 is None else p2), (q1 if q2 is None else q2), (out if r is None else r)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), P)
    _mm_kernel[grid](p1, q1, p2_, q2_, r_, out, M, N, K, alpha, beta,
                     *p1.stride(), *q1.stride(), *p2_.stride(), *q2_.stride(), *r_.stride(), *out.stride(),
                     TWO=p2 is not None, HAS_R=r is not None, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out


def fused_forward(x, tile):
    """The iterations with three fused launches each: (y, saved [(X, A, B)])."""
    a, b, c = NS_COEFFS
    saved = []
    for _ in range(STEPS):
        A = _mm(x, x.mT, tile=tile)
        B = _mm(A, A, r=A, alpha=c, beta=b, tile=tile)
        saved.append((x, A, B))
        x = _mm(B, x, r=x, beta=a, tile=tile)
    return x, saved


def fused_backward(g, saved, tile):
    """∂L/∂X from ∂L/∂Y (same formulas as _NewtonSchulzIters.backward), three launches per step."""
    a, b, c = NS_COEFFS
    for x, A, B in reversed(saved):
        S = _mm(g, x.mT, x, g.mT, tile=tile)  # dB + dBᵀ
        P = _mm(S, A, A, S, r=S, alpha=c, beta=b, tile=tile)  # bS + c(SA + AS)
        g = _mm(B, g, P, x, r=g, beta=a, tile=tile)  # aG + BG + PX
    return g


@triton.jit
def _barrier(cnt, target):
    """Wait until ``target`` arrivals at ``cnt`` (one per program and phase); orders memory."""
    tl.debug_barrier()
    tl.atomic_add(cnt, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _persistent_tiles(R, S, BT: tl.constexpr):
    """For a persistent program (grid (tiles of (R, S), P)): its matrix, the programs per matrix,
    whether it owns an (R, R) tile, that tile's rows and columns, and those of its (R, S) tile."""
    pid = tl.program_id(0)
    ntr = tl.cdiv(R, BT)
    nts = tl.cdiv(S, BT)
    ar = tl.arange(0, BT)
    return (tl.program_id(1), ntr * nts, pid < ntr * ntr, (pid // ntr) * BT + ar, (pid % ntr) * BT + ar,
            (pid // nts) * BT + ar, (pid % nts) * BT + ar)


@triton.jit
def _persistent_forward(xs, As, Bs, cnt, P, R, S, a, b, c, STEPS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """All iterations in one launch; grid (tiles of (R, S), P); xs (STEPS+1, P, R, S), As/Bs (STEPS, P, R, R).
    Per iteration three phases, each followed by a barrier of the matrix's programs: A = XXᵀ and
    B = bA + cA² on the (R, R) tiles, X' = aX + BX on the (R, S) tiles."""
    mat, nprog, in_rr, rm, rn, rm2, rn2 = _persistent_tiles(R, S, BT)
    for s in range(STEPS):
        X = xs + (s * P + mat).to(tl.int64) * R * S
        A = As + (s * P + mat).to(tl.int64) * R * R
        B = Bs + (s * P + mat).to(tl.int64) * R * R
        Xn = xs + ((s + 1) * P + mat).to(tl.int64) * R * S
        if in_rr:  # A = X Xᵀ
            _tile_out(A, R, 1, A, R, 1, X, S, 1, X, 1, S, X, S, 1, X, 1, S, 1.0, 0.0, rm, rn, R, R, S,
                      False, False, BT, BT, BK)
        _barrier(cnt + mat, (3 * s + 1) * nprog)
        if in_rr:  # B = c A A + b A
            _tile_out(B, R, 1, A, R, 1, A, R, 1, A, R, 1, A, R, 1, A, R, 1, c, b, rm, rn, R, R, R,
                      False, True, BT, BT, BK)
        _barrier(cnt + mat, (3 * s + 2) * nprog)
        # X' = B X + a X
        _tile_out(Xn, S, 1, X, S, 1, B, R, 1, X, S, 1, B, R, 1, X, S, 1, 1.0, a, rm2, rn2, R, S, R,
                  False, True, BT, BT, BK)
        _barrier(cnt + mat, (3 * s + 3) * nprog)


@triton.jit
def _persistent_backward(xs, As, Bs, gs, Ss, Ps, cnt, P, R, S, a, b, c, STEPS: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr):
    """The backward in one launch, phases as in the forward; gs (2, P, R, S) ping-pong
    (gs[0] = ∂L/∂Y), Ss/Ps (P, R, R) scratch."""
    mat, nprog, in_rr, rm, rn, rm2, rn2 = _persistent_tiles(R, S, BT)
    Sm = Ss + mat.to(tl.int64) * R * R
    Pm = Ps + mat.to(tl.int64) * R * R
    for t in range(STEPS):
        s = STEPS - 1 - t
        X = xs + (s * P + mat).to(tl.int64) * R * S
        A = As + (s * P + mat).to(tl.int64) * R * R
        B = Bs + (s * P + mat).to(tl.int64) * R * R
        G = gs + ((t % 2) * P + mat).to(tl.int64) * R * S
        Gn = gs + (((t + 1) % 2) * P + mat).to(tl.int64) * R * S
        if in_rr:  # S = G Xᵀ + X Gᵀ
            _tile_out(Sm, R, 1, Sm, R, 1, G, S, 1, X, 1, S, X, S, 1, G, 1, S, 1.0, 0.0, rm, rn, R, R, S,
                      True, False, BT, BT, BK)
        _barrier(cnt + mat, (3 * t + 1) * nprog)
        if in_rr:  # P = c (S A + A S) + b S
            _tile_out(Pm, R, 1, Sm, R, 1, Sm, R, 1, A, R, 1, A, R, 1, Sm, R, 1, c, b, rm, rn, R, R, R,
                      True, True, BT, BT, BK)
        _barrier(cnt + mat, (3 * t + 2) * nprog)
        # G' = B G + P X + a G
        _tile_out(Gn, S, 1, G, S, 1, B, R, 1, G, S, 1, Pm, R, 1, X, S, 1, 1.0, a, rm2, rn2, R, S, R,
                  True, True, BT, BT, BK)
        _barrier(cnt + mat, (3 * t + 3) * nprog)


PERSISTENT = dict(BT=128, BK=64, num_warps=8, num_stages=3)


def _persistent_grid(P, R, S):
    grid = (triton.cdiv(R, PERSISTENT["BT"]) * triton.cdiv(S, PERSISTENT["BT"]), P)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if grid[0] * grid[1] > sms:  # every program must be resident at once, one per SM to be safe
        raise ValueError(f"persistent kernel needs {grid[0] * grid[1]} resident programs, the GPU has {sms} SMs")
    return grid


def persistent_forward(x):
    a, b, c = NS_COEFFS
    P, R, S = x.shape
    xs = torch.empty(STEPS + 1, P, R, S, device=x.device, dtype=x.dtype)
    xs[0] = x
    As = torch.empty(STEPS, P, R, R, device=x.device, dtype=x.dtype)
    Bs = torch.empty_like(As)
    cnt = torch.zeros(P, device=x.device, dtype=torch.int32)
    _persistent_forward[_persistent_grid(P, R, S)](xs, As, Bs, cnt, P, R, S, a, b, c, STEPS=STEPS, **PERSISTENT)
    return xs[STEPS], (xs, As, Bs)


def persistent_backward(g, saved):
    a, b, c = NS_COEFFS
    xs, As, Bs = saved
    P, R, S = g.shape
    gs = torch.empty(2, P, R, S, device=g.device, dtype=g.dtype)
    gs[0] = g
    Ss = torch.empty(P, R, R, device=g.device, dtype=g.dtype)
    Ps = torch.empty_like(Ss)
    cnt = torch.zeros(P, device=g.device, dtype=torch.int32)
    _persistent_backward[_persistent_grid(P, R, S)](xs, As, Bs, gs, Ss, Ps, cnt, P, R, S, a, b, c, STEPS=STEPS,
                                                    **PERSISTENT)
    return gs[STEPS % 2]


def torch_forward(x):
    return _ns_iterations(x, STEPS)


class _FusedNewtonSchulz(torch.autograd.Function):
    """Drop-in for ``fastweights.ops.lact._NewtonSchulzIters`` on the fused Triton kernels."""

    @staticmethod
    def forward(ctx, x, steps: int):
        assert steps == STEPS
        y, saved = fused_forward(x, (64, 128, 64, 4, 3))  # the fastest forward tile above
        ctx.save_for_backward(*(t for step in saved for t in step))
        return y

    @staticmethod
    def backward(ctx, g):
        sv = ctx.saved_tensors
        return fused_backward(g.contiguous(), [sv[i:i + 3] for i in range(0, len(sv), 3)], TILES[3]), None


def in_loop(iters: int, tiny: bool = False) -> None:
    """One layer's compiled Muon loop with torch's chain, then with the fused one (see the
    docstring), in bf16 (timed) and float32; prints how far the loops' outputs and gradients
    are apart."""
    import fastweights.ops.lact as lact_ops

    device = torch.device("cpu" if tiny else "cuda")
    shape, chunk = ((1, 2, 40, 12), 8) if tiny else ((1, 4, 32768, 384), 2048)
    dtypes = [torch.float32] if tiny else [torch.bfloat16, torch.float32]
    original, results = lact_ops._NewtonSchulzIters, {}
    try:
        for dtype in dtypes:
            for label, chain in (("torch", original), ("triton fused", _FusedNewtonSchulz)):
                lact_ops._NewtonSchulzIters = chain
                torch._dynamo.reset()
                lact_ops._COMPILED.clear()
                fwd_ms, step_ms, forward, (ins, cot) = _loop("muon", chunk, device, *shape, dtype, iters)
                out = forward()
                grads = torch.autograd.grad(out, ins, cot)
                results[label, dtype] = [t.double() for t in (out, *grads)]
                print(f"Muon loop, {label} chain, {dtype}: forward {fwd_ms:.2f} ms, forward+backward {step_ms:.2f} ms",
                      flush=True)
    finally:
        lact_ops._NewtonSchulzIters = original
        torch._dynamo.reset()
        lact_ops._COMPILED.clear()

    def diff(a, b):
        return " ".join(f"{((x - y).norm() / y.norm()).item():.1e}" for x, y in zip(a, b, strict=True))

    print("relative difference of the loop output, then of the gradients of q k v lr beta w1 w2 w3:")
    for dtype in dtypes:
        print(f"fused vs torch loop, {dtype}: {diff(results['triton fused', dtype], results['torch', dtype])}")
    if not tiny:  # how far bf16 rounding alone moves the loop: torch's chain, bf16 vs float32
        print(f"torch loop, bf16 vs float32: {diff(results['torch', dtypes[0]], results['torch', dtypes[1]])}")


def _graph_us(fn, iters: int, reps: int = 10) -> float:
    """Median µs of ``fn()`` replayed from a CUDA graph holding ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()  # warm-up replay, untimed
    return _timer(torch.device("cuda"))(graph.replay, iters) * 1e3 / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: Triton interpreter, correctness only")
    p.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--in-loop", action="store_true", help="also time the Muon chunk loop with either chain")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: the timings need a GPU (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    P, R, S = (12, 384, 384) if cuda else (3, 20, 36)  # the tiny size has ragged tiles
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(P, R, S, generator=gen, dtype=torch.float64)
    x64 = x64 / x64.norm(dim=(-2, -1), keepdim=True)  # the chain's input is Frobenius-normalised
    g64 = torch.randn(P, R, S, generator=gen, dtype=torch.float64)
    y_ref, saved = torch_forward(x64)
    gx_ref = _ns_backward(g64, saved)
    x, g = x64.to(device, dtype), g64.to(device, dtype)

    def rel(t, ref):
        return ((t.double().cpu() - ref).norm() / ref.norm()).item()

    methods = {"torch eager": (torch_forward, _ns_backward)}
    if cuda:  # inductor fuses the elementwise work, as inside the compiled chunk loop
        methods["torch compiled"] = (torch.compile(torch_forward), torch.compile(_ns_backward))
    for tile in TILES if cuda else TILES[:1]:
        methods[f"triton fused {tile[0]}x{tile[1]}x{tile[2]} w{tile[3]} s{tile[4]}"] = (
            lambda x, t=tile: fused_forward(x, t), lambda g, sv, t=tile: fused_backward(g, sv, t))
    if cuda:
        methods["triton persistent"] = (persistent_forward, persistent_backward)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    timing = f"times from CUDA graphs, median of {args.iters}" if cuda else "not timed"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, X ({P}, {R}, {S}), "
          f"{STEPS} iterations; {timing}")
    print("| method | rel. err. y | rel. err. ∂x | forward µs | backward µs | total µs |\n|---|---|---|---|---|---|")
    limit = None
    for label, (fwd, bwd) in methods.items():
        try:
            y, sv = fwd(x)
            gx = bwd(g, sv)
            ey, eg = rel(y, y_ref), rel(gx, gx_ref)
            if limit is None:  # torch eager in this dtype sets the bar
                limit = 2 * max(ey, eg, 1e-6)
            if max(ey, eg) > limit:
                print(f"| {label} | {ey:.2e} | {eg:.2e} | off by more than 2x torch's error: not timed | | |")
                continue
            if not cuda:
                print(f"| {label} | {ey:.2e} | {eg:.2e} | – | – | – |")
                continue
            tf = _graph_us(lambda f=fwd: f(x), args.iters)
            tb = _graph_us(lambda b=bwd, s=sv: b(g, s), args.iters)
            print(f"| {label} | {ey:.2e} | {eg:.2e} | {tf:.1f} | {tb:.1f} | {tf + tb:.1f} |", flush=True)
        except Exception as e:  # noqa: BLE001 — report and go on with the other methods
            print(f"| {label} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |", flush=True)
    if cuda:
        bmm = _graph_us(lambda: torch.bmm(x, x.mT), args.iters)
        print(f"\none ({P}, {R}, {R}) x ({P}, {R}, {S}) bmm (cuBLAS): {bmm:.1f} µs; compute bound at 989 TFLOP/s: "
              f"{2 * P * R * R * S / 989e12 * 1e6:.1f} µs")
    if args.in_loop:
        in_loop(10 if cuda else 1, tiny=not cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
