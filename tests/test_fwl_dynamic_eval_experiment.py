"""The fwl-dynamic-eval experiment runs end to end at --quick scale and its numbers hang together."""

import json

import pytest
import torch
from pipeline_helpers import write_corpus

from fastweights.cli import main as cli_main


def test_quick_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=30)
    out, page = tmp_path / "out", tmp_path / "docs" / "results" / "fwl.md"
    threads = torch.get_num_threads()
    try:
        rc = cli_main(["experiment", "fwl-dynamic-eval", "--quick", "--no-progress", "--threads", "1",
                       "--corpus", str(corpus), "--val-fraction", "0.4", "--out", str(out), "--report", str(page)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "loss_by_position.png").stat().st_size > 0
    rows = {r["method"].split(" (")[0]: r for r in res["rows"]}
    assert set(rows) == {"static", "dynamic evaluation", "FWL", "In-Place TTT"}
    seg = res["setting"]["segment"]
    static, dyn = rows["static"], rows["dynamic evaluation"]
    # the first segment is scored before any update: the same losses as the one-pass reading
    assert torch.allclose(torch.tensor(dyn["loss_by_position"][:seg]), torch.tensor(static["loss_by_position"][:seg]),
                          atol=1e-4)
    assert dyn["loss_by_position"][seg:] != static["loss_by_position"][seg:]
    assert dyn["flop_ratio"] > 3 and rows["FWL"]["flop_ratio"] > 1 and static["flop_ratio"] == 1
    assert len({r["tokens"] for r in res["rows"]}) == 1  # every method scores the same tokens
    st = res["setting"]
    assert {t["tokens"] for t in res["training"].values()} == {st["steps"] * st["batch_size"] * st["seq_len"]}
    assert all(r["val_perplexity"] > 1 for k, r in rows.items() if k != "dynamic evaluation")
    # the results page: command, table and a plot link that resolves from the page's directory
    text = page.read_text()
    assert res["table"] in text and "fastweights experiment fwl-dynamic-eval --quick" in text
    assert f"raw numbers in `{page.with_suffix('.json').name}` next to the plot" in text  # it named results.json
    link = text.split("![loss by position](")[1].split(")")[0]
    assert (page.parent / link).read_bytes() == (out / "loss_by_position.png").read_bytes()
    assert json.loads(page.with_suffix(".json").read_text())["table"] == res["table"]
    assert "](loss_by_position.png)" in (out / "report.md").read_text()
    # a re-run resumes the runs in --out with the settings they started with (not as `train --resume`,
    # which may change the rate: the report would name a rate its first steps did not run at)
    capsys.readouterr()
    try:
        rc = cli_main(["experiment", "fwl-dynamic-eval", "--quick", "--no-progress", "--threads", "1",
                       "--corpus", str(corpus), "--val-fraction", "0.4", "--out", str(out), "--report", str(page),
                       "--lr", "0.001"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 2 and "fastweights experiment fwl-dynamic-eval (which resumes the runs in its --out) continues" in err
    assert "these differ: lr" in err


def test_bad_options_are_rejected(tmp_path, capsys):
    assert cli_main(["experiment", "fwl-dynamic-eval", "--quick", "--methods", "fwl", "--out", str(tmp_path)]) != 0
    assert "--methods: need static" in capsys.readouterr().err
    assert cli_main(["experiment", "fwl-dynamic-eval", "--size", "21m", "--out", str(tmp_path)]) != 0
    assert "--size must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a full run has no default output directory
        cli_main(["experiment", "fwl-dynamic-eval", "--size", "tiny"])
    assert "--out is required (only --quick has a default, runs/quick/fwl-dynamic-eval)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # rejected before any work


class _Store:
    """The part of a TokenStore that long_rows reads: documents of the given lengths."""

    def __init__(self, lengths):
        import numpy as np

        self.lengths = np.array(lengths)
        self.names = [f"d{i}" for i in range(len(lengths))]
        self._docs = [np.arange(1, n + 1) for n in lengths]

    def __len__(self):
        return len(self._docs)

    def doc(self, i):
        return self._docs[i]


def test_scored_documents_have_a_target_at_every_position():
    """A document of exactly --doc-length tokens ends on an ignored target, which the
    per-token means counted as a loss of 0 (and dynamic evaluation read as token -100)."""
    from dataclasses import replace

    from fastweights.experiments.fwl_dynamic_eval import QUICK, as_sequence, documents

    st = replace(QUICK, doc_length=8, tune_docs=1, test_docs=5)
    tune, test = documents(_Store([8, 13, 9, 8, 20, 3]), st)
    got = tune + test
    assert [int(f["input_ids"][0, 0]) for f in got] == [1, 1, 1]  # the 13, 9 and 20 token documents
    for f in got:
        assert f["input_ids"].shape == (1, 8) and bool((f["targets"] >= 0).all())
        seq = as_sequence(f)
        assert seq.tolist() == list(range(1, 10))  # 8 inputs and the last target


@pytest.mark.parametrize("flags,match", [
    (["--lr-grid", "1e-4", "-1"], "--lr-grid entry must be a finite number >= 0, got -1.0"),
    (["--lr-grid", "nan"], "--lr-grid entry must be a finite number >= 0, got nan"),
    (["--calib-docs", "-1"], "--calib-docs must be >= 0, got -1"),
    (["--tune-docs", "-2", "--methods", "static"], "--tune-docs must be >= 0, got -2"),
])
def test_dynamic_settings_are_checked_before_any_work(tmp_path, capsys, flags, match):
    """--lr-grid -1 failed only after the corpus was prepared and the static model trained, naming lr."""
    assert cli_main(["experiment", "fwl-dynamic-eval", "--quick", "--no-progress", "--out", str(tmp_path),
                     *flags]) != 0
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # rejected before any work
