"""The training loop: AdamW (or Lookahead/SLRLA from fastweights.optim) with warmup + cosine decay,
clipping, accumulation, optional embedding forgetting, exact resume; data parallelism (DDP or
FSDP2) under ``torchrun`` with ``parallel`` (docs/distributed.md).

One plain loop (nanoGPT-style). Rows come from :class:`~fastweights.data.packing.PackedRows`,
so the data position is a row count and resuming needs no data-loader state. Metrics go to
``<out>/metrics.jsonl`` (one line per optimiser step; with ``eval_every``, the validation loss in
the lines of those steps) and to TensorBoard if installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from fastweights._globals import caller_globals
from fastweights._progress import progress_bar
from fastweights.config import option
from fastweights.data.packing import IGNORE, PackedRows
from fastweights.data.store import Dataset, same_documents
from fastweights.data.tokenizer import check_dataset_tokenizer
from fastweights.errors import FastWeightsError, check_at_least, is_int, is_real, warn
from fastweights.models.compat import enable_activation_checkpointing, hf_progress_bars
from fastweights.models.inplace_ttt import HYBRID
from fastweights.models.presets import SIZES, build_model, check_causal, check_vocab, load_model, resolve_model
from fastweights.optim import OPTIMIZERS, Lookahead, build_optimizer
from fastweights.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    saved_group_sizes,
)
from fastweights.train.forgetting import FORGETTING, build_forgetting

__all__ = ["TrainConfig", "causal_lm_loss", "peak_flops", "train", "warmup_cosine"]


@dataclass
class TrainConfig:
    """Options of ``fastweights train`` (each is also a ``--flag`` and a config-file key)."""

    data: str = option("prepared dataset directory (from `fastweights prepare`)", "")
    out: str = option("run directory: checkpoints, metrics.jsonl, model/", "runs/run")
    model: str = option("a size (tiny, 20m, 60m, 150m) or a local Hugging Face model directory", "tiny")
    ttt: bool = option("convert to In-Place TTT before training (a hybrid model's config picks its MLPs)", True)
    ttt_target: str = option("TTT target: embed, hidden, or auto (embed for a size, hidden for a local model)", "auto")
    ttt_layers: list[int] | None = option("TTT layer indices (default: the size's, or every 6th from 0)", None)
    ttt_chunk: int = option("TTT chunk length (0: the size's default, or 1024 for a local model)", 0)
    ttt_lr: float = option("TTT inner learning rate eta", 3.0)
    fwl: bool = option("add a Fast Weight Layer before the unembedding (add_fwl, SPEC §3)", False)
    fwl_grad_scale: float = option("FWL: factor on each token's loss before its inner gradient (0: "
                                   "1/(batch_size·accum·seq_len), the reference code's batch-mean loss)", 0.0)
    trainable: str = option("parameters to train: all, or fast (only the In-Place TTT parameters ttt_conv and "
                            "ttt_proj)", "all")
    steps: int = option("optimiser steps", 200)
    batch_size: int = option("rows per micro-batch", 8)
    seq_len: int = option("tokens per row", 512)
    accum: int = option("gradient accumulation micro-batches per step", 1)
    optimizer: str = option("adamw, sgd, lookahead_adamw, slrla_adamw, lookahead_sgd or slrla_sgd "
                          "(fastweights.optim)", "adamw")
    lookahead_k: int = option("Lookahead/SLRLA: inner steps per slow-weight sync", 5)
    lookahead_alpha: float = option("Lookahead/SLRLA: slow-weight step size alpha", 0.5)
    slrla_beta: float = option("SLRLA: weight beta of the pull ||theta - phi||^2 toward the slow weights", 0.2)
    forgetting: str = option("embedding forgetting: none, active (every --forgetting-every steps) or temporary "
                           "(also only up to --forgetting-until)", "none")
    forgetting_every: int = option("forgetting: steps between re-initialisations of the token embeddings", 1000)
    forgetting_until: int = option("temporary forgetting: last step with a re-initialisation", 0)
    lr: float | None = option("peak learning rate (default 3e-3; with --resume, the rate the run's last steps ran "
                              "at unless given)", None)
    min_lr_ratio: float = option("the floor the cosine decays toward, as a fraction of the peak (reached at step "
                                 "--steps, one past the last)", 0.1)
    warmup: int = option("linear warmup steps", 20)
    weight_decay: float = option("AdamW weight decay (matrices only)", 0.1)
    clip: float | None = option("gradient-norm clipping threshold, 0: off (default 1.0; with --resume, the run's "
                                "unless given)", None)
    seed: int = option("seed for the data order and the model init of a preset --model or of a --model DIR "
                       "that holds a config.json alone (a DIR with weights brings its own)", 0)
    device: str = option("auto, cpu or cuda[:i]", "auto")
    compile: bool = option("torch.compile the model", False)
    activation_checkpointing: bool = option("recompute each decoder layer's activations in the backward pass: "
                                            "less memory for long rows, one more forward of the layers", False)
    save_every: int = option("checkpoint every K steps (and at the end)", 100)
    eval_every: int = option("every K steps (and at the end), the loss on --eval-rows rows of the dataset's "
                             "validation split, as val_loss/val_ppl in that step's metrics (0: never)", 0)
    eval_rows: int = option("--eval-every: validation rows of --seq-len tokens, the split's first", 16)
    keep: int = option("checkpoints to keep (0: all)", 3)
    resume: bool = option("resume from the latest checkpoint in --out (with the run's settings; --steps, and "
                          "--lr/--clip while steps are left, may change)", False)
    progress: bool = option("show a progress bar", True)
    threads: int = option("torch CPU threads (0: auto, 1 when the load average is at least the core count, "
                        "else torch's default)", 0)
    parallel: str = option("data parallelism under torchrun: none, ddp or fsdp (FSDP2 fully_shard). "
                         "--batch-size is then the global micro-batch, split evenly over the ranks", "none")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier after ``step`` scheduler steps: linear warmup to 1, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. ``logits`` (B, L, V); ``targets`` (B, L), already shifted,
    -100 where ignored. ``reduction="none"`` gives (B, L) with 0 at ignored positions."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision scored in float32
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


# Dense bf16 tensor-core peaks (NVIDIA's datasheets list twice these, with sparsity). Matched as
# whole words, most specific first: "A10" is not "A10G", "L40" is not "L40S".
_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
              ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
              ("A10", 125e12), ("4090", 165e12))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (as CUDA names it), else None."""
    return next((v for k, v in _PEAK_BF16 if re.search(rf"\b{re.escape(k)}\b", name)), None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FastWeightsError(f"unknown device {name!r}: use auto, cpu or cuda[:i]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FastWeightsError("device cuda requested but CUDA is not available")
    return dev


def set_threads(threads: int, device: torch.device) -> None:
    """Set torch's CPU threads: ``threads`` if > 0; else, on a CPU whose load average is at least
    its core count (a shared machine), 1, since oversubscribed threads slow every step."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and os.getloadavg()[0] >= (os.cpu_count() or 1):
        torch.set_num_threads(1)


def make_model(cfg: TrainConfig, vocab_size: int, fwl_grad_scale: float | None = None, kind: str | None = None):
    """The model to train: a preset (optionally converted, target embed) or a local model
    (optionally converted, target hidden); with ``cfg.fwl``, plus a Fast Weight Layer whose
    ``grad_scale`` is ``cfg.fwl_grad_scale``, else ``fwl_grad_scale`` (a resumed run's), else
    1/(tokens per optimizer step): the same model whatever the split into micro-batches. ``kind``:
    :func:`resolve_model`'s answer for ``cfg.model`` when the caller has it."""
    kind = kind or resolve_model(cfg.model)
    if cfg.ttt_target not in ("auto", "embed", "hidden"):
        raise FastWeightsError(f"ttt_target must be auto, embed or hidden, got {cfg.ttt_target!r}")
    if kind == "preset":
        model = build_model(cfg.model, vocab_size, max_position_embeddings=max(4096, cfg.seq_len), seed=cfg.seed)
        size = SIZES[cfg.model]
        layers, chunk, target = list(size.ttt_layers), size.ttt_chunk, "embed"
    else:
        torch.manual_seed(cfg.seed)  # also the init of a directory that holds a config.json alone
        model = load_model(cfg.model, init_missing=True)
        check_vocab(model, vocab_size, cfg.model)
        check_causal(model, cfg.model)
        layers, chunk, target = None, 1024, "hidden"
    if cfg.ttt:
        from fastweights.models import convert, is_converted

        # a hybrid model's MLPs (In-Place TTT or not) are chosen per layer in its config
        if not is_converted(model) and model.config.model_type != HYBRID:
            convert(
                model,
                layers=cfg.ttt_layers if cfg.ttt_layers is not None else layers,
                chunk_size=cfg.ttt_chunk or chunk,
                lr=cfg.ttt_lr,
                target=target if cfg.ttt_target == "auto" else cfg.ttt_target,
            )
    if cfg.fwl:
        from fastweights.models import add_fwl, has_fwl

        if cfg.fwl_grad_scale < 0:
            raise FastWeightsError(f"fwl_grad_scale must be >= 0 (0: the default), got {cfg.fwl_grad_scale}")
        if not has_fwl(model):
            add_fwl(model, grad_scale=cfg.fwl_grad_scale or fwl_grad_scale
                    or 1.0 / (cfg.batch_size * cfg.accum * cfg.seq_len))
    return model


def model_flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token of the dense model (forward + backward, 6 per weight, for MFU):
    every weight matrix but the input embedding (the output head counted once, tied or not),
    plus the attention scores over at most ``seq_len`` keys (the window for sliding-window
    layers) at the heads' width. Fast-weight updates (In-Place TTT, LaCT) are not counted."""
    c = model.config
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())  # shared tensors once
    flops = 6 * (params - emb.numel() + (emb.numel() if out is not None and out.weight is emb else 0))
    width = getattr(c, "num_attention_heads", 1) * (getattr(c, "head_dim", None)
                                                    or c.hidden_size // getattr(c, "num_attention_heads", 1))
    mixers = getattr(c, "mixers", None) or ["attention"] * c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    for kind in mixers:
        if kind in ("attention", "swa", "lact"):
            keys = min(seq_len, window) if kind != "attention" and window else seq_len
            flops += 12 * width * keys  # QK^T and PV, forward + backward
    return flops


def _warn_short_rows(model, seq_len: int) -> None:
    """Rows no longer than a fast-weight chunk never read an update: say so (the comparison
    would be with a model whose fast weights do nothing)."""
    from fastweights.layers.inplace_ttt import InPlaceTTTMLP
    from fastweights.layers.lact import LaCTLayer

    chunks = {f"{type(m).__name__} chunk {m.chunk_size}" for m in model.modules()
              if isinstance(m, (InPlaceTTTMLP, LaCTLayer)) and m.chunk_size >= seq_len}
    if chunks:
        warn(f"--seq-len {seq_len} fits in one fast-weight chunk ({', '.join(sorted(chunks))}): no token of "
             f"a row reads an update, so these fast weights do nothing and their parameters get no gradient; "
             f"train on longer rows or use a smaller chunk")


def _trainable(model, mode: str) -> list[torch.nn.Parameter]:
    if mode == "all":
        return [p for p in model.parameters() if p.requires_grad]
    if mode != "fast":
        raise FastWeightsError(f"trainable must be 'all' or 'fast', got {mode!r}")
    from fastweights.models import ttt_parameters

    fast = [p for _, p in ttt_parameters(model)]
    if not fast:
        raise FastWeightsError("trainable=fast trains only In-Place TTT parameters (ttt_conv, ttt_proj): a model "
                               "converted with --ttt, or a hybrid with inplace_ttt MLPs; this model has none")
    ids = {id(p) for p in fast}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return fast


def _decays(model, params: list[torch.nn.Parameter]) -> list[bool]:
    """Whether each of ``params`` takes weight decay: matrices do, except the per-channel
    parameters a layer names in its ``NO_WEIGHT_DECAY`` (LaCT's q/k scale and shift, (2, d));
    vectors (norms, biases) do not."""
    exempt = {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "NO_WEIGHT_DECAY", ())}
    return [p.dim() >= 2 and id(p) not in exempt for p in params]


def _resumed_decays(ckpt, params, decays: list[bool], rank: int) -> list[bool]:
    """The weight-decay split a resumed run continues with: the one its checkpoint was written
    with. Runs started before ``NO_WEIGHT_DECAY`` existed decayed every matrix (LaCT's q/k scale
    and shift too) and keep doing so; their optimizer state is grouped that way."""
    sizes = saved_group_sizes(ckpt)
    legacy = [p.dim() >= 2 for p in params]
    if sizes is None or legacy == decays or sizes == [sum(decays), len(decays) - sum(decays)]:
        return decays
    if sizes == [sum(legacy), len(legacy) - sum(legacy)]:
        if rank == 0:
            warn(f"{ckpt} was written when LaCT's q/k scale and shift took weight decay; the resumed run "
                 "keeps decaying them (a new run does not)")
        return legacy
    return decays


PARALLEL = ("none", "ddp", "fsdp")


def _setup_parallel(cfg: TrainConfig) -> tuple[int, int, torch.device | None, bool]:
    """``(rank, world, device or None, created)``: the process group for ``cfg.parallel``
    (``created``: this call initialised it, so ``train`` destroys it at the end)."""
    if cfg.parallel not in PARALLEL:
        raise FastWeightsError(f"parallel must be one of {', '.join(PARALLEL)}, got {cfg.parallel!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel == "none":
        if launched > 1:
            raise FastWeightsError(
                f"launched as {launched} processes (WORLD_SIZE={launched}, e.g. by torchrun) with --parallel none: "
                f"each would train its own copy on the same rows. Pass --parallel ddp or --parallel fsdp, "
                f"or run one process without torchrun")
        return 0, 1, None, False
    if cfg.forgetting != "none" and cfg.parallel == "fsdp":
        raise FastWeightsError("embedding forgetting is not supported with --parallel fsdp: use --parallel ddp")
    if cfg.optimizer not in ("adamw", "sgd") and cfg.parallel == "fsdp":
        raise FastWeightsError(f"optimizer {cfg.optimizer} is not supported with --parallel fsdp (its state is "
                               f"not per-parameter): use --parallel ddp, or adamw/sgd")
    dev = None if cfg.device == "auto" else pick_device(cfg.device)  # unknown, or CUDA without CUDA: refused
    if dev is not None and (dev.type not in ("cpu", "cuda") or dev.type == "cuda" and dev.index is not None):
        raise FastWeightsError(f"--device {cfg.device} is not for --parallel {cfg.parallel}: pass auto, cpu (gloo) or "
                               f"cuda (NCCL); each rank runs on cuda:LOCAL_RANK (choose the GPUs with "
                               f"CUDA_VISIBLE_DEVICES)")
    created = not dist.is_initialized()
    if created and "RANK" not in os.environ:
        raise FastWeightsError(f"--parallel {cfg.parallel} needs a torchrun launch, e.g. `torchrun --nproc-per-node 2 "
                               f"-m fastweights train ... --parallel {cfg.parallel}`")
    from fastweights.distributed import init_distributed

    rank, world, device = init_distributed("gloo" if dev is not None and dev.type == "cpu" else None)
    return rank, world, device, created


def _wrap(model, cfg: TrainConfig, trainable: list[torch.nn.Parameter]):
    """DDP/FSDP2-wrapped ``model`` and its trainable parameters (FSDP2 replaces them by
    sharded ones, found again by name, in the same order)."""
    from fastweights.distributed import wrap_model

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in trainable]
    wrapped = wrap_model(model, cfg.parallel)
    plain = wrapped.module if cfg.parallel == "ddp" else wrapped
    params = dict(plain.named_parameters())
    return wrapped, [params[n] for n in order]


def _read_json(path: Path):
    """A run's JSON file, or a FastWeightsError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastWeightsError(f"cannot read {path}: {err}") from err


def _eval_split(ds: Dataset, cfg: TrainConfig):
    """The validation split that ``--eval-every`` scores, checked before any training."""
    try:
        val = ds.split("val")
    except FastWeightsError as err:
        raise FastWeightsError(f"--eval-every {cfg.eval_every} needs a validation split in {cfg.data}: {err}") from err
    if val.total_tokens < 2:
        raise FastWeightsError(f"--eval-every {cfg.eval_every}: the validation split of {cfg.data} has "
                               f"{val.total_tokens} tokens (prepare the data with a --val-fraction > 0)")
    return val


def _validate(model, plain, optimizer, val, cfg: TrainConfig, world: int) -> dict:
    """``val_loss``/``val_ppl``/``val_tokens`` of the first ``cfg.eval_rows`` validation rows, with
    Lookahead's slow weights (as the export). Every rank scores the same rows (FSDP's forward is
    a collective); nothing draws random numbers, so a resumed run stays exact."""
    from fastweights.eval.lm import perplexity

    scored = model if cfg.parallel == "fsdp" else plain  # DDP's forward would sync buffers
    with torch.no_grad(), optimizer.slow_weights() if isinstance(optimizer, Lookahead) else nullcontext():
        res = perplexity(scored, val, cfg.seq_len, max(1, cfg.batch_size // world), cfg.eval_rows, progress=False)
    return {"val_loss": res["loss"], "val_ppl": res["perplexity"], "val_tokens": res["tokens"]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step``, replacing the file atomically. A last line that is
    not JSON (a write cut short) is dropped with a warning; a broken line before it raises."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise FastWeightsError(f"{path}:{i + 1} is not a JSON record: {err}") from err
            warn(f"dropped the unfinished last line of {path}")
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    _replace_text(path, "".join(ln + "\n" for ln in kept))


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_key(name: str) -> str:
    """What ``--model`` names, for a resume to compare: a local directory by its config.json (keys
    sorted, transformers' version left out; a moved or re-saved directory is the same model, an
    edited config is not), a preset by its name (a preset's name is the preset, as in
    :func:`resolve_model`)."""
    path = Path(name) / "config.json"
    if name not in SIZES and path.is_file():
        config = {k: v for k, v in _read_json(path).items() if k != "transformers_version"}
        return "config " + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return "preset " + name


# settings that --resume may change: they do not change what the remaining steps compute, but for
# ``steps`` (the schedule then ends at the new step count, from the step resumed at)
RESUMABLE = frozenset({"out", "resume", "progress", "threads", "save_every", "keep", "device", "compile",
                       "activation_checkpointing", "parallel", "steps", "eval_every", "eval_rows"})
# and those `train --resume` may change with steps left to train (a run stopped by a non-finite loss
# goes on from a checkpoint with smaller ones), recorded in train_config.json's "rate_changes"; a
# caller that always resumes (``fastweights main``) keeps them fixed
RATE_SETTINGS = ("lr", "clip")
# their values when not given (None): a new run's; a resumed run keeps the ones its last steps ran at
DEFAULT_RATES = {"lr": 3e-3, "clip": 1.0}


def _unreadable(ckpt: Path, err: Exception) -> FastWeightsError:
    """The error for a latest checkpoint that cannot be read, naming the one before it."""
    earlier = [p.name for p in list_checkpoints(ckpt.parent.parent) if p != ckpt]
    hint = f"; move it out of {ckpt.parent} to resume from {earlier[-1]}" if earlier else ""
    return FastWeightsError(f"cannot resume from {ckpt}: {type(err).__name__}: {err}{hint}")


def _check_resume(out: Path, ckpt: Path, cfg: TrainConfig, dataset_key: str,
                  resumer: str = "--resume") -> tuple[dict[str, tuple], list[dict], dict]:
    """Raise unless ``cfg`` continues the run in ``out`` (latest checkpoint ``ckpt``) with its
    settings (those outside RESUMABLE; RATE_SETTINGS too unless ``resumer`` is ``--resume``) and
    its dataset (by the dataset's key: a moved dataset is the same one, another dataset at the
    same path is not), and with ``steps`` at least the steps done. ``resumer`` names what asked
    to continue it, in the messages. Returns the rate settings that change against those the
    checkpoint's steps ran at, {name: (was, now)}, the run's ``rate_changes`` up to it, and the
    rate settings to train with (a rate left None takes the one the checkpoint's steps ran at)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not the trainer's record")
        for key in ("step", "rows"):  # counts, as the trainer writes them
            value = state.get(key)
            if not is_int(value) or value < 0:
                raise ValueError(f"its {key} is {value!r}, not a count")
        done = state["step"]
    except (OSError, ValueError, AttributeError) as err:
        raise _unreadable(ckpt, err) from err
    if cfg.steps < done:
        raise FastWeightsError(f"{ckpt} is at step {done}: {resumer} needs --steps >= {done}, got {cfg.steps}")
    saved_file = out / "train_config.json"
    if not saved_file.exists():
        raise FastWeightsError(f"{out} has checkpoints but no train_config.json, the settings it started with: "
                               f"{resumer} cannot check that they still hold; restore the file, or train into a "
                               f"new --out")
    saved, now = _read_json(saved_file), asdict(cfg)
    _check_record(saved_file, saved, resumer)
    # rate_changes: [{"step": s, **settings}], the settings the steps after s ran at (the first
    # entry, step 0, the run's own); those at or after the checkpoint's step are undone by this resume
    history = [h for h in saved.get("rate_changes", []) if h["step"] < done]
    inforce = history[-1] if history else saved  # the settings the checkpoint's last steps ran at
    for k in RATE_SETTINGS:  # not given: the run's own
        if now[k] is None:
            now[k] = inforce[k]
    same_data, same_model = saved.get("dataset_key"), saved.get("model_key")
    rates = set(RATE_SETTINGS) if resumer == "--resume" else set()
    skip = RESUMABLE | rates | ({"data"} if same_data else set()) | ({"model"} if same_model else set())
    diff = [f"{k} {saved[k]!r} (now {now[k]!r})" for k in now if k in saved and k not in skip and saved[k] != now[k]]
    if same_data and same_data != dataset_key:
        if same_documents(same_data, dataset_key):  # the same documents, encoded anew
            raise FastWeightsError(
                f"{resumer} continues {out}, whose steps read the dataset at --data {cfg.data!r} as it was encoded "
                f"before (key {same_data}); `prepare` has since rebuilt it with this fastweights' encoding (key "
                f"{dataset_key}; the encodings are listed at ENCODING in fastweights.data.store), so the run's rows "
                f"no longer exist: train into a "
                f"new --out (from the run's model directory, to keep its training)")
        diff.insert(0, f"the dataset at --data {cfg.data!r} (key {dataset_key}, the run's: {same_data})")
    if same_model and same_model != model_key(cfg.model):
        diff.insert(0, f"the model --model {cfg.model!r} ({model_key(cfg.model)[:20]}…, the run's: "
                       f"{same_model[:20]}…)")
    if diff:
        raise FastWeightsError(f"{resumer} continues {out} with the settings it started with, but these differ: "
                               f"{'; '.join(diff)}; pass the run's values, or train into a new --out")
    changed = {k: (inforce[k], now[k]) for k in sorted(rates) if inforce[k] != now[k]}
    if changed and done >= cfg.steps:
        raise FastWeightsError(f"{resumer} with {_rate_notes(changed)}: {ckpt} is at step {done} of --steps "
                               f"{cfg.steps}, so no step would train at it; pass more --steps")
    if changed:  # the run's own settings first, as step 0's entry
        start = history or [{"step": 0, **{k: inforce[k] for k in RATE_SETTINGS}}]
        history = [*start, {"step": done, **{k: now[k] for k in RATE_SETTINGS}}]
    rates = {k: now[k] for k in RATE_SETTINGS}
    return changed, history if len(history) > 1 else [], rates  # the run's own settings alone: no change


def _check_record(path: Path, saved, resumer: str) -> None:
    """Raise naming ``path`` unless ``saved`` has the shape the trainer writes: an object with numbers
    for RATE_SETTINGS and, if any, ``rate_changes`` as [{"step": 0, ...}, {"step": s, ...}, ...] with
    rising steps and a number for each setting."""
    bad = None
    if not isinstance(saved, dict):
        bad = f"it holds a {type(saved).__name__}, not the run's settings"
    elif not all(is_real(saved.get(k)) for k in RATE_SETTINGS):
        bad = f"its {', '.join(RATE_SETTINGS)} are not all numbers"
    elif "rate_changes" in saved:
        h = saved["rate_changes"]
        ok = (isinstance(h, list) and len(h) >= 2 and all(isinstance(e, dict) for e in h)
              and all(is_int(e.get("step")) and all(is_real(e.get(k)) for k in RATE_SETTINGS) for e in h)
              and h[0]["step"] == 0 and all(a["step"] < b["step"] for a, b in zip(h, h[1:])))
        bad = None if ok else f"its rate_changes is {h!r}, not [{{\"step\": 0, ...}}, ...] with rising steps"
    if bad:
        raise FastWeightsError(f"{path} is damaged ({bad}): {resumer} cannot check the run's settings; restore the "
                               f"file, or train into a new --out")


def _rate_notes(changed: dict[str, tuple]) -> str:
    return ", ".join(f"--{k} {now} (was {was})" for k, (was, now) in changed.items())


def _save_model(model, out: Path, tokenizer, state_dict=None) -> None:
    """Export ``out/model`` (safetensors, config, tokenizer) through a temporary directory, so that
    a crash leaves either the old export or the new one."""
    final, tmp, old = out / "model", out / "model.tmp", out / "model.old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
        # a gathered (FSDP) state dict holds tied weights as two tensors: share them again, so
        # that save_pretrained writes the tied weight once, as for a model saved in one process
        names = {id(m): n for n, m in model.named_modules()}
        emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
        if emb_in is not None and emb_out is not None and id(emb_in) in names and id(emb_out) in names:
            src, dst = names[id(emb_in)] + ".weight", names[id(emb_out)] + ".weight"
            if src in state_dict and dst in state_dict:
                state_dict = {**state_dict, dst: state_dict[src]}
    for key in ("eos_token_id", "bos_token_id"):  # generate() stops at the tokenizer's end of text
        if getattr(model.config, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(model.config, key, getattr(tokenizer, key))
            setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: TrainConfig, resumer: str = "--resume") -> dict:
    """Run training as configured; return a summary (final loss, steps, tokens, paths).
    ``resumer``: how the messages name what resumes the run (a caller that always resumes, such
    as ``fastweights main``, names itself)."""
    # transformers' own bars too (loading, saving); the caller's RNGs and threads come back after
    with hf_progress_bars(cfg.progress), caller_globals(), ExitStack() as held:
        return _train(cfg, resumer, held)


def stopped(last_good: Path | None, step: int, resumer: str = "--resume", out: Path | None = None) -> str:
    """The end of the message for a non-finite loss or gradient at ``step``: what was kept and how
    to go on. When ``last_good`` holds the weights of step - 1, those weights gave the non-finite
    value, so resuming from it would stop again: the message names the checkpoint before it. A
    caller that keeps a run's settings (``resumer``, e.g. ``fastweights main``) cannot lower the
    rate: the run in ``out`` has to go."""
    if resumer != "--resume":
        return (f"training stopped; {resumer} keeps a run's settings, so remove {out} (or choose another --out) "
                f"and run it again with a smaller --lr")
    if last_good is None:
        return "training stopped, last good checkpoint: none (try a smaller --lr or --clip)"
    if int(last_good.name[5:]) == step - 1:
        earlier = [p for p in list_checkpoints(last_good.parent.parent) if int(p.name[5:]) < step - 1]
        where = (f"move {last_good.name} out of {last_good.parent} and --resume from {earlier[-1].name}" if earlier
                 else "no checkpoint comes before it: train into a new --out")
        return (f"training stopped; the weights of the last checkpoint, {last_good}, gave it, so a resume from "
                f"there would stop again: {where}, with a smaller --lr or --clip")
    return (f"training stopped, last good checkpoint: {last_good} (--resume goes on from it, also with a smaller "
            f"--lr or --clip)")


def _lock_run(out: Path, held: ExitStack) -> None:
    """Hold ``out/.lock`` until training ends (the OS lets go of it if the process dies): a second
    process training into ``out`` (a requeued job) is refused instead of racing for its files."""
    try:
        held.enter_context(FileLock(out / ".lock", timeout=0))
    except Timeout:
        raise FastWeightsError(f"{out} is in use by another training process (it holds {out / '.lock'}): wait for "
                               f"it to end, or train into another --out") from None


def _train(cfg: TrainConfig, resumer: str = "--resume", held: ExitStack | None = None) -> dict:
    held = held if held is not None else ExitStack()
    if not cfg.data:
        raise FastWeightsError("no dataset given: pass --data DIR (from `fastweights prepare`)")
    if cfg.optimizer not in OPTIMIZERS:
        raise FastWeightsError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.forgetting not in FORGETTING:
        raise FastWeightsError(f"forgetting must be one of {', '.join(FORGETTING)}, got {cfg.forgetting!r}")
    if cfg.fwl and cfg.ttt:
        raise FastWeightsError("--fwl trains a Fast Weight Layer instead of In-Place TTT: pass --no-ttt with it")
    if cfg.optimizer.startswith(("lookahead", "slrla")):  # before the model loads, named by flag
        if not 0.0 < cfg.lookahead_alpha <= 1.0:
            raise FastWeightsError(f"--lookahead-alpha must be in (0, 1], got {cfg.lookahead_alpha}")
    if cfg.optimizer.startswith("slrla") and not (math.isfinite(cfg.slrla_beta) and cfg.slrla_beta >= 0):
        raise FastWeightsError(f"--slrla-beta must be a finite number >= 0, got {cfg.slrla_beta}")
    if cfg.forgetting == "temporary" and cfg.forgetting_until < 1:
        raise FastWeightsError(f"temporary forgetting needs --forgetting-until >= 1, got {cfg.forgetting_until}")
    if cfg.forgetting == "temporary" and cfg.forgetting_until < cfg.forgetting_every:
        raise FastWeightsError(f"--forgetting-until {cfg.forgetting_until} < --forgetting-every "
                               f"{cfg.forgetting_every}: temporary forgetting would never reset")
    if cfg.forgetting == "active" and cfg.forgetting_until:
        raise FastWeightsError(f"--forgetting-until {cfg.forgetting_until} applies to temporary forgetting only "
                               f"(active forgetting resets every --forgetting-every steps to the end)")
    if cfg.forgetting != "none" and cfg.trainable == "fast":
        raise FastWeightsError("forgetting re-initialises the token embeddings, which --trainable fast freezes: "
                               "use --trainable all with it")
    for name in ("steps", "batch_size", "seq_len", "accum", "save_every", "lookahead_k", "forgetting_every",
                 "eval_rows"):
        check_at_least(name, getattr(cfg, name), 1)
    check_at_least("eval_every", cfg.eval_every, 0)  # 0: never
    check_at_least("ttt_chunk", cfg.ttt_chunk, 0)  # 0: the model's default
    check_at_least("seed", cfg.seed, 0)
    check_at_least("threads", cfg.threads, 0)  # 0: auto
    for name, ok, allowed in (("lr", cfg.lr is None or cfg.lr > 0, "> 0"),
                              ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
                              ("warmup", cfg.warmup >= 0, ">= 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                              ("clip", cfg.clip is None or cfg.clip >= 0, ">= 0 (0: off)"),
                              ("keep", cfg.keep >= 0, ">= 0 (0: all)"), ("ttt_lr", cfg.ttt_lr >= 0, ">= 0")):
        value = getattr(cfg, name)  # None: lr and clip not given
        if not ok or (value is not None and not math.isfinite(value)):
            raise FastWeightsError(f"{name} must be {allowed}, got {value}")
    rank, world, dp_device, created = _setup_parallel(cfg)
    if cfg.batch_size % world:
        raise FastWeightsError(f"--batch-size {cfg.batch_size} (the global micro-batch) must be divisible by the "
                               f"world size {world}")
    device = dp_device if dp_device is not None else pick_device(cfg.device)
    set_threads(cfg.threads, device)
    random.seed(cfg.seed)  # nothing draws from the global Python/NumPy generators, but checkpoints
    np.random.seed(cfg.seed % 2**32)  # save their states: seeded, two identical runs save identical files
    kind = resolve_model(cfg.model)  # a bad model name fails before any work
    ds = Dataset(cfg.data)
    rows = PackedRows(ds.split("train"), cfg.seq_len, seed=cfg.seed)
    val = _eval_split(ds, cfg) if cfg.eval_every else None
    out = Path(cfg.out)
    locked = rank == 0 and out.is_dir()  # an existing run: held before its checkpoints are read
    if locked:
        _lock_run(out, held)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not cfg.resume:
        way = "pass --resume or choose another --out" if resumer == "--resume" else "remove it or choose another --out"
        raise FastWeightsError(f"{out} already has checkpoints ({ckpt.name}): {way}")
    rate_changes, history, saved_fwl_scale = {}, [], None
    if cfg.resume and ckpt is None and resumer == "--resume":  # a mistyped --out would train anew unnoticed
        warn(f"--resume: {out} holds no checkpoint, so this run starts from step 0")
    if cfg.resume and ckpt is not None:
        rate_changes, history, rates = _check_resume(out, ckpt, cfg, ds.meta["key"], resumer)
        cfg = replace(cfg, **rates)
        if cfg.fwl and (ckpt / "config.json").is_file():  # the FWL's scale as the run was trained (it was
            saved_fwl_scale = _read_json(ckpt / "config.json").get("fwl_grad_scale")  # per micro-batch once)
    cfg = replace(cfg, **{k: DEFAULT_RATES[k] for k in RATE_SETTINGS if getattr(cfg, k) is None})  # a new run

    if kind == "local":
        check_dataset_tokenizer(cfg.model, ds)
    model = make_model(cfg, ds.vocab_size, saved_fwl_scale, kind).to(device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if rank == 0 and isinstance(max_pos, int) and cfg.seq_len > max_pos:
        warn(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {max_pos}: positions "
             f"past it were never trained, and memory grows with the row length")
    if rank == 0:
        _warn_short_rows(model, cfg.seq_len)
        ttt_flags = ["--" + f.name.replace("_", "-") for f in fields(TrainConfig)
                     if f.name.startswith("ttt_") and getattr(cfg, f.name) != f.default]
        if model.config.model_type == HYBRID and (ttt_flags or not cfg.ttt):
            ignored = ttt_flags + ([] if cfg.ttt else ["--no-ttt"])
            warn(f"a fastweights_hybrid model takes its In-Place TTT settings from its config (mlps, "
                 f"ttt_chunk, ttt_lr, ttt_target); ignored: {', '.join(ignored)}")
        given = (_read_json(Path(cfg.model) / "config.json").get("ttt_layers")
                 if kind == "local" else None)
        if given is not None:  # the model was converted before: its settings stay
            if ttt_flags:
                warn(f"{cfg.model} is already converted to In-Place TTT (layers {given}, chunk "
                     f"{model.config.ttt_chunk}, lr {model.config.ttt_lr}); its settings are kept; ignored: "
                     f"{', '.join(ttt_flags)}")
            if not cfg.ttt:
                warn(f"--no-ttt: {cfg.model} is already converted to In-Place TTT (layers {given}); it "
                     f"trains with its fast weights (train its base model for a run without them)")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    params = _trainable(model, cfg.trainable)
    decays = _decays(model, params)
    if cfg.resume and ckpt is not None:
        decays = _resumed_decays(ckpt, params, decays, rank)
    plain = model
    if world > 1 or cfg.parallel != "none":
        model, params = _wrap(model, cfg, params)
    decay = [p for p, d in zip(params, decays, strict=True) if d]
    no_decay = [p for p, d in zip(params, decays, strict=True) if not d]
    optimizer = build_optimizer(
        cfg.optimizer,
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), k=cfg.lookahead_k, alpha=cfg.lookahead_alpha, beta=cfg.slrla_beta,
    )
    forgetting = build_forgetting(cfg.forgetting, plain, optimizer, every=cfg.forgetting_every,
                                  until=cfg.forgetting_until if cfg.forgetting == "temporary" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )
    out.mkdir(parents=True, exist_ok=True)  # only once everything is built: a bad setting leaves no run behind
    if rank == 0 and not locked:
        _lock_run(out, held)
    step, rows_done = 0, 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume and ckpt is not None:
        base_lrs = list(scheduler.base_lrs)  # this run's --lr (loading puts back the saved run's)
        try:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise _unreadable(ckpt, err) from err
        step, rows_done = state["step"], state["rows"]
        if forgetting is not None and state.get("forgetting_deferred") and step < cfg.steps:
            forgetting.on_step_end(step)  # the reset that the saved run's last step left out: it now trains on
        if rank == 0 and rate_changes:
            print(f"resuming {out} with {_rate_notes(rate_changes)}", file=sys.stderr)
        old_steps = state.get("schedule_steps")
        if rank == 0 and old_steps is not None and old_steps != cfg.steps:
            print(f"resuming {out} with --steps {cfg.steps} (was {old_steps}): the learning-rate schedule now ends "
                  f"at step {cfg.steps}", file=sys.stderr)
        # the next step's rate comes from this run's schedule (the optimizer holds the saved one's)
        scheduler.base_lrs = base_lrs
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        if rank == 0:
            _truncate_metrics(metrics_path, step)
    elif metrics_path.exists() and rank == 0:
        metrics_path.unlink()
    if rank == 0:  # after a resume has loaded: a failed one leaves the run's record as it was
        _replace_text(out / "train_config.json", json.dumps(
            {**asdict(cfg), "dataset_key": ds.meta["key"], "model_key": model_key(cfg.model),
             **({"rate_changes": history} if history else {})}, indent=2))
        if cfg.warmup > cfg.steps > step:  # a short trial run with the default warmup: never at the peak rate
            warn(f"--warmup {cfg.warmup} > --steps {cfg.steps}: the learning rate never reaches its peak (--lr; the "
                 f"warmup's last step, {cfg.warmup}, is the first at it); lower --warmup for a run this short")

    fwd = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    flops_per_token = model_flops_per_token(plain, cfg.seq_len)
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum
    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a crashed run logged after the step resumed at are dropped (metrics.jsonl too)
        tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1) if rank == 0 else None
    except ImportError:
        pass

    model.train()
    last_good = ckpt if cfg.resume else None
    loss_value = float("nan")
    bar = progress_bar(total=cfg.steps, initial=step, desc=f"train {out.name}", unit="step",
                       disable=not cfg.progress or rank != 0)
    local = cfg.batch_size // world
    with metrics_path.open("a") if rank == 0 else nullcontext() as log:
        while step < cfg.steps:
            t0 = time.perf_counter()
            step += 1
            total = 0.0
            # rank r takes rows [r·local, (r+1)·local) of each global micro-batch
            batches = []
            for _ in range(cfg.accum):
                batches.append({k: v.to(device) for k, v in rows.batch(rows_done + rank * local, local).items()})
                rows_done += cfg.batch_size
            # the step's loss is the mean over all its targets (every micro-batch, every rank)
            count = sum((b["targets"] != IGNORE).sum() for b in batches).to(torch.float32)
            if world > 1:
                dist.all_reduce(count)
            for batch in batches:
                with autocast:
                    ids, pos = batch["input_ids"], batch["position_ids"]
                    logits = fwd(input_ids=ids, position_ids=pos, use_cache=False).logits
                if world == 1 and cfg.accum == 1:
                    loss = causal_lm_loss(logits, batch["targets"])
                    value = loss.detach()
                else:  # DDP/FSDP average the ranks' gradients, hence × world
                    loss = causal_lm_loss(logits, batch["targets"], reduction="sum") * world / count.clamp(min=1)
                    value = loss.detach().clone()
                    if world > 1:
                        dist.all_reduce(value)
                        value = value / world
                if not torch.isfinite(value):
                    bar.close()
                    raise FastWeightsError(f"non-finite loss ({value.item()}) at step {step}; "
                                           + stopped(last_good, step, resumer, out))
                loss.backward()
                total += value.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                bar.close()
                raise FastWeightsError(f"non-finite gradient norm at step {step}; "
                                       + stopped(last_good, step, resumer, out))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            loss_value = total
            rec = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens": step * tokens_per_step,
                "tokens_per_s": tokens_per_step / dt,
            }
            if peak:
                rec["mfu"] = flops_per_token * tokens_per_step / dt / (peak * world)  # per GPU
            if val is not None and (step % cfg.eval_every == 0 or step == cfg.steps):  # before a forgetting reset
                rec.update(_validate(model, plain, optimizer, val, cfg, world))
            if forgetting is not None and step < cfg.steps:  # no reset after the last step: nothing trains after it
                forgetting.on_step_end(step)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if tb is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    if k in rec:
                        tb.add_scalar(f"train/{k}", rec[k], step)
                for k in ("val_loss", "val_ppl"):
                    if k in rec:
                        tb.add_scalar(f"val/{k[4:]}", rec[k], step)
            bar.update(1)
            # no forced redraw: the bar's own interval holds (a log file gets an update every 30 s)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if step % cfg.save_every == 0 or step == cfg.steps:
                deferred = forgetting is not None and step == cfg.steps and forgetting.active(step)
                last_good = save_checkpoint(out, step, model, optimizer, scheduler,
                                            {"rows": rows_done, "schedule_steps": cfg.steps,
                                             **({"forgetting_deferred": True} if deferred else {})}, keep=cfg.keep)
    bar.close()
    if tb is not None:
        tb.close()
    if math.isnan(loss_value) and metrics_path.exists():  # resumed a finished run
        lines = metrics_path.read_text().splitlines()
        loss_value = json.loads(lines[-1])["loss"] if lines else loss_value
    # Lookahead/SLRLA: the exported model holds the slow weights, as they are evaluated with.
    with optimizer.slow_weights() if isinstance(optimizer, Lookahead) else nullcontext():
        if cfg.parallel == "fsdp":
            from fastweights.distributed import full_state_dict

            sd = full_state_dict(model)  # a collective; full tensors on rank 0
            if rank == 0:
                _save_model(plain, out, ds.tokenizer(), state_dict=sd)
        elif rank == 0:
            _save_model(plain, out, ds.tokenizer())
    if world > 1:
        dist.barrier()
    if created:
        dist.destroy_process_group()
    return {"out": str(out), "model": str(out / "model"), "steps": step, "loss": loss_value,
            "tokens": step * tokens_per_step, "parameters": n_params}
