"""The LaCT benchmark script runs end to end on CPU at its tiny size (``--tiny``): its
correctness gate passes and every requested variant gets a timed row (no GPU numbers here)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lact.py"


def test_lact_benchmark_tiny_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_lact", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    variants = ["lact-muon", "lact-muon-graphs", "lact-gd", "swa"]
    rc = bench.main(["--tiny", "--variants", ",".join(variants), "--warmup", "1", "--iters", "1",
                     "--output", str(out)])
    assert rc == 0
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    for v in variants:
        assert v in rows and "nan" not in rows[v].split("|")[2], rows.get(v)
    assert "failed" not in capsys.readouterr().err
