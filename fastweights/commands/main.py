"""``fastweights main``: the README's main job.

1. builds the default corpus (the Python source of this interpreter) and tokenises it once;
2. trains the model twice on the same tokens, without and with In-Place TTT;
3. evaluates both: perplexity and loss by position on long validation documents;
4. writes the loss-by-position plot and prints a summary table.

``--size tiny`` (the default) runs on a CPU in a few minutes; ``--size 60m`` on a GPU is the
small-scale version of the paper's from-scratch experiment. Every setting left at 0 takes
the size's default (``fastweights.commands.main.DEFAULTS``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastweights._json import strict_dumps
from fastweights.commands.eval import EvalConfig, eval_inputs, evaluate
from fastweights.commands.prepare import PrepareConfig, prepare
from fastweights.config import option, parse
from fastweights.errors import FastWeightsError, check_at_least, check_number
from fastweights.eval.passkey import check_passkey_settings
from fastweights.eval.plot import plot_position_losses
from fastweights.models.presets import SIZES
from fastweights.train.trainer import TrainConfig, train

# Per size: corpus sample (MB, 0 = all) and document cap (KB), vocabulary, training shape,
# evaluation length and first position bucket, passkey lengths.
DEFAULTS = {
    "tiny": dict(max_mb=12, max_doc_kb=128, vocab_size=2048, seq_len=1024, batch_size=4, steps=150, lr=3e-3,
                 warmup=15, eval_length=2048, first_bucket=256, max_docs=8, ppl_rows=32, passkey_lengths=[]),
    "20m": dict(max_mb=0, max_doc_kb=0, vocab_size=16384, seq_len=2048, batch_size=16, steps=1000, lr=1.5e-3,
                warmup=50, eval_length=8192, first_bucket=1024, max_docs=32, ppl_rows=256,
                passkey_lengths=[1024, 2048, 4096]),
    "60m": dict(max_mb=0, max_doc_kb=0, vocab_size=16384, seq_len=4096, batch_size=16, steps=3000, lr=1e-3,
                warmup=100, eval_length=16384, first_bucket=1024, max_docs=64, ppl_rows=256,
                passkey_lengths=[1024, 2048, 4096, 8192]),
    "150m": dict(max_mb=0, max_doc_kb=0, vocab_size=16384, seq_len=4096, batch_size=16, steps=5000, lr=6e-4,
                 warmup=200, eval_length=16384, first_bucket=1024, max_docs=64, ppl_rows=256,
                 passkey_lengths=[1024, 2048, 4096, 8192]),
}


@dataclass
class MainConfig:
    size: str = option(f"model size: {', '.join(SIZES)}", "tiny")
    out: str = option("output directory (data/, baseline/, inplace-ttt/, plot, summary.json)", "runs/main")
    steps: int = option("training steps per run (0: the size's default)", 0)
    batch_size: int = option("rows per step (0: default)", 0)
    seq_len: int = option("training row length (0: default)", 0)
    lr: float = option("peak learning rate (0: default)", 0.0)
    warmup: int = option("warmup steps (0: default)", 0)
    vocab_size: int = option("BPE vocabulary (0: default)", 0)
    ttt_lr: float = option("In-Place TTT inner learning rate eta of the TTT run", 3.0)
    max_mb: int = option("corpus sample in MB, whole documents until it is reached (0: the size's default; -1: "
                         "the whole corpus)", 0)
    max_doc_kb: int = option("per-document cap in KB (0: default; -1: none)", 0)
    eval_length: int = option("document length for loss by position (0: default)", 0)
    first_bucket: int = option("first position bucket end (0: default)", 0)
    max_docs: int = option("documents for loss by position (0: default)", 0)
    ppl_rows: int = option("validation rows for perplexity (0: default)", 0)
    passkey_lengths: list[int] | None = option("passkey context lengths (default: the size's; tiny: none)", None)
    device: str = option("auto, cpu or cuda[:i]", "auto")
    compile: bool = option("torch.compile the models", False)
    threads: int = option("torch CPU threads (0: auto, see `fastweights train --help`)", 0)
    seed: int = option("seed (model init and data order, shared by both runs)", 0)
    progress: bool = option("progress bars", True)


def _setting(cfg: MainConfig, name: str):
    value = getattr(cfg, name)
    default = DEFAULTS[cfg.size][name]
    if name in ("max_mb", "max_doc_kb"):
        return 0 if value == -1 else (value or default)
    if name == "passkey_lengths":
        return default if value is None else value
    return value or default


def _check(cfg: MainConfig, s: dict) -> None:
    """The flags that training and evaluation would check only after the corpus is prepared."""
    for name in ("steps", "batch_size", "seq_len", "warmup", "vocab_size", "eval_length", "first_bucket",
                 "max_docs", "ppl_rows", "threads", "seed"):
        check_at_least(name, getattr(cfg, name), 0)
    for name in ("max_mb", "max_doc_kb"):
        check_at_least(name, getattr(cfg, name), -1)
    for name in ("lr", "ttt_lr"):  # lr 0: the size's default
        check_number(name, getattr(cfg, name))
    if s["passkey_lengths"]:
        try:
            check_passkey_settings(s["passkey_lengths"], [0.0, 0.25, 0.5, 0.75, 1.0], 4, cfg.seed)
        except ValueError as err:
            raise FastWeightsError(f"--passkey-lengths: {err}") from None


def run(cfg: MainConfig) -> dict:
    """The main job; returns the summary that it also writes to ``<out>/summary.json``."""
    if cfg.size not in DEFAULTS:
        raise FastWeightsError(f"unknown size {cfg.size!r}: expected one of {', '.join(DEFAULTS)}")
    s = {k: _setting(cfg, k) for k in DEFAULTS[cfg.size]}
    _check(cfg, s)  # before the corpus is built and tokenised, not after
    out = Path(cfg.out)
    t0 = time.perf_counter()
    ds = prepare(PrepareConfig(corpus="python", out=str(out / "data"), vocab_size=s["vocab_size"], val_fraction=0.1,
                               max_doc_kb=s["max_doc_kb"], max_mb=s["max_mb"], progress=cfg.progress))
    m = ds.meta
    print(f"corpus: {m['manifest']['documents']} documents, {m['manifest']['files']} files, "
          f"{m['manifest']['bytes'] / 1e6:.1f} MB, sha256 {m['manifest']['sha256'][:12]}; "
          f"tokens: train {m['splits']['train']['tokens']}, val {m['splits']['val']['tokens']}")

    def eval_config(model: str, name: str) -> EvalConfig:
        return EvalConfig(model=model, data=str(ds.path), out=str(out / name / "eval.json"),
                          seq_len=s["seq_len"], ppl_rows=s["ppl_rows"], length=s["eval_length"],
                          first_bucket=s["first_bucket"], max_docs=s["max_docs"],
                          passkey_lengths=s["passkey_lengths"], device=cfg.device, seed=cfg.seed,
                          threads=cfg.threads, progress=cfg.progress)

    eval_inputs(eval_config("", ""), ds)  # data that evaluation cannot use fails before training, not after it
    runs = {}
    for name, ttt in (("baseline", False), ("inplace-ttt", True)):
        tc = TrainConfig(data=str(ds.path), out=str(out / name), model=cfg.size, ttt=ttt, ttt_lr=cfg.ttt_lr,
                         steps=s["steps"],
                         batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"], warmup=s["warmup"],
                         seed=cfg.seed, device=cfg.device, compile=cfg.compile, save_every=max(1, s["steps"] // 2),
                         resume=True, progress=cfg.progress, threads=cfg.threads)
        t = time.perf_counter()
        summary = train(tc, resumer="fastweights main (which resumes the runs in its --out)")
        summary["train_seconds"] = time.perf_counter() - t
        with torch.inference_mode():
            runs[name] = {"train": summary, "eval": evaluate(eval_config(summary["model"], name))}
    curves = [(k, v["eval"]["loss_by_position"]) for k, v in runs.items()]
    png = plot_position_losses(curves, out / "loss_by_position.png",
                               title=f"{cfg.size}: loss by position, with and without In-Place TTT")
    result = {"config": asdict(cfg), "settings": s, "plot": str(png), "seconds": time.perf_counter() - t0, "runs": runs}
    (out / "summary.json").write_text(strict_dumps(result, indent=2)[0])  # NaN as null; evaluate warned
    return result


def table(result: dict) -> str:
    """The summary table: one row per run."""
    names = list(result["runs"])
    buckets = result["runs"][names[0]]["eval"]["loss_by_position"]["buckets"]
    passkey = all("passkey" in result["runs"][n]["eval"] for n in names)
    head = (["run", "params", "train loss", "val ppl"] + [f"{b['start']}-{b['end']}" for b in buckets]
            + (["passkey acc"] if passkey else []))
    rows = []
    for n in names:
        r = result["runs"][n]
        acc = [a for row in r["eval"]["passkey"]["accuracy"] for a in row] if passkey else []
        rows.append([n, f"{r['train']['parameters'] / 1e6:.2f}M", f"{r['train']['loss']:.3f}",
                     f"{r['eval']['perplexity']['perplexity']:.2f}"]
                    + ["-" if b["loss"] is None else f"{b['loss']:.3f}"
                       for b in r["eval"]["loss_by_position"]["buckets"]]
                    + ([f"{sum(acc) / len(acc):.0%}"] if passkey else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *rows]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg = parse(MainConfig, argv, "fastweights main", __doc__)
    result = run(cfg)
    print("\nloss by position (mean next-token loss, nats):")
    print(table(result))
    print(f"\nplot: {result['plot']}\nsummary: {Path(cfg.out) / 'summary.json'}  ({result['seconds']:.0f} s)")
    return 0
