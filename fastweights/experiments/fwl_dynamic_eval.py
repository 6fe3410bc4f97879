"""Experiment: gradient updates at test time, two ways (SPEC §3, issue 10).

On one model size, one corpus and one token budget, with the project's pipeline
(``fastweights prepare`` data, ``fastweights train`` loop, ``fastweights.eval``):

* **static**: the preset model trained plainly, evaluated plainly;
* **dynamic evaluation** of that same static model (Krause's RMS rule, η picked on held-out
  tuning documents that are not scored);
* **FWL**: the preset with a Fast Weight Layer (``fastweights train --fwl``), trained from
  the start on the same rows;
* **In-Place TTT**: the preset converted at init (``fastweights train --ttt``, the size's
  layers and chunk), trained from the start on the same rows.

Reports validation perplexity (packed rows), loss by position on long validation documents
(table and PNG), and inference cost relative to static: wall-clock and FLOPs
(``torch.utils.flop_counter``) of reading the same documents. Writes ``results.json``,
``table.md``, ``loss_by_position.png`` and ``report.md`` (the results page) to ``--out``
(which also holds the prepared data and the training runs); ``--report docs/results/x.md``
writes the page there too, with ``x.json`` and ``x_loss_by_position.png`` beside it.

    fastweights experiment fwl-dynamic-eval --out runs/fwl20m --report docs/results/fwl_dynamic_eval.md
    fastweights experiment fwl-dynamic-eval --quick --out /tmp/fwlq          # CPU smoke run

Re-running the same command reuses the prepared data and finished (or checkpointed) training
runs in ``--out``, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fastweights.commands.prepare import PrepareConfig, prepare
from fastweights.data.packing import long_rows
from fastweights.errors import FastWeightsError, named_by_flag
from fastweights.eval.dynamic import DynamicEvalConfig, dynamic_eval
from fastweights.eval.flops import flop_counter
from fastweights.eval.lm import perplexity, position_edges, token_losses
from fastweights.models.presets import SIZES, load_model
from fastweights.train.trainer import TrainConfig, pick_device, set_threads, train

METHODS = ("static", "dynamic", "fwl", "inplace_ttt")
TRAINED = ("static", "fwl", "inplace_ttt")
LABELS = {"static": "static", "dynamic": "dynamic evaluation (of static)", "fwl": "FWL (trained from the start)",
          "inplace_ttt": "In-Place TTT (trained from the start)"}


@dataclass
class Setting:
    """Everything that defines a run; ``--key value`` overrides any field."""

    size: str = "20m"
    corpus: str = "python"  # 'python' (the interpreter's sources) or a directory of .txt/.jsonl/.parquet
    max_mb: int = 0  # corpus sample (MB, 0: all)
    max_doc_kb: int = 1024  # per-document cap (KB, 0: none): ~46 MB of the ~256 MB default corpus
    val_fraction: float = 0.2  # the default corpus has few (~270), long documents: 20% gives ~50 held out
    vocab_size: int = 16384
    tokenizer_sample_mb: int = 8
    seq_len: int = 1024
    batch_size: int = 16
    steps: int = 1000
    lr: float = 1.5e-3
    warmup: int = 60
    ttt_lr: float = 3.0
    ppl_rows: int = 512  # validation rows of seq_len for perplexity
    doc_length: int = 2048  # long validation documents are cut to this many tokens
    first_bucket: int = 128  # loss-by-position buckets [0, b), [b, 2b), ...
    tune_docs: int = 4  # documents for picking the dynamic-evaluation η (not scored)
    test_docs: int = 32  # documents scored by every method (fewer if the split has fewer long ones)
    # training documents for the RMS rule's mean squared gradient; 0: the running mean over the
    # document so far. With a 16k vocabulary a few documents leave most embedding rows with a
    # near-zero mean square, and g/(√ms + ε) then blows up on the rare tokens of a test document.
    calib_docs: int = 0
    segment: int = 128  # dynamic evaluation: tokens scored, then updated on
    lr_grid: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # dynamic evaluation η candidates
    timing_repeats: int = 3


QUICK = Setting(size="tiny", max_mb=2, max_doc_kb=64, val_fraction=0.3, vocab_size=512, tokenizer_sample_mb=1,
                seq_len=256, batch_size=4, steps=3, lr=3e-3, warmup=1, ppl_rows=8, doc_length=256, first_bucket=32,
                tune_docs=1, test_docs=2, calib_docs=0, segment=64, lr_grid=(1e-4,), timing_repeats=1)


# --------------------------------------------------------------------------- helpers
def _autocast(device: torch.device):
    """bf16 autocast on GPU (as training and ``fastweights eval``), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def documents(store, st: Setting) -> tuple[list[dict], list[dict]]:
    """(tuning, test) documents: validation documents longer than ``doc_length`` tokens, cut to
    ``doc_length`` inputs that each have a target, in store order: the first ``tune_docs``,
    then up to ``test_docs`` (at least one); each a dict of (1, L) ``input_ids``/
    ``position_ids``/``targets`` with L = ``doc_length``."""
    docs = list(_full_rows(store, st.doc_length, st.tune_docs + st.test_docs))
    if len(docs) <= st.tune_docs:
        raise FastWeightsError(f"the validation split has {len(docs)} documents of > {st.doc_length} tokens, "
                               f"need more than --tune-docs {st.tune_docs}: lower --doc-length or raise "
                               f"--val-fraction")
    return docs[: st.tune_docs], docs[st.tune_docs:]


