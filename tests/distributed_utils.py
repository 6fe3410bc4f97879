"""Run a function on a gloo process group of W CPU processes, from inside a test."""

import faulthandler
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, fn, args, out_dir, backend, timeout):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    stacks = open(os.path.join(out_dir, f"rank{rank}.stack"), "w")  # noqa: SIM115 (open until exit)
    faulthandler.dump_traceback_later(max(timeout - 5.0, 1.0), file=stacks)  # where a hung rank waits
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # a file store: no port to race for
    dist.init_process_group(backend, init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        err = None
    except Exception:
        result, err = None, traceback.format_exc()
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as fh:  # then renamed: the parent never reads a partial file
        json.dump({"result": result, "error": err}, fh)
    os.replace(path + ".tmp", path)
    if err is None:
        dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _errors(out_dir: str, world: int) -> dict[int, str]:
    """The errors that finished ranks reported so far, by rank."""
    errs = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as fh:
                data = json.load(fh)
            if data["error"]:
                errs[r] = data["error"]
    return errs


def _terminate(ctx) -> None:
    for proc in ctx.processes:
        if proc.is_alive():
            proc.terminate()


def run_world(world: int, fn, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Start ``world`` processes running ``fn(rank, world, *args)`` (a module-level function
    returning JSON-able data) on a ``backend`` group (gloo: forked CPU processes; nccl: spawned,
    one GPU each); return the per-rank results. Raises as soon as a rank reports an error (the
    others, which may wait in a collective for it, are terminated), and after ``timeout``
    seconds with every rank's stack (a hang)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, fn, args, out_dir, backend, timeout), nprocs=world,
                                 join=False, start_method="fork" if backend == "gloo" else "spawn")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ctx.join(0.5):
                    break
            except mp.ProcessRaisedException:  # a rank crashed outside fn (e.g. its peer vanished)
                _terminate(ctx)
                raise
            errs = _errors(out_dir, world)
            if errs or time.monotonic() > deadline:
                # errors: let the other ranks report theirs too (the first error's peers fail after
                # it); a hang: let the ranks' faulthandler write their stacks
                time.sleep(2.0 if errs else 6.0)
                errs = _errors(out_dir, world)
                _terminate(ctx)
                if errs:
                    _raise_errors(errs)
                stacks = ""
                for r in range(world):
                    with open(os.path.join(out_dir, f"rank{r}.stack")) as fh:
                        stacks += f"--- rank {r}\n{fh.read()}"
                raise AssertionError(f"{world} ranks did not finish in {timeout} s; their stacks:\n{stacks}")
        errs = _errors(out_dir, world)
        if errs:  # every rank's error: the first rank's may only be the echo of another's
            _raise_errors(errs)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                results.append(json.load(fh)["result"])
    return results


def _raise_errors(errs: dict[int, str]) -> None:
    raise AssertionError("\n".join(f"rank {r} failed:\n{e}" for r, e in errs.items()))
