"""The Lookahead experiment's quick runs and its summary logic."""

import json

import pytest
from pipeline_helpers import prepare_args, write_corpus

from fastweights.commands.prepare import PrepareConfig, prepare
from fastweights.config import parse
from fastweights.experiments import lookahead


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("la_data")
    prepare(parse(PrepareConfig, prepare_args(write_corpus(root / "corpus"), root / "data"), "t", ""))
    return str(root / "data")


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_quick_run_writes_results(tmp_path, task, dataset):
    extra = ["--data", dataset] if task == "lm" else []
    assert lookahead.main(["--task", task, "--quick", "--quiet", "--out", str(tmp_path), *extra]) == 0
    record = json.loads((tmp_path / f"lookahead_{task}.json").read_text())
    results = record["results"]
    assert list(results) == list(lookahead.METHODS[task])
    for runs in results.values():
        assert len(runs) == 2  # --quick keeps two seeds
        for r in runs:
            assert r["val_loss"] > 0
            if task == "digits":
                assert 0.0 <= r["val_acc"] <= 1.0
            else:  # the project trainer ran: its run directory holds the exported model and metrics
                assert r["tokens"] == 12 * 4 * 64 and r["val_tokens"] > 0 and r["curve"]["step"][-1] == 12
    if task == "lm":
        assert len(list((tmp_path / "runs").glob("*/model/config.json"))) == 6
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


def test_lm_needs_data(capsys):
    with pytest.raises(SystemExit):
        lookahead.main(["--task", "lm", "--quick"])
    assert "--data" in capsys.readouterr().err


def test_combine_merges_method_and_seed_subsets(tmp_path):
    settings = {"task": "digits", "k": 5, "alpha": 0.5, "beta": 0.2, "lr": 0.05}
    dirs = []
    for method in ("sgd", "lookahead_sgd"):
        for seed in (0, 1):
            d = tmp_path / f"{method}{seed}"
            d.mkdir()
            run = {"val_acc": 0.9 + seed / 100, "val_loss": 0.1, "curve": {"epoch": [1], "val_acc": [0.9]}}
            rec = {"settings": {**settings, "methods": [method], "seeds": [seed]}, "hardware": "cpu",
                   "seconds": 1.0, "results": {method: [run]}}
            (d / "lookahead_digits.json").write_text(json.dumps(rec))
            dirs.append(str(d))
    out = tmp_path / "all"
    assert lookahead.main(["--combine", *dirs[::-1], "--out", str(out)]) == 0
    record = json.loads((out / "lookahead_digits.json").read_text())
    assert record["settings"]["seeds"] == [0, 1] and list(record["results"]) == ["sgd", "lookahead_sgd"]
    assert [r["val_acc"] for r in record["results"]["sgd"]] == [0.9, 0.91] and record["seconds"] == 4.0
    with pytest.raises(ValueError, match="same seeds"):
        lookahead.main(["--combine", *dirs[:3], "--out", str(out)])


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--epochs", "0"),
                                        ("--steps", "0"), ("--seq-len", "0"), ("--val-tokens", "-5"),
                                        ("--threads", "0"), ("--k", "0")])
def test_bad_sizes_are_refused_naming_the_flag(flag, value):
    """--batch-size 0 used to become 32 silently and -1 failed later as total_steps -1347."""
    with pytest.raises(ValueError, match=f"^{flag} must be >= 1, got {value}$"):
        lookahead.parse_args([flag, value])
    assert lookahead.parse_args([]).batch_size == 32
