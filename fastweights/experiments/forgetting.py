"""Dual-process learning with active and temporary forgetting (Anand et al. 2025; SPEC §7).

Trains a small BERT-style masked LM (``transformers.BertForMaskedLM``, tied embeddings) on
the synthetic task of :mod:`fastweights.data.dual_process` three ways (vanilla, active
forgetting, temporary forgetting) and records, every ``--eval-every`` steps, the fraction of
sequences with all three targets correct on ``val``, ``switch``, ``tail`` and ``holdout``,
plus ``switch_iwl``, the fraction that follows the memorised roles on ``switch``, and
``holdout_choice``, holdout accuracy when each target is chosen between the sequence's two
content tokens only (structure without the output layer's calibration for unseen tokens).

    fastweights experiment forgetting [--quick] [--out DIR]

Writes ``DIR/forgetting.json`` (curves and settings), ``DIR/forgetting.png`` and prints a
summary table (peak and final value per method and set). To use several processes, run
each method alone (``--methods M --out DIR_M``), then ``--combine DIR_A DIR_B ... --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from fastweights._progress import progress_bar
from fastweights.data.dual_process import COP, N_TARGETS, PAD, DualProcessTask
from fastweights.experiments._runs import apply_quick, group_runs
from fastweights.train.forgetting import build_forgetting

METHODS = ("vanilla", "active", "temporary")
EVAL_SETS = ("val", "switch", "tail", "holdout")
METRICS = (*EVAL_SETS, "switch_iwl", "holdout_choice")


def build_model(task: DualProcessTask, hidden: int, layers: int, heads: int, seed: int) -> BertForMaskedLM:
    """A small BERT MLM over the task's vocabulary; input and output embeddings tied."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=task.size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=8,
        type_vocab_size=1,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tie_word_embeddings=True,
    )
    return BertForMaskedLM(config)


