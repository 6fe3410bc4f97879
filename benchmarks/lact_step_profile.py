"""Where one training step's GPU time goes, per variant of benchmarks/lact.py: the kernels that
the LaCT chunk loop's CUDA graphs replay, and the others grouped by kind.

Each variant (default ``swa,lact-muon,lact-momentum``, with ``FASTWEIGHTS_LACT_COMPILE=graphs``
unless set) is built as in benchmarks/lact.py, warmed up, timed (median of 5), and one step is
profiled with torch.profiler. Kernels are split by the runtime call that launched them
(``cudaGraphLaunch``: the loop's graphs) and the rest is grouped into GEMMs, flex attention (and
its block mask), inductor-generated Triton kernels (the compiled glue), fastweights' own Triton
kernels, memory copies and other ATen kernels. Differences between variants show what a LaCT
layer adds to the SWA block outside its chunk loop. ``--trace-dir`` keeps the Chrome traces.
``--tiny`` runs on CPU at a tiny size (ATen ops' self times; a smoke test).

    python benchmarks/lact_step_profile.py                       # H100, the 760M shapes
    python benchmarks/lact_step_profile.py --variants swa,lact-muon --trace-dir /tmp/traces
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FASTWEIGHTS_LACT_COMPILE", "graphs")
import lact as bench  # noqa: E402  (benchmarks/lact.py, beside this script)
import torch  # noqa: E402

OURS = ("_inputs_kernel", "_merge_kernel")  # fastweights.ops.lact_glue


def kind(name: str) -> str:
    """The group of a kernel (or CPU op) name."""
    if any(k in name for k in OURS):
        return "fastweights Triton glue"
    if "flex" in name or "arange_bitwise" in name:
        return "flex attention + block mask"
    if name.startswith("triton_"):
        return "inductor Triton (compiled glue)"
    if "Memcpy" in name or "copy" in name.lower():
        return "copies"
    if any(k in name for k in ("nvjet", "cutlass", "gemm", "splitK", "aten::mm", "aten::addmm", "aten::bmm")):
        return "GEMM"
    return "other ATen"


def split(trace: dict, device: str) -> tuple[float, dict[str, float]]:
    """(ms in the loop's CUDA graphs, {group: ms} of everything else) from a Chrome trace."""
    ev = trace["traceEvents"]
    if device != "cuda":  # CPU: each ATen op's self time (its time less that of the ops inside it)
        ops = sorted((e for e in ev if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: (e["tid"], e["ts"]))
        self_ms = {id(e): e["dur"] / 1e3 for e in ops}
        stack: list = []
        for e in ops:
            while stack and (stack[-1]["tid"] != e["tid"] or stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]):
                stack.pop()
            if stack:
                self_ms[id(stack[-1])] -= e["dur"] / 1e3
            stack.append(e)
        groups = collections.defaultdict(float)
        for e in ops:
            if e["name"].startswith("aten::"):
                groups[kind(e["name"])] += self_ms[id(e)]
        return 0.0, dict(groups)
    graph = {e["args"].get("correlation") for e in ev
             if e.get("cat") == "cuda_runtime" and "GraphLaunch" in e.get("name", "")}
    in_graphs, groups = 0.0, collections.defaultdict(float)
    for e in ev:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ms = e["dur"] / 1e3
        if e["args"].get("correlation") in graph:
            in_graphs += ms
        else:
            groups[kind(e["name"])] += ms
    return in_graphs, dict(groups)


def _gpu_events(events: list) -> list:
    """The GPU's kernels, copies and memsets of a Chrome trace, by start time."""
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])


