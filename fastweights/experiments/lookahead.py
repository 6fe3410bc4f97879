"""Lookahead and SLRLA against their inner optimiser, over several seeds (SPEC §6).

Two tasks:

- ``--task digits`` (default, CPU): a small CNN on scikit-learn's 8x8 digits (1,797 images,
  fixed stratified 75/25 split), SGD vs Lookahead(SGD) vs SLRLA(SGD), all with the stagewise
  schedule (LR x0.2 at 30/60/80% of training). Needs the ``experiments`` extra (scikit-learn).
- ``--task lm`` (GPU-sized): a Qwen3 decoder from transformers (about 20M parameters with
  the defaults) on byte tokens of this interpreter's standard-library sources, AdamW vs
  Lookahead(AdamW) vs SLRLA(AdamW) with warmup + cosine, a fixed token budget. A minimal
  stand-in until the project's trainer runs this comparison.

Lookahead and SLRLA are evaluated with their slow weights. Writes ``DIR/lookahead_<task>.json``
and ``.png`` and prints a markdown table: mean ± std over seeds, and for each wrapper
whether its difference from the inner optimiser exceeds the seed spread (|Δ mean| greater
than the sum of the two standard deviations).

    fastweights experiment lookahead [--task digits|lm] [--quick] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastweights.errors import FastWeightsError
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
def stdlib_bytes(n: int) -> torch.Tensor:
    """The first ``n`` bytes of the sorted standard-library ``.py`` files, as token ids ``[n]``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        raw = path.read_bytes()
        chunks.append(raw)
        total += len(raw)
        if total >= n:
            break
    if total < n:
        raise FastWeightsError(f"the standard library holds {total} bytes of source, fewer than the {n} asked")
    return torch.frombuffer(bytearray(b"".join(chunks)[:n]), dtype=torch.uint8).long()


def run_lm(method: str, seed: int, args, data) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    train_ids, val_ids = data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 or 1,
        num_key_value_heads=args.hidden // 64 or 1,
        head_dim=min(64, args.hidden),
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config).to(device)
    opt = build_optimizer(method, model.parameters(), lr=args.lr, weight_decay=args.weight_decay, **args.la)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    rows = train_ids[: len(train_ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    val_rows = val_ids[: len(val_ids) // args.seq_len * args.seq_len].view(-1, args.seq_len).to(device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve = {"step": [], "val_loss": []}

    @torch.no_grad()
    def val():
        losses = []
        for batch in val_rows.split(args.batch_size):
            with autocast:
                losses.append(model(input_ids=batch, labels=batch).loss.float().item())
        return sum(losses) / len(losses)

    for step in tqdm(range(1, args.steps + 1), desc=f"{method} seed {seed}", disable=args.quiet, mininterval=5):
        idx = order[(step - 1) * args.batch_size : step * args.batch_size]
        batch = rows[idx].to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve["step"].append(step)
            curve["val_loss"].append(_evaluate(model, opt, val))
    return {"val_loss": curve["val_loss"][-1], "curve": curve, "params": sum(p.numel() for p in model.parameters())}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastweights experiment lookahead", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=tuple(METHODS), default="digits")
    p.add_argument("--quick", action="store_true", help="a few steps (the test suite's setting)")
    p.add_argument("--out", type=Path, default=Path("docs/results/lookahead"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.2, help="SLRLA regulariser strength")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 (digits), 1e-3 (lm)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (digits), 0.1 (lm)")
    p.add_argument("--epochs", type=int, default=30, help="digits: epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (digits), 32 (lm)")
    p.add_argument(
        "--steps", type=int, default=1800, help="lm: optimiser steps; tokens = steps x batch x seq-len (29.5M)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="lm: sequence length")
    p.add_argument("--hidden", type=int, default=384, help="lm: width")
    p.add_argument("--layers", type=int, default=12, help="lm: layers")
    p.add_argument("--eval-every", type=int, default=500, help="lm: steps between validations")
    p.add_argument("--val-tokens", type=int, default=1_000_000, help="lm: validation tokens")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    lm = args.task == "lm"
    args.lr = args.lr if args.lr is not None else (1e-3 if lm else 0.05)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (0.1 if lm else 5e-4)
    args.batch_size = args.batch_size or 32
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:2]
        args.steps, args.seq_len, args.hidden, args.layers, args.eval_every = 12, 64, 64, 2, 6
        args.batch_size, args.val_tokens = 4, 4096
    args.la = {"k": args.k, "alpha": args.alpha, "beta": args.beta}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    torch.set_num_threads(args.threads)
    if args.task == "digits":
        data, run, metrics, x_key = load_digits_split(), run_digits, ["val_acc", "val_loss"], "epoch"
    else:
        n_train = args.steps * args.batch_size * args.seq_len
        ids = stdlib_bytes(n_train + args.val_tokens)
        data, run, metrics, x_key = (ids[:n_train], ids[n_train:]), run_lm, ["val_loss"], "step"
    start = time.time()
    results = {m: [run(m, seed, args, data) for seed in args.seeds] for m in METHODS[args.task]}
    elapsed = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    device = torch.cuda.get_device_name() if args.task == "lm" and torch.cuda.is_available() else "CPU"
    record = {
        "settings": settings,
        "hardware": f"{device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} CPU thread(s)",
        "seconds": round(elapsed, 1),
        "results": results,
    }
    stem = args.out / f"lookahead_{args.task}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    title = f"{args.task}: k={args.k}, alpha={args.alpha}, beta={args.beta}, seeds {args.seeds}"
    plot(results, stem.with_suffix(".png"), x_key, "val_loss" if args.task == "lm" else "val_acc", title)
    print(summary_table(results, metrics))
    print(f"wrote {stem}.json and {stem}.png ({elapsed:.0f} s)")
    return 0
