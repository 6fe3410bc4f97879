"""The benchmark scripts that have a CPU size run end to end at it (functional checks, not
measurements: performance is measured on a GPU, docs/benchmarks.md)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lact.py"


@pytest.mark.parametrize("packed", [[], ["--doc-len", "50"], ["--doc-len", "50", "--batch", "2"]],
                         ids=["one-document", "packed", "packed-batch-2"])
def test_lact_benchmark_tiny_runs(tmp_path, capsys, packed):
    spec = importlib.util.spec_from_file_location("bench_lact", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    variants = ["lact-muon", "lact-muon-graphs", "lact-gd", "swa"]
    rc = bench.main(["--tiny", "--variants", ",".join(variants), "--warmup", "1", "--iters", "1",
                     "--output", str(out), *packed])
    assert rc == 0
    assert ("documents of 50 tokens packed" in out.read_text()) == bool(packed)
    assert f"batch {2 if '--batch' in packed else 1}," in out.read_text()
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    for v in variants:
        assert v in rows and "nan" not in rows[v].split("|")[2], rows.get(v)
        assert rows[v].split("|")[6].strip() == "-", rows[v]  # no peak memory measured on the CPU
    assert "failed" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,expect", [
    (["benchmarks/generation.py", "--tiny"], "decode"),
    (["benchmarks/prepare_memory.py", "--big", "1", "--big-mb", "0.05"], "peak memory"),
    (["benchmarks/lact_loop_profile.py", "--tiny", "--iters", "1", "--top", "3"], "Newton-Schulz in the loop"),
    (["benchmarks/lact_step_profile.py", "--tiny", "--variants", "swa,lact-muon"], "| lact-muon | "),
    (["benchmarks/lact_step_profile.py", "--tiny", "--variants", "lact-gd", "--doc-len", "20"], "| lact-gd | "),
    (["benchmarks/flex_mask.py", "--tiny", "--iters", "1", "--warmup", "0"], "| packed, keys = queries |"),
    (["benchmarks/fwl_inference_cost.py", "--size", "tiny", "--device", "cpu", "--length", "128", "--docs", "1",
      "--repeats", "1"], "In-Place TTT"),
    (["benchmarks/associative_retrieval_step.py", "--hidden-sizes", "20", "--steps", "2", "--repeats", "1",
      "--warmup", "1"], "sum over cells"),
    (["benchmarks/lact_muon_precision.py", "--chunks", "3"], "| 3 | 9 |"),
])
def test_benchmark_script_cpu_size_runs(argv, expect):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expect in res.stdout


def test_lact_glue_benchmark_checks_triton_against_torch_on_cpu():
    """The glue benchmark (Triton interpreter) checks each configuration against the torch glue."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "benchmarks/lact_glue.py", "--tiny", "--iters", "1", "--warmup", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith(("| fast_inputs", "| merge | "))]
    tri = [r for r in rows if r[2].strip().isdigit()]
    # --tiny: 1 forward and 1 backward inputs configuration, 2 merge configurations, each group with its torch row
    assert len(rows) == 7 and len(tri) == 4, res.stdout
    assert all(float(r[5]) < 1e-5 for r in tri), res.stdout  # | glue | tokens | tile | warps | rel. err. |


def test_grad_product_study_kernel_agrees_with_float64_on_cpu():
    """The fused gradient product of the study script (Triton interpreter), forward and its
    backward kernels, matches the float64 product of the chunk step's stacked operands and every
    gradient."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "benchmarks/lact_grad_product.py", "--tiny", "--iters", "1", "--warmup", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| triton (fused")]
    assert len(rows) == 2, res.stdout  # the forward, then forward + backward (every gradient)
    assert all(float(r[3]) < 1e-5 for r in rows), res.stdout  # | path | tile | rel. err. |


def test_newton_schulz_kernels_agree_with_float64_chain_on_cpu():
    """The study's fused Triton chain (Triton interpreter) is checked against the float64 chain
    inside the script; a row that fails or is off prints so instead of its errors."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "benchmarks/lact_newton_schulz.py", "--tiny", "--in-loop"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| triton fused")]
    assert rows, res.stdout
    for row in rows:
        err_y, err_dx = (float(c) for c in row.split("|")[2:4])  # raises if the row says failed / off
        assert err_y < 1e-5 and err_dx < 1e-5, row
    loop = [line for line in res.stdout.splitlines() if line.startswith("fused vs torch loop, torch.float32")]
    assert loop, res.stdout
    diffs = [float(x) for x in loop[0].split(":")[-1].split()]
    assert len(diffs) == 9 and max(diffs) < 1e-3, loop[0]  # output + 8 gradients, float32


def test_step_profile_gaps_from_a_trace(monkeypatch):
    """lact_step_profile's idle-gap finder on a hand-made trace: overlapping kernels count once,
    each gap names the kernels around it and the host ops between their launches."""
    monkeypatch.setenv("FASTWEIGHTS_LACT_COMPILE", "0")  # the script sets a default on import
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks" / "lact_step_profile.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)

    def kernel(name, ts, dur, corr):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [kernel("a", 0, 10, 1), kernel("b", 30, 5, 2), kernel("c", 32, 18, 3), kernel("d", 75, 10, 4),
              {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 1, "args": {"correlation": 1}},
              {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 25, "dur": 1, "args": {"correlation": 2}},
              {"cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 26, "dur": 1, "args": {"correlation": 3}},
              {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 65, "dur": 1, "args": {"correlation": 4}},
              {"cat": "cpu_op", "name": "aten::slow", "ts": 3, "dur": 20, "args": {}},
              {"cat": "cpu_op", "name": "aten::quick", "ts": 24, "dur": 1, "args": {}},
              {"cat": "cpu_op", "name": "aten::later", "ts": 30, "dur": 30, "args": {}}]
    idle, found = prof.gaps({"traceEvents": events})
    assert idle == pytest.approx(0.045)  # 10..30 and 50..75 µs
    assert [f[:3] for f in found] == [(pytest.approx(0.025), "c", "d"), (pytest.approx(0.020), "a", "b")]
    assert found[0][3] == "aten::later 0.03"  # c was launched by the driver API: its launch time is known
    assert found[1][3].startswith("aten::slow 0.02, aten::quick")
    # CUDA graph replays: their launch call's host time, and the GPU's wait before their first kernel
    events += [kernel("g1", 100, 5, 9), kernel("g2", 106, 5, 9), kernel("e", 112, 20, 10), kernel("g3", 132, 4, 11),
               {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 70, "dur": 29, "args": {"correlation": 9}},
               {"cat": "cuda_driver", "name": "cuGraphLaunch", "ts": 110, "dur": 3, "args": {"correlation": 11}},
               {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 140, "dur": 2, "args": {"correlation": 12}}]
    launches = prof.graph_launches({"traceEvents": events})
    assert launches == [(pytest.approx(0.029), pytest.approx(0.015), 2), (pytest.approx(0.003), 0.0, 1)]
