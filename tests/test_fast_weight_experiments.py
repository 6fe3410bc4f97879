"""The two reproduction experiments run end to end in --quick mode and write their reports."""

import json

from fastweights.cli import main


def test_associative_retrieval_quick(tmp_path):
    assert main(["experiment", "associative-retrieval", "--quick", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "associative_retrieval.md").read_text()
    assert "| Fast weights | " in md and "| IRNN | 62.11 | 60.23 | 0.34 |" in md
    assert (tmp_path / "associative_retrieval.png").stat().st_size > 0
    results = json.loads((tmp_path / "associative_retrieval.json").read_text())["results"]
    assert {r["model"] for r in results} == {"irnn", "lstm", "alstm", "fw-control", "fw"}
    assert all(0 <= r["test_error"] <= 100 for r in results)


def test_plasticity_quick(tmp_path):
    assert main(["experiment", "plasticity", "--quick", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "plasticity.md").read_text()
    assert "| copy (recall accuracy) |" in md and "| regression MSE | 1.589 | 1.546 | 1.997 |" in md
    assert (tmp_path / "plasticity.png").stat().st_size > 0
    results = json.loads((tmp_path / "plasticity.json").read_text())["results"]
    assert {(r["task"], r["rule"]) for r in results} == {
        (t, r) for t in ("copy", "regression", "digits") for r in ("none", "hebbian", "gradient")}


def test_experiment_rejects_bad_args():
    assert main(["experiment", "plasticity", "--steps", "0"]) == 2
