"""Run a function on a gloo process group of W CPU processes, from inside a test."""

import json
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, fn, args, out_dir, backend):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
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
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"result": result, "error": err}, fh)
    if err is None:
        dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, fn, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    """Start ``world`` processes running ``fn(rank, world, *args)`` (a module-level function
    returning JSON-able data) on a ``backend`` group (gloo: forked CPU processes; nccl: spawned,
    one GPU each); return the per-rank results, raising on error."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, fn, args, out_dir, backend), nprocs=world,
                                 join=False, start_method="fork" if backend == "gloo" else "spawn")
        while not ctx.join(timeout):
            pass
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                data = json.load(fh)
            if data["error"]:
                raise AssertionError(f"rank {r} failed:\n{data['error']}")
            results.append(data["result"])
    return results
