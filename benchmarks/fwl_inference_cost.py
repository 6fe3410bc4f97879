"""Inference cost of FWL and In-Place TTT relative to the plain model, at the shapes of the
fwl-dynamic-eval experiment (CPU, float32, one document of up to 512 bytes per forward).

FLOPs (matmuls and attention, torch.utils.flop_counter) and wall-clock do not depend on the
weights' values, so untrained models of the experiment's shapes are measured, on the
experiment's test documents. Wall-clock: interleaved repeats, minimum per model.

    PYTHONPATH=. python benchmarks/fwl_inference_cost.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import torch

from fastweights.experiments.fwl_dynamic_eval import (
    LABELS,
    Scale,
    build,
    split,
    static_flops_per_token,
    static_seconds,
    stdlib_documents,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sc = Scale()
    docs = stdlib_documents(max(sc.eval_len, sc.seq + 2))
    test = split(docs, sc)[2]
    kinds = ("base", "fwl", "fwl_residual", "inplace_ttt")
    models = {k: build(k, sc, 0).eval() for k in kinds}
    flops = {k: static_flops_per_token(m, test[0]) for k, m in models.items()}
    secs = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for k, m in models.items():
            secs[k].append(static_seconds(m, test))
    print(f"CPU: {platform.processor() or platform.machine()}, threads {args.threads}, float32, "
          f"{len(test)} documents of {sc.eval_len} bytes, d={sc.hidden}, layers={sc.layers}, V=256")
    print(f"| model | FLOPs/token | FLOPs × plain | seconds (min of {args.repeats}) | time × plain |")
    print("|---|---|---|---|---|")
    for k in kinds:
        t = min(secs[k])
        print(f"| {LABELS[k]} | {flops[k] / 1e6:.2f} M | {flops[k] / flops['base']:.2f} | {t:.3f} | "
              f"{t / min(secs['base']):.2f} |")


if __name__ == "__main__":
    main()
