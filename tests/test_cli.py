"""The CLI: every subcommand end to end on tiny settings, --help, one-line errors."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import prepare_args, train_args, write_corpus

from fastweights import cli
from fastweights.errors import FastWeightsError

SUBCOMMANDS = ["prepare", "train", "eval", "convert", "generate", "plot", "main"]


def run(argv, capsys):
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTWEIGHTS_CACHE", str(root / "cache"))
    yield root
    mp.undo()


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastweights {name}") and "--config" in out
    flat = " ".join(out.split())
    assert "(default: )" not in flat and not re.search(r"\(default[^)]*\) \(default", flat), flat
    assert "(default: " in flat  # defaults are still shown


def test_pipeline_end_to_end(workdir, capsys):
    corpus, data = write_corpus(workdir / "corpus"), workdir / "data"
    code, out, err = run(["prepare", *prepare_args(corpus, data)], capsys)
    assert code == 0, err
    assert json.loads((data / "manifest.json").read_text())["documents"] == 24
    evals = []
    for name, ttt in (("base", "--no-ttt"), ("ttt", "--ttt")):
        code, out, err = run(["train", *train_args(data, workdir / name, steps=2), ttt, "--ttt-chunk", "16"], capsys)
        assert code == 0, err
        assert json.loads(out)["steps"] == 2
        ev = workdir / name / "eval.json"
        code, out, err = run(["eval", "--model", str(workdir / name / "model"), "--data", str(data), "--out", str(ev),
                              "--seq-len", "32", "--ppl-rows", "2", "--length", "64", "--first-bucket", "16",
                              "--max-docs", "2", "--passkey-lengths", "128", "160", "--passkey-depths", "0", "1",
                              "--passkey-trials", "1"], capsys)
        assert code == 0, err
        res = json.loads(ev.read_text())
        assert [(b["start"], b["end"]) for b in res["loss_by_position"]["buckets"]] == [(0, 16), (16, 32), (32, 64)]
        assert len(res["passkey"]["accuracy"]) == 2 and (workdir / name / "eval-passkey.png").stat().st_size > 1000
        evals.append(str(ev))
    # dynamic evaluation mode, next to static evaluation over the same windows
    ev = workdir / "ttt" / "eval-dynamic.json"
    code, out, err = run(["eval", "--model", str(workdir / "ttt" / "model"), "--data", str(data), "--out", str(ev),
                          "--seq-len", "32", "--ppl-rows", "2", "--length", "64", "--first-bucket", "16",
                          "--max-docs", "2", "--dynamic", "--dynamic-segment", "16", "--dynamic-docs", "2",
                          "--dynamic-calibration-docs", "2", "--dynamic-lr", "1e-3"], capsys)
    assert code == 0, err
    dyn = json.loads(ev.read_text())["dynamic_eval"]
    assert dyn["static"]["tokens"] == dyn["dynamic"]["tokens"] == 2 * 63
    assert dyn["dynamic"]["perplexity"] != dyn["static"]["perplexity"]
    assert dyn["flop_overhead"] > 1  # the wall-time ratio is reported, not asserted (machine load)
    assert dyn["time_overhead"] == dyn["dynamic"]["seconds"] / dyn["static"]["seconds"]
    assert "dynamic evaluation (rms)" in out
    # continual training from a local Hugging Face directory: converted with target "hidden"
    cont = workdir / "continued"
    code, out, err = run(["train", *train_args(data, cont, steps=1, model=workdir / "base" / "model"),
                          "--ttt-chunk", "16"], capsys)
    assert code == 0, err
    cfg = json.loads((cont / "model" / "config.json").read_text())
    assert cfg["ttt_layers"] == [0] and cfg["ttt_target"] in ("hidden", "hidden_states")
    png = workdir / "both.png"
    code, out, err = run(["plot", "--inputs", *evals, "--labels", "base", "ttt", "--out", str(png)], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conv = workdir / "converted"
    code, out, err = run(["convert", "--model", str(workdir / "base" / "model"), "--out", str(conv),
                          "--layers", "1", "3", "--chunk-size", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert "Loading weights" not in err and "Writing model" not in err  # transformers' bars off too
    cfg = json.loads((conv / "config.json").read_text())
    assert cfg["ttt_layers"] == [1, 3] and cfg["ttt_chunk"] == 8 and (conv / "tokenizer.json").exists()
    from fastweights.data.tokenizer import load_tokenizer
    from fastweights.models.presets import load_model

    for model in (workdir / "base" / "model", conv):
        capsys.readouterr()  # this loop's own loading below
        code, out, err = run(["generate", "--model", str(model), "--prompt", "def train", "--max-new-tokens", "5",
                              "--no-progress"], capsys)
        assert code == 0, err
        assert "Loading weights" not in err, err
        # greedy by full forward passes (no cache), up to 5 tokens or end of text
        m, tok = load_model(str(model)).eval(), load_tokenizer(str(model))
        ids = tok("def train", return_tensors="pt", add_special_tokens=False).input_ids
        n0 = ids.shape[1]
        with torch.no_grad():
            for _ in range(5):
                nxt = m(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                if int(nxt) == tok.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert ids.shape[1] > n0 and out == "def train" + tok.decode(ids[0, n0:], skip_special_tokens=True) + "\n"


@pytest.fixture(scope="module")
def small_data(workdir):
    corpus, data = write_corpus(workdir / "small-corpus", docs=8), workdir / "small-data"
    assert cli.main(["prepare", *prepare_args(corpus, data)]) == 0
    return data


def test_hybrid_model_through_the_cli(workdir, small_data, capsys):
    """A saved hybrid model (LaCT + SWA) trains (not converted: its config picks its MLPs),
    evaluates and generates through the CLI, which must load it in a process where nothing
    imported the hybrid family (checked in tests/test_hybrid_model.py)."""
    from transformers.utils import logging as hf_logging

    from fastweights.models.hybrid import HybridConfig, HybridForCausalLM

    data = small_data
    vocab = json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    for mlps in (["swiglu", "swiglu"], ["inplace_ttt", "swiglu"]):
        cfg = HybridConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, mixers=["lact", "swa"], mlps=mlps,
                           lact_heads=2, lact_chunk_size=16, sliding_window=16, lact_init_rank=4, ttt_chunk=8)
        torch.manual_seed(0)
        HybridForCausalLM(cfg).save_pretrained(workdir / "hybrid")
        capsys.readouterr()  # the save's own progress bar
        run_dir = workdir / f"hybrid-run-{mlps[0]}"
        code, out, err = run(["train", *train_args(data, run_dir, steps=2, model=workdir / "hybrid")], capsys)
        assert code == 0, err
        assert "Loading weights" not in err and "Writing model" not in err  # --no-progress: transformers' too
        assert hf_logging.is_progress_bar_enabled()  # and back on afterwards
        saved = json.loads((run_dir / "model" / "config.json").read_text())
        assert saved["model_type"] == "fastweights_hybrid" and saved["architectures"] == ["HybridForCausalLM"]
        assert saved["mlps"] == mlps and "ttt_layers" not in saved
        code, out, err = run(["eval", "--model", str(run_dir / "model"), "--data", str(data), "--out",
                              str(run_dir / "eval.json"), "--seq-len", "32", "--ppl-rows", "2", "--length", "64",
                              "--first-bucket", "16", "--max-docs", "2", "--passkey-lengths", "128",
                              "--passkey-depths", "0", "--passkey-trials", "1"], capsys)
        assert code == 0, err
        res = json.loads((run_dir / "eval.json").read_text())
        assert res["perplexity"]["tokens"] > 0
        assert res["model_type"] == "fastweights_hybrid" and res["parameters"] > 0  # what was scored, for comparisons
        code, out, err = run(["generate", "--model", str(run_dir / "model"), "--prompt", "def train",
                              "--max-new-tokens", "5"], capsys)
        assert code == 0, err
        assert out.startswith("def train")


def _hybrid_config(vocab, **kw):
    from fastweights.models.hybrid import HybridConfig

    return HybridConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mixers=["lact", "swa"], lact_heads=2,
                        lact_chunk_size=16, sliding_window=16, lact_init_rank=4, **kw)


def test_a_config_alone_trains_from_scratch_with_its_seed(workdir, small_data, capsys):
    """Found by a review: a directory holding only config.json (the natural input for a
    from-scratch comparison) gave transformers' raw OSError; and the exported model had no
    eos_token_id, so model.generate() ran past the end of text."""
    data = small_data
    vocab = json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    _hybrid_config(vocab, lact_update="gd").save_pretrained(workdir / "cfg-only")
    losses = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, out, err = run(["train", *train_args(data, workdir / f"scratch-{name}", steps=2,
                                                   model=workdir / "cfg-only", seed=seed)], capsys)
        assert code == 0, err
        assert "holds no weights: a model initialised from its config.json" in err
        losses.append(json.loads((workdir / f"scratch-{name}" / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] == losses[1] != losses[2]  # the seed makes the init
    saved = json.loads((workdir / "scratch-a" / "model" / "config.json").read_text())
    from fastweights.data.tokenizer import load_tokenizer

    assert saved["eos_token_id"] == load_tokenizer(data / "tokenizer").eos_token_id is not None
    code, out, err = run(["eval", "--model", str(workdir / "cfg-only"), "--data", str(data)], capsys)
    assert code == 2 and "holds a config.json but no weights (model.safetensors)" in err


@pytest.mark.parametrize("optimizer", ["adamw", "lookahead_adamw"])
def test_a_lact_run_from_before_the_weight_decay_change_resumes_exactly(workdir, small_data, capsys, monkeypatch,
                                                                       optimizer):
    """Runs written when LaCT's q/k scale and shift took weight decay could not resume: their
    optimizer state holds two groups of other sizes ("loaded state dict contains a parameter group
    that doesn't match"). They resume with the split they were written with."""
    from fastweights.models.hybrid import HybridForCausalLM
    from fastweights.train import trainer

    vocab = json.loads((small_data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    HybridForCausalLM(_hybrid_config(vocab, lact_update="momentum")).save_pretrained(workdir / "wd-lact")
    capsys.readouterr()
    new_rule = trainer._decays
    monkeypatch.setattr(trainer, "_decays", lambda model, params: [p.dim() >= 2 for p in params])
    args = lambda out, steps: ["train", *train_args(small_data, out, steps=steps, model=workdir / "wd-lact"),  # noqa: E731
                               "--keep", "0", "--weight-decay", "5", "--optimizer", optimizer]
    for d in ("wd-straight", "wd-resumed"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    assert run(args(workdir / "wd-straight", 4), capsys)[0] == 0
    assert run(args(workdir / "wd-resumed", 2), capsys)[0] == 0
    monkeypatch.setattr(trainer, "_decays", new_rule)
    code, out, err = run([*args(workdir / "wd-resumed", 4), "--resume"], capsys)
    assert code == 0, err
    assert "was written when LaCT's q/k scale and shift took weight decay" in err
    straight = (workdir / "wd-straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (workdir / "wd-resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in straight] == [json.loads(x)["loss"] for x in resumed]


def test_a_model_that_is_not_causal_is_refused_for_losses_and_decodes_without_a_cache(workdir, small_data, capsys):
    """Found by a review: LaCT with lact_order='update_apply' reads each chunk with its own
    update (token 10 moved the logits of tokens 0..9 by 0.12), yet train and eval scored it as a
    causal LM (its passkey prompt holds the answer); generate asked it for a cache it cannot keep."""
    from fastweights.models.hybrid import HybridForCausalLM

    data = small_data
    vocab = json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    HybridForCausalLM(_hybrid_config(vocab, lact_order="update_apply")).save_pretrained(workdir / "ua")
    capsys.readouterr()
    for argv in (["train", *train_args(data, workdir / "ua-run", steps=2, model=workdir / "ua")],
                 ["eval", "--model", str(workdir / "ua"), "--data", str(data)]):
        code, out, err = run(argv, capsys)
        assert code == 2 and "is not a causal LM: its LaCT layers [0] read each chunk with their own update" in err
    from fastweights.data.tokenizer import load_tokenizer

    load_tokenizer(data / "tokenizer").save_pretrained(workdir / "ua")
    code, out, err = run(["generate", "--model", str(workdir / "ua"), "--prompt", "def", "--max-new-tokens", "3"],
                         capsys)
    assert code == 0, err


@pytest.mark.parametrize("flag,value,match", [
    ("--dynamic-rule", "adam", r"--dynamic-rule must be one of \('sgd', 'rms'\), got 'adam'"),
    ("--dynamic-params", "last:7", r"--dynamic-params 'last:7': the model has 4 decoder layers; K must be in 1..4"),
    ("--dynamic-lr", "-1", r"--dynamic-lr must be a finite number >= 0, got -1.0"),
    ("--dynamic-segment", "0", r"--dynamic-segment must be"),
    # every document one segment: no update scored, and dynamic printed equal to static without a word
    ("--dynamic-segment", "63", r"--dynamic-segment 63 >= --length 64 - 1: every document is one segment, so no "
                                r"update is ever scored"),
])
def test_dynamic_eval_settings_fail_before_any_evaluation(workdir, small_data, capsys, flag, value, match):
    from fastweights.models.presets import build_model

    model_dir = workdir / "small-model"
    if not (model_dir / "config.json").exists():
        build_model("tiny", 300).save_pretrained(model_dir)
    capsys.readouterr()
    code, out, err = run(["eval", "--model", str(model_dir), "--data", str(small_data), "--dynamic", flag, value,
                          "--seq-len", "32", "--ppl-rows", "2", "--length", "64"], capsys)
    assert code == 2 and re.search(match, err.strip().splitlines()[-1]), err
    assert "perplexity" not in err and "loss by position" not in err  # nothing was evaluated first


@pytest.mark.parametrize("flags,match", [
    (["--length", "64", "--passkey-lengths", "20"],
     r"--passkey-lengths: length 20 is too short for a passkey prompt \(needs > \d+\)"),
    (["--length", "100000"], r"no validation document has 100000 tokens \(the longest has \d+\)"),
])
def test_eval_lengths_fail_before_any_evaluation(workdir, small_data, capsys, flags, match):
    """Both used to fail only after perplexity (and loss by position) had run, writing nothing."""
    from fastweights.models.presets import build_model

    model_dir = workdir / "small-model"
    if not (model_dir / "config.json").exists():
        build_model("tiny", 300).save_pretrained(model_dir)
    capsys.readouterr()
    code, out, err = run(["eval", "--model", str(model_dir), "--data", str(small_data), "--seq-len", "32",
                          "--ppl-rows", "2", *flags], capsys)
    assert code == 2 and re.search(match, err.strip().splitlines()[-1]), err
    assert "perplexity" not in err and "loss by position" not in err  # nothing was evaluated first


def test_lookahead_settings_are_named_by_flag_before_the_model_loads(workdir, small_data, capsys, monkeypatch):
    """--lookahead-alpha 2 said 'alpha must be in (0, 1]', after the model had loaded."""
    from fastweights.train import trainer

    monkeypatch.setattr(trainer, "make_model", lambda *a, **k: pytest.fail("the model loaded first"))
    for flags, match in ((["--lookahead-alpha", "2"], "--lookahead-alpha must be in (0, 1], got 2.0"),
                         (["--lookahead-k", "0"], "lookahead_k must be >= 1, got 0"),
                         (["--optimizer", "slrla_adamw", "--slrla-beta", "-1"],
                          "--slrla-beta must be a finite number")):
        argv = ["train", *train_args(small_data, workdir / "la", steps=1), "--optimizer", "lookahead_adamw", *flags]
        line = _one_line_error(*run(argv, capsys)[::2])
        assert match in line, line


def test_main_job_tiny(workdir, capsys):
    out_dir = workdir / "main"
    code, out, err = run(["main", "--out", str(out_dir), "--steps", "2", "--max-mb", "1", "--max-doc-kb", "24",
                          "--vocab-size", "300", "--seq-len", "64", "--batch-size", "2", "--eval-length", "128",
                          "--first-bucket", "32", "--max-docs", "2", "--ppl-rows", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "%|" not in err, err  # --no-progress: no bar at all (reading, BPE, tokenising, training, evaluation)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline", "inplace-ttt"}
    assert summary["runs"]["inplace-ttt"]["train"]["parameters"] > summary["runs"]["baseline"]["train"]["parameters"]
    assert (out_dir / "loss_by_position.png").stat().st_size > 1000
    assert "baseline" in out and "inplace-ttt" in out and "32-64" in out
    # the same --out with another setting: main resumes its runs, and says so (it has no --resume)
    line = _one_line_error(*run(["main", "--out", str(out_dir), "--steps", "2", "--max-mb", "1", "--max-doc-kb", "24",
                                 "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--no-progress"],
                                capsys)[::2])
    assert "fastweights main (which resumes the runs in its --out) continues" in line and "seq_len 64 (now 32)" in line


def _one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_missing_paths(workdir, capsys):
    line = _one_line_error(*run(["train", "--data", str(workdir / "nope")], capsys)[::2])
    assert "dataset directory not found" in line and "nope" in line
    line = _one_line_error(*run(["prepare", "--corpus", str(workdir / "nodir")], capsys)[::2])
    assert "not found" in line and "nodir" in line
    line = _one_line_error(*run(["eval", "--model", str(workdir / "nomodel"), "--data", str(workdir / "data")],
                                capsys)[::2])
    assert "not found" in line
    line = _one_line_error(*run(["train", "--config", str(workdir / "none.yaml")], capsys)[::2])
    assert "config file not found" in line
    (workdir / "a-run" / "model").mkdir(parents=True, exist_ok=True)  # a run directory given as the model
    (workdir / "a-run" / "model" / "config.json").write_text("{}")
    line = _one_line_error(*run(["generate", "--model", str(workdir / "a-run"), "--prompt", "x"], capsys)[::2])
    assert f"no config.json in model directory {workdir / 'a-run'} (a training run? its model is " in line
    for flag, value, match in (("--temperature", "-1", "temperature must be >= 0 (0: greedy), got -1.0"),
                               ("--top-k", "-1", "top_k must be >= 0, got -1"),
                               ("--max-new-tokens", "0", "max_new_tokens must be >= 1, got 0")):
        line = _one_line_error(*run(["generate", "--model", str(workdir / "nomodel"), flag, value], capsys)[::2])
        assert match in line, line


@pytest.mark.parametrize("flag,value,match", [
    ("--lr", "-1", "lr must be > 0, got -1.0"),
    ("--lr", "nan", "lr must be > 0, got nan"),
    ("--min-lr-ratio", "1.5", r"min_lr_ratio must be in \[0, 1\], got 1.5"),
    ("--warmup", "-2", "warmup must be >= 0, got -2"),
    ("--weight-decay", "-0.1", "weight_decay must be >= 0, got -0.1"),
    ("--clip", "-1", r"clip must be >= 0 \(0: off\), got -1.0"),
    ("--keep", "-1", r"keep must be >= 0 \(0: all\), got -1"),
    ("--seed", "-1", "seed must be >= 0, got -1"),
    ("--threads", "-1", "threads must be >= 0, got -1"),
])
def test_bad_training_numbers_name_their_setting(workdir, capsys, flag, value, match):
    line = _one_line_error(*run(["train", "--data", str(workdir), flag, value], capsys)[::2])
    assert re.search(match, line), line


@pytest.mark.parametrize("flag,value,match", [
    ("--first-bucket", "0", "first_bucket must be >= 1, got 0"),
    ("--length", "1", "length must be >= 2, got 1"),
    ("--seq-len", "1", "seq_len must be >= 2, got 1"),
    ("--ppl-rows", "-1", "ppl_rows must be >= 0, got -1"),
    ("--passkey-trials", "0", "passkey_trials must be >= 1, got 0"),
    ("--seed", "-1", "seed must be >= 0, got -1"),
    ("--threads", "-1", "threads must be >= 0, got -1"),
    ("--passkey-lengths", "0", "passkey lengths must be integers >= 1, got 0"),
    ("--passkey-lengths", "128 --passkey-depths 1.5", "passkey depths must be in [0, 1], got 1.5"),
])
def test_bad_eval_numbers_name_their_setting(workdir, capsys, flag, value, match):
    argv = ["eval", "--model", str(workdir), "--data", str(workdir), flag, *value.split()]
    line = _one_line_error(*run(argv, capsys)[::2])
    assert line.endswith(match), line


@pytest.mark.parametrize("args,match", [
    (["--forgetting", "temporary", "--forgetting-every", "5", "--forgetting-until", "3"],
     "--forgetting-until 3 < --forgetting-every 5: temporary forgetting would never reset"),
    (["--forgetting", "active", "--forgetting-until", "5"], "--forgetting-until 5 applies to temporary forgetting"),
    (["--forgetting", "active", "--trainable", "fast"], "which --trainable fast freezes: use --trainable all"),
])
def test_forgetting_settings_that_cannot_work_are_refused(workdir, capsys, args, match):
    line = _one_line_error(*run(["train", "--data", str(workdir), *args], capsys)[::2])
    assert match in line, line


def test_bad_config_key_names_close_matches(workdir, capsys):
    cfg = workdir / "bad.yaml"
    cfg.write_text("stpes: 3\nseq_len: 64\n")
    line = _one_line_error(*run(["train", "--config", str(cfg)], capsys)[::2])
    assert "unknown config key 'stpes'" in line and "'steps'" in line
    cfg = workdir / "bad.json"
    cfg.write_text(json.dumps({"batch_size": "many"}))
    line = _one_line_error(*run(["train", "--config", str(cfg)], capsys)[::2])
    assert "'batch_size' must be int" in line


@pytest.mark.parametrize("cmd,key,value,what", [
    ("train", "steps", 2.9, "int"),
    ("train", "steps", True, "int"),
    ("train", "lr", True, "float"),
    ("train", "lookahead_k", 2.5, "int"),
    ("train", "ttt", "yes", "bool"),
    ("convert", "chunk_size", 64.7, "int"),
    ("eval", "passkey_lengths", [128, 1.5], "a list of int"),
])
def test_config_file_values_are_not_converted_silently(workdir, capsys, cmd, key, value, what):
    """A config file's value that the command line would refuse is refused too (a float for an
    int was truncated, a bool read as 1)."""
    cfg = workdir / "typed.json"
    cfg.write_text(json.dumps({key: value}))
    line = _one_line_error(*run([cmd, "--config", str(cfg)], capsys)[::2])
    assert f"option {key!r} must be {what}, got {value!r}" in line


def test_config_file_values_that_convert_exactly(tmp_path):
    """Integral floats for ints, numbers as strings (YAML reads 1e-3 as a string) and one value
    for a list option are read as the command line would read them."""
    import yaml

    from fastweights.commands.eval import EvalConfig
    from fastweights.config import parse
    from fastweights.train.trainer import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("steps: 3.0\nlr: 1e-3\nttt_layers: 1\n")
    cfg = parse(TrainConfig, ["--config", str(path)], "t", "")
    assert (cfg.steps, cfg.lr, cfg.ttt_layers) == (3, 1e-3, [1]) and type(cfg.steps) is int
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # why strings must still convert to numbers
    path.write_text("passkey_lengths: [128, 256]\n")
    assert parse(EvalConfig, ["--config", str(path)], "t", "").passkey_lengths == [128, 256]


def test_config_file_with_command_line_override(workdir, capsys):
    data = workdir / "data"
    if not (data / "meta.json").exists():
        run(["prepare", *prepare_args(write_corpus(workdir / "corpus"), data)], capsys)
    cfg = workdir / "train.yaml"
    cfg.write_text(f"data: {data}\nsteps: 5\nseq-len: 32\nbatch_size: 2\nttt: false\nprogress: false\nthreads: 1\n")
    code, out, err = run(["train", "--config", str(cfg), "--out", str(workdir / "cfgrun"), "--steps", "1"], capsys)
    assert code == 0, err
    saved = json.loads((workdir / "cfgrun" / "train_config.json").read_text())
    assert saved["steps"] == 1 and saved["seq_len"] == 32 and saved["ttt"] is False


def test_unknown_model_family(workdir, capsys):
    line = _one_line_error(*run(["train", "--data", str(workdir), "--model", "tinny"], capsys)[::2])
    assert "unknown model 'tinny'" in line and "tiny" in line
    bad = workdir / "weird"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen33"}))
    line = _one_line_error(*run(["generate", "--model", str(bad)], capsys)[::2])
    assert "unknown model family 'qwen33'" in line and "qwen3" in line


def test_plot_labels_name_what_differs_and_mixed_buckets_warn(tmp_path, capsys):
    from fastweights.commands.plot import default_labels

    assert default_labels(["runs/a/model/eval.json", "runs/b/model/eval.json"]) == ["a", "b"]
    assert default_labels(["runs/a/model/eval.json", "runs/a/model/eval-dyn.json"]) == ["eval", "eval-dyn"]
    assert default_labels(["runs/a/model/eval.json"]) == ["model/eval"]
    assert default_labels(["e.json", "e.json"]) == ["e", "e"]
    paths = []
    for name, spans in (("a", [(0, 16), (16, 32)]), ("b", [(0, 32)])):
        (tmp_path / name).mkdir()
        buckets = [{"start": s, "end": e, "loss": 3.0, "tokens": e - s} for s, e in spans]
        (tmp_path / name / "eval.json").write_text(json.dumps({"loss_by_position": {"buckets": buckets}}))
        paths.append(str(tmp_path / name / "eval.json"))
    code, out, err = run(["plot", "--inputs", *paths, "--out", str(tmp_path / "p.png")], capsys)
    assert code == 0 and (tmp_path / "p.png").exists()
    assert "the inputs use different position buckets" in err


def test_plot_names_a_bad_bucket_and_leaves_the_callers_backend(tmp_path, capsys, monkeypatch):
    """A bucket without its 'end' was one line `error: end` (the CLI turned any KeyError into a user
    error); the plots switched the process's matplotlib backend to Agg (a notebook lost its
    inline display). A bug's KeyError now shows as a traceback, not as a user error."""
    import matplotlib

    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"loss_by_position": {"buckets": [{"start": 0}]}}))
    line = _one_line_error(*run(["plot", "--inputs", str(bad), "--out", str(tmp_path / "x.png")], capsys)[::2])
    assert f"{bad}: bucket 0 is {{'start': 0}}; each bucket needs integer 'start' and 'end'" in line
    bad.write_text(json.dumps({"buckets": [{"start": 0, "end": 8}]}))  # no loss: KeyError when drawn
    line = _one_line_error(*run(["plot", "--inputs", str(bad), "--out", str(tmp_path / "x.png")], capsys)[::2])
    assert "bucket 0 is {'start': 0, 'end': 8}; each bucket needs" in line and "a 'loss' (a number or null)" in line
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"buckets": [{"start": 0, "end": 8, "loss": 2.0}, {"start": 8, "end": 16,
                                                                                 "loss": None}]}))
    matplotlib.use("svg")
    try:
        assert run(["plot", "--inputs", str(good), "--out", str(tmp_path / "g.png")], capsys)[0] == 0
        assert matplotlib.get_backend() == "svg" and (tmp_path / "g.png").stat().st_size > 1000
    finally:
        matplotlib.use("Agg")
    from fastweights.commands import plot as plot_cmd

    monkeypatch.setattr(plot_cmd, "default_labels", lambda paths: {}["bug"])
    with pytest.raises(KeyError):
        cli.main(["plot", "--inputs", str(good)])


