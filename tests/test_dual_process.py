"""The dual-process synthetic task (SPEC §7) and the forgetting experiment's quick run."""

import json

import pytest
import torch

from fastweights.data.dual_process import COP, MASK, SPLITS, DualProcessTask
from fastweights.experiments import forgetting


@pytest.fixture(scope="module")
def task():
    return DualProcessTask()


def _structural_answer(seq: torch.Tensor) -> list[int]:
    """Solve one unmasked 7-token sequence from its structure alone: the adjective follows cop."""
    prefix, s1 = seq[:3].tolist(), int(seq[3])
    i = prefix.index(COP)
    adj = prefix[i + 1]
    noun = next(t for j, t in enumerate(prefix) if j not in (i, i + 1))
    return [adj, adj, adj] if s1 == adj else [adj, noun, noun]


def test_vocabulary_follows_the_spec(task):
    assert task.vocab == 10_000 and task.n_holdout == 1_000
    assert task.size == 3 + 10_000 + 1_000
    assert len(task.nouns_all) == len(task.adjs_all) == 5_000
    assert len(task.ambiguous_ids) == 1_000  # 10% of the content tokens
    assert len(task.holdout_ids) == 1_000 and int(task.holdout_ids.min()) == 10_003
    content = torch.arange(3, 10_003)
    assert sorted(task.rank[content].tolist()) == list(range(1, 10_001))
    assert (task.rank[task.tail_ids] > 9_000).all() and len(task.tail_ids) == 1_000
    assert not set(task.nouns_all.tolist()) & set(task.adjs_all.tolist())


def test_zipf_frequencies(task):
    g = torch.Generator().manual_seed(0)
    b = task.sample("train", 40_000, g)
    seq = b["input_ids"][:, :3]
    nouns = torch.where(seq[:, 0] == COP, seq[:, 2], seq[:, 0])
    counts = torch.bincount(nouns, minlength=task.size).double()
    pool = task.noun_pool
    probs = task.weight[pool] / task.weight[pool].sum()
    top = probs.argsort(descending=True)[:5]
    expected = probs[top] * 40_000
    observed = counts[pool[top]]
    assert ((observed - expected).abs() / expected).max() < 0.1
    # Frequency falls with rank as rank^-zipf: the pool's most frequent token vs one ~10x rarer in rank.
    ranks = task.rank[pool]
    r1 = ranks.min()
    far = pool[(ranks - 10 * r1).abs().argmin()]
    want = (task.rank[far] / r1).double() ** task.zipf
    got = counts[pool[ranks.argmin()]] / counts[far]
    assert abs(got / want - 1) < 0.15 and want > 5


@pytest.mark.parametrize("split", SPLITS)
def test_sequences_have_the_spec_form(task, split):
    g = torch.Generator().manual_seed(1)
    b = task.sample(split, 600, g)
    ids, labels, targets = b["input_ids"], b["labels"], b["targets"]
    assert ids.shape == labels.shape == (600, 7) and targets.shape == (600, 3)
    assert (ids[:, 4:] == MASK).all() and (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:], targets)
    full = torch.cat([ids[:, :4], targets], 1)
    forms = set()
    for seq in full:
        p = seq[:3].tolist()
        if p[0] == COP:
            adj, noun, pre = p[1], p[2], "cop-adj-noun"
        else:
            assert p[1] == COP
            noun, adj, pre = p[0], p[2], "noun-cop-adj"
        assert noun != adj
        suf = seq[3:].tolist()
        assert suf in ([adj] * 4, [noun, adj, noun, noun])
        forms.add((pre, suf[0] == adj))
        assert _structural_answer(seq) == seq[4:].tolist()
    assert len(forms) == 4
    noun_slot = torch.where(full[:, 0] == COP, full[:, 2], full[:, 0])
    adj_slot = torch.where(full[:, 0] == COP, full[:, 1], full[:, 2])
    pools = {
        "train": (task.noun_pool, task.adj_pool),
        "val": (task.noun_pool, task.adj_pool),
        "switch": (task.pure_adjs, task.pure_nouns),
        "tail": (task.tail_ids, task.tail_ids),
        "holdout": (task.holdout_ids, task.holdout_ids),
    }[split]
    assert torch.isin(noun_slot, pools[0]).all() and torch.isin(adj_slot, pools[1]).all()
    if split in ("train", "val"):
        assert not torch.isin(full, task.holdout_ids).any()
        amb = task.ambiguous_ids
        assert torch.isin(noun_slot, amb).any() and torch.isin(adj_slot, amb).any()
    if split == "switch":  # the memorised roles give a different, well-defined answer
        iwl = b["iwl_targets"]
        assert (iwl != targets).any(-1).all()
        pure_adjs, pure_nouns = set(task.pure_adjs.tolist()), set(task.pure_nouns.tolist())
        for seq, answer in zip(full, iwl, strict=True):
            mem_adj = next(t for t in seq[:3].tolist() if t in pure_adjs)
            mem_noun = next(t for t in seq[:3].tolist() if t in pure_nouns)
            want = [mem_adj] * 3 if int(seq[3]) == mem_adj else [mem_adj, mem_noun, mem_noun]
            assert answer.tolist() == want
    else:
        assert torch.equal(b["iwl_targets"], targets)


