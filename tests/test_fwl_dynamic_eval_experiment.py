"""The fwl-dynamic-eval experiment runs end to end at --quick scale and its numbers hang together."""

import json

import torch

from fastweights.cli import main as cli_main


def test_quick_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = cli_main(["experiment", "fwl-dynamic-eval", "--quick", "--no-progress", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "loss_by_position.png").stat().st_size > 0
    rows = {r["method"].split(" (")[0]: r for r in res["rows"]}
    assert set(rows) == {"static", "dynamic evaluation", "FWL", "FWL, residual variant", "In-Place TTT"}
    seg = res["scale"]["segment"]
    static, dyn = rows["static"], rows["dynamic evaluation"]
    # the first segment is scored before any update: the same losses as plain evaluation
    assert torch.allclose(torch.tensor(dyn["loss_by_position"][:seg]), torch.tensor(static["loss_by_position"][:seg]),
                          atol=1e-5)
    assert dyn["loss_by_position"][seg:] != static["loss_by_position"][seg:]
    assert dyn["flop_ratio"] > 3 and rows["FWL"]["flop_ratio"] > 1 and static["flop_ratio"] == 1
    assert len({r["tokens"] for r in res["rows"]}) == 1  # every method scores the same tokens
    assert all(t["tokens"] == res["train_tokens"] for t in res["training"].values())