def test_a_directory_named_like_a_preset_is_not_taken_silently(tmp_path, monkeypatch, small_data, capsys):
    """--model tiny with a model directory ./tiny trains the preset: a warning (once per run) says the
    directory is passed over and how to name it, and the run records the preset, so a resume does
    not depend on the directory."""
    from fastweights.errors import FastWeightsWarning
    from fastweights.models.presets import resolve_model
    from fastweights.train.trainer import model_key

    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") == "preset"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    with pytest.warns(FastWeightsWarning, match=r"model 'tiny' is the preset; the model directory ./tiny is not "
                                                r"used \(name it ./tiny to use it\)"):
        assert resolve_model("tiny") == "preset"
    assert resolve_model("./tiny") == "local"
    assert model_key("tiny") == "preset tiny" and model_key("./tiny").startswith("config ")
    argv = ["train", "--data", str(small_data), "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len",
            "32", "--batch-size", "2", "--no-ttt", "--no-progress", "--threads", "1"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert err.count("warning: model 'tiny' is the preset") == 1, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["model_key"] == "preset tiny"


@pytest.mark.parametrize("argv", [[], ["experiment"]])
def test_no_subcommand_prints_usage_and_fails(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: fastweights")
    assert ("COMMAND" if not argv else "{associative-retrieval") in err  # the choices are listed


@pytest.mark.parametrize("argv", [["--help"], ["experiment", "--help"]])
def test_top_level_help_succeeds(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 0 and out.startswith("usage: fastweights") and err == ""


def test_convert_keeps_the_checkpoints_dtype(tmp_path, capsys):
    """A bf16 checkpoint is saved in bf16 (it was written back as float32, twice the size);
    --dtype picks another; a bad --dtype is named."""
    from safetensors import safe_open
    from tiny_models import tiny_model

    src = tmp_path / "bf16"
    tiny_model("qwen3", layers=2).to(torch.bfloat16).save_pretrained(src)

    def dtypes(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    assert dtypes(src) == {"BF16"}
    code, out, err = run(["convert", "--model", str(src), "--out", str(tmp_path / "a"), "--layers", "1"], capsys)
    assert code == 0, err
    assert dtypes(tmp_path / "a") == {"BF16"} and "bfloat16" in out
    code, out, err = run(["convert", "--model", str(src), "--out", str(tmp_path / "b"), "--layers", "1",
                          "--dtype", "float32"], capsys)
    assert code == 0, err
    assert dtypes(tmp_path / "b") == {"F32"}
    code, out, err = run(["convert", "--model", str(src), "--out", str(tmp_path / "c"), "--dtype", "fp8"], capsys)
    assert code == 2 and "--dtype must be one of auto, float32, bfloat16, float16, got 'fp8'" in err
    (tmp_path / "afile").touch()  # save_pretrained only logs a file in the way: convert said it had converted
    code, out, err = run(["convert", "--model", str(src), "--out", str(tmp_path / "afile")], capsys)
    assert code == 2 and f"--out {tmp_path / 'afile'} exists and is not a directory" in err


def test_generate_follows_its_options_not_the_models_saved_sampling(small_data, tmp_path, capsys, monkeypatch):
    """A model saved with top_k 1 (Qwen3 ships top_k 20, top_p 0.95): --temperature 1 --top-k 0
    samples from every token, so two seeds differ; the model's end-of-text token is kept."""
    from tiny_models import tiny_model
    from transformers import GenerationConfig

    from fastweights.commands import generate as gen_cmd
    from fastweights.data.tokenizer import load_tokenizer

    model = tiny_model("qwen3", layers=2, vocab_size=300)
    model.generation_config = GenerationConfig(top_k=1, top_p=0.05, eos_token_id=299, do_sample=True)
    model.save_pretrained(tmp_path / "m")
    load_tokenizer(small_data / "tokenizer").save_pretrained(tmp_path / "m")
    seen = []
    real = gen_cmd.load_model

    def spy(path):
        m = real(path)
        orig = m.generate
        m.generate = lambda *a, **kw: seen.append(kw["generation_config"]) or orig(*a, **kw)
        return m

    monkeypatch.setattr(gen_cmd, "load_model", spy)
    outs = []
    for seed in (0, 1):
        code, out, err = run(["generate", "--model", str(tmp_path / "m"), "--prompt", "def", "--max-new-tokens", "12",
                              "--temperature", "1", "--top-k", "0", "--seed", str(seed)], capsys)
        assert code == 0, err
        outs.append(out)
    assert outs[0] != outs[1]
    g = seen[0]
    assert (g.top_k, g.top_p, g.temperature, g.do_sample, g.eos_token_id) == (0, 1.0, 1.0, True, 299)
    code, out, err = run(["generate", "--model", str(tmp_path / "m"), "--top-p", "0"], capsys)
    assert code == 2 and "top_p must be in (0, 1]" in err


def test_a_model_with_a_smaller_vocabulary_than_the_data_is_named(small_data, tmp_path, capsys):
    """eval crashed with an IndexError inside the embedding; train already named the sizes."""
    from tiny_models import tiny_model

    tiny_model("qwen3", layers=1, vocab_size=50).save_pretrained(tmp_path / "small-vocab")
    capsys.readouterr()
    for cmd in ("eval", "train"):
        argv = [cmd, "--model", str(tmp_path / "small-vocab"), "--data", str(small_data)]
        argv += ["--out", str(tmp_path / f"{cmd}-out"), "--no-progress"] + (["--steps", "1"] if cmd == "train" else [])
        line = _one_line_error(*run(argv, capsys)[::2])
        assert "the dataset's tokenizer has 300 tokens but" in line and "has vocab_size 50" in line, line


def test_an_empty_validation_split_and_a_default_corpus_setting_are_named(tmp_path, capsys, monkeypatch):
    """Two documents and --val-fraction 0.01: prepare warns that the validation split is empty and
    eval names that split; --max-doc-kb, a default-corpus setting, is said to be ignored."""
    from tiny_models import tiny_model

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=2)
    argv = ["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300",
            "--val-fraction", "0.01", "--max-doc-kb", "1", "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "--max-doc-kb caps the default corpus's documents (Python packages) only; ignored" in err
    assert "warning: the validation split is empty: 2 documents with --val-fraction 0.01" in err
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["val_documents"] == 0 and manifest["max_doc_bytes"] == 0
    tiny_model("qwen3", layers=1, vocab_size=300).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    line = _one_line_error(*run(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"),
                                 "--no-progress"], capsys)[::2])
    assert "the validation split of" in line and "is empty" in line, line


def test_data_from_another_tokenizer_than_the_models_is_refused(small_data, tmp_path, capsys, monkeypatch):
    """A model saved with its tokenizer and a dataset prepared with another one of the same size:
    every id would be read as another token; train and eval name it (both went on silently)."""
    from tiny_models import tiny_model

    from fastweights.data.tokenizer import load_tokenizer

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "m"
    tiny_model("qwen3", layers=1, vocab_size=300).save_pretrained(model_dir)
    load_tokenizer(small_data / "tokenizer").save_pretrained(model_dir)
    other = tmp_path / "other-data"
    corpus = write_corpus(tmp_path / "other-corpus", docs=8, seed=5)
    assert run(["prepare", "--corpus", str(corpus), "--out", str(other), "--vocab-size", "280", "--no-progress"],
               capsys)[0] == 0
    capsys.readouterr()
    for cmd in ("eval", "train"):
        argv = [cmd, "--model", str(model_dir), "--data", str(other), "--out", str(tmp_path / f"{cmd}-out"),
                "--no-progress"] + (["--steps", "1", "--seq-len", "32"] if cmd == "train" else [])
        line = _one_line_error(*run(argv, capsys)[::2])
        assert "was tokenised with another tokenizer than the one saved with" in line, line
        assert f"prepare the data with --tokenizer {model_dir}" in line
    code, out, err = run(["eval", "--model", str(model_dir), "--data", str(small_data), "--out",
                          str(tmp_path / "same.json"), "--no-progress", "--ppl-rows", "1", "--length", "64",
                          "--max-docs", "1", "--seq-len", "32", "--first-bucket", "16"], capsys)
    assert code == 0, err  # the model's own tokenizer: no complaint


def test_plot_names_an_input_that_is_not_a_result(tmp_path, capsys):
    """A JSON array raised AttributeError ('list' object has no attribute 'get')."""
    for text in ("[1, 2]", '{"loss": 3}', '"text"'):
        (tmp_path / "x.json").write_text(text)
        line = _one_line_error(*run(["plot", "--inputs", str(tmp_path / "x.json"), "--out",
                                     str(tmp_path / "x.png")], capsys)[::2])
        assert "x.json: no loss-by-position result (expected a 'buckets' list)" in line


def test_prepare_names_txt_files_that_are_not_utf8_and_a_python_directory(tmp_path, capsys, monkeypatch):
    """Bad bytes in a .txt were replaced silently; a BOM stayed in the text; ./python was taken
    for the built-in corpus without a word."""
    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=6)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 au lait\r\nsecond line\rthird line")
    (corpus / "bom.txt").write_bytes("\ufeffwith a byte order mark".encode())
    code, out, err = run(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "warning: 1 .txt files are not valid UTF-8 and were read with U+FFFD for their bad bytes, e.g. bad.txt " \
           "(byte 3)" in err
    from fastweights.data.corpus import build_corpus

    corpus_docs = {d.name: d.text for d in build_corpus(str(corpus), 0.25, progress=False).documents}
    assert corpus_docs["bad.txt"] == "caf\ufffd au lait\nsecond line\nthird line"
    assert corpus_docs["bom.txt"] == "with a byte order mark"
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["not_utf8_files"] == 1 and manifest["not_utf8"] == ["bad.txt (byte 3)"]
    (tmp_path / "python").mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["prepare", "--corpus", "python", "--val-fraction", "2"], capsys)
    assert code != 0 and "--corpus python is the built-in corpus" in err and "--corpus ./python" in err


def test_a_model_tokenizer_that_extends_the_datas_is_accepted(small_data, tmp_path, capsys):
    """A tokenizer with an added <pad> (every data id the same token) crashed train and eval with
    an IndexError in the tokenizer comparison."""
    from tiny_models import tiny_model

    from fastweights.data.tokenizer import load_tokenizer

    model_dir = tmp_path / "m"
    tiny_model("qwen3", layers=1, vocab_size=320).save_pretrained(model_dir)
    tok = load_tokenizer(small_data / "tokenizer")
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(model_dir)
    code, out, err = run(["eval", "--model", str(model_dir), "--data", str(small_data), "--out",
                          str(tmp_path / "e.json"), "--no-progress", "--ppl-rows", "1", "--length", "64",
                          "--max-docs", "1", "--seq-len", "32", "--first-bucket", "16"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("text,match", [
    ("out:\n", None),  # empty: the default, not the string "None"
    ("prompt: no\n", r"option 'prompt' must be str, got False"),  # YAML's no is a bool
    ("max_new_tokens: 3\nmax-new-tokens: 4\n", r"option 'max_new_tokens' is given twice"),
    ("max_new_tokens: 3\nmax_new_tokens: 4\n", r"option 'max_new_tokens' is given twice"),
    ('{"max_new_tokens": 3, "max_new_tokens": 4}', r"option 'max_new_tokens' is given twice"),
    ("? [a, b]\n: 1\n", r"config keys must be option names, got \['a', 'b'\]"),
    ("<<: {max_new_tokens: 3, max_new_tokens: 4}\n", r"option 'max_new_tokens' is given twice"),
])
def test_config_file_values_yaml_would_misread(tmp_path, text, match):
    from fastweights.commands.generate import GenerateConfig
    from fastweights.commands.prepare import PrepareConfig
    from fastweights.config import parse

    path = tmp_path / "c.yaml"
    path.write_text(text)
    if match is None:
        assert parse(PrepareConfig, ["--config", str(path)], "t", "").out == PrepareConfig().out
    else:
        with pytest.raises(FastWeightsError, match=match):
            parse(GenerateConfig, ["--config", str(path)], "t", "")


def test_yaml_merge_keys_still_work(tmp_path):
    """The duplicate-key check refused YAML's merge key (<<: *defaults) as an unknown constructor."""
    from fastweights.commands.generate import GenerateConfig
    from fastweights.config import parse

    path = tmp_path / "m.yaml"
    path.write_text("<<: {max_new_tokens: 3, prompt: a}\nprompt: b\n")  # an explicit key overrides a merged one
    cfg = parse(GenerateConfig, ["--config", str(path)], "t", "")
    assert (cfg.max_new_tokens, cfg.prompt) == (3, "b")


def test_a_prefix_of_config_is_refused_not_ignored(tmp_path, capsys):
    """argparse read --conf as --config while the scan for the file did not: the file was ignored."""
    (tmp_path / "g.yaml").write_text("max_new_tokens: 2\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "--model", str(tmp_path), "--conf", str(tmp_path / "g.yaml")])
    assert stop.value.code == 2 and "unrecognized arguments: --conf" in capsys.readouterr().err


def test_version_interrupts_and_unwritable_paths(workdir, small_data, tmp_path, capsys, monkeypatch):
    from fastweights import __version__
    from fastweights.commands import eval as eval_cmd

    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"fastweights {__version__}"

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastweights.commands.train.main", interrupted)
    code, out, err = run(["train"], capsys)
    assert code == 130 and "interrupted (`--resume` continues a training run from its last checkpoint)" in err
    # an --out that cannot be a file fails before the evaluation (it raised IsADirectoryError after it)
    monkeypatch.setattr(eval_cmd, "load_model", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    (tmp_path / "afile").write_text("x")
    for out_path, match in ((tmp_path, "is a directory: give a file path"),
                            (tmp_path / "afile" / "e.json", "afile is a file, not a directory")):
        line = _one_line_error(*run(["eval", "--model", str(tmp_path), "--data", str(small_data), "--out",
                                     str(out_path)], capsys)[::2])
        assert match in line, line
    # other commands' OSErrors are one line too (a traceback before)
    corpus = write_corpus(tmp_path / "corpus", docs=4)
    code, out, err = run(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "afile" / "d"), "--no-progress",
                          "--val-fraction", "0.5"], capsys)
    assert code == 2 and "Traceback" not in err and "afile" in err.strip().splitlines()[-1], err


def test_plots_report_the_file_they_wrote(tmp_path):
    """matplotlib adds .png to a name without a suffix; plot printed, and eval.json recorded, the
    name as given."""
    from fastweights.eval.plot import plot_passkey, plot_position_losses

    curve = {"buckets": [{"start": 0, "end": 4, "loss": 1.0}, {"start": 4, "end": 8, "loss": 0.9}]}
    assert plot_position_losses([("a", curve)], tmp_path / "runs") == tmp_path / "runs.png"
    assert (tmp_path / "runs.png").is_file()
    res = {"accuracy": [[1.0]], "depths": [0.5], "lengths": [64]}
    assert plot_passkey(res, tmp_path / "pk") == tmp_path / "pk.png" and (tmp_path / "pk.png").is_file()
    assert plot_passkey(res, tmp_path / "pk.pdf") == tmp_path / "pk.pdf"


def test_main_checks_its_flags_before_preparing_the_corpus(tmp_path, capsys, monkeypatch):
    from fastweights.commands import main as main_cmd

    monkeypatch.setattr(main_cmd, "prepare", lambda *a, **k: pytest.fail("prepared before checking the flags"))
    for flag, value, match in (("--steps", "-1", "steps must be >= 0, got -1"),
                               ("--ttt-lr", "-1", "ttt_lr must be a finite number >= 0"),
                               ("--passkey-lengths", "0", "passkey lengths must be integers >= 1, got 0")):
        line = _one_line_error(*run(["main", flag, value, "--out", str(tmp_path / "m")], capsys)[::2])
        assert match in line, line
    assert not (tmp_path / "m").exists()


def test_a_training_checkpoint_is_a_model_directory_eval_reads(small_data, tmp_path, capsys):
    """Checkpoints held no config.json: `eval --model <checkpoint>` said there was none."""
    run_dir = tmp_path / "r"
    code, out, err = run(["train", *train_args(small_data, run_dir, steps=2)], capsys)
    assert code == 0, err
    ckpt = run_dir / "checkpoints" / "step-00000002"
    code, out, err = run(["eval", "--model", str(ckpt), "--data", str(small_data), "--out", str(tmp_path / "e.json"),
                          "--no-progress", "--ppl-rows", "1", "--length", "64", "--max-docs", "1", "--seq-len", "32",
                          "--first-bucket", "16"], capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "e.json").read_text())["perplexity"]["perplexity"]
    code, out, err = run(["eval", "--model", str(run_dir / "model"), "--data", str(small_data), "--out",
                          str(tmp_path / "f.json"), "--no-progress", "--ppl-rows", "1", "--length", "64",
                          "--max-docs", "1", "--seq-len", "32", "--first-bucket", "16"], capsys)
    assert json.loads((tmp_path / "f.json").read_text())["perplexity"]["perplexity"] == final  # same weights


def test_main_table_shows_passkey_accuracy_when_it_was_measured():
    """main computes passkey at 20m and above, but its summary table left it out."""
    from fastweights.commands.main import table

    def run_result(acc):
        ev = {"perplexity": {"perplexity": 5.0}, "loss_by_position": {"buckets": [{"start": 0, "end": 8, "loss": 1.0}]}}
        if acc is not None:
            ev["passkey"] = {"accuracy": acc}
        return {"train": {"parameters": 2e6, "loss": 1.5}, "eval": ev}

    lines = table({"runs": {"a": run_result([[1.0, 0.5]]), "b": run_result([[0.0, 0.5]])}}).splitlines()
    assert lines[0].split()[-2:] == ["passkey", "acc"] and lines[1].endswith("75%") and lines[2].endswith("25%")
    assert "passkey" not in table({"runs": {"a": run_result(None)}})


def test_shards_without_their_index_are_not_taken_for_no_weights(tmp_path):
    """A directory of model-0000x-of-0000y.safetensors without its index trained from random
    weights (its shards were not counted as weights); transformers' own error comes instead."""
    from tiny_models import tiny_model

    from fastweights.models.presets import load_model

    tiny_model("qwen3", layers=1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(OSError):
        load_model(tmp_path, init_missing=True)


def test_prepare_into_a_directory_with_a_damaged_meta_json(tmp_path, capsys):
    """prepare told to 'prepare the dataset again', which it was doing: it names the way out."""
    corpus = write_corpus(tmp_path / "corpus", docs=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text('{"key": "x", "splits": {}}')
    line = _one_line_error(*run(["prepare", *prepare_args(corpus, bad)], capsys)[::2])
    assert f"{bad} holds no dataset this prepare can check; remove it or pick another --out" in line
    assert "prepare the dataset again" not in line


def test_main_checks_the_evaluation_data_before_training(tmp_path, capsys, monkeypatch):
    """A passkey length too short for the needle, or an evaluation length that no validation
    document reaches, failed only in evaluation, after both models had trained."""
    from fastweights.commands import main as main_cmd

    monkeypatch.setattr(main_cmd, "train", lambda *a, **k: pytest.fail("trained before checking the evaluation data"))
    base = ["main", "--out", str(tmp_path / "m"), "--steps", "1", "--max-mb", "1", "--max-doc-kb", "24",
            "--vocab-size", "300", "--seq-len", "32", "--no-progress"]
    for flags, match in ((["--eval-length", "128", "--passkey-lengths", "5"],
                          r"--passkey-lengths: length 5 is too short for a passkey prompt \(needs > \d+\)"),
                         (["--eval-length", "10000000"], r"no validation document has 10000000 tokens")):
        line = _one_line_error(*run(base + flags, capsys)[::2])
        assert re.search(match, line), line
    assert not (tmp_path / "m" / "baseline").exists()


def test_cli_warnings_come_from_rank_0_only(monkeypatch, capsys):
    """Under torchrun every rank runs the same command, and each printed the same warning."""
    from fastweights.cli import _show_warning
    from fastweights.errors import FastWeightsWarning

    for rank, shown in ((None, True), ("0", True), ("1", False), ("3", False)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        _show_warning(FastWeightsWarning("same on every rank"), FastWeightsWarning, "f.py", 1)
        assert ("warning: same on every rank" in capsys.readouterr().err) == shown, rank


def test_resume_without_a_checkpoint_says_the_run_starts_anew(small_data, tmp_path, capsys):
    """`train --resume` into an --out without checkpoints (a mistyped path) trained from step 0
    without a word."""
    code, _, err = run(["train", *train_args(small_data, tmp_path / "typo", steps=1), "--resume"], capsys)
    assert code == 0, err
    assert f"warning: --resume: {tmp_path / 'typo'} holds no checkpoint, so this run starts from step 0" in err
    code, _, err = run(["train", *train_args(small_data, tmp_path / "fresh", steps=1)], capsys)
    assert code == 0 and "holds no checkpoint" not in err


def test_generate_keeps_the_space_a_sentencepiece_tokenizer_puts_before_the_continuation(tmp_path, capsys,
                                                                                          monkeypatch):
    """The new tokens were decoded alone: a Metaspace tokenizer (Llama-2, Mistral) then dropped the
    word-start space, and `--prompt "def return"` printed "def returnmodel ...". Greedy decoding
    with --top-k set now says that the flag does nothing."""
    from tiny_models import tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "def class return import self value data model".split()
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator([" ".join(words[(i * 7) % 8:] + words[:(i * 7) % 8]) for i in range(50)],
                                trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    from fastweights.commands import generate as gen_cmd

    tiny_model("llama", layers=1, vocab_size=len(tok)).save_pretrained(tmp_path / "sp")
    tok.save_pretrained(tmp_path / "sp")
    real = gen_cmd.load_model
    word = tok.convert_tokens_to_ids("▁model")  # the word "model" with its word-start space, one token

    def load(path):  # a model that continues with that token three times
        m = real(path)
        m.generate = lambda ids, **kw: torch.cat([ids, torch.full((1, 3), word)], 1)
        return m

    monkeypatch.setattr(gen_cmd, "load_model", load)
    code, out, err = run(["generate", "--model", str(tmp_path / "sp"), "--prompt", "def return", "--max-new-tokens",
                          "3", "--no-progress", "--top-k", "5"], capsys)
    assert code == 0, err
    assert out.strip() == "def return model model model", out
    assert "warning: --top-k 5 and --top-p 1 apply to sampling: with --temperature 0 decoding is greedy" in err


def test_generate_starts_the_prompt_as_the_tokenizer_starts_a_text(tmp_path, capsys, monkeypatch):
    """The prompt was encoded without the BOS that Llama and Mistral tokenizers put before every
    text (and that prepared data now starts with): the model generated from an input unlike any
    it was trained on. The BOS is now there, and not printed."""
    from test_data import _bos_tokenizer
    from tiny_models import tiny_model

    from fastweights.commands import generate as gen_cmd

    words = "def class return import self value data model".split()
    tok = _bos_tokenizer([" ".join(words[(i * 7) % 8:] + words[:(i * 7) % 8]) for i in range(50)])
    tiny_model("llama", layers=1, vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    real, seen = gen_cmd.load_model, []

    def load(path):
        m = real(path)
        m.generate = lambda ids, **kw: seen.append(ids.tolist()) or torch.cat([ids, ids[:, -1:]], 1)
        return m

    monkeypatch.setattr(gen_cmd, "load_model", load)
    code, out, err = run(["generate", "--model", str(tmp_path / "m"), "--prompt", "def return", "--max-new-tokens",
                          "1", "--no-progress"], capsys)
    assert code == 0, err
    assert seen == [[tok("def return")["input_ids"]]] and seen[0][0][0] == tok.bos_token_id
    assert out.strip() == "def return return", out


def test_prepare_reads_the_tokenizer_first_and_counts_bad_bytes_from_the_files_start(tmp_path, capsys, monkeypatch):
    """A bad --tokenizer failed only after the whole corpus was read (a file path was said to hold
    no tokenizer files); a BOM made the reported offset of a bad byte 3 short; main printed
    prepare's ./python note although it has no --corpus."""
    from fastweights.commands import prepare as prepare_cmd

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=6)
    monkeypatch.setattr(prepare_cmd, "build_corpus", lambda *a, **k: pytest.fail("read the corpus first"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    for given, match in ((tmp_path / "none", "tokenizer directory not found"),
                         (tmp_path / "tok" / "tokenizer.json", "a tokenizer is read from its directory .*got the "
                                                               f"file {tmp_path / 'tok' / 'tokenizer.json'}: pass "
                                                               f"{tmp_path / 'tok'}")):
        line = _one_line_error(*run(["prepare", "--corpus", str(corpus), "--tokenizer", str(given), "--out",
                                     str(tmp_path / "d")], capsys)[::2])
        assert re.search(match, line), line
    monkeypatch.undo()
    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    (corpus / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\r\nworld \xff")
    code, _, err = run(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300",
                        "--no-progress"], capsys)
    assert code == 0 and "e.g. bom.txt (byte 16)" in err, err
    (tmp_path / "python").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_cmd, "build_corpus", lambda *a, **k: (_ for _ in ()).throw(FastWeightsError("stop")))
    with pytest.raises(FastWeightsError, match="stop"):  # the function main calls says nothing of ./python
        prepare_cmd.prepare(prepare_cmd.PrepareConfig(corpus="python", progress=False))
    assert "built-in corpus" not in capsys.readouterr().err  # (the prepare command does: the test above)


def test_evaluation_functions_leave_the_model_in_its_mode_and_take_a_split(small_data):
    """perplexity and loss_by_position left a training model in eval mode (dynamic_eval gave its
    mode back); perplexity(batch_size=0) raised range()'s error; dynamic_eval refused a split
    (a TokenStore: 'not iterable') where loss_by_position takes one."""
    from tiny_models import tiny_model

    from fastweights.data import Dataset
    from fastweights.eval import loss_by_position, perplexity
    from fastweights.eval.dynamic import DynamicEvalConfig, dynamic_eval

    val = Dataset(small_data).split("val")
    model = tiny_model("qwen3", layers=1, vocab_size=300).train()
    model.model.layers[0].eval()  # a mixed model: each submodule keeps its own mode
    modes = [m.training for m in model.modules()]
    perplexity(model, val, seq_len=16, max_rows=2, progress=False)
    loss_by_position(model, val, length=32, first_bucket=8, max_docs=1, progress=False)
    assert [m.training for m in model.modules()] == modes and model.training
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        perplexity(model, val, seq_len=16, batch_size=0, progress=False)
    assert perplexity(model, val, seq_len=16, batch_size=np.int64(2), max_rows=2, progress=False)["rows"] == 2
    docs = [torch.tensor(val.doc(i)[:20].astype("int64")) for i in range(2)]
    cfg = DynamicEvalConfig(segment_length=8, lr=0.01, params="last:1")

    class First2:  # the split's first two documents, cut as above, through its iteration
        def __iter__(self):
            return (d[:20] for _, d in zip(range(2), val, strict=False))

    a = dynamic_eval(model, docs, cfg, count_flops=False, progress=False)
    b = dynamic_eval(model, First2(), cfg, count_flops=False, progress=False)
    assert a.dynamic.loss == b.dynamic.loss and a.static.loss == b.static.loss
    assert [m.training for m in model.modules()] == modes and model.training  # dynamic_eval's too
    assert len(list(val)) == len(val) and all((x == val.doc(i)).all() for i, x in enumerate(val))


def test_a_warmup_longer_than_the_run_is_named(small_data, tmp_path, capsys):
    """--warmup 10 with --steps 5 trained without ever reaching --lr, silently (the warmup's last
    step is the first at the peak: --warmup equal to --steps reaches it)."""
    code, _, err = run(["train", *train_args(small_data, tmp_path / "w", steps=2), "--warmup", "5"], capsys)
    assert code == 0 and "warning: --warmup 5 > --steps 2: the learning rate never reaches its peak" in err, err
    code, _, err = run(["train", *train_args(small_data, tmp_path / "v", steps=2), "--warmup", "2"], capsys)
    assert code == 0 and "never reaches its peak" not in err
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(3e-3)  # the peak, at the last step


def test_generate_from_a_checkpoint_says_where_the_tokenizer_is(small_data, tmp_path, capsys):
    """A checkpoint is a model directory eval reads, but it holds no tokenizer: generate said only
    that there were no tokenizer files."""
    assert run(["train", *train_args(small_data, tmp_path / "r", steps=2)], capsys)[0] == 0
    ckpt = tmp_path / "r" / "checkpoints" / "step-00000002"
    line = _one_line_error(*run(["generate", "--model", str(ckpt), "--no-progress"], capsys)[::2])
    assert "is a training checkpoint, which holds no tokenizer; generate from the run's model directory" in line
    code, out, err = run(["generate", "--model", str(tmp_path / "r" / "model"), "--max-new-tokens", "2",
                          "--no-progress"], capsys)
    assert code == 0, err


def test_max_update_norm_through_convert_eval_and_generate(small_data, tmp_path, capsys, monkeypatch):
    """SPEC's clipping is an inference option: convert records it, and eval and generate set it on a
    saved model for their run (the layers and the config), refusing a model without TTT layers."""
    from tiny_models import tiny_model

    from fastweights.commands import eval as eval_cmd
    from fastweights.commands import generate as gen_cmd
    from fastweights.data.tokenizer import load_tokenizer

    src = tmp_path / "src"
    tiny_model("qwen3", layers=2, vocab_size=300).save_pretrained(src)
    load_tokenizer(small_data / "tokenizer").save_pretrained(src)
    code, _, err = run(["convert", "--model", str(src), "--out", str(tmp_path / "c"), "--layers", "1",
                        "--chunk-size", "8", "--max-update-norm", "0.5", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "config.json").read_text())["ttt_max_update_norm"] == 0.5
    seen = {}
    for cmd, mod in (("eval", eval_cmd), ("generate", gen_cmd)):
        real = mod.load_model

        def spy(path, _real=real, _cmd=cmd, **kw):
            seen[_cmd] = m = _real(path, **kw)
            return m

        monkeypatch.setattr(mod, "load_model", spy)
    argv = ["eval", "--model", str(tmp_path / "c"), "--data", str(small_data), "--out", str(tmp_path / "e.json"),
            "--no-progress", "--ppl-rows", "1", "--length", "64", "--max-docs", "1", "--seq-len", "32",
            "--first-bucket", "16", "--max-update-norm", "0.25"]
    assert run(argv, capsys)[0] == 0
    assert run(["generate", "--model", str(tmp_path / "c"), "--max-new-tokens", "2", "--no-progress",
                "--max-update-norm", "0.125"], capsys)[0] == 0
    for cmd, tau in (("eval", 0.25), ("generate", 0.125)):
        m = seen[cmd]
        assert m.config.ttt_max_update_norm == tau
        assert [x.max_update_norm for x in m.modules() if hasattr(x, "ttt_conv")] == [tau]
    line = _one_line_error(*run(["generate", "--model", str(src), "--max-update-norm", "1", "--no-progress"],
                                capsys)[::2])
    assert "has no In-Place TTT MLPs: max_update_norm applies to them" in line
    line = _one_line_error(*run(["generate", "--model", str(tmp_path / "c"), "--max-update-norm", "-1"], capsys)[::2])
    assert "max_update_norm must be None (no clipping) or a finite number > 0, got -1.0" in line


def test_dynamic_decay_help_names_both_rules(capsys):
    """--dynamic-decay's help said "(rms)", but the sgd rule decays toward θ0 with it too."""
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "dynamic evaluation (sgd and rms): decay lambda toward the original weights" in help_text


def test_prepare_out_dot_is_the_current_directory_and_a_bad_out_fails_first(tmp_path, capsys, monkeypatch):
    """--out . failed with "PosixPath('.') has an empty name" after the corpus was read and the BPE
    trained; it is the current directory by its full path. A root --out, or a directory that is
    neither empty nor a dataset, is refused before the corpus is read."""
    from fastweights.commands import prepare as prepare_cmd

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=6)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, out, _ = run(["prepare", "--corpus", str(corpus), "--out", ".", "--vocab-size", "300", "--no-progress"],
                       capsys)
    assert code == 0 and f"dataset: {tmp_path / 'here'}" in out
    assert (tmp_path / "here" / "meta.json").exists()
    monkeypatch.setattr(prepare_cmd, "build_corpus", lambda *a, **k: pytest.fail("read the corpus first"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "full")
    for out_dir, match in (("/", "needs a directory with a name"), (".", "exists and is not a dataset directory")):
        line = _one_line_error(*run(["prepare", "--corpus", str(corpus), "--out", out_dir], capsys)[::2])
        assert re.search(match, line), line


def test_prepare_warns_of_bpe_flags_a_tokenizer_directory_ignores(tmp_path, capsys, monkeypatch):
    """--vocab-size and --tokenizer-sample-mb set the BPE prepare trains: with --tokenizer DIR they
    were ignored silently. --help gave the --out default as '<corpus>-<tokenizer> key'."""
    from transformers import ByT5Tokenizer

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=6)
    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    code, _, err = run(["prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "byt5"), "--out",
                        str(tmp_path / "d"), "--vocab-size", "30000", "--tokenizer-sample-mb", "50", "--no-progress"],
                       capsys)
    assert code == 0 and "warning: --vocab-size 30000 and --tokenizer-sample-mb 50 set the BPE that prepare " \
                         f"trains; ignored with --tokenizer {tmp_path / 'byt5'}" in err, err
    code, _, err = run(["prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "byt5"), "--out",
                        str(tmp_path / "d"), "--no-progress"], capsys)
    assert code == 0 and "ignored with --tokenizer" not in err, err
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "-val<val fraction>-e<encoding>" in capsys.readouterr().out


def test_perplexity_max_rows_and_eval_seq_len_are_checked_first(small_data, tmp_path, capsys):
    """perplexity(max_rows=0) said the split had fewer than seq_len + 1 tokens; eval --seq-len 1
    passed its check and failed after the model loaded ('seq_len must be >= 2')."""
    from tiny_models import tiny_model

    from fastweights.data import Dataset
    from fastweights.eval import perplexity

    val = Dataset(small_data).split("val")
    model = tiny_model("qwen3", layers=1, vocab_size=300)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"max_rows must be None \(the whole split\) or an integer >= 1, got "
                                             rf"{bad}"):
            perplexity(model, val, seq_len=16, max_rows=bad, progress=False)
    line = _one_line_error(*run(["eval", "--model", str(tmp_path / "none"), "--data", str(small_data),
                                 "--seq-len", "1"], capsys)[::2])
    assert "seq_len must be >= 2, got 1" in line, line


def test_prepare_on_one_document_says_the_split_is_by_document(tmp_path, capsys, monkeypatch):
    """One input.txt always leaves a split empty; the warning advised changing --val-fraction,
    which cannot help."""
    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "input.txt").write_text("one long text\n" * 200)
    code, _, err = run(["prepare", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--vocab-size",
                        "300", "--no-progress"], capsys)
    assert code == 0 and "split is empty: the corpus is one document, and the split is by document" in err, err
    assert "so no --val-fraction can help; give the corpus several documents" in err and "change --val" not in err


def test_eval_and_plot_take_image_names_with_dots(small_data, tmp_path, capsys, monkeypatch):
    """`eval --png heat_run1.2` ran the whole evaluation, then matplotlib refused the format '2' and
    no eval.json was written; `plot --out runs/v1.5` failed the same way. A suffix matplotlib does
    not write gets .png appended, and eval writes its JSON before it plots."""
    from tiny_models import tiny_model

    from fastweights.commands import eval as eval_cmd
    from fastweights.data.tokenizer import load_tokenizer

    model_dir = tmp_path / "m"
    tiny_model("qwen3", layers=1, vocab_size=300).save_pretrained(model_dir)
    load_tokenizer(small_data / "tokenizer").save_pretrained(model_dir)
    argv = ["eval", "--model", str(model_dir), "--data", str(small_data), "--out", str(tmp_path / "e.json"),
            "--no-progress", "--ppl-rows", "1", "--length", "64", "--max-docs", "1", "--seq-len", "32",
            "--first-bucket", "16", "--passkey-lengths", "128", "--passkey-depths", "0.5", "--passkey-trials", "1",
            "--png", str(tmp_path / "heat_run1.2")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    png = tmp_path / "heat_run1.2.png"
    assert json.loads((tmp_path / "e.json").read_text())["passkey"]["png"] == str(png) and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def broken(*args, **kw):
        raise RuntimeError("plot failed")

    (tmp_path / "e.json").unlink()
    monkeypatch.setattr(eval_cmd, "plot_passkey", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        run(argv, capsys)
    assert "passkey" in json.loads((tmp_path / "e.json").read_text())  # the results are kept
    curve = tmp_path / "c.json"
    curve.write_text(json.dumps({"buckets": [{"start": 0, "end": 8, "loss": 2.0}]}))
    code, out, err = run(["plot", "--inputs", str(curve), "--out", str(tmp_path / "runs" / "v1.5")], capsys)
    assert code == 0, err
    assert f"wrote {tmp_path / 'runs' / 'v1.5.png'}" in out and (tmp_path / "runs" / "v1.5.png").is_file()
    from fastweights.eval.plot import image_path

    assert image_path("a/heat_run1.2") == Path("a/heat_run1.2.png") and image_path("x.SVG") == Path("x.SVG")
    assert image_path("x.pdf") == Path("x.pdf") and image_path("runs") == Path("runs.png")


def test_eval_writes_strict_json_and_names_non_finite_results(small_data, tmp_path, capsys):
    """A huge loss raised a raw OverflowError in math.exp (perplexity); a NaN loss went into eval.json
    as a bare NaN (not JSON) without a word. Perplexity is now inf where exp overflows, and
    non-finite numbers are written as null and named in a warning."""
    from tiny_models import tiny_model

    from fastweights.data.tokenizer import load_tokenizer
    from fastweights.eval.dynamic import _summarise

    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    for name, scale in (("huge", 1e6), ("nan", float("nan"))):
        model = tiny_model("qwen3", layers=1, vocab_size=300)
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        model.save_pretrained(tmp_path / name)
        load_tokenizer(small_data / "tokenizer").save_pretrained(tmp_path / name)
        out = tmp_path / f"{name}.json"
        code, stdout, err = run(["eval", "--model", str(tmp_path / name), "--data", str(small_data), "--out",
                                 str(out), "--no-progress", "--ppl-rows", "1", "--length", "64", "--max-docs", "1",
                                 "--seq-len", "32", "--first-bucket", "16"], capsys)
        assert code == 0, err
        res = json.loads(out.read_text(), parse_constant=refuse)
        if name == "huge":
            assert res["perplexity"]["loss"] > 1000 and res["perplexity"]["perplexity"] is None
            assert "perplexity.perplexity = inf" in err and "perplexity inf" in stdout
        else:
            assert res["perplexity"]["loss"] is None and res["loss_by_position"]["buckets"][0]["loss"] is None
            assert "perplexity.loss = nan" in err and "loss_by_position.buckets[0].loss = nan" in err
        assert f"non-finite results (a diverged or broken model?), written as null to {out}" in err
    assert _summarise([[torch.tensor([1e4, 1e4])]], 1.0, None).perplexity == float("inf")


def test_convert_refuses_a_non_empty_out_and_its_own_model(tmp_path, capsys, monkeypatch):
    """convert wrote silently into a non-empty --out (a trained model's directory kept its old
    eval.json next to the new model) and, with --out equal to --model, converted the source in
    place. A non-empty --out now needs --overwrite (files left from before are named); the source
    directory is refused; both before the model loads."""
    from tiny_models import tiny_model

    from fastweights.commands import convert as convert_cmd

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("qwen3", layers=2).save_pretrained(src)
    capsys.readouterr()  # the save's own progress bar
    out.mkdir()
    (out / "eval.json").write_text("{}")
    real = convert_cmd.load_model
    monkeypatch.setattr(convert_cmd, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    line = _one_line_error(*run(["convert", "--model", str(src), "--out", str(out), "--layers", "1"], capsys)[::2])
    assert f"--out {out} is not empty (1 entries: eval.json): give a new or empty directory, or pass " \
           "--overwrite" in line
    for flags in ([], ["--overwrite"]):
        line = _one_line_error(*run(["convert", "--model", str(src), "--out", str(src / "."), *flags], capsys)[::2])
        assert f"--out {src} is the --model directory: converting in place would overwrite the source" in line
    assert "ttt_layers" not in json.loads((src / "config.json").read_text())
    monkeypatch.setattr(convert_cmd, "load_model", real)
    code, stdout, err = run(["convert", "--model", str(src), "--out", str(out), "--layers", "1", "--overwrite",
                             "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["ttt_layers"] == [1]
    assert f"--overwrite: 1 files in {out} are from before and were not rewritten: eval.json" in err
    code, stdout, err = run(["convert", "--model", str(src), "--out", str(out), "--layers", "0", "--overwrite",
                             "--no-progress"], capsys)
    assert code == 0 and "model.safetensors" not in err and "config.json" not in err, err


def test_plot_names_an_input_that_is_binary_or_a_directory(tmp_path, capsys):
    """A PNG given as input said only "'utf-8' codec can't decode byte 0x89 ..." without the file;
    a directory said "file not found"."""
    png = tmp_path / "heat.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    line = _one_line_error(*run(["plot", "--inputs", str(png), "--out", str(tmp_path / "x.png")], capsys)[::2])
    assert f"{png}: not a UTF-8 text file (byte 0 is 0x89): expected an eval JSON" in line
    line = _one_line_error(*run(["plot", "--inputs", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)[::2])
    assert f"{tmp_path} is a directory: pass an eval JSON file (e.g. {tmp_path / 'eval.json'})" in line
