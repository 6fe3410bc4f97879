"""Lookahead and SLRLA against their inner optimiser, over several seeds (SPEC §6).

Two tasks:

- ``--task digits`` (default, CPU): a small CNN on scikit-learn's 8x8 digits (1,797 images,
  fixed stratified 75/25 split), SGD vs Lookahead(SGD) vs SLRLA(SGD), all with the stagewise
  schedule (LR x0.2 at 30/60/80% of training). Needs the ``experiments`` extra (scikit-learn).
- ``--task lm`` (GPU-sized): the project trainer (``fastweights.train``) on a preset (``20m``
  by default, no TTT) and a prepared dataset (``--data``, from ``fastweights prepare``: the
  default corpus with the BPE tokenizer), AdamW vs Lookahead(AdamW) vs SLRLA(AdamW) with its
  warmup + cosine schedule and a fixed token budget; validation loss on the dataset's val split.

Lookahead and SLRLA are evaluated with their slow weights. Writes ``DIR/lookahead_<task>.json``
and ``.png`` and prints a markdown table: mean ± std over seeds, and for each wrapper
whether its difference from the inner optimiser exceeds the seed spread (|Δ mean| greater
than the sum of the two standard deviations).

    fastweights experiment lookahead [--task digits|lm] [--quick] [--seeds 0 1 2]

To use several processes (or share one GPU), run subsets (``--methods M --seeds S --out DIR_i``),
then merge them with ``--combine DIR_1 DIR_2 ... --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fastweights.errors import FastWeightsError
from fastweights.experiments._runs import apply_quick, group_runs
from fastweights.optim import Lookahead, build_optimizer, stagewise_lr

METHODS = {"digits": ("sgd", "lookahead_sgd", "slrla_sgd"), "lm": ("adamw", "lookahead_adamw", "slrla_adamw")}


def _evaluate(model: nn.Module, opt: torch.optim.Optimizer, fn):
    """Run ``fn()`` in eval mode, with the slow weights for a Lookahead optimiser."""
    model.eval()
    try:
        if isinstance(opt, Lookahead):
            with opt.slow_weights():
                return fn()
        return fn()
    finally:
        model.train()


# ----------------------------------------------------------------------------- digits (CPU)
def load_digits_split() -> tuple[torch.Tensor, ...]:
    """``x_train [N, 1, 8, 8], y_train [N], x_val, y_val`` (pixel values scaled to [0, 1])."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise FastWeightsError("the digits task needs scikit-learn: pip install 'fastweights[experiments]'") from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va = train_test_split(range(len(y)), test_size=0.25, stratify=data.target, random_state=0)
    return x[tr], y[tr], x[va], y[va]