def test_sampling_is_reproducible_and_validates(task):
    a = task.sample("val", 50, torch.Generator().manual_seed(3))
    b = task.sample("val", 50, torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    with pytest.raises(ValueError, match="unknown split"):
        task.sample("test", 5, torch.Generator())
    with pytest.raises(ValueError, match="vocab"):
        DualProcessTask(vocab=11)


def test_quick_experiment_writes_curves_and_plot(tmp_path):
    assert forgetting.main(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "forgetting.json").read_text())
    results = record["results"]
    assert set(results) == {"vanilla", "active", "temporary"}
    assert [results[m]["resets"] for m in ("vanilla", "active", "temporary")] == [0, 4, 2]
    for curves in results.values():
        assert curves["step"] == [10, 20, 30, 40]
        for key in forgetting.METRICS:
            assert len(curves[key]) == 4 and all(0.0 <= v <= 1.0 for v in curves[key])
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_combine_merges_single_method_runs(tmp_path):
    curves = {"step": [10], "loss": [1.0], "resets": 0, **{k: [0.5] for k in forgetting.METRICS}}
    settings = {"vocab": 10_000, "zipf": 1.0, "layers": 1, "hidden": 32, "every": 10, "until": 20, "steps": 10}
    for method, seed in (("vanilla", 0), ("active", 0), ("temporary", 1)):
        d = tmp_path / method
        d.mkdir()
        rec = {"settings": {**settings, "seed": seed, "methods": [method]}, "hardware": "cpu", "seconds": 2.0}
        (d / "forgetting.json").write_text(json.dumps({**rec, "results": {method: curves}}))
    out = tmp_path / "all"
    assert forgetting.main(["--combine", str(tmp_path / "vanilla"), str(tmp_path / "active"), "--out", str(out)]) == 0
    record = json.loads((out / "forgetting.json").read_text())
    assert list(record["results"]) == ["vanilla", "active"] and record["seconds"] == 4.0
    with pytest.raises(ValueError, match="seed"):
        forgetting.main(["--combine", str(tmp_path / "vanilla"), str(tmp_path / "temporary"), "--out", str(out)])


def test_combine_averages_seeds(tmp_path):
    settings = {"vocab": 10_000, "zipf": 1.0, "layers": 1, "hidden": 32, "every": 10, "until": 20, "steps": 20}
    dirs = []
    for method in ("vanilla", "active"):
        for seed, value in ((0, 0.2), (1, 0.6)):
            curves = {"step": [10, 20], "loss": [2.0, 1.0 + seed], "resets": 0,
                      **{k: [value, value / 2] for k in forgetting.METRICS}}
            d = tmp_path / f"{method}{seed}"
            d.mkdir()
            rec = {"settings": {**settings, "seed": seed, "methods": [method]}, "hardware": "cpu", "seconds": 1.0}
            (d / "forgetting.json").write_text(json.dumps({**rec, "results": {method: curves}}))
            dirs.append(str(d))
    out = tmp_path / "all"
    assert forgetting.main(["--combine", *dirs, "--out", str(out)]) == 0
    record = json.loads((out / "forgetting.json").read_text())
    assert record["settings"]["seed"] == [0, 1] and record["seconds"] == 4.0
    van = record["results"]["vanilla"]
    assert van["seeds"] == [0, 1] and set(van["per_seed"]) == {"0", "1"}
    assert van["val"] == pytest.approx([0.4, 0.2]) and van["loss"] == pytest.approx([2.0, 1.5])
    # sample std of (0.2, 0.6) and of (0.1, 0.3)
    assert van["val_std"] == pytest.approx([0.2 * 2**0.5, 0.1 * 2**0.5])
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same seeds"):
        forgetting.main(["--combine", *dirs[:3], "--out", str(out)])


def test_every_panel_of_the_forgetting_plot_names_its_y_axis(tmp_path, monkeypatch):
    """The panels had titles and a step axis but no y label."""
    import matplotlib.figure

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.append(fig))
    curves = {"step": [0, 1], "loss": [2.0, 1.0], **{m: [0.1, 0.2] for m in forgetting.METRICS}}
    forgetting.plot({"vanilla": curves}, tmp_path / "x.png", "t")
    panels = [ax for ax in seen[0].axes if ax.axison]
    assert len(panels) == len(forgetting.METRICS) + 1
    assert all(ax.get_ylabel() and ax.get_xlabel() == "step" for ax in panels)


def test_an_until_that_never_resets_fails_before_any_run_trains(tmp_path, monkeypatch):
    """`--until 5` (< --every) failed only when the temporary run started, after the vanilla and
    active runs had trained, and nothing was written."""
    monkeypatch.setattr(forgetting, "train_run", lambda *a, **k: pytest.fail("trained before the check"))
    for until in ("5", "-5"):
        with pytest.raises(ValueError, match=rf"--until {until} < --every 10: temporary forgetting would never reset"):
            forgetting.main(["--quick", "--quiet", "--until", until, "--out", str(tmp_path)])
    assert forgetting.parse_args(["--quick", "--until", "5", "--methods", "vanilla", "active"]).until == 5
