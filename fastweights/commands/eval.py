"""``fastweights eval``: perplexity, loss by position and passkey retrieval for a local model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastweights._globals import caller_globals
from fastweights._json import strict_dumps
from fastweights.config import option, parse
from fastweights.data.store import Dataset
from fastweights.data.tokenizer import check_dataset_tokenizer
from fastweights.errors import FastWeightsError, check_at_least, check_file_path, named_by_flag, warn
from fastweights.eval.lm import long_docs_error, loss_by_position, perplexity
from fastweights.eval.passkey import check_passkey_settings, passkey_eval, passkey_prompts
from fastweights.eval.plot import image_path, plot_passkey
from fastweights.models.compat import hf_progress_bars
from fastweights.models.inplace_ttt import set_max_update_norm
from fastweights.models.presets import check_causal, check_vocab, load_model
from fastweights.ops.inplace_ttt import check_max_update_norm
from fastweights.train.trainer import pick_device, set_threads


@dataclass
class EvalConfig:
    model: str = option("local Hugging Face model directory (converted or not)", "")
    data: str = option("prepared dataset directory; its validation split is evaluated", "")
    out: str = option("result JSON (default: <model>/eval.json)", "")
    seq_len: int = option("row length for perplexity (>= 2)", 512)
    ppl_rows: int = option("rows for perplexity (0: the whole split, its last partial row included)", 64)
    batch_size: int = option("rows per batch for perplexity", 8)
    length: int = option("document length for loss by position", 4096)
    first_bucket: int = option("end of the first position bucket; buckets double after it", 1024)
    max_docs: int = option("documents for loss by position (0: all long enough)", 16)
    passkey_lengths: list[int] = option("context lengths for passkey retrieval (none: skip it)", factory=list)
    passkey_depths: list[float] = option("needle depths in [0, 1]", factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = option("trials per (length, depth)", 4)
    png: str = option("passkey heatmap PNG (default: next to --out)", "")
    device: str = option("auto, cpu or cuda[:i]", "auto")
    seed: int = option("seed for passkey sampling", 0)
    max_update_norm: float | None = option("In-Place TTT models: clip each chunk's fast-weight update to this "
                                           "Frobenius norm (default: the model's config, ttt_max_update_norm)", None)
    threads: int = option("torch CPU threads (0: auto, see `fastweights train --help`)", 0)
    progress: bool = option("show progress bars", True)
    dynamic: bool = option("also run dynamic evaluation (fastweights.eval.dynamic) next to static evaluation", False)
    dynamic_rule: str = option("dynamic evaluation rule: sgd, or rms (Krause et al., decay toward the original)", "rms")
    dynamic_segment: int = option("dynamic evaluation: tokens scored, then updated on, per step", 64)
    dynamic_lr: float = option("dynamic evaluation step size eta", 1e-4)
    dynamic_decay: float = option("dynamic evaluation (sgd and rms): decay lambda toward the original weights", 0.0)
    dynamic_eps: float = option("dynamic evaluation (rms): epsilon", 1e-8)
    dynamic_params: str = option("parameters to adapt: all, last:K (last K layers) or mlp_down", "all")
    dynamic_docs: int = option("validation documents for dynamic evaluation, cut to --length tokens", 8)
    dynamic_calibration_docs: int = option("training documents for the rms rule's mean squared gradient (0: the "
                                           "running mean over each document; a few documents can blow up the "
                                           "rows of tokens they lack, see docs/fwl.md)", 0)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluations of ``cfg`` and write the JSON (and heatmap); return the results."""
    with hf_progress_bars(cfg.progress), caller_globals():  # transformers' bar of loading the model too
        return _evaluate(cfg)