def target_logits(model: BertForMaskedLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, 3, V]`` at the three masked positions only (the MLM head on those rows)."""
    hidden = model.bert(input_ids=input_ids).last_hidden_state[:, -N_TARGETS:]
    return model.cls(hidden)


# y axes of the plot's panels (the rest: the fraction of sequences with all three targets right)
YLABELS = {"loss": "training loss", "switch_iwl": "sequences following the memorised roles",
           "holdout_choice": "all 3 right (choice of 2 tokens)"}


@torch.no_grad()
def evaluate(model: BertForMaskedLM, sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """All-three-correct accuracy per set; ``switch_iwl``; ``holdout_choice`` (argmax over the two
    content tokens of the sequence instead of the whole vocabulary)."""
    model.eval()
    out = {}
    for name, batch in sets.items():
        pred = target_logits(model, batch["input_ids"]).argmax(-1)
        out[name] = (pred == batch["targets"]).all(-1).float().mean().item()
        if name == "switch":
            out["switch_iwl"] = (pred == batch["iwl_targets"]).all(-1).float().mean().item()
        if name == "holdout":  # the choice between the two context tokens only: no output-bias confound
            logits = target_logits(model, batch["input_ids"])
            pair = batch["input_ids"][:, :3]
            pair = pair[pair != COP].view(-1, 1, 2).expand(-1, N_TARGETS, 2)
            choice = pair.gather(-1, logits.gather(-1, pair).argmax(-1, keepdim=True)).squeeze(-1)
            out["holdout_choice"] = (choice == batch["targets"]).all(-1).float().mean().item()
    model.train()
    return out


def train_run(method: str, task: DualProcessTask, sets, args) -> dict:
    """Train one model with ``method``; returns ``{"step": [...], metric: [...], "loss": [...]}``."""
    model = build_model(task, args.hidden, args.layers, args.heads, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    until = args.until if method == "temporary" else None
    kind = "none" if method == "vanilla" else method
    forgetting = build_forgetting(kind, model, opt, every=args.every, until=until, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    curves: dict[str, list] = {"step": [], "loss": [], **{m: [] for m in METRICS}}
    running = 0.0
    for step in progress_bar(range(1, args.steps + 1), desc=method, disable=args.quiet, mininterval=5):
        batch = task.sample("train", args.batch_size, gen)
        logits = target_logits(model, batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if step % args.eval_every == 0:  # evaluated before a reset at this step
            curves["step"].append(step)
            curves["loss"].append(running / args.eval_every)
            running = 0.0
            for name, value in evaluate(model, sets).items():
                curves[name].append(value)
        if forgetting is not None:
            forgetting.on_step_end(step)
    curves["resets"] = 0 if forgetting is None else forgetting.resets
    return curves


def plot(results: dict, path: Path, title: str) -> None:
    """Curves per metric; with several seeds, the mean and a ± one-std band."""
    from fastweights.eval.plot import figure

    fig, axes = figure(2, 4, figsize=(17, 7), sharex=True)
    panels = [*METRICS, "loss"]
    labels = {
        "val": "val (training distribution)",
        "switch": "switch: structural ICL",
        "tail": "tail (rarest 10%)",
        "holdout": "holdout (unseen tokens)",
        "switch_iwl": "switch: in-weights answer",
        "holdout_choice": "holdout: choice between context tokens",
        "loss": "training loss",
    }
    axes.flat[-1].axis("off")
    for ax, key in zip(axes.flat, panels, strict=False):
        for method, curves in results.items():
            n = len(curves.get("seeds", [None]))
            (line,) = ax.plot(curves["step"], curves[key], label=method if n == 1 else f"{method} (mean of {n})")
            if key + "_std" in curves:
                lo = [m - s for m, s in zip(curves[key], curves[key + "_std"], strict=True)]
                hi = [m + s for m, s in zip(curves[key], curves[key + "_std"], strict=True)]
                ax.fill_between(curves["step"], lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(labels[key])
        ax.set_xlabel("step")
        ax.set_ylabel(YLABELS.get(key, "sequences with all 3 targets right"))
        ax.set_ylim(0, None if key == "loss" else 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary_table(results: dict) -> str:
    """Markdown: per method and metric, the peak (and its step) and the final value; with several
    seeds, of the mean curve, and the final value as mean ± std."""
    rows = ["| method | metric | peak | at step | final |", "| --- | --- | --- | --- | --- |"]
    for method, curves in results.items():
        for key in METRICS:
            values = curves[key]
            i = max(range(len(values)), key=values.__getitem__)
            final = f"{values[-1]:.3f}"
            if key + "_std" in curves:
                final += f" ± {curves[key + '_std'][-1]:.3f}"
            rows.append(f"| {method} | {key} | {values[i]:.3f} | {curves['step'][i]} | {final} |")
    return "\n".join(rows)


def seed_average(runs: dict[int, dict]) -> dict:
    """Mean curves over seeds ``{seed: curves}`` with ``<metric>_std`` (sample std) and the runs."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    if any(runs[s]["step"] != first["step"] for s in seeds):
        raise ValueError(f"runs of seeds {seeds} were evaluated at different steps; cannot average")
    out: dict = {"step": first["step"], "seeds": seeds, "per_seed": {str(s): runs[s] for s in seeds}}
    for key in ("loss", *METRICS):
        stacked = torch.tensor([runs[s][key] for s in seeds], dtype=torch.float64)
        out[key] = stacked.mean(0).tolist()
        out[key + "_std"] = stacked.std(0).tolist()
    out["resets"] = first["resets"]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastweights experiment forgetting", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (the test suite's setting)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: docs/results/forgetting, the committed results; with --quick, "
                        "runs/quick/forgetting)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--vocab", type=int, default=10_000, help="content tokens V (SPEC: 10,000)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of token frequencies")
    p.add_argument("--ambiguous", type=float, default=0.1, help="fraction of ambiguous tokens")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--every", type=int, default=100, help="steps between embedding resets")
    p.add_argument("--until", type=int, default=1000, help="temporary forgetting: last step with resets")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=1000, help="sequences per evaluation set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--combine", type=Path, nargs="+", help="merge the outputs of these single-method runs into --out")
    args = p.parse_args(argv)
    if args.out is None:  # a smoke run never overwrites the committed results
        args.out = Path("runs/quick/forgetting" if args.quick else "docs/results/forgetting")
    if args.quick:
        apply_quick(p, argv, args, steps=40, batch_size=32, hidden=32, layers=1, heads=2, every=10, until=20,
                    eval_every=10, eval_size=64)
    for name in ("steps", "batch_size", "every", "eval_every", "eval_size", "hidden", "layers", "heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "temporary" in args.methods and args.until < args.every:  # before the other methods train, not after
        raise ValueError(f"--until {args.until} < --every {args.every}: temporary forgetting would never reset "
                         f"(its first reset is at step {args.every}); give --until >= --every")
    return args


def write_outputs(results: dict, settings: dict, hardware: str, seconds: float, out: Path) -> None:
    """Write ``forgetting.json`` and ``forgetting.png`` to ``out`` and print the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "hardware": hardware, "seconds": round(seconds, 1), "results": results}
    (out / "forgetting.json").write_text(json.dumps(record, indent=1))
    s = settings
    title = (
        f"dual-process task: V={s['vocab']}, zipf={s['zipf']}, BERT {s['layers']}x{s['hidden']}, "
        f"reset every {s['every']} (temporary: until {s['until']}), {s['steps']} steps, "
        f"seed{'s' if isinstance(s['seed'], list) else ''} {s['seed']}"
    )
    plot(results, out / "forgetting.png", title)
    print(summary_table(results))
    print(f"wrote {out / 'forgetting.json'} and {out / 'forgetting.png'} ({seconds:.0f} s of training)")


def combine(dirs: list[Path], out: Path) -> int:
    """Merge runs of single methods and seeds (run in parallel) into one record and plot.

    Runs must share every setting but the method and the seed, and every method must have been
    run with the same seeds. With several seeds, each method's curves are the mean over seeds
    (``<metric>_std`` holds the sample std; ``per_seed`` the runs)."""
    records = [json.loads((d / "forgetting.json").read_text()) for d in dirs]
    first, runs, seeds = group_runs(
        dirs, records, {"methods", "out", "combine", "quiet", "seed"},
        lambda rec: ((m, rec["settings"]["seed"], curves) for m, curves in rec["results"].items()))
    if len(seeds) == 1:
        results = {method: r[seeds[0]] for method, r in runs.items()}
    else:
        results = {method: seed_average(r) for method, r in runs.items()}
    settings = {**first, "seed": seeds[0] if len(seeds) == 1 else seeds, "methods": list(results)}
    write_outputs(results, settings, records[0]["hardware"], sum(r["seconds"] for r in records), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    task = DualProcessTask(vocab=args.vocab, zipf=args.zipf, ambiguous=args.ambiguous, seed=args.seed)
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    sets = {name: task.sample(name, args.eval_size, eval_gen) for name in EVAL_SETS}
    start = time.time()
    results = {method: train_run(method, task, sets, args) for method in args.methods}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "combine"}
    hardware = f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    write_outputs(results, settings, hardware, time.time() - start, args.out)
    return 0
