"""Associative retrieval with fast weights and its baselines (Ba et al. 2016, SPEC §4).

``fastweights experiment associative-retrieval [--quick]`` trains each model at each hidden
size R with each seed, picks the step with the lowest validation error, reports its test
error, and writes ``<out-dir>/associative_retrieval.md`` (table with mean ± std next to the
published one), ``associative_retrieval.json`` (raw numbers and curves) and
``associative_retrieval.png`` (validation-error curves).

``--jobs N`` trains the runs in N single-process workers at once (each ``--threads``
threads); ``--time-budget-s`` stops every run at a wall-clock deadline (counted from the
start of the command) and records the step it reached; ``--lr-for MODEL=LR`` gives a model
its own learning rate, ``--lr-schedule cosine`` decays it to 0 over ``--steps``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastweights._progress import progress_bar
from fastweights.data.associative_retrieval import VOCAB, associative_retrieval_splits
from fastweights.experiments._runs import apply_quick, merge_reports, run_in_workers
from fastweights.layers.fast_weights_rnn import IRNN, LSTM, AttentionLSTM, FastWeightsRNN

MODELS = {
    "irnn": "IRNN",
    "lstm": "LSTM",
    "alstm": "A-LSTM",
    "fw-control": "Inner loop S, A ≡ 0 (control)",
    "fw": "Fast weights",
}
# --report-from: settings that may differ between the merged files (what selects the runs, how they
# ran, and the learning rate and device, which the report gives per run); the others must agree
MERGE_FREE = {"models", "hidden_sizes", "seeds", "lr", "lr_for", "device", "threads", "jobs", "time_budget_s",
              "out_dir", "report_from", "quick"}
PUBLISHED = {  # test error (%), Ba et al. 2016 Table 1 via SPEC §4 (unverified there)
    "irnn": {20: 62.11, 50: 60.23, 100: 0.34},
    "lstm": {20: 60.81, 50: 1.85, 100: 0.0},
    "alstm": {20: 60.13, 50: 1.62, 100: 0.0},
    "fw": {20: 1.81, 50: 0.0, 100: 0.0},
}


class RetrievalModel(nn.Module):
    """Embedding (E) -> recurrent layer (R) -> ReLU hidden layer (100) -> 10 digit logits.
    ``dropout`` > 0: dropout on the embeddings and on the recurrent layer's last output."""

    def __init__(self, kind: str, hidden: int, embed: int = 100, eta: float = 0.5, lam: float = 0.95,
                 inner_steps: int = 1, dropout: float = 0.0):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed = nn.Embedding(len(VOCAB), embed)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if kind == "fw":
            self.rnn = FastWeightsRNN(embed, hidden, eta=eta, lam=lam, inner_steps=inner_steps)
        elif kind == "fw-control":
            self.rnn = FastWeightsRNN(embed, hidden, eta=eta, lam=lam, inner_steps=inner_steps,
                                      fast_weights=False)
        elif kind == "irnn":
            self.rnn = IRNN(embed, hidden)
        elif kind == "lstm":
            self.rnn = LSTM(embed, hidden)
        elif kind == "alstm":
            self.rnn = AttentionLSTM(embed, hidden)
        else:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {kind!r}")
        self.head = nn.Sequential(nn.Linear(hidden, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> digit logits (B, 10)."""
        _, last = self.rnn(self.drop(self.embed(tokens)), outputs=False)
        return self.head(self.drop(last))


@torch.no_grad()
def error_rate(model: nn.Module, tokens: torch.Tensor, answers: torch.Tensor, batch: int = 2000) -> float:
    """Percentage of wrong answers."""
    model.eval()
    wrong = 0
    for i in range(0, len(tokens), batch):
        wrong += (model(tokens[i : i + batch]).argmax(-1) != answers[i : i + batch]).sum().item()
    model.train()
    return 100.0 * wrong / len(tokens)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): linear warmup
    over ``warmup`` steps, then constant or a cosine decay that reaches 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def model_lr(args: argparse.Namespace, kind: str) -> float:
    """The learning rate of ``kind``: its ``--lr-for`` entry, else ``--lr``."""
    return args.lr_for.get(kind, args.lr)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled decay of every parameter) when ``weight_decay`` > 0; torch's
    fused implementation (one kernel for all parameters, on CPU and GPU)."""
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, answers: torch.Tensor,
               clip: float) -> None:
    """One step on a batch: tokens (B, L), answers (B,); cross-entropy, gradient-norm clip, optimiser."""
    loss = F.cross_entropy(model(tokens), answers)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def train_one(kind: str, hidden: int, seed: int, data: dict, args: argparse.Namespace,
              deadline: float | None = None) -> dict:
    """Train one model; return the curve and the test error at the best validation step.

    Training stops after ``args.steps`` steps or at the wall-clock ``deadline`` (``time.time()``
    value), whichever comes first; ``steps`` in the result is the step reached.
    """
    torch.manual_seed(seed)
    device = torch.device(args.device)
    model = RetrievalModel(kind, hidden, eta=args.eta, lam=args.lam, inner_steps=args.inner_steps,
                           dropout=args.dropout).to(device)
    lr = model_lr(args, kind)
    opt = make_optimizer(model, lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=args.steps, warmup=args.warmup_steps, schedule=args.lr_schedule))
    train_x, train_y = (t.to(device) for t in data["train"])
    valid = tuple(t.to(device) for t in data["valid"])
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(train_x), generator=gen).to(device), 0
    best, best_state, curve = math.inf, None, []
    t0 = time.time()
    step = 0
    while step < args.steps:
        step += 1
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(train_x), generator=gen).to(device), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        train_step(model, opt, train_x[idx], train_y[idx], args.clip)
        sched.step()
        out_of_time = deadline is not None and time.time() >= deadline
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            err = error_rate(model, *valid)
            curve.append((step, err))
            if err < best:
                best, best_state = err, copy.deepcopy(model.state_dict())
        if out_of_time:
            break
    model.load_state_dict(best_state)
    n_fit = min(len(train_x), len(valid[0]))  # as many training sequences as validation ones
    return {"model": kind, "hidden": hidden, "seed": seed, "device": device.type, "host": host(device),
            "lr": lr, "steps": step,
            "stopped_by_budget": step < args.steps, "valid_error": best,
            "train_error": error_rate(model, train_x[:n_fit], train_y[:n_fit]),
            "test_error": error_rate(model, *(t.to(device) for t in data["test"])), "curve": curve,
            "seconds": time.time() - t0}


