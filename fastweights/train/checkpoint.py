"""Training checkpoints without pickle: tensors in safetensors files, the rest in JSON.

A checkpoint is a directory ``<run>/checkpoints/step-XXXXXXXX/`` holding
``model.safetensors``, ``optimizer.safetensors`` (optimizer and scheduler state through
:mod:`fastweights.optim.state`), ``rng.safetensors`` and ``state.json`` (step, data
position, Python/NumPy RNG states and anything else the trainer records). It is written
under a temporary name and renamed into place, so a killed run never leaves a half-written
checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()
                  and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, state: dict, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_state(tmp / "optimizer.safetensors", {"optimizer": optimizer.state_dict(), "scheduler": sched})
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    payload = {
        "step": step,
        "rng": rng_meta,
        **state,
    }
    (tmp / "state.json").write_text(json.dumps(payload))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and every RNG from checkpoint ``path``; return
    its ``state.json`` contents."""
    path = Path(path)
    payload = json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    device = next(model.parameters()).device
    state = load_state(path / "optimizer.safetensors", device=device)
    optimizer.load_state_dict(state["optimizer"])
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    _set_rng_state(load_file(str(path / "rng.safetensors")), payload["rng"])
    return payload
