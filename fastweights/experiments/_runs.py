"""Shared plumbing of the experiments that run many small trainings: worker processes, merging
result files (``--jobs``, ``--report-from``) and grouping runs by method and seed (``--combine``)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from fastweights._progress import progress_bar

__all__ = ["check_settings", "group_runs", "merge_reports", "run_in_workers"]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_in_workers(fn: Callable[..., dict], jobs: Iterable[tuple], workers: int, threads: int,
                   done: Callable[[dict], None], desc: str, quiet: bool = False) -> None:
    """Run ``fn(*job)`` for every job in ``workers`` spawned processes of ``threads`` torch threads
    each; ``done(result)`` is called in this process as each finishes. ``fn`` must be importable."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in progress_bar(as_completed(futures), total=len(futures), desc=desc, disable=quiet):
            done(f.result())


def check_settings(named: Iterable[tuple[object, dict]], ignore: set[str]) -> dict:
    """The settings of every ``(name, settings)`` pair but the keys in ``ignore``, which must
    agree; a ValueError names the first that differs and the keys."""
    named = list(named)
    first = {k: v for k, v in named[0][1].items() if k not in ignore}
    for name, settings in named:
        other = {k: v for k, v in settings.items() if k not in ignore}
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ValueError(f"{name} was run with different settings ({', '.join(diff)}); cannot combine")
    return first


def merge_reports(paths: Iterable[Path], key: Callable[[dict], tuple], ignore: set[str],
                  defaults: dict) -> tuple[list[dict], dict, list[list[str]]]:
    """Read result files ``{"args", "argv"/"commands", "results"}``; return the results (a run
    present in several files, by ``key(result)``, counted once: the first file's), the shared
    ``args`` and every file's commands. Each file's ``args`` are completed from ``defaults`` (an
    option added since it ran) and must agree but for the keys in ``ignore``; such a key whose
    values differ is None in the returned ``args``."""
    paths = list(paths)
    runs = [json.loads(Path(p).read_text()) for p in paths]
    settings = [{**defaults, **run["args"]} for run in runs]
    args = check_settings(zip(paths, settings, strict=True), ignore) | {k: settings[0][k] for k in ignore}
    for k in ignore:
        if any(s[k] != args[k] for s in settings):
            args[k] = None
    unique: dict[tuple, dict] = {}
    for r in (r for run in runs for r in run["results"]):
        unique.setdefault(key(r), r)
    commands = [c for run in runs for c in run.get("commands", [run["argv"]])]
    return list(unique.values()), args, commands


def group_runs(
    dirs: list[Path], records: list[dict], ignore: set[str], items: Callable[[dict], Iterable[tuple[str, int, dict]]]
) -> tuple[dict, dict[str, dict[int, dict]], list[int]]:
    """Group the results of several records (one per directory in ``dirs``) by method and seed.

    Every record's ``settings`` must agree except for the keys in ``ignore``; ``items(record)``
    yields its ``(method, seed, result)``. Every method must have the same seeds. Returns the
    shared settings, ``{method: {seed: result}}`` and the sorted seeds."""
    first = check_settings(((d, rec["settings"]) for d, rec in zip(dirs, records, strict=True)), ignore)
    runs: dict[str, dict[int, dict]] = {}
    for rec in records:
        for method, seed, result in items(rec):
            runs.setdefault(method, {})[seed] = result
    seed_sets = {m: sorted(r) for m, r in runs.items()}
    if len({tuple(v) for v in seed_sets.values()}) > 1:
        raise ValueError(f"every method needs the same seeds to be combined, got {seed_sets}")
    return first, runs, next(iter(seed_sets.values()))


def apply_quick(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace,
                **settings) -> None:
    """``--quick``'s settings, for the options not given on the command line (an explicit flag
    wins: ``--quick --steps 5`` runs 5 steps)."""
    argv = sys.argv[1:] if argv is None else argv
    given = {a.dest for a in parser._actions
             if any(x == o or x.startswith(o + "=") for o in a.option_strings for x in argv)}
    for name, value in settings.items():
        if name not in given:
            setattr(args, name, value)
