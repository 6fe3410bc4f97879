"""Data parallelism (FSDP2 or DDP) and world-size independent checkpoints (docs/distributed.md).

Functions the trainer calls under ``torchrun``:

* :func:`init_distributed`: the process group from torchrun's environment (NCCL on CUDA,
  gloo on CPU) and this rank's device;
* :func:`wrap_model`: ``fully_shard`` (FSDP2) on every decoder layer and the root, or DDP;
* :func:`parallelize`: data parallelism and context parallelism together on a 2-D mesh;
* :func:`save_checkpoint` / :func:`load_checkpoint`: full (unsharded) tensors in safetensors,
  keyed by parameter name, so a checkpoint written at one world size loads at any other:
  ``model.safetensors`` + ``config.json`` (a Hugging Face model directory),
  ``optimizer.safetensors`` (state per parameter name) + ``optimizer.json`` (class, param groups),
  ``rng-<rank>.safetensors`` (per-rank RNG, restored only at the same world size: resume is
  then exact, bit for bit with FSDP2; with DDP at > 2 ranks up to the order of the gradient
  all-reduce sums in the first step, as DDP rebuilds its buckets) and ``state.json`` (step,
  world size and what the caller adds). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from fastweights.distributed.context_parallel import apply_context_parallel
from fastweights.errors import warn
from fastweights.optim.lookahead import Lookahead

__all__ = [
    "MODES",
    "full_state_dict",
    "init_distributed",
    "load_checkpoint",
    "load_full_state_dict",
    "parallelize",
    "save_checkpoint",
    "wrap_model",
]

MODES = ("fsdp", "ddp")


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) if needed; returns
    ``(rank, world_size, device)``. NCCL and ``cuda:LOCAL_RANK`` with CUDA, else gloo/CPU."""
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds the group to this rank's GPU (NCCL's barrier otherwise warns that it guesses)
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def _decoder_layers(model: nn.Module):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return list(getattr(base, "layers", []))


def wrap_model(model: nn.Module, mode: str = "fsdp", *, mesh=None, group: dist.ProcessGroup | None = None,
               mp_dtype: torch.dtype | None = None) -> nn.Module:
    """Data-parallel ``model`` (already on this rank's device) over the world or ``mesh``/``group``.

    ``"fsdp"``: FSDP2 ``fully_shard`` on each decoder layer, then the root (parameters become
    DTensors sharded on dim 0; ``mp_dtype`` sets bf16/fp16 compute with float32 gradient
    reduction). The module is changed in place and returned; names are unchanged.
    ``"ddp"``: ``DistributedDataParallel`` (names gain ``module.``; the checkpoint functions
    strip it). Gradients are averaged over the data-parallel ranks in both modes.
    """
    if mode not in MODES:
        raise ValueError(f"data-parallel mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    if mode == "ddp":
        if mp_dtype is not None:
            raise ValueError("mp_dtype is for FSDP; with DDP cast the model or use autocast")
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = (DeviceMesh.from_group(group, device.type) if group is not None
                else _world_mesh(device.type))
    kw = {"mesh": mesh}
    if mp_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _world_mesh(device_type: str):
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the whole model's tensors on CPU under their plain names, on rank 0
    (other ranks get ``{}``). A collective: every rank calls it."""
    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    live = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return {k: v.clone() if v.data_ptr() in live else v for k, v in sd.items()}  # DDP on CPU: no copy was made


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load full tensors (needed on rank 0 only; others may pass ``{}``) into a wrapped or
    plain model, sharding them as the model is sharded. A collective."""
    set_model_state_dict(model, state_dict, options=_options(broadcast_from_rank0=True))


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): copy repeats."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v.contiguous()
        seen.add(key)
    return out


