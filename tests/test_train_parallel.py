"""`fastweights train --parallel ddp|fsdp` on 2 gloo processes: exact resume after a kill, and
a checkpoint written at world size 2 that continues at world size 1 (issue 6)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_world
from pipeline_helpers import prepare_args, train_args, write_corpus

from fastweights.commands.prepare import PrepareConfig, prepare
from fastweights.config import parse
from fastweights.errors import FastWeightsError
from fastweights.train.trainer import TrainConfig, train

STEPS = 6
KILLED_AFTER = 2  # the last checkpoint a killed run left


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_parallel")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTWEIGHTS_CACHE", str(root / "cache"))
    ds = prepare(parse(PrepareConfig, prepare_args(write_corpus(root / "corpus", docs=12), root / "data"), "t", ""))
    yield ds.path
    mp.undo()


def _args(data, out, **extra):
    return train_args(data, out, steps=STEPS, save_every=2, batch_size=4, device="cpu", **extra)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _as_if_killed(src: Path, dst: Path) -> None:
    """``dst``: what a run killed after checkpoint KILLED_AFTER left (metrics may run ahead)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "model")
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > KILLED_AFTER:
            shutil.rmtree(ckpt)


def _train_worker(rank, world, mode, data, root):
    root = Path(root)
    full, killed = root / f"{mode}-full", root / f"{mode}-killed"
    train(parse(TrainConfig, _args(data, full, parallel=mode), "t", ""))
    if rank == 0:
        _as_if_killed(full, killed)
    dist.barrier()
    train(parse(TrainConfig, [*_args(data, killed, parallel=mode), "--resume"], "t", ""))
    return json.loads((killed / "checkpoints" / f"step-{KILLED_AFTER:08d}" / "state.json").read_text())["world_size"]


def rel(a: dict, b: dict) -> float:
    """Relative difference of the losses of ``a``'s steps."""
    x, y = torch.tensor([a[s] for s in sorted(a)]), torch.tensor([b[s] for s in sorted(a)])
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_data_parallel_train_resumes_exactly_and_loads_at_another_world_size(data, tmp_path, mode):
    threads = torch.get_num_threads()
    assert run_world(2, _train_worker, mode, str(data), str(tmp_path)) == [2, 2]
    full, killed = _losses(tmp_path / f"{mode}-full"), _losses(tmp_path / f"{mode}-killed")
    assert sorted(full) == sorted(killed) == list(range(1, STEPS + 1))
    assert full == killed  # resume at the same world size: bit for bit
    # the same run in one process equals 2 ranks (the same global batch and token mean)
    one = tmp_path / "one"
    train(parse(TrainConfig, _args(data, one), "t", ""))
    assert rel(_losses(one), full) < 1e-5
    # the exported model holds the same tensors whatever the parallel mode (FSDP wrote a tied
    # lm_head.weight twice)
    from safetensors import safe_open

    keys = []
    for run in (one, tmp_path / f"{mode}-full"):
        with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
            keys.append(set(f.keys()))
    assert keys[0] == keys[1], keys[0] ^ keys[1]
    # the world-size-2 checkpoint continues at world size 1 (plain trainer) as at world size 2
    cont = tmp_path / "cont"
    _as_if_killed(tmp_path / f"{mode}-full", cont)
    train(parse(TrainConfig, [*_args(data, cont), "--resume"], "t", ""))
    after = {s: v for s, v in _losses(cont).items() if s > KILLED_AFTER}
    assert sorted(after) == list(range(KILLED_AFTER + 1, STEPS + 1))
    assert rel(after, full) < 1e-5
    torch.set_num_threads(threads)


def test_parallel_option_errors(data, tmp_path, monkeypatch):
    with pytest.raises(FastWeightsError, match="parallel must be one of"):
        train(parse(TrainConfig, _args(data, tmp_path / "a", parallel="zero"), "t", ""))
    with pytest.raises(FastWeightsError, match="needs a torchrun launch"):
        train(parse(TrainConfig, _args(data, tmp_path / "b", parallel="ddp"), "t", ""))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FastWeightsError, match="--parallel ddp or --parallel fsdp"):
        train(parse(TrainConfig, _args(data, tmp_path / "c"), "t", ""))


def _device_worker(rank, world, data, root):
    out = {}
    for device, cuda in (("bogus", None), ("cuda", False), ("mps", None), ("cuda:1", True)):
        run = Path(root) / device.replace(":", "-")
        available = torch.cuda.is_available
        if cuda is not None:  # as on a host with or without CUDA (the check comes before any CUDA call)
            torch.cuda.is_available = lambda cuda=cuda: cuda
        try:
            train(parse(TrainConfig, train_args(data, run, steps=1, device=device, parallel="ddp"), "t", ""))
            out[device] = "trained"
        except Exception as err:  # noqa: BLE001
            out[device] = str(err) if isinstance(err, FastWeightsError) else f"{type(err).__name__}: {err}"
        finally:
            torch.cuda.is_available = available
        out[device + " wrote"] = run.exists()
    return out


def test_parallel_train_checks_the_device(data, tmp_path):
    """Found by a review: under torchrun --device was ignored unless it was cpu (--device bogus
    and --device cuda on a host without CUDA trained on CPU with gloo, recording the value)."""
    for out in run_world(2, _device_worker, str(data), str(tmp_path)):
        assert out["bogus"].startswith("unknown device 'bogus'"), out
        assert out["cuda"] == "device cuda requested but CUDA is not available", out
        for device in ("mps", "cuda:1"):
            assert out[device].startswith(f"--device {device} is not for --parallel ddp: pass auto, cpu (gloo) or "
                                          "cuda (NCCL); each rank runs on cuda:LOCAL_RANK"), out
        assert not any(v for k, v in out.items() if k.endswith(" wrote")), out
