"""Data parallelism (FSDP2 or DDP) and world-size independent checkpoints (docs/distributed.md).

Functions the trainer calls under ``torchrun``:

* :func:`init_distributed`: the process group from torchrun's environment (NCCL on CUDA,
  gloo on CPU) and this rank's device;
* :func:`wrap_model`: ``fully_shard`` (FSDP2) on every decoder layer and the root, or DDP;
* :func:`parallelize`: data parallelism and context parallelism together on a 2-D mesh;
* :func:`save_checkpoint` / :func:`load_checkpoint`: full (unsharded) tensors in safetensors,
  keyed by parameter name, so a checkpoint written at one world size loads at any other:
  ``model.safetensors`` + ``config.json`` (a Hugging Face model directory),
  ``optimizer.safetensors`` (state per parameter name) + ``optimizer.json`` (param groups),
  ``rng-<rank>.safetensors`` (per-rank RNG, restored only at the same world size: resume is
  then exact, bit for bit with FSDP2; with DDP at > 2 ranks up to the order of the gradient
  all-reduce sums in the first step, as DDP rebuilds its buckets) and ``state.json`` (step,
  world size and what the caller adds). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
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
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
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


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    state: dict | None = None) -> Path:
    """Write a world-size independent checkpoint directory (module docstring). Every rank
    calls it; rank 0 writes the shared files, each rank its RNG state. ``state``: JSON-able
    values (step, data position, scheduler...) stored in ``state.json``."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd = full_state_dict(model)
    optim_sd = (get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
                if optimizer is not None else None)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file(_untie(model_sd), str(path / "model.safetensors"), metadata={"format": "pt"})
        config = getattr(_plain(model), "config", None)
        if config is not None:
            config.save_pretrained(path)
        if optim_sd is not None:
            tensors = {f"{name}/{k}": v.contiguous() for name, st in optim_sd["state"].items()
                       for k, v in st.items() if torch.is_tensor(v)}
            other = {name: {k: v for k, v in st.items() if not torch.is_tensor(v)}
                     for name, st in optim_sd["state"].items()}
            save_file(tensors, str(path / "optimizer.safetensors"))
            (path / "optimizer.json").write_text(json.dumps(
                {"param_groups": optim_sd["param_groups"], "state": other}, indent=1, default=list))
        (path / "state.json").write_text(json.dumps({**(state or {}), "world_size": world}, indent=1))
    dist.barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(path / f"rng-{rank}.safetensors"))
    dist.barrier()
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a :func:`save_checkpoint` directory into a model wrapped (or not) at any world
    size; restores the per-rank RNG when the world size is the one that wrote it. Returns
    ``state.json``. Every rank calls it; only rank 0 reads the tensor files."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in ("model.safetensors", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: {name} is missing")
    state = json.loads((path / "state.json").read_text())
    load_full_state_dict(model, load_file(str(path / "model.safetensors")) if rank == 0 else {})
    if optimizer is not None:
        if not (path / "optimizer.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no optimizer state (optimizer.safetensors)")
        osd: dict = {}
        if rank == 0:
            meta = json.loads((path / "optimizer.json").read_text())
            st: dict[str, dict] = {name: dict(v) for name, v in meta["state"].items()}
            for key, v in load_file(str(path / "optimizer.safetensors")).items():
                name, k = key.rsplit("/", 1)
                st.setdefault(name, {})[k] = v
            groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
            osd = {"state": st, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, osd, options=_options(broadcast_from_rank0=True))
    if state.get("world_size") == world and (path / f"rng-{rank}.safetensors").is_file():
        rng = load_file(str(path / f"rng-{rank}.safetensors"))
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