def eval_inputs(cfg: EvalConfig, ds: Dataset) -> tuple:
    """``(val, tokenizer, prompts)`` for :func:`evaluate` on ``ds``, or a FastWeightsError for data that
    cannot serve ``cfg``: an empty validation split, no document of ``--length`` tokens, a passkey
    length too short for the needle (tokenisation only; ``tokenizer`` and ``prompts`` are None without
    passkey lengths). ``fastweights main`` calls it before training."""
    val = ds.split("val")
    if val.total_tokens == 0:
        raise FastWeightsError(f"the validation split of {ds.path} is empty: prepare it with more documents or a "
                               "larger --val-fraction")
    if err := long_docs_error(val, cfg.length):
        raise FastWeightsError(err)
    if not cfg.passkey_lengths:
        return val, None, None
    try:
        tok = ds.tokenizer()
        return val, tok, passkey_prompts(tok, val, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials,
                                         cfg.seed)
    except ValueError as err:
        raise FastWeightsError(f"--passkey-lengths: {err}") from None


def _evaluate(cfg: EvalConfig) -> dict:
    if not cfg.model or not cfg.data:
        raise FastWeightsError("pass --model DIR and --data DIR")
    for name, low in (("seq_len", 2), ("batch_size", 1), ("length", 2), ("first_bucket", 1), ("ppl_rows", 0),
                      ("max_docs", 0), ("passkey_trials", 1), ("seed", 0), ("threads", 0)):
        check_at_least(name, getattr(cfg, name), low)
    if cfg.passkey_lengths:  # before the other evaluations, not after them
        try:
            check_passkey_settings(cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, cfg.seed)
        except ValueError as err:
            raise FastWeightsError(f"--passkey-*: {err}") from None
    check_max_update_norm(cfg.max_update_norm)
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "eval.json"
    check_file_path("out", out)  # before the evaluation, not after it
    png = image_path(cfg.png) if cfg.png else out.with_name(out.stem + "-passkey.png")  # a known format
    if cfg.png or cfg.passkey_lengths:
        check_file_path("png", png)
    ds = Dataset(cfg.data)
    device = pick_device(cfg.device)
    set_threads(cfg.threads, device)
    check_dataset_tokenizer(cfg.model, ds)
    model = load_model(cfg.model).to(device)
    if cfg.max_update_norm is not None:
        set_max_update_norm(model, cfg.max_update_norm)
    check_vocab(model, ds.vocab_size, cfg.model)
    check_causal(model, cfg.model)
    dcfg = _dynamic_config(model, cfg) if cfg.dynamic else None  # bad settings fail before any evaluation
    val, tok, prompts = eval_inputs(cfg, ds)  # before perplexity runs, not after
    # what the model is, for comparing runs: its family and size next to the scores
    res: dict = {"model": str(cfg.model), "data": str(cfg.data), "model_type": model.config.model_type,
                 "parameters": sum(p.numel() for p in model.parameters())}
    with torch.inference_mode():
        res["perplexity"] = perplexity(model, val, cfg.seq_len, cfg.batch_size, cfg.ppl_rows or None,
                                       progress=cfg.progress)
        res["loss_by_position"] = loss_by_position(model, val, cfg.length, cfg.first_bucket, cfg.max_docs or None,
                                                   progress=cfg.progress)
    if dcfg is not None:
        res["dynamic_eval"] = _dynamic(model, ds, cfg, dcfg)
    if prompts is not None:
        with torch.inference_mode():
            res["passkey"] = passkey_eval(model, tok, val, cfg.passkey_lengths, cfg.passkey_depths,
                                          cfg.passkey_trials, cfg.seed, progress=cfg.progress, prompts=prompts)
        res["passkey"]["png"] = str(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    text, bad = strict_dumps(res, indent=2)  # strict JSON: a non-finite number is written as null
    if bad:
        warn(f"non-finite results (a diverged or broken model?), written as null to {out}: {', '.join(bad)}")
    out.write_text(text)  # before the plot: a failing plot leaves the results
    if prompts is not None:
        plot_passkey(res["passkey"], png)
    res["out"] = str(out)
    return res


def _docs(store, n: int, length: int) -> list[torch.Tensor]:
    """The first ``n`` documents of a split with at least 2 tokens, cut to ``length`` tokens."""
    docs = []
    for i in range(len(store)):
        if len(docs) == n:
            break
        d = store.doc(i)[:length]
        if len(d) >= 2:
            docs.append(torch.from_numpy(d.astype("int64")))
    return docs


def _dynamic_config(model, cfg: EvalConfig):
    """The dynamic evaluation settings, checked (with the parameters they select) before any
    evaluation runs."""
    from fastweights.eval.dynamic import DynamicEvalConfig, select_parameters

    if cfg.dynamic_calibration_docs < 0:
        raise FastWeightsError(f"--dynamic-calibration-docs must be >= 0, got {cfg.dynamic_calibration_docs}")
    if cfg.dynamic_docs < 1:
        raise FastWeightsError(f"--dynamic-docs must be >= 1, got {cfg.dynamic_docs}")
    dcfg = DynamicEvalConfig(rule=cfg.dynamic_rule, segment_length=cfg.dynamic_segment, lr=cfg.dynamic_lr,
                             decay=cfg.dynamic_decay, eps=cfg.dynamic_eps, params=cfg.dynamic_params)
    try:
        dcfg.validate()
        select_parameters(model, dcfg.params)
    except ValueError as err:
        raise named_by_flag(err, {"rule": "--dynamic-rule", "segment_length": "--dynamic-segment",
                                  "lr": "--dynamic-lr", "decay": "--dynamic-decay", "eps": "--dynamic-eps",
                                  "params": "--dynamic-params"}) from None
    if cfg.dynamic_segment >= cfg.length - 1:  # a document of --length tokens predicts length - 1 of them
        raise FastWeightsError(f"--dynamic-segment {cfg.dynamic_segment} >= --length {cfg.length} - 1: every "
                               "document is one segment, so no update is ever scored (dynamic equals static); "
                               "give a --dynamic-segment below --length - 1")
    return dcfg


def _dynamic(model, ds: Dataset, cfg: EvalConfig, dcfg) -> dict:
    """Dynamic evaluation next to static evaluation over the same windows (SPEC §3), with the
    settings ``dcfg`` from :func:`_dynamic_config`."""
    from fastweights.eval.dynamic import dynamic_eval

    docs = _docs(ds.split("val"), cfg.dynamic_docs, cfg.length)
    if not docs:
        raise FastWeightsError("dynamic evaluation found no validation document with 2 or more tokens")
    calibration = None
    if cfg.dynamic_rule == "rms" and cfg.dynamic_calibration_docs > 0:
        calibration = _docs(ds.split("train"), cfg.dynamic_calibration_docs, cfg.length)
    try:
        result = dynamic_eval(model, docs, dcfg, calibration=calibration or None, progress=cfg.progress)
    except ValueError as err:
        raise FastWeightsError(str(err)) from None
    return result.to_dict()


def main(argv: list[str]) -> int:
    cfg = parse(EvalConfig, argv, "fastweights eval", __doc__)
    res = evaluate(cfg)
    p = res["perplexity"]
    print(f"perplexity {p['perplexity']:.3f} (loss {p['loss']:.4f}, {p['tokens']} tokens)")
    for b in res["loss_by_position"]["buckets"]:
        loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
        print(f"  positions {b['start']:>6}-{b['end']:<6} loss {loss}")
    if "dynamic_eval" in res:
        d = res["dynamic_eval"]
        print(f"dynamic evaluation ({d['config']['rule']}): perplexity {d['dynamic']['perplexity']:.3f} vs static "
              f"{d['static']['perplexity']:.3f} on the same windows; time x{d['time_overhead']:.2f}, FLOPs x"
              + (f"{d['flop_overhead']:.2f}" if d.get("flop_overhead") is not None else " n/a"))
    if "passkey" in res:
        print(f"passkey accuracy {res['passkey']['accuracy']} -> {res['passkey']['png']}")
    print(f"wrote {res['out']}")
    return 0
