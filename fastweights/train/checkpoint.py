"""Training checkpoints without pickle: tensors in safetensors files, the rest in JSON.

A checkpoint is a directory ``<run>/checkpoints/step-XXXXXXXX/`` holding
``model.safetensors`` and ``config.json`` (a Hugging Face model directory, which ``eval``
reads; with Lookahead/SLRLA its slow weights φ, as the run's exported model, and the fast
weights θ go in the optimizer file), ``optimizer.safetensors`` (optimizer and scheduler state through
:mod:`fastweights.optim.state`), ``rng.safetensors`` and ``state.json`` (step, data
position, Python/NumPy RNG states and anything else the trainer records). It is written
under a temporary name, flushed to disk (``fsync``) and renamed into place, so neither a killed
run nor a crash of the machine leaves a half-written checkpoint; temporary directories of
earlier failed writes are removed by the next save. A failed write raises
:class:`~fastweights.errors.FastWeightsError` naming the directory, and leaves the older
checkpoints as they were.

Under data parallelism (the model wrapped in DDP or FSDP2, docs/distributed.md) every rank
calls both functions. The files stay those of one process: full tensors under their plain
names, optimizer state indexed as ``optimizer.state_dict()`` indexes it (FSDP2's sharded
state is gathered with ``torch.distributed.checkpoint.state_dict`` and re-sharded on load),
so a checkpoint loads at any world size, with or without a wrapper. Ranks other than 0 add
``rng-<rank>.safetensors``; each rank's RNG is restored when the world size is unchanged
(``state.json`` records it), else every rank takes rank 0's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from fastweights.distributed.data_parallel import fsync as _fsync
from fastweights.errors import FastWeightsError
from fastweights.optim.lookahead import Lookahead
from fastweights.optim.state import load_state, save_state

__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, pystate, pygauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(pystate), pygauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


def _layout(model) -> tuple[nn.Module, bool, int, int]:
    """(plain module, is FSDP2, rank, world size) of a plain, DDP or FSDP2 model."""
    from torch.distributed.fsdp import FSDPModule

    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    on = dist.is_available() and dist.is_initialized()
    return plain, isinstance(model, FSDPModule), dist.get_rank() if on else 0, dist.get_world_size() if on else 1


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """Names of the optimizer's parameters in ``state_dict`` index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _full_optimizer_state(model, optimizer) -> dict:
    """FSDP2: the whole optimizer state (on rank 0, CPU), indexed like ``optimizer.state_dict()``.
    A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:  # ranks other than 0
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: st for n, st in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def _load_full_optimizer_state(model, optimizer, osd: dict) -> None:
    """FSDP2: load an index-keyed full optimizer state (every rank holds it), re-sharding it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    fqn = {"state": {names[int(i)]: st for i, st in osd["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    # exactly step-NNNNNNNN (a renamed "step-00000006.broken" is not one), in step order
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name)
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, state: dict, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``.
    Under data parallelism every rank calls it (module docstring)."""
    plain, fsdp, rank, world = _layout(model)
    barrier = dist.barrier if world > 1 else (lambda: None)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
        from fastweights.distributed.data_parallel import _untie, full_state_dict

        model_sd, optim_sd = _untie(full_state_dict(model)), _full_optimizer_state(model, optimizer)
    rng_tensors, rng_meta = _rng_state()
    if rank == 0:
        for stale in root.glob("step-*.tmp") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        try:
            _write(tmp, plain, fsdp, model_sd if fsdp else None, optim_sd if fsdp else optimizer.state_dict(),
                   scheduler, rng_tensors, {"step": step, "rng": rng_meta, **state,
                                            **({"world_size": world} if world > 1 else {})},
                   optimizer if isinstance(optimizer, Lookahead) else None)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise FastWeightsError(f"could not write checkpoint {tmp}: {err} (the older checkpoints are "
                                   f"unchanged)") from err
    barrier()
    if rank > 0:
        save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"), metadata={"rng": json.dumps(rng_meta)})
        _fsync(tmp / f"rng-{rank}.safetensors")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(root)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def _write(tmp: Path, plain, fsdp: bool, model_sd, optim_sd, scheduler, rng_tensors, payload: dict,
           lookahead: Lookahead | None = None) -> None:
    """Rank 0's files of one checkpoint, each flushed to disk. ``lookahead``: the model file
    holds its slow weights φ (what the run exports and is evaluated with), and the optimizer
    file the fast weights θ that training resumes from."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra = {}
    if fsdp:
        save_file(model_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    elif lookahead is not None:  # no copy of the model: φ written from the slow weights, θ from the parameters
        params = [p for g in lookahead.param_groups for p in g["params"]]
        extra["fast"] = {i: p.detach() for i, p in enumerate(params)}
        save_model(_SlowWeights(plain, lookahead), str(tmp / "model.safetensors"))
    else:
        save_model(plain, str(tmp / "model.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_state(tmp / "optimizer.safetensors", {"optimizer": optim_sd, "scheduler": sched, **extra})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(payload))
    config = getattr(plain, "config", None)
    if config is not None:  # with model.safetensors, a Hugging Face model directory: `eval --model` reads it
        config.save_pretrained(tmp)
    for f in tmp.iterdir():
        _fsync(f)


class _SlowWeights:
    """What ``save_model`` reads of a model trained by Lookahead/SLRLA: its state dict with the slow
    weights φ in place of each parameter the optimizer holds (tied names share one φ)."""

    def __init__(self, plain: nn.Module, lookahead: Lookahead):
        self.plain, self.lookahead = plain, lookahead

    def state_dict(self) -> dict[str, torch.Tensor]:
        held = {id(p) for g in self.lookahead.param_groups for p in g["params"]}
        sd = self.plain.state_dict()
        for name, p in self.plain.named_parameters(remove_duplicate=False):
            if id(p) in held:
                sd[name] = self.lookahead.slow_param(p)
        return sd


def _model_tensors(path: Path, plain: nn.Module) -> dict[str, torch.Tensor]:
    """``model.safetensors`` with both names of tied parameters (``save_model`` keeps one)."""
    sd = load_file(str(path / "model.safetensors"))
    kept = {id(p): n for n, p in plain.named_parameters(remove_duplicate=False) if n in sd}
    for name, p in plain.named_parameters(remove_duplicate=False):
        if name not in sd and id(p) in kept:
            sd[name] = sd[kept[id(p)]]
    return sd


def saved_group_sizes(path) -> list[int] | None:
    """The parameter count of each optimizer param group stored in checkpoint ``path`` (read from
    the state's JSON, no tensor loaded), or None when it cannot be read."""
    try:
        optim = load_state(Path(path) / "optimizer.safetensors", tensors=False)["optimizer"]
        while "param_groups" not in optim and "inner" in optim:  # Lookahead/SLRLA wrap the inner optimizer's
            optim = optim["inner"]
        return [len(g["params"]) for g in optim["param_groups"]]
    except (OSError, KeyError, TypeError, ValueError, SafetensorError):
        return None


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and every RNG from checkpoint ``path``; return
    its ``state.json`` contents. Under data parallelism every rank calls it, at any world size."""
    plain, fsdp, rank, world = _layout(model)
    path = Path(path)
    payload = json.loads((path / "state.json").read_text())
    if fsdp:
        from fastweights.distributed.data_parallel import load_full_state_dict

        load_full_state_dict(model, _model_tensors(path, plain) if rank == 0 else {})
    else:
        plain.load_state_dict(_model_tensors(path, plain), strict=True)
    device = next(model.parameters()).device
    state = load_state(path / "optimizer.safetensors", device="cpu" if fsdp else device)
    if fsdp:
        _load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if "fast" in state:  # Lookahead/SLRLA: the model file held φ; training resumes from θ
        params = [p for g in optimizer.param_groups for p in g["params"]]
        fast = {int(i): t for i, t in state["fast"].items()}
        if sorted(fast) != list(range(len(params))):
            raise ValueError(f"checkpoint has fast weights for {len(fast)} parameters, the optimizer has {len(params)}")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(fast[i])
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    own = path / f"rng-{rank}.safetensors"
    if rank > 0 and payload.get("world_size", 1) == world and own.is_file():
        with safe_open(str(own), "pt") as fh:
            meta = json.loads(fh.metadata()["rng"])
        _set_rng_state(load_file(str(own)), meta)
    else:
        _set_rng_state(load_file(str(path / "rng.safetensors")), payload["rng"])
    return payload
