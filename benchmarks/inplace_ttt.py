"""Benchmark: the In-Place TTT MLP (fast path) against a plain SwiGLU MLP and the official formulation.

Each row times, on one CUDA GPU, batch 1, in the chosen dtype:

* plain:    ``o = (silu(x Wgᵀ) * (x Wuᵀ)) Wdᵀ``;
* official: the same MLP with ``Wd`` as fast weights, computed as the official code does
  (re-derived here): per-chunk deltas ``v_iᵀ z_i`` (B, T, d, f), concatenated after ``W0``,
  a cumsum over chunks, and one einsum that applies each chunk's weights;
* ours:     the same MLP through :func:`fastweights.ops.inplace_ttt.inplace_ttt` (``impl="auto"``,
  which is the fast path on CUDA).

The target ``v = Conv_K(x) @ P`` (``target="hidden"``: the MLP input is the target source) is
the same autograd code in official and ours. Times are ``triton.testing.do_bench`` medians
after a warm-up, for forward + backward (gradients of x and every weight) and for the forward
alone (under ``torch.no_grad``). Peak memory is ``torch.cuda.max_memory_allocated`` over one
forward + backward, inputs and weights included.

A correctness check runs first (the fast path against the float64 chunked form, forward and
every gradient, odd sizes and documents, each dtype); if it fails, no speedup is printed.

    PYTHONPATH=. python benchmarks/inplace_ttt.py              # all rows of the issue
    PYTHONPATH=. python benchmarks/inplace_ttt.py --rows 0 5 --variants auto,tf=full
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from fastweights.ops.inplace_ttt import chunk_ids, doc_starts, inplace_ttt, inplace_ttt_chunked, ttt_target
from fastweights.ops.inplace_ttt_fast import default_block, inplace_ttt_fast

ROWS = [  # (d, f, N, C)
    (2560, 9728, 8192, 1024),
    (2560, 9728, 32768, 1024),
    (2560, 9728, 32768, 4096),
    (4096, 12288, 32768, 4096),
    (4096, 12288, 65536, 4096),
    (2048, 8192, 16384, 256),
]
LR = 3.0  # the official recommended η
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- the three MLPs
def official_scan(z, v, w0, lr, chunk_size):
    """The official formulation: (B, T, d, f) deltas, cat with W0, cumsum, einsum apply."""
    B, N, f = z.shape
    d = v.shape[-1]
    if N % chunk_size:
        raise ValueError(f"the official formulation needs N % C == 0, got N={N}, C={chunk_size}")
    T = N // chunk_size
    zc = z.view(B, T, chunk_size, f)
    vc = v.view(B, T, chunk_size, d)
    deltas = torch.einsum("btcd,btcf->btdf", vc, zc) * lr
    weights = torch.cat([w0.expand(B, 1, d, f), deltas[:, :-1]], dim=1).cumsum(dim=1)
    return torch.einsum("btcf,btdf->btcd", zc, weights).reshape(B, N, d)


def make_mlp(kind, p, chunk_size, **fast_kw):
    """A function x -> o for kind in plain | official | ours."""

    def hidden(x):
        return F.silu(F.linear(x, p["wg"])) * F.linear(x, p["wu"])

    if kind == "plain":
        return lambda x: F.linear(hidden(x), p["wd"])
    if kind == "official":

        def official(x):
            z = hidden(x)
            g, _ = chunk_ids(doc_starts(x.shape[0], x.shape[1], device=x.device), chunk_size)
            v = ttt_target(x, p["conv"], p["proj"], g)
            return official_scan(z, v, p["wd"], LR, chunk_size)

        return official
    if fast_kw:
        return lambda x: inplace_ttt_fast(
            hidden(x), x, p["wd"], p["conv"], p["proj"], LR, chunk_size, **fast_kw
        )
    return lambda x: inplace_ttt(hidden(x), x, p["wd"], p["conv"], p["proj"], LR, chunk_size)


def make_params(d, f, dtype, device, gen):
    def r(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    return {
        "wg": r(f, d, scale=d**-0.5),
        "wu": r(f, d, scale=d**-0.5),
        "wd": r(d, f, scale=f**-0.5),
        "conv": r(d, 5, scale=0.2),
        "proj": r(d, d, scale=d**-0.5),
    }


# --------------------------------------------------------------------------- correctness
def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check(device, dtypes, full_rows) -> bool:
    """Fast path vs the float64 chunked form: forward and every gradient. True if all pass."""
    ok = True
    gen = torch.Generator(device=device).manual_seed(1)
    cases = [  # (B, N, d, f, C, cu_seqlens, tile_f)
        (1, 1000, 96, 203, 128, None, None),
        (2, 777, 80, 150, 100, None, 64),
        (1, 901, 64, 129, 64, [0, 5, 300, 301, 700, 901], 50),
    ]
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    for dtype in dtypes:
        for B, N, d, f, C, cu, tile in cases:
            errs = _compare(B, N, d, f, C, cu, tile, dtype, device, gen)
            bad = max(errs) > tol[dtype] or any(e != e for e in errs)
            ok &= not bad
            print(f"check {str(dtype):15s} B={B} N={N} d={d} f={f} C={C} docs={cu is not None}: "
                  f"max rel err {max(errs):.2e} {'FAIL' if bad else 'ok'}", flush=True)
    for d, f, N, C in full_rows:  # full size, bf16 vs a float32 chunked run on the GPU
        errs = _compare(1, N, d, f, C, None, None, torch.bfloat16, device, gen, ref_dtype=torch.float32)
        bad = max(errs) > tol[torch.bfloat16] or any(e != e for e in errs)
        ok &= not bad
        print(f"check full-size bf16 d={d} f={f} N={N} C={C} vs fp32 chunked: max rel err "
              f"{max(errs):.2e} {'FAIL' if bad else 'ok'}", flush=True)
    return ok


def _compare(B, N, d, f, C, cu, tile, dtype, device, gen, ref_dtype=torch.float64):
    z = torch.randn(B, N, f, generator=gen, device=device)
    s = torch.randn(B, N, d, generator=gen, device=device)
    w0 = torch.randn(d, f, generator=gen, device=device) * f**-0.5
    conv = torch.randn(d, 5, generator=gen, device=device) * 0.3
    proj = torch.randn(d, d, generator=gen, device=device) * d**-0.5
    lr = torch.tensor(0.5 / (N**0.5 * f**0.5), device=device)
    kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, device=device)}
    # ∂L/∂o: noise plus the fast-weight part u of o, so that ∂L/∂η is not a sum that cancels
    with torch.no_grad():
        ref = [t.to(ref_dtype) for t in (z, s, w0, conv, proj)]
        u = inplace_ttt_chunked(*ref, lr.to(ref_dtype), C, **kw) - inplace_ttt_chunked(*ref, 0.0, C, **kw)
        go = torch.randn(B, N, d, generator=gen, device=device)
        go += (u * (go.norm() / u.norm())).float()
    res = []
    for dt, fn in ((ref_dtype, inplace_ttt_chunked), (dtype, inplace_ttt_fast)):
        xs = [t.to(dt).requires_grad_() for t in (z, s, w0, conv, proj)]
        xs.append(lr.to(ref_dtype if dt == ref_dtype else torch.float32).requires_grad_())  # η: float32
        extra = {} if fn is inplace_ttt_chunked else {"tile_f": tile}
        o = fn(*xs[:5], xs[5], C, **kw, **extra)
        if fn is inplace_ttt_fast:
            assert not o.isnan().any(), "unwritten output"
        grads = torch.autograd.grad(o, xs, go.to(dt))
        res.append([o, *grads])
    return [rel_err(a, b) for a, b in zip(res[1], res[0], strict=True)]


# --------------------------------------------------------------------------- timing
def bench_row(d, f, N, C, dtype, variants, rep_ms):
    from triton.testing import do_bench

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    p = make_params(d, f, dtype, dev, gen)
    x = torch.randn(1, N, d, generator=gen, device=dev).to(dtype).requires_grad_()
    go = torch.randn(1, N, d, generator=gen, device=dev).to(dtype)
    params = [x, *p.values()]
    out = {}
    kinds = [("plain", {}), ("official", {})] + [("ours" if not kw else f"ours[{name}]", kw)
                                                 for name, kw in variants]
    for name, kw in kinds:
        base = "ours" if name.startswith("ours") else name
        fn = make_mlp(base, p, C, **kw)
        used = [x, p["wg"], p["wu"], p["wd"]] if name == "plain" else params

        def step(fn=fn, used=used):
            torch.autograd.grad(fn(x), used, go)

        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)

        try:
            step()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            t_fb = do_bench(step, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
            t_f = do_bench(fwd, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
        except torch.OutOfMemoryError:
            peak, t_fb, t_f = float("nan"), float("nan"), float("nan")
        torch.cuda.empty_cache()
        out[name] = {"fb_ms": t_fb, "f_ms": t_f, "peak_gib": peak / 2**30}
        print(f"  {name:22s} fwd+bwd {t_fb:9.3f} ms  fwd {t_f:9.3f} ms  peak {peak / 2**30:7.3f} GiB",
              flush=True)
    return out


def breakdown(d, f, N, C, dtype, kw):
    """Kernel time of one forward + backward of ours: GEMMs, the rest, the top non-GEMM kernels (ms)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    p = make_params(d, f, dtype, dev, gen)
    x = torch.randn(1, N, d, generator=gen, device=dev).to(dtype).requires_grad_()
    go = torch.randn(1, N, d, generator=gen, device=dev).to(dtype)
    fn = make_mlp("ours", p, C, **kw)
    for _ in range(2):
        torch.autograd.grad(fn(x), [x, *p.values()], go)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(fn(x), [x, *p.values()], go)
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue  # kernels only (operators would count their kernels twice)
        t = ev.device_time / 1e3
        name = ev.name.lower()
        is_gemm = any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90_xmma"))
        cats["gemm" if is_gemm else "other"] = cats.get("gemm" if is_gemm else "other", 0.0) + t
        if not is_gemm:
            cats["top:" + ev.name[:70]] = cats.get("top:" + ev.name[:70], 0.0) + t
    top = [(k[4:], round(v, 3)) for k, v in cats.items() if k.startswith("top:")]
    top = sorted(top, key=lambda kv: -kv[1])[:8]
    return {"gemm_ms": cats.get("gemm", 0.0), "other_ms": cats.get("other", 0.0), "top": top}