def digits_cnn() -> nn.Module:
    """conv 16 -> conv 32 -> pool -> linear: [B, 1, 8, 8] -> logits [B, 10]."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def run_digits(method: str, seed: int, args, data) -> dict:
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = build_optimizer(
        method, model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, **args.la
    )
    steps_per_epoch = math.ceil(len(y_tr) / args.batch_size)
    sched = stagewise_lr(opt, args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    curve = {"epoch": [], "val_acc": [], "val_loss": []}

    def val():
        logits = model(x_va)
        return (logits.argmax(-1) == y_va).float().mean().item(), nn.functional.cross_entropy(logits, y_va).item()

    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(y_tr), generator=gen).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            acc, vloss = _evaluate(model, opt, val)
        curve["epoch"].append(epoch)
        curve["val_acc"].append(acc)
        curve["val_loss"].append(vloss)
    return {"val_acc": curve["val_acc"][-1], "val_loss": curve["val_loss"][-1], "curve": curve}


# ----------------------------------------------------------------------------- language model (GPU)
def run_lm(method: str, seed: int, args, data: str) -> dict:
    """Train a preset with the project trainer (``fastweights.train``) using ``method``, then
    score the exported model (slow weights for Lookahead/SLRLA) on the dataset's val split."""
    from fastweights.data.store import Dataset
    from fastweights.eval.lm import perplexity
    from fastweights.models.presets import load_model
    from fastweights.train.trainer import TrainConfig, pick_device, train

    cfg = TrainConfig(
        data=data, out=str(args.out / "runs" / f"{method}-seed{seed}"), model=args.model, ttt=False,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, optimizer=method,
        lookahead_k=args.k, lookahead_alpha=args.alpha, slrla_beta=args.beta, lr=args.lr,
        warmup=max(1, args.steps // 20), weight_decay=args.weight_decay, seed=seed, save_every=args.steps,
        keep=1, progress=not args.quiet, threads=args.threads,
    )
    start = time.time()
    summary = train(cfg, resumer="fastweights experiment lookahead")
    seconds = time.time() - start
    device = pick_device("auto")
    model = load_model(summary["model"]).to(device)
    with torch.inference_mode():
        val = perplexity(model, Dataset(data).split("val"), args.seq_len, args.batch_size,
                         max(1, args.val_tokens // args.seq_len), progress=not args.quiet)
    log = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    every = max(1, len(log) // 100)
    curve = {"step": [r["step"] for r in log[::every]], "train_loss": [r["loss"] for r in log[::every]]}
    return {"val_loss": val["loss"], "val_tokens": val["tokens"], "tokens": summary["tokens"],
            "parameters": summary["parameters"], "train_seconds": round(seconds, 1), "curve": curve}


# ----------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(results: dict, metrics: list[str]) -> str:
    """Markdown: mean ± std per method and metric; Δ vs the first (inner) optimiser."""
    methods = list(results)
    base = methods[0]
    head = "| method | " + " | ".join(f"{m} (mean ± std)" for m in metrics) + " | "
    head += " | ".join(f"Δ{m} vs {base} | exceeds spread" for m in metrics) + " |"
    rows = [head, "|" + " --- |" * (1 + 3 * len(metrics))]
    for method in methods:
        cells = []
        for m in metrics:
            mean, std = _mean_std([r[m] for r in results[method]])
            cells.append(f"{mean:.4f} ± {std:.4f}")
        for m in metrics:
            if method == base:
                cells += ["", ""]
                continue
            mean, std = _mean_std([r[m] for r in results[method]])
            bmean, bstd = _mean_std([r[m] for r in results[base]])
            cells += [f"{mean - bmean:+.4f}", "yes" if abs(mean - bmean) > std + bstd else "no"]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, path: Path, x_key: str, y_key: str, title: str) -> None:
    from fastweights.eval.plot import figure

    fig, ax = figure(figsize=(7, 4.5))
    for method, runs in results.items():
        xs = runs[0]["curve"][x_key]
        ys = torch.tensor([r["curve"][y_key] for r in runs])
        mean, std = ys.mean(0), (ys.std(0) if len(runs) > 1 else torch.zeros_like(ys[0]))
        ax.plot(xs, mean, label=f"{method} (n={len(runs)})")
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastweights experiment lookahead", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(METHODS), default="digits")
    p.add_argument("--quick", action="store_true", help="a few steps (the test suite's setting)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: docs/results/lookahead (the committed results); with --quick, runs/quick/lookahead")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the task's methods (default: all)")
    p.add_argument("--combine", type=Path, nargs="+", help="merge the outputs of these runs (subsets) into --out")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.2, help="SLRLA regulariser strength")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 (digits), 3e-3 (lm)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (digits), 0.1 (lm)")
    p.add_argument("--epochs", type=int, default=30, help="digits: epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (both tasks)")
    p.add_argument("--data", default="", help="lm: prepared dataset directory (`fastweights prepare`)")
    p.add_argument("--model", default="20m", help="lm: a preset size of fastweights.models.presets")
    p.add_argument(
        "--steps", type=int, default=1800, help="lm: optimiser steps; tokens = steps x batch x seq-len (29.5M)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="lm: sequence length")
    p.add_argument("--val-tokens", type=int, default=1_000_000, help="lm: validation tokens")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.out is None:  # a smoke run never overwrites the committed results
        args.out = Path("runs/quick/lookahead" if args.quick else "docs/results/lookahead")
    lm = args.task == "lm"
    args.lr = args.lr if args.lr is not None else (3e-3 if lm else 0.05)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (0.1 if lm else 5e-4)
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    args.methods = args.methods or list(METHODS[args.task])
    bad = [m for m in args.methods if m not in METHODS[args.task]]
    if bad:
        p.error(f"--methods {bad} not in the {args.task} task's {list(METHODS[args.task])}")
    if args.quick:
        apply_quick(p, argv, args, epochs=1, seeds=args.seeds[:2], steps=12, seq_len=64, model="tiny", batch_size=4,
                    val_tokens=4096)
    for name in ("batch_size", "epochs", "steps", "seq_len", "val_tokens", "threads", "k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if lm and not args.combine and not args.data:
        p.error("--task lm needs --data DIR: a dataset from `fastweights prepare` (the default corpus: "
                "`fastweights prepare --out DIR`)")
    args.la = {"k": args.k, "alpha": args.alpha, "beta": args.beta}
    return args


def write_outputs(results: dict, settings: dict, hardware: str, seconds: float, out: Path) -> None:
    """``out/lookahead_<task>.json`` and ``.png``; print the summary table."""
    task = settings["task"]
    metrics, x_key, y_key = (["val_acc", "val_loss"], "epoch", "val_acc") if task == "digits" else (
        ["val_loss"], "step", "train_loss")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lookahead_{task}"
    record = {"settings": settings, "hardware": hardware, "seconds": round(seconds, 1), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    title = f"{task}: k={settings['k']}, alpha={settings['alpha']}, beta={settings['beta']}, seeds {settings['seeds']}"
    plot(results, stem.with_suffix(".png"), x_key, y_key, title)
    print(summary_table(results, metrics))
    print(f"wrote {stem}.json and {stem}.png ({seconds:.0f} s)")


def combine(dirs: list[Path], task: str, out: Path) -> int:
    """Merge runs of method/seed subsets into one record: same settings but methods and seeds,
    and the same seeds for every method."""
    records = [json.loads((d / f"lookahead_{task}.json").read_text()) for d in dirs]
    first, runs, seeds = group_runs(
        dirs, records, {"methods", "seeds", "out", "combine", "quiet"},
        lambda rec: ((m, seed, r) for m, rs in rec["results"].items()
                     for seed, r in zip(rec["settings"]["seeds"], rs, strict=True)))
    order = [m for m in METHODS[task] if m in runs]
    results = {m: [runs[m][s] for s in seeds] for m in order}
    settings = {**first, "methods": order, "seeds": seeds}
    write_outputs(results, settings, records[0]["hardware"], sum(r["seconds"] for r in records), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.combine:
        return combine(args.combine, args.task, args.out)
    torch.set_num_threads(args.threads)
    if args.task == "digits":
        data, run = load_digits_split(), run_digits
    else:
        data, run = args.data, run_lm
    start = time.time()
    results = {m: [run(m, seed, args, data) for seed in args.seeds] for m in args.methods}
    elapsed = time.time() - start
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "combine"}
    device = torch.cuda.get_device_name() if args.task == "lm" and torch.cuda.is_available() else "CPU"
    hardware = (f"{device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                f"{args.threads} CPU thread(s)")
    write_outputs(results, settings, hardware, elapsed, args.out)
    return 0