def gaps(trace: dict, top: int = 8) -> tuple[float, list[tuple[float, str, str, str]]]:
    """(ms the GPU idles between its first and last kernel, the ``top`` longest idle gaps as
    (ms, kernel before, kernel after, the longest host ops between their launches)) from a CUDA
    Chrome trace. A gap whose host ops fill it is the host's: the GPU waited for the launch."""
    events = trace["traceEvents"]
    launch = {e["args"]["correlation"]: e["ts"] for e in events
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    ev = _gpu_events(events)
    idle, found, end, last = 0.0, [], None, None
    for e in ev:
        if end is not None and e["ts"] > end:
            t0, t1 = launch.get(last["args"].get("correlation")), launch.get(e["args"].get("correlation"))
            ops = "" if t0 is None or t1 is None else ", ".join(
                f"{o['name'][:40]} {o['dur'] / 1e3:.2f}" for o in sorted(
                    (o for o in host if t0 <= o["ts"] and o["ts"] + o["dur"] <= t1), key=lambda o: -o["dur"])[:3])
            idle += (e["ts"] - end) / 1e3
            found.append(((e["ts"] - end) / 1e3, last["name"][:50], e["name"][:50], ops))
        if end is None or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e
    return idle, sorted(found, reverse=True)[:top]


def graph_launches(trace: dict) -> list[tuple[float, float, int]]:
    """Each CUDA graph replay in a CUDA Chrome trace, in launch order: (ms of host time in the
    launch call, ms the GPU idled before the graph's first kernel, the graph's kernel count).
    The GPU starts a graph only when its launch call returns, so a long call idles a GPU that has
    nothing else queued."""
    events = trace["traceEvents"]
    gpu = _gpu_events(events)
    out = []
    for e in sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                     and "GraphLaunch" in e.get("name", "") and "dur" in e), key=lambda e: e["ts"]):
        corr = e["args"].get("correlation")
        mine = [k for k in gpu if k["args"].get("correlation") == corr]
        if not mine:
            continue
        start = mine[0]["ts"]
        before = [k["ts"] + k["dur"] for k in gpu if k["ts"] < start and k["args"].get("correlation") != corr]
        out.append((e["dur"] / 1e3, max(0.0, start - max(before)) / 1e3 if before else 0.0, len(mine)))
    return out


def profile_variant(name, shape, device, trace_dir: Path, doc_len=None):
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step, sync = bench.build_step(name, shape, 2, dtype, device, doc_len)
    for _ in range(4):
        step()
    sync()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    path = trace_dir / f"{name}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    cuda = device.type == "cuda"
    return (statistics.median(times) * 1e3, split(trace, device.type), gaps(trace) if cuda else None,
            graph_launches(trace) if cuda else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="swa,lact-muon,lact-momentum")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--trace-dir", default=None, help="keep the Chrome traces here")
    p.add_argument("--doc-len", type=int, default=None,
                   help="pack documents of this many tokens into the sequence (default: one document)")
    args = p.parse_args(argv)
    if args.doc_len is not None and args.doc_len < 1:
        p.error(f"--doc-len must be >= 1, got {args.doc_len}")
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("needs CUDA (or --tiny)")
    if args.tiny:
        os.environ[bench.COMPILE_ENV] = "0"
    shape = bench.SHAPES["tiny" if args.tiny else "760m"]
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in bench.VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(bench.VARIANTS)}")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows_of = f"documents of {args.doc_len} tokens packed" if args.doc_len else "one document"
    print(f"{gpu}, {bench.COMPILE_ENV}={os.environ.get(bench.COMPILE_ENV)}, 2 blocks, N {shape['seqlen']}, "
          f"d {shape['hidden_size']}, {rows_of}; one profiled step, kernel ms (CPU: ATen op self time) by group")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = Path(args.trace_dir or tmp)
        trace_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            rows[name] = profile_variant(name, shape, device, trace_dir, args.doc_len)
    groups = sorted({g for _, (_, gs), _, _ in rows.values() for g in gs})
    print("| variant | ms/step | kernels in loop graphs (ms) | " + " | ".join(groups) + " | all kernels (ms) | "
          "GPU idle (ms) |")
    print("|---|---|---|" + "---|" * len(groups) + "---|---|")
    for name, (ms, (loop, gs), idle, _) in rows.items():
        cells = " | ".join(f"{gs.get(g, 0.0):.2f}" for g in groups)
        print(f"| {name} | {ms:.1f} | {loop:.2f} | {cells} | {loop + sum(gs.values()):.2f} | "
              f"{'-' if idle is None else f'{idle[0]:.2f}'} |")
    for name, (_, _, idle, launches) in rows.items():
        if idle:
            print(f"\n{name}: the longest GPU idle gaps (ms, kernel before -> kernel after; the longest host "
                  "ops between their launches, ms)")
            for ms, before, after, ops in idle[1]:
                print(f"  {ms:.3f}  {before}  ->  {after};  {ops}")
        if launches:
            print(f"{name}: CUDA graph replays (host ms in the launch call / GPU idle ms before it / kernels): "
                  + ", ".join(f"{h:.2f} / {i:.3f} / {n}" for h, i, n in launches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