def _plain(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rank_world() -> tuple[int, int]:
    """``(rank, world size)``: (0, 1) without a process group (one process, an unwrapped model)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _agree_all(error: str | None) -> None:
    """Raise on every rank the first error that any rank met (``error``: this rank's, or None),
    naming the rank: each rank's own files (its RNG state) can fail on that rank alone."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise RuntimeError(e if len(errors) == 1 else f"{e} (rank {r})")


def _json_value(x):
    """JSON for optimizer hyperparameters: tuples as lists; a tensor (a tensor lr) as
    ``{"__tensor__": value, "dtype": name}``, which :func:`_from_json` turns back into a tensor."""
    if torch.is_tensor(x):
        return {"__tensor__": x.tolist(), "dtype": str(x.dtype).removeprefix("torch.")}
    return list(x)


def _from_json(x):
    """Inverse of :func:`_json_value`, also inside lists (tensor betas)."""
    if isinstance(x, dict) and set(x) == {"__tensor__", "dtype"}:
        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failure(err: BaseException, what: str | None = None) -> str:
    """``err`` as the message :func:`_agree_all` raises (a RuntimeError: its own type not repeated)."""
    text = str(err) if type(err) is RuntimeError else f"{type(err).__name__}: {err}"
    return text if what is None else f"{what}: {text}"


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    state: dict | None = None) -> Path:
    """Write a world-size independent checkpoint directory (module docstring). Every rank
    calls it (or one process without a process group); rank 0 writes the shared files, each
    rank its RNG state. ``state``: JSON-able values (step, data position, scheduler...) stored
    in ``state.json`` (``world_size`` is added). ``path`` is new, empty or an earlier checkpoint
    (anything else is refused, as are ``<path>.tmp`` / ``<path>.old`` directories that are not
    this function's). The files go to ``<path>.tmp`` (``state.json`` last, once every rank's file
    is there), which then replaces ``path``; the previous checkpoint stays at ``<path>.old`` until
    the new one is in place, and :func:`load_checkpoint` falls back to it. Any error, on any
    rank, is raised on every rank."""
    path = Path(os.path.abspath(path))
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    rank, world = _rank_world()
    kind = None if optimizer is None else _optimizer_kind(optimizer)  # the same on every rank: checked first
    model_sd = full_state_dict(model)
    optim_sd = (get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
                if optimizer is not None else None)
    error, state_text = None, ""
    if rank == 0:
        error = _unsafe_target(path, tmp, old, state)
        if error is None:
            try:
                _string_keys(state or {}, "state")
                # fails before any write; NaN/inf are not JSON (strict readers refuse them)
                state_text = json.dumps({**(state or {}), "world_size": world}, indent=1, allow_nan=False)
                _write_shared(tmp, model, model_sd, optim_sd, kind)
            except Exception as err:  # noqa: BLE001  (raised on every rank by _agree_all)
                shutil.rmtree(tmp, ignore_errors=True)
                error = _failure(err, f"could not write checkpoint {tmp}") + f" ({path} is unchanged)"
    _agree_all(error)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    error = None
    try:
        save_file(rng, str(tmp / f"rng-{rank}.safetensors"))
        fsync(tmp / f"rng-{rank}.safetensors")
    except Exception as err:  # noqa: BLE001
        error = _failure(err, f"could not write checkpoint {tmp / f'rng-{rank}.safetensors'}")
    try:
        _agree_all(error)  # also the barrier: every rank's file is in before state.json
    except RuntimeError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        try:
            (tmp / "state.json").write_text(state_text)
            fsync(tmp / "state.json")
            _put_in_place(tmp, path, old)
        except Exception as err:  # noqa: BLE001
            error = _failure(err, f"could not finish checkpoint {path}")
    _agree_all(error)
    return path


def _unsafe_target(path: Path, tmp: Path, old: Path, state) -> str | None:
    """Why ``path`` (and its ``.tmp``/``.old`` siblings) must not be replaced, or None."""
    if state is not None and "world_size" in state:
        return "state's key 'world_size' is the one save_checkpoint writes: give it another name"
    if Path.cwd() == path or path in Path.cwd().parents:
        return (f"{path} is the current directory (or holds it): save_checkpoint replaces its directory, so give "
                "a subdirectory")
    if path.exists() and not path.is_dir():
        return f"{path} is a file: give a directory for the checkpoint"
    if path.is_dir() and any(path.iterdir()) and not _complete(path):
        return (f"{path} holds files but no checkpoint (state.json): save_checkpoint replaces its directory, so "
                "give a new or empty one")
    if tmp.exists() and not (tmp.is_dir() and ((tmp / "model.safetensors").exists() or all(
            f.name in _OWN_FILES or f.name.startswith("rng-") for f in tmp.iterdir()))):
        return f"{tmp} exists and is not an unfinished checkpoint: save_checkpoint would delete it; move it away"
    if old.exists() and not (old.is_dir() and _complete(old)):
        return f"{old} exists and is not a checkpoint: save_checkpoint would delete it; move it away"
    return None


# the files save_checkpoint writes; anything else in a checkpoint (a tokenizer added to it) is kept
_OWN_FILES = ("model.safetensors", "config.json", "generation_config.json", "optimizer.safetensors",
              "optimizer.json", "state.json")


def _put_in_place(tmp: Path, path: Path, old: Path) -> None:
    """Replace ``path`` by the finished checkpoint ``tmp``; the previous checkpoint waits at ``old``
    until the new one is in place, and files a user added to it (at ``path``, or at ``old`` after
    an interrupted save) move over to the new one."""
    previous = path if _complete(path) else old if _complete(old) else None
    if previous is not None:
        for f in previous.iterdir():
            if f.name not in _OWN_FILES and not f.name.startswith("rng-") and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
    if previous is path:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    elif path.exists():
        shutil.rmtree(path)  # empty, or an unfinished copy
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _complete(path: Path) -> bool:
    """A checkpoint directory whose writing finished (``state.json`` is written last)."""
    return (path / "state.json").is_file() and (path / "model.safetensors").is_file()


def _string_keys(x, where: str) -> None:
    """Raise on a dict key that is not a string anywhere in ``x``: JSON would turn it into one."""
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has the key {k!r} ({type(k).__name__}): state.json (JSON) holds string "
                                 "keys only, so it would not come back as it went in; use string keys")
            _string_keys(v, f"{where}[{k!r}]")
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _string_keys(v, f"{where}[{i}]")


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class name, as ``optimizer.json`` records it; a Lookahead/SLRLA is refused (torch's
    distributed state-dict functions read an optimizer's own per-parameter state only)."""
    if isinstance(optimizer, Lookahead):
        raise ValueError(f"save_checkpoint/load_checkpoint take torch optimizers, not a {type(optimizer).__name__} "
                         "(its slow weights are not per-parameter optimizer state); the trainer checkpoints "
                         "Lookahead and SLRLA runs: fastweights train --parallel ddp --optimizer lookahead_adamw")
    return type(optimizer).__qualname__


def _write_shared(tmp: Path, model: nn.Module, model_sd: dict, optim_sd: dict | None, kind: str | None) -> None:
    """Rank 0's tensor files of one checkpoint, in the directory ``tmp`` (made anew), each
    flushed (``state.json`` comes last, from :func:`save_checkpoint`)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_untie(model_sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = getattr(_plain(model), "config", None)
    if config is not None:
        config.save_pretrained(tmp)
    if optim_sd is not None:
        tensors = {f"{name}/{k}": v.contiguous() for name, st in optim_sd["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}
        other = {name: {k: v for k, v in st.items() if not torch.is_tensor(v)}
                 for name, st in optim_sd["state"].items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(
            {"optimizer": kind, "param_groups": optim_sd["param_groups"], "state": other}, indent=1,
            default=_json_value))
    for f in tmp.iterdir():
        fsync(f)


def _read_shared(path: Path, model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Rank 0's reads of a checkpoint, checked against ``model`` and ``optimizer`` before any
    collective: (model tensors, optimizer state dict or {}). Errors name the file."""
    def tensors(name):
        try:
            return load_file(str(path / name))
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(f"{path / name} cannot be read ({err}): the checkpoint is incomplete") from err

    model_sd = tensors("model.safetensors")
    want = {k: tuple(v.shape) for k, v in _plain(model).state_dict().items()}
    missing, extra = sorted(set(want) - set(model_sd)), sorted(set(model_sd) - set(want))
    shapes = [k for k in want if k in model_sd and tuple(model_sd[k].shape) != want[k]]
    if missing or extra or shapes:
        what = (f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} tensors the model lacks (e.g. {extra[0]})" if extra else
                f"tensors of other shapes (e.g. {shapes[0]}: {tuple(model_sd[shapes[0]].shape)} here, "
                f"{want[shapes[0]]} in the model)")
        raise RuntimeError(f"{path / 'model.safetensors'} does not fit this model: {what}")
    if optimizer is None:
        return model_sd, {}
    if not (path / "optimizer.json").is_file():
        raise FileNotFoundError(f"{path} has optimizer.safetensors but no optimizer.json: the checkpoint is "
                                "incomplete")
    try:
        meta = json.loads((path / "optimizer.json").read_text())
        st: dict[str, dict] = {name: dict(v) for name, v in meta["state"].items()}
        groups = [{k: _from_json(v) for k, v in g.items()} for g in meta["param_groups"]]
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
        sizes = [len(g["params"]) for g in groups]
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"{path / 'optimizer.json'} cannot be read ({type(err).__name__}: {err}): the "
                           "checkpoint is incomplete") from None
    saved_kind = meta.get("optimizer")  # absent in checkpoints written before it was recorded
    if saved_kind is not None and saved_kind != _optimizer_kind(optimizer):
        raise RuntimeError(f"{path / 'optimizer.json'} holds the state of optimizer {saved_kind}; this one is "
                           f"{_optimizer_kind(optimizer)}: build the optimizer the checkpoint was written with, or "
                           "load the model alone (optimizer=None)")
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise RuntimeError(f"{path / 'optimizer.json'} holds param groups of {sizes} parameters; this optimizer's "
                           f"have {[len(g['params']) for g in optimizer.param_groups]}")
    for key, v in tensors("optimizer.safetensors").items():
        if "/" not in key:
            raise RuntimeError(f"{path / 'optimizer.safetensors'} holds {key!r}, not '<parameter>/<state>'")
        name, k = key.rsplit("/", 1)
        st.setdefault(name, {})[k] = v
    return model_sd, {"state": st, "param_groups": groups}