def _full_rows(store, length: int, max_docs: int | None):
    """Rows of documents longer than ``length``: ``length`` inputs, every one with a target (a
    document of exactly ``length`` tokens would end on an ignored target, which the per-token
    means and :func:`as_sequence` would count)."""
    return (f for _, f in long_rows(store, length, min_length=length + 1, max_docs=max_docs))


def as_sequence(fields: dict) -> torch.Tensor:
    """A document row as the 1-D token sequence (L+1,) that dynamic evaluation reads."""
    return torch.cat([fields["input_ids"][0], fields["targets"][0, -1:]])


def doc_losses(model, docs: list[dict]) -> list[torch.Tensor]:
    """Per-token next-token losses (L,) of each document, read in one forward pass."""
    with torch.inference_mode():
        return [token_losses(model, d)[0].float().cpu() for d in docs]


def read_seconds(model, docs: list[dict], device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    doc_losses(model, docs)
    _sync(device)
    return time.perf_counter() - t0


def flops_per_token(model, doc: dict, device) -> float:
    """Forward FLOPs (matmuls and attention) per predicted token of one document."""
    with flop_counter(model) as counter, torch.no_grad(), _autocast(device):  # (inference_mode breaks its hooks)
        f = {k: v.to(device) for k, v in doc.items()}
        model(input_ids=f["input_ids"], position_ids=f["position_ids"], use_cache=False)
    return counter.get_total_flops() / doc["input_ids"].shape[1]


def per_position(losses: list[torch.Tensor]) -> list[float]:
    """Mean loss at each position over documents (documents may be shorter than the longest)."""
    n = max(t.numel() for t in losses)
    tot, cnt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in losses:
        tot[: t.numel()] += t.double()
        cnt[: t.numel()] += 1
    return (tot / cnt).tolist()


def buckets(curve: list[float], edges: list[int]) -> list[float | None]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        vals = curve[lo:hi]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def train_throughput(run_dir: Path) -> float | None:
    """Median tokens/s of the logged steps after the first 10% (warm-up and compile excluded)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [json.loads(line)["tokens_per_s"] for line in path.read_text().splitlines() if line.strip()]
    rates = sorted(rates[len(rates) // 10:])
    return rates[len(rates) // 2] if rates else None


# --------------------------------------------------------------------------- run
def run(st: Setting, out: Path, *, seed: int = 0, device_name: str = "auto", threads: int = 0,
        methods=METHODS, progress: bool = True, command: str = "") -> dict:
    device = pick_device(device_name)
    set_threads(threads, device)
    t_start = time.perf_counter()
    res: dict = {"setting": asdict(st), "seed": seed, "methods": list(methods), "device": _device_name(device),
                 "torch": torch.__version__, "command": command}
    t = time.perf_counter()
    ds = prepare(PrepareConfig(corpus=st.corpus, out=str(out / "data"), vocab_size=st.vocab_size,
                               val_fraction=st.val_fraction, max_doc_kb=st.max_doc_kb, max_mb=st.max_mb,
                               tokenizer_sample_mb=st.tokenizer_sample_mb))
    res["prepare_seconds"] = time.perf_counter() - t
    m = ds.meta
    res["data"] = {"documents": m["manifest"]["documents"], "bytes": m["manifest"]["bytes"],
                   "sha256": m["manifest"]["sha256"], "vocab_size": ds.vocab_size,
                   "train_tokens": m["splits"]["train"]["tokens"], "val_tokens": m["splits"]["val"]["tokens"]}
    val = ds.split("val")
    tune, test = documents(val, st)
    res["test_documents"] = len(test)
    edges = position_edges(st.doc_length, st.first_bucket)

    res["training"], models = {}, {}
    for kind in [k for k in TRAINED if k in methods or (k == "static" and "dynamic" in methods)]:
        tc = TrainConfig(data=str(ds.path), out=str(out / kind), model=st.size, ttt=kind == "inplace_ttt",
                         ttt_lr=st.ttt_lr, fwl=kind == "fwl", steps=st.steps, batch_size=st.batch_size,
                         seq_len=st.seq_len, lr=st.lr, warmup=st.warmup, seed=seed, device=device_name,
                         save_every=max(1, st.steps // 4), keep=1, resume=True, progress=progress, threads=threads)
        t = time.perf_counter()
        summary = train(tc, resumer="fastweights experiment fwl-dynamic-eval (which resumes the runs in its --out)")
        summary["wall_seconds"] = time.perf_counter() - t
        summary["tokens_per_s"] = train_throughput(out / kind)
        res["training"][kind] = summary
        model = load_model(summary["model"]).to(device)
        model.eval()
        models[kind] = model

    rows = {}
    for kind, model in models.items():
        with torch.inference_mode():
            ppl = perplexity(model, val, st.seq_len, st.batch_size, st.ppl_rows, progress=progress)
        losses = doc_losses(model, test)  # also warms up the kernels before timing
        secs = min(read_seconds(model, test, device) for _ in range(st.timing_repeats))
        flat = torch.cat(losses).double()
        rows[kind] = {"method": LABELS[kind], "val_loss": ppl["loss"], "val_perplexity": ppl["perplexity"],
                      "val_tokens": ppl["tokens"], "loss": flat.mean().item(), "perplexity": math.exp(flat.mean()),
                      "tokens": flat.numel(), "loss_by_position": per_position(losses), "seconds": secs,
                      "flops_per_token": flops_per_token(model, test[0], device)}
    if "dynamic" in methods:
        rows["dynamic"] = dynamic_row(models["static"], tune, test, ds, st, res, device, progress)
    base = rows["static"]
    for r in rows.values():
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["flop_ratio"] = r["flops_per_token"] / base["flops_per_token"]
        r["buckets"] = buckets(r["loss_by_position"], edges)
    res["rows"] = [rows[k] for k in METHODS if k in rows]
    res["buckets"] = [[lo, hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    res["seconds"] = time.perf_counter() - t_start
    res["table"] = table(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "table.md").write_text(res["table"] + "\n")
    plot(res, out / "loss_by_position.png")
    return res


def dynamic_row(static, tune, test, ds, st: Setting, res: dict, device, progress: bool) -> dict:
    """Dynamic evaluation of the static model: η picked on the tuning documents, then the test ones."""
    calib = [as_sequence(f) for f in _full_rows(ds.split("train"), st.doc_length, st.calib_docs)] \
        if st.calib_docs else []
    tune_seqs, test_seqs = [as_sequence(f) for f in tune], [as_sequence(f) for f in test]
    tuning = {}
    with _autocast(device):
        for lr in st.lr_grid:
            cfg = DynamicEvalConfig(rule="rms", segment_length=st.segment, lr=lr, decay=0.0, params="all")
            tuning[lr] = dynamic_eval(static, tune_seqs, cfg, calibration=calib or None, count_flops=False,
                                      progress=progress).dynamic.loss
        best = min(tuning, key=tuning.get)
        cfg = DynamicEvalConfig(rule="rms", segment_length=st.segment, lr=best, decay=0.0, params="all")
        dyn = dynamic_eval(static, test_seqs, cfg, calibration=calib or None, progress=progress)
    res["dynamic_eval"] = {"rule": "rms", "params": "all", "segment": st.segment, "decay": 0.0, "lr": best,
                           "tuning_loss_by_lr": {str(k): v for k, v in tuning.items()},
                           "calibration_docs": len(calib),
                           "windowed_static_loss": dyn.static.loss,
                           "time_vs_windowed_static": dyn.time_overhead,
                           "flops_vs_windowed_static": dyn.flop_overhead}
    return {"method": LABELS["dynamic"], "val_loss": None, "val_perplexity": None, "val_tokens": None,
            "loss": dyn.dynamic.loss, "perplexity": dyn.dynamic.perplexity, "tokens": dyn.dynamic.tokens,
            "loss_by_position": dyn.dynamic.loss_by_position, "seconds": dyn.dynamic.seconds,
            "flops_per_token": dyn.dynamic.flops_per_token}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# --------------------------------------------------------------------------- report
def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def table(res: dict) -> str:
    """The results table (markdown)."""
    head = ["method", "val ppl (packed rows)", "test-doc ppl", "test-doc loss", "time × static", "FLOPs × static"]
    head += [f"loss @{lo}-{hi}" for lo, hi in res["buckets"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["method"], _f(r["val_perplexity"], ".3f"), f"{r['perplexity']:.3f}", f"{r['loss']:.4f}",
                 f"{r['time_ratio']:.2f}", _f(r["flop_ratio"], ".2f")] + [_f(b, ".3f") for b in r["buckets"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(res: dict) -> list[str]:
    """The published direction, checked against this run's numbers (one line each)."""
    rows = {r["method"]: r for r in res["rows"]}
    static = rows[LABELS["static"]]
    out = []
    if LABELS["dynamic"] in rows:
        d, de = rows[LABELS["dynamic"]], res["dynamic_eval"]
        gain = d["loss"] - de["windowed_static_loss"]
        out.append(f"- **Dynamic evaluation gains at more than 3× cost:** "
                   f"{'yes' if gain < 0 and d['flop_ratio'] > 3 else 'no'}. Test-document loss "
                   f"{d['loss']:.4f} vs {de['windowed_static_loss']:.4f} for static evaluation of the same windows "
                   f"(Δ {gain:+.4f} nats, perplexity {math.exp(de['windowed_static_loss']):.3f} → "
                   f"{d['perplexity']:.3f}); cost {d['flop_ratio']:.2f}× the FLOPs and {d['time_ratio']:.2f}× the "
                   f"time of one-pass static inference ({_f(de['flops_vs_windowed_static'], '.2f')}× the FLOPs and "
                   f"{de['time_vs_windowed_static']:.2f}× the time of static evaluation over the same windows); "
                   f"η = {de['lr']:g} picked on {res['setting']['tune_docs']} tuning documents.")
    if LABELS["fwl"] in rows:
        f = rows[LABELS["fwl"]]
        gain = f["val_loss"] - static["val_loss"]
        small = f["flop_ratio"] <= 1.5 and f["time_ratio"] <= 1.5
        out.append(f"- **FWL gains at a small cost:** gain {'yes' if gain < 0 else 'no'} (validation perplexity "
                   f"{f['val_perplexity']:.3f} vs {static['val_perplexity']:.3f}, Δ loss {gain:+.4f} nats; "
                   f"test documents {f['perplexity']:.3f} vs {static['perplexity']:.3f}); cost "
                   f"{'small' if small else 'not small'} ({f['flop_ratio']:.2f}× the FLOPs, {f['time_ratio']:.2f}× "
                   f"the time of static inference; we call ≤ 1.5× on both small).")
    if LABELS["inplace_ttt"] in rows:
        t = rows[LABELS["inplace_ttt"]]
        out.append(f"- **In-Place TTT** (same tokens): validation perplexity {t['val_perplexity']:.3f} vs "
                   f"{static['val_perplexity']:.3f}; {t['flop_ratio']:.2f}× the FLOPs, {t['time_ratio']:.2f}× "
                   f"the time of static inference.")
    return out


def report(res: dict, png: str, raw: str = "results.json") -> str:
    """The results page (markdown) for ``docs/results/``: setting, command, tables, plot (``png``)
    and the name of the raw numbers' file beside it (``raw``), verdicts."""
    st, data = res["setting"], res["data"]
    size = SIZES[st["size"]]
    tokens = st["steps"] * st["batch_size"] * st["seq_len"]
    lines = [
        "# Gradient updates at test time, two ways: dynamic evaluation vs Fast Weight Layers",
        "",
        "Issue 10, SPEC §3: static evaluation, dynamic evaluation, FWL trained from the start and In-Place "
        "TTT, at equal training tokens. Generated by `fastweights/experiments/fwl_dynamic_eval.py`; raw "
        f"numbers in `{raw}` next to the plot.",
        "",
        "## Command",
        "",
        "```bash",
        f"PYTHONPATH=. python -m {res['command']}",
        "```",
        "",
        "## Setting",
        "",
        "| setting | value |",
        "|---|---|",
        f"| device | {res['device']}, torch {res['torch']}{', bf16 autocast' if 'CPU' not in res['device'] else ''} |",
        f"| model | `{st['size']}` preset (Qwen3: width {size.hidden_size}, {size.num_hidden_layers} layers, "
        f"{size.num_attention_heads} heads, MLP {size.intermediate_size}, tied embeddings); parameters: "
        + ", ".join(f"{k} {v['parameters'] / 1e6:.2f}M" for k, v in res["training"].items()) + " |",
        f"| corpus | `{st['corpus']}`, {data['documents']} documents, {data['bytes'] / 1e6:.1f} MB "
        f"(sha256 {data['sha256'][:12]}), {st['val_fraction']:.0%} of documents held out |",
        f"| tokenizer | byte-level BPE, {data['vocab_size']} tokens (`fastweights prepare`); train split "
        f"{data['train_tokens']:,} tokens, validation {data['val_tokens']:,} |",
        f"| training | {st['steps']} steps × {st['batch_size']} × {st['seq_len']} = **{tokens:,} tokens per model**, "
        f"the same packed rows for every model; AdamW {st['lr']:g} (β 0.9/0.95, wd 0.1 on matrices), "
        f"warm-up {st['warmup']}, cosine to 10%, clip 1.0; seed {res['seed']} |",
        f"| FWL | `fastweights train --fwl`: SPEC §3 block, step sizes 0.01, inner loss scale "
        f"1/({st['batch_size']}·{st['seq_len']}) (the reference code's batch mean) |",
        f"| In-Place TTT | `fastweights train --ttt`: layers {list(size.ttt_layers)}, chunk {size.ttt_chunk}, "
        f"η {st['ttt_lr']:g}, target embed |",
        f"| validation perplexity | {st['ppl_rows']} packed validation rows of {st['seq_len']} tokens |",
        f"| test documents | the first {res['test_documents']} validation documents of ≥ {st['doc_length']} "
        f"tokens after {st['tune_docs']} tuning documents, cut to {st['doc_length']} tokens, one per forward |",
        f"| dynamic evaluation | RMS rule, all parameters, segment {st['segment']}, λ 0, η from "
        f"{list(st['lr_grid'])} on the tuning documents, mean squared gradients "
        + (f"from {res['dynamic_eval']['calibration_docs']} training documents"
           if res.get("dynamic_eval", {}).get("calibration_docs") else "as the running mean over the document so far")
        + "; each segment is read with the whole preceding document |",
        f"| wall-clock | data preparation {res['prepare_seconds']:.0f} s; whole run {res['seconds']:.0f} s |",
        "",
        "## Results",
        "",
        res["table"],
        "",
        f"![loss by position]({png})",
        "",
        "- *val ppl*: packed validation rows. *test-doc*: the test documents, each read in one forward pass "
        "(dynamic evaluation: segment by segment, each scored before the update on it).",
        "- *× static*: reading the test documents, relative to the static model's one forward pass per document; "
        f"time is the minimum of {st['timing_repeats']} passes (dynamic evaluation: one pass); FLOPs are counted "
        "by `torch.utils.flop_counter` (matmuls and attention) on the first test document.",
        "- Loss by position: mean loss of the predicting positions in each range.",
        "",
        "Training:",
        "",
        "| model | parameters | final training loss | training tokens/s | training wall-clock (s) |",
        "|---|---|---|---|---|",
    ]
    for k, v in res["training"].items():
        lines.append(f"| {LABELS[k]} | {v['parameters']:,} | {v['loss']:.4f} | {_f(v['tokens_per_s'], ',.0f')} | "
                     f"{v['wall_seconds']:.0f} |")
    lines += ["", "## Did the published direction reproduce?", "", *verdicts(res), "",
              "One seed and one token budget, far below the papers' scales: read the signs, not the sizes."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    from fastweights.eval.plot import figure

    k = max(1, res["setting"]["doc_length"] // 64)  # moving mean over positions, for readability
    fig, ax = figure(figsize=(7, 4.2), dpi=120)
    for r in res["rows"]:
        y = torch.tensor(r["loss_by_position"], dtype=torch.float64)
        w = min(k, y.numel())
        ys = F.avg_pool1d(y[None, None], w, stride=1).flatten()
        ax.plot(torch.arange(ys.numel()) + (w + 1) / 2, ys, label=r["method"])
    ax.set_xlabel("token position in document")
    ax.set_ylabel(f"test loss, nats/token ({k}-position mean)")
    ax.set_title(f"{res['setting']['size']}: loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastweights experiment fwl-dynamic-eval", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized settings (seconds; used by the tests)")
    ap.add_argument("--out", type=Path, help="output directory (data, runs, results); needed without --quick, "
                    "whose default is runs/quick/fwl-dynamic-eval")
    ap.add_argument("--report", type=Path, help="also write the results page here (e.g. docs/results/x.md), with "
                    "its plot (x_loss_by_position.png) and raw numbers (x.json) beside it")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto)")
    ap.add_argument("--no-progress", action="store_true")
    for f in fields(Setting):
        kind = float if f.name == "lr_grid" else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, nargs="+" if f.name == "lr_grid" else None,
                        help=f"(default {f.default}; --quick: {getattr(QUICK, f.name)})")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.out is None:
        if not args.quick:  # a full run writes its data, runs and results: where is the caller's choice
            ap.error("--out is required (only --quick has a default, runs/quick/fwl-dynamic-eval)")
        args.out = Path("runs/quick/fwl-dynamic-eval")
    st = QUICK if args.quick else Setting()
    st = replace(st, **{f.name: (tuple(v) if f.name == "lr_grid" else v) for f in fields(Setting)
                        if (v := getattr(args, f.name)) is not None})
    if st.size not in SIZES:
        raise FastWeightsError(f"--size must be one of {', '.join(SIZES)}, got {st.size!r}")
    for name in ("steps", "batch_size", "seq_len", "doc_length", "first_bucket", "test_docs", "segment",
                 "timing_repeats"):
        if getattr(st, name) < 1:
            raise FastWeightsError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(st, name)}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or "static" not in methods:
        raise FastWeightsError(f"--methods: need static plus any of {list(METHODS[1:])}, got {list(methods)}")
    if "dynamic" in methods and st.tune_docs < 1:
        raise FastWeightsError("dynamic evaluation needs --tune-docs >= 1 to pick its η")
    for name in ("tune_docs", "calib_docs"):
        if getattr(st, name) < 0:
            raise FastWeightsError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(st, name)}")
    if "dynamic" in methods:  # before the corpus is prepared and the static model trained, not after
        try:
            for lr in st.lr_grid:
                DynamicEvalConfig(rule="rms", segment_length=st.segment, lr=lr, decay=0.0, params="all").validate()
        except ValueError as err:
            raise named_by_flag(err, {"lr": "--lr-grid entry", "segment_length": "--segment"}) from None
    res = run(st, args.out, seed=args.seed, device_name=args.device, threads=args.threads, methods=methods,
              progress=not args.no_progress, command="fastweights experiment fwl-dynamic-eval " + shlex.join(argv))
    page = report(res, "loss_by_position.png")
    (args.out / "report.md").write_text(page)
    if args.report is not None:  # the page plus its plot and raw numbers, e.g. docs/results/x{.md,.json,_...png}
        args.report.parent.mkdir(parents=True, exist_ok=True)
        png = args.report.with_name(args.report.stem + "_loss_by_position.png")
        shutil.copyfile(args.out / "loss_by_position.png", png)
        shutil.copyfile(args.out / "results.json", args.report.with_suffix(".json"))
        args.report.write_text(report(res, png.name, args.report.with_suffix(".json").name))
    print(res["table"])
    print("\n".join(verdicts(res)))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'report.md'} ({res['seconds']:.0f} s)")
    return 0
