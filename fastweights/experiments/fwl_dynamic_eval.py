"""Experiment: gradient updates at test time, two ways (SPEC §3, issue 10).

Compares, on one small Qwen3-shaped model trained here from scratch on one token budget:

* **static**: the base model, plain evaluation;
* **dynamic**: the same base model with dynamic evaluation (Krause's RMS rule, η picked on
  held-out tuning documents);
* **FWL**: the base model with a Fast Weight Layer (``add_fwl``), trained from the start;
* **In-Place TTT**: the base model converted with ``fastweights.models.convert``
  (target ``embed``), trained from the start.

All three trained models see the same batches (same seed, same number of tokens). The corpus
is the Python standard library's own source (byte-level tokens, one file per document),
split by file into train, tuning and test documents. Reports test perplexity, loss by
position, and inference cost relative to static evaluation (wall-clock and FLOPs counted by
``torch.utils.flop_counter``).

    fastweights experiment fwl-dynamic-eval --out runs/fwl_dynamic_eval
    fastweights experiment fwl-dynamic-eval --quick     # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from fastweights.eval.dynamic import DynamicEvalConfig, dynamic_eval
from fastweights.models import add_fwl, convert

VOCAB = 256  # bytes


@dataclass
class Scale:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    seq: int = 256
    batch: int = 8
    steps: int = 400
    lr: float = 3e-3
    eval_len: int = 512
    test_docs: int = 24
    tune_docs: int = 4
    calib_docs: int = 8
    segment: int = 64
    ttt_chunk: int = 64
    ttt_lr: float = 3.0
    timing_repeats: int = 3
    lr_grid: tuple = (3e-4, 1e-3, 3e-3, 1e-2)


QUICK = Scale(hidden=32, layers=2, heads=2, ffn=64, seq=32, batch=2, steps=3, eval_len=48, test_docs=2,
              tune_docs=1, calib_docs=1, segment=16, ttt_chunk=8, timing_repeats=1, lr_grid=(1e-3,))


# --------------------------------------------------------------------------- data
def stdlib_documents(min_len: int) -> list[tuple[str, torch.Tensor]]:
    """(relative path, uint8 byte tokens) of the stdlib's ``.py`` files (site-packages excluded)
    with at least ``min_len`` bytes, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) >= min_len:
            out.append((rel, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    if not out:
        raise FileNotFoundError(f"no stdlib sources of >= {min_len} bytes under {root}")
    return out


def split(docs, sc: Scale):
    """Every 8th file (by path) is held out; test and tuning files are drawn from those in a fixed
    shuffled order; the calibration files (for the RMS rule) are training files."""
    held = [d for i, d in enumerate(docs) if i % 8 == 3]
    held = [held[i] for i in torch.randperm(len(held), generator=torch.Generator().manual_seed(1234))]
    train = [d for i, d in enumerate(docs) if i % 8 != 3]
    test = [t[: sc.eval_len].long() for _, t in held[: sc.test_docs]]
    tune = [t[: sc.eval_len].long() for _, t in held[sc.test_docs: sc.test_docs + sc.tune_docs]]
    if len(test) < sc.test_docs or len(tune) < sc.tune_docs:
        raise ValueError(f"not enough held-out files: {len(held)} for {sc.test_docs} test + {sc.tune_docs} tuning")
    calib = [t[: sc.eval_len].long() for _, t in train[: sc.calib_docs]]
    return [t for _, t in train], tune, test, calib


def batches(train: list[torch.Tensor], sc: Scale, seed: int):
    """The same stream of (batch, seq+1) windows for every model; each window inside one file."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([len(t) - sc.seq - 1 for t in train], dtype=torch.float64).clamp_min(0)
    for _ in range(sc.steps):
        idx = torch.multinomial(lens, sc.batch, replacement=True, generator=g)
        rows = []
        for i in idx.tolist():
            off = int(torch.randint(0, int(lens[i]) + 1, (1,), generator=g))
            rows.append(train[i][off: off + sc.seq + 1].long())
        yield torch.stack(rows)


# --------------------------------------------------------------------------- models
def base_model(sc: Scale, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=sc.hidden, intermediate_size=sc.ffn,
                      num_hidden_layers=sc.layers, num_attention_heads=sc.heads, num_key_value_heads=sc.heads,
                      head_dim=sc.hidden // sc.heads, max_position_embeddings=max(sc.eval_len, sc.seq),
                      tie_word_embeddings=True, use_cache=False)
    return Qwen3ForCausalLM(cfg)


def build(kind: str, sc: Scale, seed: int):
    m = base_model(sc, seed)
    if kind == "fwl":
        add_fwl(m)
    elif kind == "fwl_residual":
        add_fwl(m, residual=True)
    elif kind == "inplace_ttt":
        convert(m, layers=list(range(1, sc.layers, 2)), chunk_size=sc.ttt_chunk, lr=sc.ttt_lr, target="embed")
    return m


def train(model, train_docs, sc: Scale, seed: int, desc: str) -> dict:
    """AdamW, linear warm-up (10%) then cosine to 10%; returns the loss curve and seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, sc.steps // 10)

    def schedule(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, sc.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for x in tqdm(batches(train_docs, sc, seed), total=sc.steps, desc=f"train {desc}", leave=False):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "tokens": sc.steps * sc.batch * sc.seq}


@torch.no_grad()
def static_losses(model, docs) -> list[torch.Tensor]:
    """Per-token losses (len-1,) of each document read in one forward pass."""
    return [F.cross_entropy(model(input_ids=d[:-1][None], use_cache=False).logits[0].float(), d[1:],
                            reduction="none") for d in docs]


def static_seconds(model, docs) -> float:
    t0 = time.perf_counter()
    static_losses(model, docs)
    return time.perf_counter() - t0


def static_flops_per_token(model, doc) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        static_losses(model, [doc])
    return counter.get_total_flops() / (doc.numel() - 1)


# --------------------------------------------------------------------------- report
BUCKETS = ((1, 16), (17, 64), (65, 128), (129, 256), (257, 511))


def by_position(per_token: list[float], buckets) -> list[float | None]:
    out = []
    for lo, hi in buckets:
        vals = per_token[lo - 1: hi]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def mean_by_position(losses: list[torch.Tensor]) -> list[float]:
    n = max(t.numel() for t in losses)
    tot, cnt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in losses:
        tot[: t.numel()] += t.double()
        cnt[: t.numel()] += 1
    return (tot / cnt).tolist()


def markdown(res: dict) -> str:
    rows = res["rows"]
    buckets = [b for b in BUCKETS if b[0] <= len(rows[0]["loss_by_position"])]
    head = "| method | test ppl (bytes) | loss (nats/byte) | time × static | FLOPs × static | " + \
        " | ".join(f"loss @{lo}-{hi}" for lo, hi in buckets) + " |"
    lines = [head, "|" + "---|" * (5 + len(buckets))]
    for r in rows:
        bp = by_position(r["loss_by_position"], buckets)
        t = "n/a" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        fl = "n/a" if r["flop_ratio"] is None else f"{r['flop_ratio']:.2f}"
        lines.append(f"| {r['method']} | {r['perplexity']:.3f} | {r['loss']:.4f} | {t} | {fl} | "
                     + " | ".join("" if v is None else f"{v:.3f}" for v in bp) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res["rows"]:
        y = torch.tensor(r["loss_by_position"])
        k = 16  # moving average over positions, for readability
        ys = F.avg_pool1d(y[None, None], k, stride=1).flatten() if y.numel() >= k else y
        ax.plot(range(k // 2, k // 2 + ys.numel()) if y.numel() >= k else range(1, y.numel() + 1), ys,
                label=r["method"])
    ax.set_xlabel("position in document (bytes)")
    ax.set_ylabel("test loss, nats/byte (16-position mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
METHODS = ("dynamic", "fwl", "fwl_residual", "inplace_ttt")  # static (the base model) always runs
LABELS = {"base": "static (base)", "fwl": "FWL (trained from the start)",
          "fwl_residual": "FWL, residual variant (trained from the start)",
          "inplace_ttt": "In-Place TTT (trained from the start)"}


def run(sc: Scale, seed: int, out: Path | None, progress: bool, methods=METHODS) -> dict:
    torch.manual_seed(seed)
    docs = stdlib_documents(max(sc.eval_len, sc.seq + 2))
    train_docs, tune, test, calib = split(docs, sc)
    res = {"scale": asdict(sc), "seed": seed, "train_tokens": sc.steps * sc.batch * sc.seq,
           "corpus": f"Python {sysconfig.get_python_version()} stdlib .py files (no site-packages), bytes",
           "documents": {"train": len(train_docs), "tune": len(tune), "test": len(test)}, "methods": list(methods)}
    models, training = {}, {}
    for kind in ["base"] + [m for m in methods if m != "dynamic"]:
        models[kind] = build(kind, sc, seed)
        training[kind] = train(models[kind], train_docs, sc, seed, kind)
    res["training"] = {k: {"final_loss": statistics.fmean(v["losses"][-max(1, sc.steps // 20):]),
                           "seconds": v["seconds"], "tokens": v["tokens"],
                           "parameters": sum(p.numel() for p in models[k].parameters())}
                       for k, v in training.items()}

    # static: losses, FLOPs, time (interleaved repeats, minimum)
    losses = {k: static_losses(m, test) for k, m in models.items()}
    flops = {k: static_flops_per_token(m, test[0]) for k, m in models.items()}
    secs = {k: [] for k in models}
    for _ in range(sc.timing_repeats):
        for k, m in models.items():
            secs[k].append(static_seconds(m, test))
    secs = {k: min(v) for k, v in secs.items()}

    def row(kind, t, fl):
        flat = torch.cat(losses[kind])
        mean = flat.double().mean().item()
        return {"method": LABELS[kind], "loss": mean, "perplexity": math.exp(mean), "tokens": flat.numel(),
                "loss_by_position": mean_by_position(losses[kind]), "seconds": t,
                "time_ratio": t / secs["base"], "flops_per_token": fl, "flop_ratio": fl / flops["base"]}

    res["rows"] = [row(k, secs[k], flops[k]) for k in models]
    if "dynamic" in methods:
        res["rows"].insert(1, dynamic_row(models["base"], tune, test, calib, sc, secs, flops, res, progress))
    res["table"] = markdown(res)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "table.md").write_text(res["table"] + "\n")
        plot(res, out / "loss_by_position.png")
    return res


def dynamic_row(base, tune, test, calib, sc: Scale, secs, flops, res, progress) -> dict:
    """Dynamic evaluation of the base model: η picked on the tuning documents, then test."""
    tuning = {}
    for lr in sc.lr_grid:
        cfg = DynamicEvalConfig(rule="rms", segment_length=sc.segment, lr=lr, decay=0.0, params="all")
        r = dynamic_eval(base, tune, cfg, calibration=calib, count_flops=False, progress=progress)
        tuning[lr] = r.dynamic.loss
    best = min(tuning, key=tuning.get)
    cfg = DynamicEvalConfig(rule="rms", segment_length=sc.segment, lr=best, decay=0.0, params="all")
    dyn = dynamic_eval(base, test, cfg, calibration=calib, progress=progress)
    res["dynamic_eval"] = {"tuning_loss_by_lr": {str(k): v for k, v in tuning.items()}, "lr": best,
                           "segment": sc.segment, "rule": "rms", "params": "all",
                           "windowed_static_loss": dyn.static.loss,
                           "time_overhead_vs_windowed_static": dyn.time_overhead,
                           "flop_overhead_vs_windowed_static": dyn.flop_overhead}

    return {"method": "dynamic evaluation (base)", "loss": dyn.dynamic.loss, "perplexity": dyn.dynamic.perplexity,
            "tokens": dyn.dynamic.tokens, "loss_by_position": dyn.dynamic.loss_by_position,
            "seconds": dyn.dynamic.seconds, "time_ratio": dyn.dynamic.seconds / secs["base"],
            "flops_per_token": dyn.dynamic.flops_per_token,
            "flop_ratio": dyn.dynamic.flops_per_token / flops["base"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastweights experiment fwl-dynamic-eval", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run that takes seconds (for tests)")
    ap.add_argument("--steps", type=int, help="training steps (default 400; quick 3)")
    ap.add_argument("--test-docs", type=int, help="test documents (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write results.json, table.md and loss_by_position.png here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: steadier timings on a shared machine)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (static always runs)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    sc = replace(QUICK if args.quick else Scale())
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        sc.steps = args.steps
    if args.test_docs is not None:
        if args.test_docs < 1:
            raise ValueError(f"--test-docs must be >= 1, got {args.test_docs}")
        sc.test_docs = args.test_docs
    res = run(sc, args.seed, args.out, progress=not args.no_progress, methods=methods)
    print(f"scale: {res['scale']}\ntrain tokens per model: {res['train_tokens']}")
    print(res["table"])
    return 0
