"""Diagnose: addmm with out_dtype on CUDA for the layouts the scan uses; per-gradient errors."""
import torch

from benchmarks.inplace_ttt import _compare

dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


for dt in (torch.bfloat16, torch.float16):
    for case in ["contig", "a_t", "b_strided", "out_strided", "all"]:
        for beta, alpha in ((0.0, 1.0), (1.0, 1.0), (1.0, -1.0), (1.0, 0.7)):
            M, K, Nn = 80, 100, 64
            A = torch.randn(M, K, device=dev, generator=g).to(dt)
            if case in ("a_t", "all"):
                A = torch.randn(K, M, device=dev, generator=g).to(dt).t()
            Bb = torch.randn(K, Nn, device=dev, generator=g).to(dt)
            if case in ("b_strided", "all"):
                Bb = torch.randn(K, 150, device=dev, generator=g).to(dt)[:, 30:30 + Nn]
            base = torch.randn(M, 100, device=dev, generator=g)
            out = base[:, :Nn] if case in ("out_strided", "all") else base[:, :Nn].contiguous()
            init = out.clone()
            torch.addmm(out, A, Bb, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)
            ref = beta * init.double() + alpha * (A.double() @ Bb.double())
            e = rel(out, ref)
            if e > 1e-2:
                print(f"BAD addmm {dt} {case} beta={beta} alpha={alpha}: {e:.2e}")
    print("addmm layouts done", dt)

cases = [(2, 777, 80, 150, 100, None, 64), (1, 901, 64, 129, 64, [0, 5, 300, 301, 700, 901], 50),
         (1, 1000, 96, 203, 128, None, None), (1, 1000, 96, 203, 128, None, 64)]
names = ["o", "z", "s", "w0", "conv", "proj", "lr"]
for dt in (torch.bfloat16, torch.float16):
    for c in cases:
        for rep in range(2):
            errs = _compare(*c, dt, dev, g)
            print(dt, c[:5], c[6], " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs, strict=True)))
