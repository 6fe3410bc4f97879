"""Time of one associative-retrieval training step per (model, R) cell (SPEC §4, issue 7).

One training step as ``fastweights experiment associative-retrieval`` takes it: batch of
training sequences (K = 4 pairs, 11 tokens), forward, cross-entropy, backward, gradient-norm
clip, Adam step. Reports the median of ``--repeats`` timings of ``--steps`` steps each (after
``--warmup`` steps), per cell, and the sum over the cells: the cost of one step of every run of
one seed, which sets the wall time of the full table.

    python benchmarks/associative_retrieval_step.py                    # this CPU, 1 thread
    PYTHONPATH=/path/to/other/checkout python benchmarks/associative_retrieval_step.py  # compare

The second form times another checkout's package with this script. It imports that checkout's
model, optimiser, training step (``train_step``) and data; for checkouts older than
``train_step``, use the script as committed in 474aa32 (docs/results/associative_retrieval.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastweights.experiments import associative_retrieval as ar


def time_cell(kind: str, hidden: int, data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> float:
    """Median milliseconds per training step of one (model, R) cell."""
    x, y = data
    torch.manual_seed(0)
    model = ar.RetrievalModel(kind, hidden)
    opt = ar.make_optimizer(model, 1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        ar.train_step(model, opt, x[idx], y[idx], clip=5.0)

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
    p.add_argument("--models", nargs="+", default=list(ar.MODELS), choices=list(ar.MODELS))
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
    data = ar._data(ar.parse_args([]))["train"]  # the experiment's default splits (SPEC §4, K = 4)
    print(f"# {ar.cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch_size}, median of {args.repeats} x {args.steps} steps")
    print("| model | " + " | ".join(f"R={h} ms" for h in args.hidden_sizes) + " |")
    print("|---|" + "---|" * len(args.hidden_sizes))
    total = 0.0
    for kind in args.models:
        row = [time_cell(kind, h, data, args) for h in args.hidden_sizes]
        total += sum(row)
        print(f"| {ar.MODELS[kind]} | " + " | ".join(f"{ms:.2f}" for ms in row) + " |")
    print(f"\nsum over cells: {total:.1f} ms per step")


if __name__ == "__main__":
    main()
