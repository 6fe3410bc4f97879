"""The Lookahead experiment's quick runs and its summary logic."""

import json

import pytest

from fastweights.experiments import lookahead


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_quick_run_writes_results(tmp_path, task):
    assert lookahead.main(["--task", task, "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"lookahead_{task}.json").read_text())
    results = record["results"]
    assert list(results) == list(lookahead.METHODS[task])
    for runs in results.values():
        assert len(runs) == 2  # --quick keeps two seeds
        for r in runs:
            assert r["val_loss"] > 0
            if task == "digits":
                assert 0.0 <= r["val_acc"] <= 1.0
    assert (tmp_path / f"lookahead_{task}.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_says_whether_differences_exceed_seed_spread():
    results = {
        "sgd": [{"acc": 0.90}, {"acc": 0.92}],  # mean 0.91, std 0.0141
        "a": [{"acc": 0.95}, {"acc": 0.97}],  # Δ +0.05 > 0.0283: exceeds
        "b": [{"acc": 0.91}, {"acc": 0.93}],  # Δ +0.01 < 0.0283: does not
    }
    rows = lookahead.summary_table(results, ["acc"]).splitlines()
    assert rows[3].endswith("| +0.0500 | yes |")
    assert rows[4].endswith("| +0.0100 | no |")
