"""How far LaCT-Muon in bf16 (and float32) lands from the float64 reference when a chunk has
fewer tokens than the head width (docs/lact.md, "bf16").

The chunk's gradient then has rank at most the chunk length, and Newton-Schulz lifts its
empty directions, which in bf16 hold rounding noise. One row, random unit-norm q/k/v, learning
rates in [0, 0.3), ``lact_chunked`` against ``lact_reference`` in float64; prints the relative
max error per (chunk, N, dtype). Runs on the CPU in seconds:

    python benchmarks/lact_muon_precision.py
    python benchmarks/lact_muon_precision.py --width 24 --chunks 8 24 96
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastweights.ops.lact import lact_chunked, lact_reference


def rel_max_err(chunk: int, n: int, width: int, heads: int, dtype: torch.dtype, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (F.normalize(torch.randn(1, heads, n, width, generator=g), dim=-1) for _ in range(3))
    lr = torch.rand(1, heads, n, 3, generator=g) * 0.3
    beta = torch.rand(1, heads, n, generator=g)
    ws = [torch.randn(heads, width, width, generator=g) / width**0.5 for _ in range(3)]
    args = (q, k, v, lr, beta, *ws)
    ref = lact_reference(*(t.double() for t in args), chunk_size=chunk, update="muon")
    out = lact_chunked(*(t.to(dtype) for t in args), chunk_size=chunk, update="muon")
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=12, help="head width (default: 12)")
    p.add_argument("--heads", type=int, default=2, help="fast-weight heads (default: 2)")
    p.add_argument("--chunks", type=int, nargs="+", default=[3, 16, 48], help="chunk lengths (default: 3 16 48)")
    p.add_argument("--updates", type=int, default=3, help="chunks per row: N = chunk x updates (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"CPU, torch {torch.__version__}, {a.heads} heads of width {a.width}, {a.updates} chunks per row; max "
          "relative error against the float64 reference")
    print("| chunk | N | float32 | bf16 |\n|---|---|---|---|")
    for c in a.chunks:
        n = c * a.updates
        errs = [rel_max_err(c, n, a.width, a.heads, dt, a.seed) for dt in (torch.float32, torch.bfloat16)]
        print(f"| {c} | {n} | {errs[0]:.2e} | {errs[1]:.2e} |")


if __name__ == "__main__":
    main()
