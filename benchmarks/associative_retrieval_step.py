"""Time of one associative-retrieval training step per (model, R) cell (SPEC §4, issue 7).

One training step as ``fastweights experiment associative-retrieval`` takes it: batch of
training sequences (K = 4 pairs, 11 tokens), forward, cross-entropy, backward, gradient-norm
clip, Adam step. Reports the median of ``--repeats`` timings of ``--steps`` steps each (after
``--warmup`` steps), per cell, and the sum over the cells: the cost of one step of every run of
one seed, which sets the wall time of the full table.

    python benchmarks/associative_retrieval_step.py                    # this CPU, 1 thread
    PYTHONPATH=/path/to/older/checkout python benchmarks/associative_retrieval_step.py  # compare

The second form times another checkout's package with this script (the script imports only
``RetrievalModel``, ``make_optimizer`` and the data splits).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastweights.experiments.associative_retrieval import MODELS, RetrievalModel, _splits, make_optimizer


def time_cell(kind: str, hidden: int, data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> float:
    """Median milliseconds per training step of one (model, R) cell."""
    x, y = data
    torch.manual_seed(0)
    model = RetrievalModel(kind, hidden)
    opt = make_optimizer(model, 1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t0) / args.steps * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--hidden-sizes", nargs="+", type=int, default=[20, 50, 100])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per cell (median reported)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    for name in ("batch_size", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    data = _splits(0, 4, 100_000, 10_000, 20_000)["train"]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch_size}, median of {args.repeats} x {args.steps} steps")
    print("| model | " + " | ".join(f"R={h} ms" for h in args.hidden_sizes) + " |")
    print("|---|" + "---|" * len(args.hidden_sizes))
    total = 0.0
    for kind in args.models:
        row = [time_cell(kind, h, data, args) for h in args.hidden_sizes]
        total += sum(row)
        print(f"| {MODELS[kind]} | " + " | ".join(f"{ms:.2f}" for ms in row) + " |")
    print(f"\nsum over cells: {total:.1f} ms per step")


if __name__ == "__main__":
    main()