def flop_ratios(d, f, N, C, K=1):
    """(issue's floor, our algorithm) FLOPs of the TTT MLP over the plain MLP, fwd+bwd, with
    K chunks per block (one document of N tokens)."""
    L = K * C
    T = -(-N // L)
    plain = 18 * N * d * f
    proj = 6 * N * d * d
    floor = 24 * N * d * f + proj
    unit = 2 * L * d * f  # one block GEMM of (d, f) size
    ours = 12 * N * d * f + (7 * T - 5) * unit + proj  # gate/up fwd+bwd, the scan (saved state), P
    for a in range(0, N, L):  # in-block attention: rectangle (n−C) × m, forward 2, backward 6 GEMMs
        n = min(L, N - a)
        m = (-(-n // C) - 1) * C
        ours += max(n - C, 0) * m * (8 * f + 6 * d)
    return floor / plain, ours / plain


def parse_variants(text):
    out = []
    for item in [t for t in text.split(",") if t]:
        if item == "auto":
            out.append(("auto", {}))
            continue
        kw = {}
        for part in item.split("+"):
            key, val = part.split("=")
            if key == "tf":
                kw["tile_f"] = None if val == "auto" else (10**9 if val == "full" else int(val))
            elif key == "save":
                kw["save_state"] = val == "1"
            elif key == "K":
                kw["block"] = int(val)
            else:
                raise ValueError(f"unknown variant key {key!r}")
        out.append((item, kw))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=list(range(len(ROWS))))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--variants", default="auto",
                    help="comma list: auto | tf=N|full|auto+save=0|1+K=chunks per block")
    ap.add_argument("--rep-ms", type=int, default=400)
    ap.add_argument("--check-dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--no-full-check", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="profile ours: GEMM vs other kernel time")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    bad = [i for i in args.rows if not 0 <= i < len(ROWS)]
    if bad:
        ap.error(f"--rows {bad}: rows are 0..{len(ROWS) - 1} ({', '.join(f'{i}: {r}' for i, r in enumerate(ROWS))})")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    rows = [ROWS[i] for i in args.rows]
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| CUDA {torch.version.cuda}", flush=True)
    t0 = time.time()
    ok = check(dev, [DTYPES[k] for k in args.check_dtypes.split(",") if k],
               [] if args.no_full_check else rows[:1])
    print(f"correctness check {'passed' if ok else 'FAILED'} ({time.time() - t0:.0f} s)", flush=True)
    if not ok:
        print("refusing to print speedups: the fast path disagrees with the reference", file=sys.stderr)
        return 1
    variants = parse_variants(args.variants)
    results = []
    for d, f, N, C in rows:
        print(f"row d={d} f={f} N={N} C={C} {args.dtype}", flush=True)
        r = bench_row(d, f, N, C, DTYPES[args.dtype], variants, args.rep_ms)
        K = default_block(C, d, f, DTYPES[args.dtype])
        floor, alg = flop_ratios(d, f, N, C, K)
        entry = {"d": d, "f": f, "N": N, "C": C, "K": K, "times": r,
                 "flop_floor": floor, "flop_ours": alg}
        if args.breakdown:
            entry["breakdown"] = breakdown(d, f, N, C, DTYPES[args.dtype], {})
            print("  breakdown", entry["breakdown"], flush=True)
        results.append(entry)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print()
    print("| d | f | N | C | K | plain fwd+bwd ms | official ms | ours ms | official/plain | ours/plain "
          "| ours/official | plain fwd ms | official fwd ms | ours fwd ms | official fwd/plain "
          "| ours fwd/plain | peak GiB plain / official / ours | official mem/plain | ours mem/plain |")
    print("|" + "---|" * 19)
    for e in results:
        t = e["times"]
        for name in [k for k in t if k.startswith("ours")]:
            pl, of, us = t["plain"], t["official"], t[name]
            spec = name[5:-1] if name != "ours" else ""  # "ours[K=1+tf=512]"
            k = next((p[2:] for p in spec.split("+") if p.startswith("K=")), e["K"])  # a variant's own K
            print(f"| {e['d']} | {e['f']} | {e['N']} | {e['C']}{'' if name == 'ours' else ' ' + name[4:]} | {k} "
                  f"| {pl['fb_ms']:.2f} | {of['fb_ms']:.2f} | {us['fb_ms']:.2f} "
                  f"| {of['fb_ms'] / pl['fb_ms']:.2f}× | **{us['fb_ms'] / pl['fb_ms']:.2f}×** "
                  f"| {us['fb_ms'] / of['fb_ms']:.2f}× "
                  f"| {pl['f_ms']:.2f} | {of['f_ms']:.2f} | {us['f_ms']:.2f} "
                  f"| {of['f_ms'] / pl['f_ms']:.2f}× | **{us['f_ms'] / pl['f_ms']:.2f}×** "
                  f"| {pl['peak_gib']:.2f} / {of['peak_gib']:.2f} / {us['peak_gib']:.2f} "
                  f"| {of['peak_gib'] / pl['peak_gib']:.2f}× | **{us['peak_gib'] / pl['peak_gib']:.2f}×** |")
    print()
    print("FLOPs over plain (fwd+bwd): " + ", ".join(
        f"({e['d']},{e['f']},{e['N']},{e['C']}) floor {e['flop_floor']:.3f} ours {e['flop_ours']:.3f}"
        for e in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
