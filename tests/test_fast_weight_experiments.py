"""The two reproduction experiments run end to end in --quick mode and write their reports."""

import json
import math
import re
import time

import pytest
import torch

from fastweights.cli import main
from fastweights.experiments import associative_retrieval as ar
from fastweights.experiments import plasticity as pl


def test_associative_retrieval_quick(tmp_path):
    assert main(["experiment", "associative-retrieval", "--quick", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "associative_retrieval.md").read_text()
    assert "| Fast weights | " in md and "| IRNN | 62.11 | 60.23 | 0.34 |" in md
    assert (tmp_path / "associative_retrieval.png").stat().st_size > 0
    results = json.loads((tmp_path / "associative_retrieval.json").read_text())["results"]
    assert {r["model"] for r in results} == {"irnn", "lstm", "alstm", "fw-control", "fw"}
    assert all(0 <= r["test_error"] <= 100 and 0 <= r["train_error"] <= 100 for r in results)
    assert "## Training error (%) at the same step" in md


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
    assert main(["experiment", "plasticity", "--time-budget-s", "0"]) == 2
    for bad in ("foo=1e-3", "irnn=abc", "irnn=-1", "irnn"):
        assert main(["experiment", "associative-retrieval", "--lr-for", bad]) == 2
    assert main(["experiment", "associative-retrieval", "--jobs", "0"]) == 2
    assert main(["experiment", "associative-retrieval", "--weight-decay", "-0.1"]) == 2
    for bad in ("-0.1", "1"):
        assert main(["experiment", "associative-retrieval", "--dropout", bad]) == 2


def test_associative_retrieval_checks_model_settings_before_any_run(tmp_path):
    """A bad fast-weights setting fails before the other models' runs, naming it."""
    with pytest.raises(SystemExit, match=r"fw with R=20: lam must be in \[0, 1\], got 1.5"):
        ar.main(["--quick", "--lam", "1.5", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # no run finished: each writes the report


def test_dropout_acts_only_in_training_and_zero_is_the_plain_model():
    """--dropout p: training-mode outputs are random, eval-mode outputs equal the same weights
    without dropout; p = 0 adds no module with an effect (outputs equal in both modes)."""
    tokens = torch.randint(0, 37, (16, 11))
    torch.manual_seed(0)
    plain = ar.RetrievalModel("irnn", 12)
    torch.manual_seed(0)
    drop = ar.RetrievalModel("irnn", 12, dropout=0.5)
    assert isinstance(plain.drop, torch.nn.Identity)
    drop.load_state_dict(plain.state_dict())  # dropout adds no parameters
    drop.eval(), plain.eval()
    assert torch.equal(drop(tokens), plain(tokens))
    drop.train(), plain.train()
    torch.manual_seed(1)
    a = drop(tokens)
    torch.manual_seed(2)
    assert not torch.equal(a, drop(tokens))
    assert torch.equal(plain(tokens), plain(tokens))
    with pytest.raises(ValueError, match="dropout must be in"):
        ar.RetrievalModel("irnn", 12, dropout=1.0)


def test_train_error_is_scored_on_the_training_set():
    """Training answers all replaced by digit 0: the model learns to answer 0, so its error on the
    training set is 0 % while the validation error (true answers) stays high."""
    args = _tiny_ar_args("--lr", "0.05")
    data = dict(ar._data(args))
    x, y = data["train"]
    data["train"] = (x, torch.zeros_like(y))
    run = ar.train_one("irnn", 20, 0, data, args)
    assert run["train_error"] == 0.0 and run["valid_error"] > 50


def test_weight_decay_decays_every_parameter_decoupled():
    """--weight-decay w: each step first scales every parameter by 1 - lr * w (AdamW), so with
    zero gradients the parameters shrink by exactly that factor; w = 0 keeps plain Adam."""
    model = ar.RetrievalModel("irnn", 7)
    assert type(ar.make_optimizer(model, 1e-3)) is torch.optim.Adam
    before = [p.detach().clone() for p in model.parameters()]
    opt = ar.make_optimizer(model, 0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)


def test_lr_schedule():
    # Linear warmup to the base rate, then a half cosine that ends at 0 on the last step.
    assert [ar.lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert ar.lr_factor(4, 10, 4, "cosine") == 1.0
    assert math.isclose(ar.lr_factor(7, 10, 4, "cosine"), math.cos(math.pi / 4) ** 2)
    assert ar.lr_factor(10, 10, 4, "cosine") == 0.0
    assert ar.lr_factor(9, 10, 0, "constant") == 1.0


def _tiny_ar_args(*extra):
    return ar.parse_args(["--train-size", "300", "--valid-size", "100", "--test-size", "100",
                          "--steps", "6", "--eval-every", "3", *extra])


def test_per_model_lr_and_time_budget_stop_runs():
    args = _tiny_ar_args("--lr-for", "irnn=2e-4")
    data = ar._data(args)
    full = ar.train_one("irnn", 20, 0, data, args)
    assert full["lr"] == 2e-4 and full["steps"] == 6 and not full["stopped_by_budget"]
    assert [s for s, _ in full["curve"]] == [3, 6]
    cut = ar.train_one("fw", 20, 0, data, args, deadline=time.time() - 1)
    assert cut["lr"] == 1e-3 and cut["steps"] == 1 and cut["stopped_by_budget"] and len(cut["curve"]) == 1
    pargs = pl.parse_args(["--quick"])
    test = pl.make_batch("copy", 8, 0, "test")
    run = pl.train_one("regression", "hebbian", 0, pl.make_batch("regression", 8, 0, "test"), pargs)
    assert run["steps"] == 2 and not run["stopped_by_budget"] and len(run["curve"]) == 2
    cut = pl.train_one("copy", "hebbian", 0, test, pargs, deadline=time.time() - 1)
    assert cut["steps"] == 0 and cut["stopped_by_budget"] and 0 <= cut["test"] <= 1


@pytest.mark.parametrize("experiment", ["associative-retrieval", "plasticity"])
def test_parallel_runs_equal_serial_runs(tmp_path, experiment):
    """Runs in worker processes give the same numbers as the same runs one after another."""
    if experiment == "associative-retrieval":
        common = ["--models", "fw", "irnn", "--hidden-sizes", "20", "--seeds", "0", "--train-size", "300",
                  "--valid-size", "100", "--test-size", "100", "--steps", "6", "--eval-every", "3"]
        key = ("model", "hidden", "seed")
    else:
        common = ["--quick", "--tasks", "regression", "--rules", "none", "gradient"]
        key = ("task", "rule", "seed")
    out = {}
    for jobs in ("1", "2"):
        assert main(["experiment", experiment, *common, "--jobs", jobs, "--time-budget-s", "600",
                     "--out-dir", str(tmp_path / jobs)]) == 0
        name = experiment.replace("-", "_") + ".json"
        results = json.loads((tmp_path / jobs / name).read_text())["results"]
        out[jobs] = {tuple(r[k] for k in key): r for r in results}
    assert len(out["1"]) == 2 and out["1"].keys() == out["2"].keys()
    for k, r in out["1"].items():
        r2 = out["2"][k]
        assert not r["stopped_by_budget"] and r["steps"] == r2["steps"]
        if experiment == "associative-retrieval":
            assert r["curve"] == r2["curve"] and r["test_error"] == r2["test_error"]
        else:
            assert r["curve"] == pytest.approx(r2["curve"], rel=1e-5)
            assert r["test"] == pytest.approx(r2["test"], rel=1e-5)


def test_quick_runs_never_write_the_committed_results():
    """--quick without an output flag writes under runs/quick, not docs/results; the experiment
    list offers only experiments."""
    from pathlib import Path

    from fastweights.cli import _experiments
    from fastweights.experiments import associative_retrieval, forgetting, lookahead, plasticity

    for mod, attr, full in ((associative_retrieval, "out_dir", "docs/results"), (plasticity, "out_dir", "docs/results"),
                            (lookahead, "out", "docs/results/lookahead"),
                            (forgetting, "out", "docs/results/forgetting")):
        assert getattr(mod.parse_args([]), attr) == Path(full)
        quick = getattr(mod.parse_args(["--quick"]), attr)
        assert quick.parts[:2] == ("runs", "quick"), mod.__name__
    assert _experiments() == ["associative-retrieval", "forgetting", "fwl-dynamic-eval", "lookahead", "plasticity"]


@pytest.mark.parametrize("module,argv,expect", [
    ("associative_retrieval", ["--quick", "--steps", "5", "--seeds", "3"],
     {"steps": 5, "seeds": [3], "train_size": 2000}),
    ("associative_retrieval", ["--quick", "--steps=7"], {"steps": 7, "seeds": [0]}),
    ("plasticity", ["--quick", "--d-model", "24"], {"d_model": 24, "steps": 2}),
    ("forgetting", ["--quick", "--steps", "60"], {"steps": 60, "hidden": 32}),
    ("lookahead", ["--quick", "--steps", "20", "--task", "digits"], {"steps": 20, "epochs": 1}),
])
def test_quick_keeps_the_flags_given_with_it(module, argv, expect):
    """--quick fills in the options not given; it used to overwrite explicit ones silently."""
    import importlib

    args = importlib.import_module(f"fastweights.experiments.{module}").parse_args(argv)
    assert {k: getattr(args, k) for k in expect} == expect


@pytest.mark.parametrize("experiment", ["associative-retrieval", "plasticity"])
def test_report_from_refuses_runs_with_different_settings(tmp_path, experiment):
    """--report-from merged runs of different settings and reported the first file's; now it
    refuses them as --combine does, and still merges runs that differ only in what selects
    them, how they ran, or a value the report gives per run."""
    if experiment == "plasticity":
        common = ["--quick", "--tasks", "copy"]
        runs = {"a": ["--rules", "none"], "b": ["--rules", "hebbian", "--eta0", "0.9", "--d-model", "32"],
                "c": ["--rules", "gradient", "--steps", "3", "--jobs", "2", "--time-budget-s", "600"]}
        diff = "d_model, eta0"
    else:
        common = ["--hidden-sizes", "20", "--seeds", "0", "--train-size", "200", "--valid-size", "50",
                  "--test-size", "50", "--steps", "2", "--eval-every", "2"]
        runs = {"a": ["--models", "irnn"], "b": ["--models", "fw", "--eta", "0.3", "--batch-size", "8"],
                "c": ["--models", "lstm", "--lr-for", "lstm=3e-3", "--threads", "2"]}
        diff = "batch_size, eta"
    name = experiment.replace("-", "_") + ".json"
    for d, flags in runs.items():
        assert main(["experiment", experiment, *common, *flags, "--out-dir", str(tmp_path / d)]) == 0
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'b' / name} was run with different settings "
                                                   f"({diff}); cannot combine")):
        (pl if experiment == "plasticity" else ar).main(
            ["--report-from", str(tmp_path / "a" / name), str(tmp_path / "b" / name), "--out-dir", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    assert main(["experiment", experiment, "--report-from", str(tmp_path / "a" / name), str(tmp_path / "c" / name),
                 "--out-dir", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / name).read_text())
    assert len(merged["results"]) == 2
    md = (tmp_path / "m" / name.replace(".json", ".md")).read_text()
    if experiment == "plasticity":  # the steps differ: given per run, and not as the first file's
        assert merged["args"]["steps"] is None and "copy [2, 3]" in md
    else:
        assert merged["args"]["threads"] is None and "--threads threads each as in the commands above" in md
        assert "LSTM [0.003]" in md and "IRNN [0.001]" in md