@functools.cache
def _splits(data_seed: int, num_pairs: int, train: int, valid: int, test: int) -> dict:
    return associative_retrieval_splits(data_seed, num_pairs, {"train": train, "valid": valid, "test": test})


def _data(args: argparse.Namespace) -> dict:
    return _splits(args.data_seed, args.num_pairs, args.train_size, args.valid_size, args.test_size)


def _worker_run(kind: str, hidden: int, seed: int, args: argparse.Namespace, deadline: float | None) -> dict:
    """One run in a worker process (the worker builds the deterministic splits itself)."""
    return train_one(kind, hidden, seed, _data(args), args, deadline)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the platform's machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs on the host)"
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def host(device: torch.device) -> str:
    """Where a run ran, recorded in its result: CPU model, torch version, GPU name if on CUDA."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu_name()}{gpu}, torch {torch.__version__}"


def _mean_std(xs: list[float], n_seeds: int) -> str:
    """``mean ± std`` (sample std); marks cells with fewer runs than there are seeds."""
    t = torch.tensor(xs, dtype=torch.float64)
    std = t.std().item() if len(xs) > 1 else float("nan")
    cell = f"{t.mean().item():.2f} ± {std:.2f}"
    return cell if len(xs) == n_seeds else f"{cell} (n={len(xs)})"


def write_report(results: list[dict], args: argparse.Namespace, commands: list[list[str]], out: Path) -> None:
    """Write the JSON, markdown and PNG; ``commands`` are the argv lists that produced it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "associative_retrieval.json").write_text(json.dumps(
        {"argv": commands[-1], "commands": commands, "args": vars(args), "results": results},
        indent=1, default=str))
    hs = sorted({r["hidden"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    n_seeds = len(seeds)
    kinds = [k for k in MODELS if any(r["model"] == k for r in results)]

    def errs(k: str, h: int, key: str = "test_error") -> list[float]:
        return [r[key] for r in results if r["model"] == k and r["hidden"] == h and key in r]

    def cell(k: str, h: int, key: str = "test_error") -> str:
        if not errs(k, h, key):
            return "–"
        cut = any(r.get("stopped_by_budget") for r in results if r["model"] == k and r["hidden"] == h)
        return _mean_std(errs(k, h, key), n_seeds) + (" †" if cut else "")

    cut_runs = [r for r in results if r.get("stopped_by_budget")]
    optimiser = "AdamW" if args.weight_decay > 0 else "Adam"

    lines = [
        "# Associative retrieval (Ba et al. 2016, SPEC §4)", "",
        "Generated by `fastweights/experiments/associative_retrieval.py`.", "",
        "## Measured test error (%)", "",
        f"Mean ± std over seeds {seeds}; test error at the step with the lowest validation error. "
        "A cell marked (n=k) holds only k finished runs (std nan when k = 1); a cell marked † holds "
        "runs stopped by the time budget before their step count (see How this was run).", "",
        "| model | " + " | ".join(f"R={h}" for h in hs) + " |",
        "|---|" + "---|" * len(hs),
    ]
    for k in kinds:
        lines.append(f"| {MODELS[k]} | " + " | ".join(cell(k, h) for h in hs) + " |")
    if any("train_error" in r for r in results):
        lines += ["", "## Training error (%) at the same step", "",
                  "Error on the first training sequences (as many as the validation set), with the "
                  "parameters the test row above uses; far below the test error means the model "
                  "overfits the training set. – where a run did not record it.", "",
                  "| model | " + " | ".join(f"R={h}" for h in hs) + " |", "|---|" + "---|" * len(hs)]
        for k in kinds:
            lines.append(f"| {MODELS[k]} | " + " | ".join(cell(k, h, "train_error") for h in hs) + " |")
    lines += ["", "## Published test error (%) (Ba et al. 2016, Table 1, as quoted in SPEC §4)", "",
              "| model | R=20 | R=50 | R=100 |", "|---|---|---|---|"]
    for k, row in PUBLISHED.items():
        lines.append(f"| {MODELS[k]} | " + " | ".join(f"{row[h]:.2f}" for h in (20, 50, 100)) + " |")
    lines += ["", "## Goal check (computed from the measured table)", ""]
    if 20 in hs and errs("fw", 20):
        fw = sum(errs("fw", 20)) / len(errs("fw", 20))
        lines.append(f"- Fast weights at R=20 ≤ 5% error: measured {fw:.2f}% → "
                     f"{'met' if fw <= 5 else 'NOT met'}.")
        for k in ("lstm", "irnn"):
            if errs(k, 20):
                e = sum(errs(k, 20)) / len(errs(k, 20))
                lines.append(f"- {MODELS[k]} at R=20 > 50% error: measured {e:.2f}% → "
                             f"{'met' if e > 50 else 'NOT met'}.")
    if 100 in hs:
        for k in kinds:
            if errs(k, 100):
                e = sum(errs(k, 100)) / len(errs(k, 100))
                lines.append(f"- {MODELS[k]} at R=100 ~0% (≤ 1%): measured {e:.2f}% → "
                             f"{'met' if e <= 1 else 'NOT met'}.")
    secs = sum(r["seconds"] for r in results)
    lrs = ", ".join(f"{MODELS[k]} {sorted({r.get('lr', args.lr) for r in results if r['model'] == k})}"
                    for k in kinds)
    lines += [
        "", "## How this was run", "",
        "```", *(f"fastweights experiment associative-retrieval {shlex.join(c)}" for c in commands),
        "```", "",
        f"- Hardware: {'; '.join(sorted({r.get('host', 'not recorded') for r in results}))}, "
        f"device(s) {sorted({r.get('device', 'cpu') for r in results})}, "
        + (f"{getattr(args, 'jobs', 1)} run(s) at once with {args.threads} thread(s) each"
           if args.threads is not None and getattr(args, "jobs", 1) is not None
           else "--jobs runs at once with --threads threads each as in the commands above")
        + f"; summed wall-clock training time {secs / 60:.1f} min.",
        f"- Scale: up to {args.steps} {optimiser} steps "
        f"of batch {args.batch_size} per run "
        f"(learning rate: {lrs}; schedule {getattr(args, 'lr_schedule', 'constant')} with "
        f"{getattr(args, 'warmup_steps', 0)} warmup steps; gradient-norm clip {getattr(args, 'clip', 5.0)}"
        f"{f'; weight decay {args.weight_decay}' if args.weight_decay > 0 else ''}"
        f"{f'; dropout {args.dropout}' if getattr(args, 'dropout', 0) > 0 else ''}), "
        f"i.e. {args.steps * args.batch_size / args.train_size:.2f} epochs of the {args.train_size} training "
        f"sequences; validation on {args.valid_size}, test on {args.test_size}; K = {args.num_pairs} pairs; "
        f"fast weights η = {args.eta}, λ = {args.lam}, S = {args.inner_steps}, layer norm.",
        "- Model: 100-d embedding, the recurrent layer, a 100-unit ReLU layer, softmax over the 10 digits.",
        f"- Validation every {args.eval_every} steps on the {args.valid_size} validation sequences; the test "
        "set is scored once per run, at the step with the lowest validation error.",
    ]
    if cut_runs:
        budget = getattr(args, "time_budget_s", None)
        lines.append(f"- Time budget{f' {budget:.0f} s' if budget else ''}: {len(cut_runs)} of {len(results)} runs "
                     "were stopped by it before their step count (marked † above); steps reached: " + ", ".join(
                         f"{MODELS[r['model']]} R={r['hidden']} seed {r['seed']}: {r['steps']}"
                         for r in sorted(cut_runs, key=lambda r: (r["hidden"], r["model"], r["seed"]))) + ".")
    else:
        lines.append(f"- Every run completed its {args.steps} steps.")
    lines += [
        "", "## Differences from the paper's setup", "",
        "- Training length: the paper trains each model to convergence; the runs here stop after the "
        "step count above (or at the time budget), so errors are upper bounds on what these models "
        "reach with longer training.",
        f"- Optimiser: {optimiser} with the learning rates above (chosen on short validation runs, not on the "
        "test set) and gradient-norm clipping; the paper's grid search is not reproduced.",
        *([f"- Training set: {args.train_size} sequences, not SPEC §4's 100000."]
          if args.train_size != 100_000 else []),
        "- A-LSTM: scaled dot-product attention over the LSTM's own past hidden states, read out at "
        "each step; it does not feed back into the recurrence. (The paper's A-LSTM row may be the "
        "Associative LSTM of Danihelka et al. 2016, a different model; not verified here.)",
        "- The control row (same S-step inner loop with A ≡ 0) is not in the paper; with A ≡ 0 the "
        "inner loop reduces to a layer-normalised ReLU RNN.",
        "- The published numbers are quoted from SPEC §4, which marks them unverified.",
        "", "![validation error curves](associative_retrieval.png)",
    ]
    (out / "associative_retrieval.md").write_text("\n".join(lines) + "\n")
    _plot(results, hs, kinds, out / "associative_retrieval.png")


def _plot(results: list[dict], hs: list[int], kinds: list[str], path: Path) -> None:
    from fastweights.eval.plot import figure

    fig, axes = figure(1, len(hs), figsize=(5 * len(hs), 4), squeeze=False)
    for ax, h in zip(axes[0], hs, strict=True):
        for i, k in enumerate(kinds):
            runs = [r for r in results if r["model"] == k and r["hidden"] == h]
            for j, r in enumerate(runs):
                steps, err = zip(*r["curve"], strict=True)
                ax.plot(steps, err, color=f"C{i}", alpha=0.8, label=MODELS[k] if j == 0 else None)
        ax.set_title(f"R = {h}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation error (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastweights experiment associative-retrieval", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--hidden-sizes", nargs="+", type=int, default=[20, 50, 100])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-for", nargs="+", default=[], metavar="MODEL=LR",
                   help="per-model learning rates, e.g. irnn=1e-4 (the others use --lr)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled weight decay (AdamW) of every parameter; 0 trains with plain Adam")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout on the embeddings and on the recurrent layer's last output (default 0: none)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--num-pairs", type=int, default=4)
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--valid-size", type=int, default=10_000)
    p.add_argument("--test-size", type=int, default=20_000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    p.add_argument("--device", default="cpu", help="torch device of every run, e.g. cpu or cuda")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="wall-clock budget of the whole command: every run stops at it and reports its step")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default: docs/results (the committed results); with --quick, runs/quick")
    p.add_argument("--report-from", nargs="+", type=Path, metavar="JSON",
                   help="train nothing: merge these associative_retrieval.json files into one report")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: R=20, one seed, 30 steps, 2k/500/500 sequences")
    args = p.parse_args(argv)
    if args.out_dir is None:  # a smoke run never overwrites the committed results
        args.out_dir = Path("runs/quick" if args.quick else "docs/results")
    if args.quick:
        apply_quick(p, argv, args, hidden_sizes=[20], seeds=[0], steps=30, eval_every=15, train_size=2000,
                    valid_size=500, test_size=500)
    for name in ("steps", "batch_size", "eval_every", "train_size", "valid_size", "test_size", "threads", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0 or args.clip <= 0:
        raise ValueError(f"--warmup-steps must be >= 0 and --clip > 0, got {args.warmup_steps}, {args.clip}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise ValueError(f"--time-budget-s must be > 0, got {args.time_budget_s}")
    lr_for = {}
    for item in args.lr_for:
        name, _, value = item.partition("=")
        try:
            lr_for[name] = float(value)
        except ValueError:
            lr_for[name] = -1.0
        if name not in MODELS or not lr_for[name] > 0:
            raise ValueError(f"--lr-for takes MODEL=LR with MODEL in {list(MODELS)} and LR > 0, got {item!r}")
    args.lr_for = lr_for
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_from:
        # a run present in several files (same configuration and seed) is counted once
        results, first_args, commands = merge_reports(
            args.report_from, lambda r: (r["model"], r["hidden"], r["seed"]), MERGE_FREE, vars(args))
        first = argparse.Namespace(**{**vars(args), **first_args})
        write_report(results, first, [*commands, argv], args.out_dir)
        return 0
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    jobs = [(k, h, s) for h in args.hidden_sizes for k in args.models for s in args.seeds]
    for k, h in sorted({(k, h) for k, h, _ in jobs}):  # bad model settings fail now, not after hours of other runs
        try:
            RetrievalModel(k, h, eta=args.eta, lam=args.lam, inner_steps=args.inner_steps, dropout=args.dropout)
        except ValueError as err:
            raise SystemExit(f"associative-retrieval: {k} with R={h}: {err}") from None
    results = []

    def done(r: dict) -> None:
        results.append(r)
        write_report(results, args, [argv], args.out_dir)  # partial results survive an interrupt
        tqdm.write(f"{r['model']} R={r['hidden']} seed={r['seed']}: test error {r['test_error']:.2f}% "
                   f"at step {r['steps']} ({r['seconds']:.0f}s)")

    if args.jobs == 1:
        for k, h, s in progress_bar(jobs, desc="associative retrieval", disable=args.quick):
            done(train_one(k, h, s, _data(args), args, deadline))
        return 0
    # Biggest runs first, so that with fewer workers than runs the long ones are not left last.
    jobs.sort(key=lambda j: -j[1])
    run_in_workers(_worker_run, [(k, h, s, args, deadline) for k, h, s in jobs], args.jobs, args.threads, done,
                   "associative retrieval", args.quick)
    return 0