def _read_own(path: Path, optimizer, rank: int, world: int) -> tuple[dict, dict | None]:
    """Every rank's reads before any collective: ``state.json`` and, at the world size that wrote
    the checkpoint, this rank's RNG state (checked). Errors name the file."""
    for name in ("model.safetensors", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: {name} is missing")
    if optimizer is not None and not (path / "optimizer.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no optimizer state (optimizer.safetensors)")
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise TypeError(f"a mapping is expected, got {type(state).__name__}")
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path / 'state.json'} cannot be read ({err}): the checkpoint is incomplete") from None
    if state.get("world_size") != world:
        return state, None
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the checkpoint is incomplete and resume would not be exact")
    try:
        rng = load_file(str(rng_file))
        if any(v.dtype != torch.uint8 for v in rng.values()) or "torch" not in rng:
            raise ValueError("expected uint8 RNG states under 'torch' (and 'cuda')")
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{rng_file} cannot be read ({type(err).__name__}: {err}): the checkpoint is "
                         "incomplete") from None
    return state, rng


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a :func:`save_checkpoint` directory into a model wrapped (or not) at any world
    size, or into one process without a process group; restores the per-rank RNG when the
    world size is the one that wrote it. Returns ``state.json``. Every rank calls it; rank 0
    reads the tensor files and checks them against the model and optimizer before any
    collective, and an error on any rank is raised on every rank."""
    path = Path(os.path.abspath(path))
    rank, world = _rank_world()
    if optimizer is not None:
        _optimizer_kind(optimizer)  # the same on every rank: raised before any collective
    old = path.with_name(path.name + ".old")
    chosen = [str(old if not _complete(path) and _complete(old) else path)]  # rank 0's choice for all
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != str(path):  # a save stopped between its two renames
        if rank == 0:
            warn(f"{path} is incomplete; loading the previous checkpoint {old}")
        path = old
    error, state, rng = None, {}, None
    try:
        state, rng = _read_own(path, optimizer, rank, world)
    except Exception as err:  # noqa: BLE001
        error = _failure(err)
    _agree_all(error)
    error, model_sd, osd = None, {}, {}
    if rank == 0:
        try:
            model_sd, osd = _read_shared(path, model, optimizer)
        except Exception as err:  # noqa: BLE001
            error = _failure(err)
    _agree_all(error)
    broadcast = dist.is_initialized()
    set_model_state_dict(model, model_sd, options=_options(broadcast_from_rank0=broadcast))
    if optimizer is not None:
        # torch's loader sets up a fresh optimizer's state by a zero step, but skips it (and then
        # fails: "Expected device to be set") when a parameter already holds a gradient
        held = {p: p.grad for g in optimizer.param_groups for p in g["params"]
                if not optimizer.state and p.grad is not None}
        for p in held:
            p.grad = None
        try:
            set_optimizer_state_dict(model, optimizer, osd, options=_options(broadcast_from_rank0=broadcast))
        finally:
            for p, grad in held.items():
                p.grad = grad
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def parallelize(model: nn.Module, *, dp_mode: str = "fsdp", cp_size: int = 1, attention: str = "split",
                mp_dtype: torch.dtype | None = None):
    """Data parallelism over the whole world and context parallelism over groups of
    ``cp_size`` consecutive ranks (a (world/cp_size) × cp_size mesh, dims ``dp`` and ``cp``).

    Ranks of one ``cp`` group share one batch of sequences, each rank a contiguous shard
    (:func:`~fastweights.distributed.cp_batch` with ``group=cp_group``); ``dp`` replicas
    (``dp_rank = rank // cp_size``) take different batches. Gradients are averaged over all
    ranks by FSDP2/DDP, which with :func:`~fastweights.distributed.cp_loss` gives the mean
    over the data-parallel batches of the whole sequences' gradients. ``attention``: the
    context-parallel attention path (:func:`~fastweights.distributed.apply_context_parallel`).

    Returns ``(model, cp_group, dp_rank)``; ``cp_group`` is None when ``cp_size == 1``.
    :func:`~fastweights.distributed.context_parallel_of` ``(model)`` gives the context-parallel
    handle (None when ``cp_size == 1``), whose ``remove()`` restores the plain model to generate.
    """
    world = dist.get_world_size()
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1 or world % cp_size:
        raise ValueError(f"cp_size must be a positive divisor of the world size {world}, got {cp_size!r}")
    device = next(model.parameters()).device
    cp_group = None
    if cp_size > 1:
        mesh = init_device_mesh(device.type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
        cp_group = mesh.get_group("cp")
        apply_context_parallel(model, cp_group, attention=attention)
    return wrap_model(model, dp_mode, mp_dtype=mp_dtype), cp_group, dist.get_rank() // cp_size
