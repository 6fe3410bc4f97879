"""fastweights.train: exact resume after a killed subprocess, non-finite loss, checkpoints,
fast-weight-only training."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from pipeline_helpers import prepare_args, train_args, write_corpus

from fastweights.commands.prepare import PrepareConfig, prepare
from fastweights.config import parse
from fastweights.errors import FastWeightsError, FastWeightsWarning
from fastweights.models import convert, ttt_parameters
from fastweights.models.presets import build_model
from fastweights.train.trainer import TrainConfig, train, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTWEIGHTS_CACHE", str(root / "cache"))
    ds = prepare(parse(PrepareConfig, prepare_args(write_corpus(root / "corpus"), root / "data"), "t", ""))
    yield ds.path
    mp.undo()


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _train(argv):
    threads = torch.get_num_threads()
    try:
        return train(parse(TrainConfig, argv, "t", ""))
    finally:
        torch.set_num_threads(threads)


def test_resume_after_kill_is_bitwise_exact(data, tmp_path):
    steps = 16
    args = train_args(data, tmp_path / "killed", steps=steps, save_every=3)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTWEIGHTS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "fastweights", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "checkpoints" / "step-00000006"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = max(_losses(tmp_path / "killed"))
    assert 6 <= done < steps
    _train([*args, "--resume"])  # in this process: the killed one was a separate interpreter
    ref = _train(train_args(data, tmp_path / "ref", steps=steps, save_every=3))
    a, b = _losses(tmp_path / "killed"), _losses(tmp_path / "ref")
    assert sorted(a) == list(range(1, steps + 1)) == sorted(b)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:3]
    assert ref["loss"] == a[steps]


def test_resume_refuses_other_settings_and_reschedules_new_steps(data, tmp_path, capsys):
    """--resume with settings that change the computation (row length, warmup) raises, naming
    each; more --steps continue on the schedule of the new step count."""
    run = tmp_path / "run"
    _train(train_args(data, run, steps=4))
    with pytest.raises(FastWeightsError, match=r"these differ: seq_len 48 \(now 32\); warmup 2 \(now 3\); pass"):
        _train([*train_args(data, run, steps=4, seq_len=32, warmup=3), "--resume"])
    capsys.readouterr()
    _train([*train_args(data, run, steps=8, keep=1), "--resume"])
    assert "with --steps 8 (was 4)" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(lrs) == list(range(1, 9))
    for s in range(5, 9):  # step s runs at the rate the scheduler set after step s - 1
        assert lrs[s] == pytest.approx(3e-3 * warmup_cosine(s - 1, 2, 8, 0.1), rel=1e-12), s
    assert json.loads((run / "train_config.json").read_text())["steps"] == 8


def test_a_resume_cut_short_keeps_the_new_schedule(data, tmp_path, monkeypatch):
    """A resume with more --steps that fails before its first checkpoint, resumed again, trains
    exactly as one resume does (before: the second resume ran at the old schedule's last rate)."""
    from fastweights.train import trainer

    _train(train_args(data, tmp_path / "once", steps=4))
    shutil.copytree(tmp_path / "once", tmp_path / "twice")
    _train([*train_args(data, tmp_path / "once", steps=8, save_every=1), "--resume"])
    real = trainer.save_checkpoint

    def fail(*args, **kwargs):
        raise FastWeightsError("disk full")

    monkeypatch.setattr(trainer, "save_checkpoint", fail)
    with pytest.raises(FastWeightsError, match="disk full"):
        _train([*train_args(data, tmp_path / "twice", steps=8, save_every=1), "--resume"])
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    _train([*train_args(data, tmp_path / "twice", steps=8, save_every=1), "--resume"])
    a, b = (list(map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())) for r in ("once", "twice"))
    assert [(r["step"], r["loss"], r["lr"]) for r in a] == [(r["step"], r["loss"], r["lr"]) for r in b]
    assert len(a) == 8


def test_resume_checks_the_dataset_and_the_steps_done(data, tmp_path):
    """The dataset is known by its key: a moved copy resumes, another dataset at the run's path
    does not; --steps below the steps done is refused."""
    shutil.copytree(data, tmp_path / "d")
    run = tmp_path / "run"
    _train(train_args(tmp_path / "d", run, steps=4))
    shutil.move(tmp_path / "d", tmp_path / "moved")
    _train([*train_args(tmp_path / "moved", run, steps=6), "--resume"])
    other = prepare(parse(PrepareConfig, prepare_args(write_corpus(tmp_path / "c2", seed=1), tmp_path / "d"), "t", ""))
    with pytest.raises(FastWeightsError, match=r"these differ: the dataset at --data .*d' \(key .*, the run's: "):
        _train([*train_args(other.path, run, steps=8), "--resume"])
    with pytest.raises(FastWeightsError, match=r"step-00000006 is at step 6: --resume needs --steps >= 6, got 5"):
        _train([*train_args(tmp_path / "moved", run, steps=5), "--resume"])


def test_broken_run_files_are_named(data, tmp_path, capsys):
    """An unfinished last metrics line is dropped; a broken checkpoint names itself and the one
    before it; a failed checkpoint write names its directory and is cleaned up by the next save."""
    from fastweights.train import checkpoint

    run = tmp_path / "run"
    _train(train_args(data, run, steps=4))
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "loss": 3.9')
    with pytest.warns(FastWeightsWarning, match="dropped the unfinished last line"):
        _train([*train_args(data, run, steps=6), "--resume"])
    assert sorted(_losses(run)) == list(range(1, 7))
    model_file = run / "checkpoints" / "step-00000006" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(FastWeightsError, match=r"cannot resume from .*step-00000006: .*; move it out of "
                                               r".*checkpoints to resume from step-00000004"):
        _train([*train_args(data, run, steps=8), "--resume"])
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    real = checkpoint.save_model

    def fail(*args, **kwargs):
        raise OSError(27, "File too large")

    checkpoint.save_model = fail
    try:
        with pytest.raises(FastWeightsError, match=r"could not write checkpoint .*step-00000006.tmp: .*File too large"):
            _train([*train_args(data, run, steps=6), "--resume"])
    finally:
        checkpoint.save_model = real
    assert (run / "checkpoints" / "step-00000006.tmp").exists()
    _train([*train_args(data, run, steps=6), "--resume"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004",
                                                                       "step-00000006"]


def test_rows_longer_than_the_models_positions_warn(data, tmp_path):
    """A local model trained on rows longer than its max_position_embeddings says so (a warning a
    program can filter: the library's own category)."""
    model = build_model("tiny", 300, max_position_embeddings=32)
    model.save_pretrained(tmp_path / "short")
    with pytest.warns(FastWeightsWarning, match="--seq-len 48 exceeds the model's max_position_embeddings 32"):
        _train(train_args(data, tmp_path / "run", steps=1, model=tmp_path / "short"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _train(train_args(data, tmp_path / "run2", steps=1, model=tmp_path / "short", seq_len=32))
    assert not [w for w in seen if "exceeds" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FastWeightsWarning)  # quiets them all
        _train(train_args(data, tmp_path / "run3", steps=1, model=tmp_path / "short"))


def test_a_converted_model_keeps_its_settings_and_says_which_flags_it_ignores(data, tmp_path):
    """--ttt-* flags and --no-ttt cannot change a model that is converted already: each is named."""
    model = convert(build_model("tiny", 300), layers=[1], chunk_size=24, lr=0.5)
    model.save_pretrained(tmp_path / "ttt")
    with pytest.warns(FastWeightsWarning) as seen:
        _train(train_args(data, tmp_path / "run", steps=1, model=tmp_path / "ttt", ttt_chunk=16, ttt_lr=0.25))
    err = " ".join(str(w.message) for w in seen)
    assert "is already converted to In-Place TTT (layers [1], chunk 24, lr 0.5)" in err
    assert "ignored: --ttt-chunk, --ttt-lr" in err
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (saved["ttt_layers"], saved["ttt_chunk"], saved["ttt_lr"]) == ([1], 24, 0.5)
    with pytest.warns(FastWeightsWarning, match="--no-ttt: "):
        _train([*train_args(data, tmp_path / "run2", steps=1, model=tmp_path / "ttt"), "--no-ttt"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _train(train_args(data, tmp_path / "run3", steps=1, model=tmp_path / "ttt"))
    assert not [w for w in seen if "already converted" in str(w.message)]


def test_resume_checks_the_model_by_its_config_and_keeps_the_runs_record(data, tmp_path, capsys):
    """--model DIR was compared as a path string (an edited config.json resumed silently; ./m/ for m
    was refused); a missing train_config.json skipped every check, a failed resume rewrote it; a
    renamed broken checkpoint still counted as the newest; --no-ttt on a hybrid was ignored silently."""
    from fastweights.models.hybrid import HybridConfig, HybridForCausalLM

    build_model("tiny", 300).save_pretrained(tmp_path / "m")
    run = tmp_path / "run"
    _train(train_args(data, run, steps=2, save_every=1, model=tmp_path / "m"))
    _train([*train_args(data, run, steps=3, save_every=1, model=f"{tmp_path / 'm'}/"), "--resume"])  # same dir
    record = (run / "train_config.json").read_text()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(FastWeightsError, match=r"these differ: the model --model .*m' \(config "):
        _train([*train_args(data, run, steps=4, model=tmp_path / "m"), "--resume"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastWeightsError, match=r"these differ: warmup 2 \(now 3\)"):
        _train([*train_args(data, run, steps=4, model=tmp_path / "m"), "--resume", "--warmup", "3"])
    assert (run / "train_config.json").read_text() == record  # the failed resume left it alone
    ckpts = run / "checkpoints"
    broken = ckpts / "step-00000003" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:1000])
    (ckpts / "step-00000003").rename(ckpts / "step-00000003.broken")  # as the error message suggests
    _train([*train_args(data, run, steps=4, model=tmp_path / "m"), "--resume"])  # from step 2, not ".broken"
    assert json.loads((ckpts / "step-00000004" / "state.json").read_text())["step"] == 4
    (run / "train_config.json").unlink()
    with pytest.raises(FastWeightsError, match=r"has checkpoints but no train_config.json"):
        _train([*train_args(data, run, steps=5, model=tmp_path / "m"), "--resume"])
    HybridForCausalLM(HybridConfig(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, mixers="swa", mlps="inplace_ttt",
                                   sliding_window=8, ttt_chunk=8)).save_pretrained(tmp_path / "h")
    with pytest.warns(FastWeightsWarning, match="ignored: --no-ttt"):
        _train([*train_args(data, tmp_path / "hrun", steps=1, model=tmp_path / "h"), "--no-ttt"])


def test_a_model_setting_that_fails_leaves_no_run_directory(data, tmp_path):
    with pytest.raises(ValueError, match="layer index 99 is out of range"):
        _train(train_args(data, tmp_path / "bad", steps=1, ttt_layers=99))
    for kw, match in ((dict(optimizer="lookahead_adamw", lookahead_k=0), "lookahead_k must be >= 1, got 0"),
                      (dict(forgetting="active", forgetting_every=0), "forgetting_every must be >= 1, got 0"),
                      (dict(ttt_lr="nan"), "ttt_lr must be >= 0, got nan"),
                      (dict(optimizer="lookahead_adamw", lookahead_alpha=2), "alpha")):
        with pytest.raises((FastWeightsError, ValueError), match=match):
            _train(train_args(data, tmp_path / "bad", steps=1, **kw))
    assert not (tmp_path / "bad").exists()


def test_checkpoints_are_safetensors_and_json_and_pruned(data, tmp_path):
    run = tmp_path / "run"
    _train(train_args(data, run, steps=6, save_every=2, keep=2))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    files = sorted(p.name for p in (run / "checkpoints" / ckpts[-1]).iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((run / "checkpoints" / ckpts[-1] / "state.json").read_text())
    assert state["step"] == 6 and state["rows"] == 6 * 2
    assert (run / "model" / "config.json").exists() and (run / "model" / "tokenizer.json").exists()
    with pytest.raises(FastWeightsError, match="already has checkpoints"):
        _train(train_args(data, run, steps=8))


def test_non_finite_loss_stops_naming_the_step(data, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "nan"
    _train(train_args(data, run, steps=2, save_every=1))
    ckpt = run / "checkpoints" / "step-00000002" / "model.safetensors"
    weights = load_file(ckpt)
    name = next(n for n in weights if "layers.1.mlp.up_proj" in n)
    weights[name][0, 0] = float("nan")  # the weights after step 2 now make the loss NaN
    save_file(weights, ckpt)
    with pytest.raises(FastWeightsError) as err:
        _train([*train_args(data, run, steps=6, save_every=1), "--resume"])
    assert err.value.args[0] == (  # the weights of step 2 give the NaN: resuming there would stop again
        f"non-finite loss (nan) at step 3; training stopped; the weights of the last checkpoint, "
        f"{run / 'checkpoints' / 'step-00000002'}, gave it, so a resume from there would stop again: move "
        f"step-00000002 out of {run / 'checkpoints'} and --resume from step-00000001, with a smaller --lr or --clip")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_a_resume_may_lower_the_learning_rate_and_the_clip(data, tmp_path, capsys):
    """The usual answer to a loss spike, going on from the last checkpoint with a smaller rate or
    clip, is a resume (it was refused: a new --out could not start from the checkpoint); the
    steps after it run on the new base rate's schedule, and train_config.json records from which
    step. With no step left to train, or from a caller that always resumes (main), it is refused."""
    run = tmp_path / "lower"
    _train(train_args(data, run, steps=4, save_every=2))
    with pytest.raises(FastWeightsError, match=r"--resume with --lr 0.001 \(was 0.003\): .*step-00000004 is at step "
                                               r"4 of --steps 4, so no step would train at it; pass more --steps"):
        _train([*train_args(data, run, steps=4, lr=1e-3), "--resume"])
    with pytest.raises(FastWeightsError, match=r"these differ: lr 0.003 \(now 0.001\)"):
        train(parse(TrainConfig, train_args(data, run, steps=6, lr=1e-3) + ["--resume"], "t", ""),
              resumer="fastweights main")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    capsys.readouterr()
    _train([*train_args(data, run, steps=4, lr=1e-3, clip=0.5), "--resume"])
    assert "with --clip 0.5 (was 1.0), --lr 0.001 (was 0.003)" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for s in (3, 4):
        assert lrs[s] == pytest.approx(1e-3 * warmup_cosine(s - 1, 2, 4, 0.1), rel=1e-12), s
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["lr"], saved["clip"]) == (1e-3, 0.5)
    first = {"step": 0, "lr": 3e-3, "clip": 1.0}
    assert saved["rate_changes"] == [first, {"step": 2, "lr": 1e-3, "clip": 0.5}]
    _train([*train_args(data, run, steps=6, lr=1e-3, clip=0.5, keep=0), "--resume"])  # history kept
    assert json.loads((run / "train_config.json").read_text())["rate_changes"] == saved["rate_changes"]
    for name in ("step-00000006", "step-00000004"):  # back to step 2, as a stop message may say
        shutil.rmtree(run / "checkpoints" / name)
    capsys.readouterr()
    _train([*train_args(data, run, steps=6, lr=2e-3, clip=0.5, keep=0), "--resume"])
    assert "with --clip 0.5 (was 1.0), --lr 0.002 (was 0.003)" in capsys.readouterr().err  # against step 2's own
    assert json.loads((run / "train_config.json").read_text())["rate_changes"] == [first, {"step": 2, "lr": 2e-3,
                                                                                            "clip": 0.5}]
    for name in ("step-00000006", "step-00000004"):
        shutil.rmtree(run / "checkpoints" / name)
    _train([*train_args(data, run, steps=6, keep=0), "--resume"])  # the run's own rates again: no change left
    assert "rate_changes" not in json.loads((run / "train_config.json").read_text())


def test_a_run_on_a_dataset_encoded_anew_cannot_resume_and_says_why(data, tmp_path):
    """After prepare rebuilt a dataset with the new encoding (its key differs only in "-e<N>"), a
    resume said the dataset differed, printing two identical 12-character keys."""
    run = tmp_path / "enc"
    _train(train_args(data, run, steps=2))
    cfg = json.loads((run / "train_config.json").read_text())
    old = cfg["dataset_key"].rsplit("-e", 1)[0] + "-e2"
    (run / "train_config.json").write_text(json.dumps({**cfg, "dataset_key": old}))
    with pytest.raises(FastWeightsError, match=rf"as it was encoded before \(key {old}\); `prepare` has since rebuilt "
                                               rf"it .*key {cfg['dataset_key']}.*train into a new --out"):
        _train([*train_args(data, run, steps=4), "--resume"])


def test_a_resume_without_lr_or_clip_keeps_the_runs_own(data, tmp_path, capsys):
    """A resume command that left out --lr took the default 3e-3 as a change of rate (the README's
    run at 1e-5 would have gone on at 300 times its rate, with one line on stderr); left out, the
    rate and the clip are those the run's last steps ran at, also after an earlier change."""
    run = tmp_path / "keep"
    _train(train_args(data, run, steps=4, save_every=2, lr=1e-3, clip=0.5))
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    capsys.readouterr()
    _train([*train_args(data, run, steps=4), "--resume"])
    assert "resuming" not in capsys.readouterr().err
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["lr"], saved["clip"]) == (1e-3, 0.5) and "rate_changes" not in saved
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for s in (3, 4):
        assert lrs[s] == pytest.approx(1e-3 * warmup_cosine(s - 1, 2, 4, 0.1), rel=1e-12), s
    _train([*train_args(data, run, steps=6, lr=5e-4), "--resume"])  # a change, then a resume without --lr
    _train([*train_args(data, run, steps=8), "--resume"])
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["lr"] == 5e-4 and saved["rate_changes"][-1] == {"step": 4, "lr": 5e-4, "clip": 0.5}
    fresh = tmp_path / "fresh"  # a new run without them: the defaults
    _train(train_args(data, fresh, steps=2))
    assert (json.loads((fresh / "train_config.json").read_text())["lr"],
            json.loads((fresh / "train_config.json").read_text())["clip"]) == (3e-3, 1.0)


def test_a_damaged_state_json_names_the_checkpoint_before_it(data, tmp_path):
    """Like the other files of the newest checkpoint, a truncated state.json, or one without its
    counts (a raw KeyError/TypeError before), names the one to go back to."""
    run = tmp_path / "state"
    _train(train_args(data, run, steps=4, save_every=2))
    state = run / "checkpoints" / "step-00000004" / "state.json"
    good = state.read_text()
    for text, why in ((good[:10], "JSONDecodeError: .*"), (json.dumps({**json.loads(good), "step": None}),
                                                           "ValueError: its step is None, not a count"),
                      (json.dumps({k: v for k, v in json.loads(good).items() if k != "rows"}),
                       "ValueError: its rows is None, not a count"),
                      ("[]", "ValueError: it holds a list, not the trainer's record")):
        state.write_text(text)
        with pytest.raises(FastWeightsError, match=rf"cannot resume from .*step-00000004: {why}; move it out of "
                                                   r".*checkpoints to resume from step-00000002$"):
            _train([*train_args(data, run, steps=4), "--resume"])


def test_a_second_process_cannot_train_into_the_same_out(data, tmp_path, monkeypatch):
    """A requeued job started beside a running one raced for its checkpoints; the running one holds
    out/.lock (a lock of another process, as filelock's are per file handle), and it is let go."""
    from filelock import FileLock, Timeout

    run = tmp_path / "busy"
    run.mkdir()
    with FileLock(run / ".lock"):
        with pytest.raises(FastWeightsError, match=f"{run} is in use by another training process"):
            _train(train_args(data, run, steps=2))
    _train(train_args(data, run, steps=2))
    with FileLock(run / ".lock", timeout=0):  # free again after the run
        pass
    import fastweights.train.trainer as trainer

    held, real = [], trainer.save_checkpoint

    def save(out, *a, **k):  # a new --out is locked from when it is made: try it while the run saves
        try:
            with FileLock(Path(out) / ".lock", timeout=0):
                held.append(False)
        except Timeout:
            held.append(True)
        return real(out, *a, **k)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    _train(train_args(data, tmp_path / "fresh", steps=2))
    assert held == [True]


def test_tensorboard_drops_the_events_after_the_step_resumed_at(data, tmp_path, monkeypatch):
    """A crashed run's events past its last checkpoint were logged again on resume (steps twice in
    TensorBoard); the writer now purges from the first step it will log."""
    import types

    made = []

    class Writer:
        def __init__(self, logdir, **kw):
            made.append(kw)

        def add_scalar(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run = tmp_path / "tb"
    _train(train_args(data, run, steps=4, save_every=2))
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    _train([*train_args(data, run, steps=4), "--resume"])
    assert made == [{"purge_step": 1}, {"purge_step": 3}]


def test_a_caller_that_keeps_the_settings_is_told_to_start_anew(data, tmp_path):
    """fastweights main and the experiments cannot resume with a smaller rate (they keep a run's
    settings) and have no --resume or --clip: their messages say to remove the run or use
    another --out."""
    run = tmp_path / "m"
    with pytest.raises(FastWeightsError, match=rf"training stopped; fastweights main keeps a run's settings, so "
                                               rf"remove {re.escape(str(run))} \(or choose another --out\) and run it "
                                               r"again with a smaller --lr$"):
        train(parse(TrainConfig, train_args(data, run, steps=20, save_every=1, lr=1e30, warmup=1, clip=0),
                    "t", ""), resumer="fastweights main")
    with pytest.raises(FastWeightsError, match=r"already has checkpoints \(step-\d+\): remove it or choose another "
                                               r"--out$"):
        train(parse(TrainConfig, train_args(data, run, steps=20), "t", ""), resumer="fastweights experiment lookahead")


def test_a_damaged_run_record_is_named(data, tmp_path):
    """train_config.json (the run's settings and rate history) of another shape raised raw
    TypeErrors/KeyErrors on --resume; a history that does not start at step 0 was misread."""
    run = tmp_path / "rec"
    _train(train_args(data, run, steps=2, save_every=2))
    path = run / "train_config.json"
    good = json.loads(path.read_text())
    entry = {"step": 0, "lr": 3e-3, "clip": 1.0}
    for bad in ([], {**good, "rate_changes": None}, {**good, "rate_changes": [1, 2]},
                {**good, "rate_changes": [{"step": 1, "lr": 1e-3, "clip": 1.0}, {"step": 2, "lr": 1e-3, "clip": 1.0}]},
                {**good, "rate_changes": [entry, {"lr": 1e-3, "clip": 1.0}]}, {**good, "lr": "x"},
                {k: v for k, v in good.items() if k != "clip"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(FastWeightsError, match=rf"{re.escape(str(path))} is damaged \(.*\): --resume cannot "
                                                   r"check the run's settings; restore the file, or train into a new"):
            _train([*train_args(data, run, steps=4, save_every=2), "--resume"])


def test_non_finite_gradient_stops_naming_the_step(data, tmp_path):
    run = tmp_path / "inf"
    with pytest.raises(FastWeightsError, match=r"non-finite .* at step (\d+)") as err:
        _train(train_args(data, run, steps=20, save_every=1, lr=1e30, warmup=1, clip=0))
    step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert step >= 2
    msg = err.value.args[0]
    assert f"the weights of the last checkpoint, {run / 'checkpoints' / f'step-{step - 1:08d}'}, gave it" in msg
    assert (f"--resume from step-{step - 2:08d}" if step > 2 else "no checkpoint comes before it") in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{step - 1:08d}"
    assert not (run / "model").exists()


def test_entry_points_leave_the_callers_generators_and_threads_alone(data, tmp_path):
    """train/evaluate/generate seeded the global Python, NumPy and torch generators and set torch's
    threads for good: a random search in the calling program drew the same rate after each run."""
    import random

    import numpy as np

    from fastweights.commands.eval import EvalConfig, evaluate
    from fastweights.commands.generate import GenerateConfig, generate

    run = tmp_path / "calls"
    calls = [lambda: train(parse(TrainConfig, train_args(data, run, steps=2, seed=5), "t", "")),
             lambda: evaluate(parse(EvalConfig, [
                 "--model", str(run / "model"), "--data", str(data), "--out", str(tmp_path / "ev"), "--seq-len", "32",
                 "--ppl-rows", "2", "--length", "32", "--max-docs", "2", "--passkey-lengths", "128",
                 "--passkey-trials", "1", "--no-progress", "--threads", "1"], "t", "")),
             lambda: generate(parse(GenerateConfig, ["--model", str(run / "model"), "--prompt", "def f",
                                                     "--max-new-tokens", "3", "--seed", "7", "--no-progress",
                                                     "--temperature", "1"], "t", ""))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for call in calls:
            random.seed(1), np.random.seed(2), torch.manual_seed(3)
            expected = (random.random(), np.random.rand(), torch.rand(2))
            random.seed(1), np.random.seed(2), torch.manual_seed(3)
            call()
            drawn = (random.random(), np.random.rand(), torch.rand(2))
            assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_callers_thread_pool_is_set_again_only_when_changed(monkeypatch):
    """Setting even the same thread count reconfigures torch's pool, and a set pool sums in another
    order than the default one (the default job's In-Place TTT perplexity moved 409.93 -> 398.67
    when train() set the unchanged count back)."""
    from fastweights._globals import caller_globals

    calls, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    n = torch.get_num_threads()
    with caller_globals():
        pass
    assert calls == []
    try:
        with caller_globals():
            real(1 if n != 1 else 2)
        assert calls == [n] and torch.get_num_threads() == n
    finally:
        real(n)


def test_train_only_fast_weights(data, tmp_path):
    run = tmp_path / "fast"
    _train(train_args(data, run, steps=3, trainable="fast", lr=1e-2, ttt_chunk=16))
    from fastweights.models.presets import load_model

    trained = load_model(run / "model")
    init = build_model("tiny", trained.config.vocab_size, max_position_embeddings=4096, seed=0)
    convert(init, layers=[0, 2], chunk_size=16, lr=3.0, target="embed")
    a, b = dict(trained.named_parameters()), dict(init.named_parameters())
    fast = {n for n, _ in ttt_parameters(trained)}
    assert fast
    for n, p in a.items():
        if n in fast and "ttt_conv" in n:
            assert not torch.equal(p, b[n]), n
        elif n not in fast:
            assert torch.equal(p, b[n]), n


def test_activation_checkpointing_gives_the_same_training(data, tmp_path):
    """--activation-checkpointing recomputes the layers in backward: same losses (CPU, exact)."""
    _train(train_args(data, tmp_path / "plain", steps=3))
    _train([*train_args(data, tmp_path / "ckpt", steps=3), "--activation-checkpointing"])
    plain, ckpt = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert len(plain) == 3 and ckpt == pytest.approx(plain, rel=1e-6)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer,forgetting", [("lookahead_adamw", "active"), ("slrla_adamw", "temporary")])
def test_lookahead_and_forgetting_from_the_config_resume_exactly(data, tmp_path, optimizer, forgetting):
    """Optimisers and forgetting chosen by config; a resumed run equals an uninterrupted one."""
    extra = dict(optimizer=optimizer, lookahead_k=3, forgetting=forgetting, forgetting_every=2)
    if forgetting == "temporary":
        extra["forgetting_until"] = 4
    args = train_args(data, tmp_path / "run", steps=7, save_every=5, **extra)
    _train(args)
    full = _losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000007")  # as if killed after step 5's checkpoint
    _train([*args, "--resume"])
    resumed = _losses(tmp_path / "run")
    assert sorted(full) == sorted(resumed) == list(range(1, 8))
    assert full == resumed
    plain = _train(train_args(data, tmp_path / "plain", steps=7, save_every=7))
    assert plain["loss"] != full[7]  # the choices change the run


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the model directory ``path`` (tied weights under both names)."""
    from fastweights.models.presets import load_model

    return load_model(path).state_dict()


def test_no_forgetting_reset_follows_the_last_step_and_a_longer_resume_makes_it(data, tmp_path):
    """A reset due at the run's last step re-drew the exported model's embeddings (with tied
    embeddings, its output layer too): a model at chance, with nothing said. It is now left out,
    and a --resume with more --steps makes it first, so the longer run equals an uninterrupted one."""
    forget = dict(forgetting="active", forgetting_every=4, min_lr_ratio=1.0)  # a rate that --steps leaves alone
    _train(train_args(data, tmp_path / "f", steps=4, save_every=4, **forget))
    _train(train_args(data, tmp_path / "none", steps=4, save_every=4, min_lr_ratio=1.0))
    got, plain = _weights(tmp_path / "f" / "model"), _weights(tmp_path / "none" / "model")
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in got)
    _train([*train_args(data, tmp_path / "f", steps=8, save_every=4, **forget), "--resume"])
    _train(train_args(data, tmp_path / "full", steps=8, save_every=4, **forget))
    assert _losses(tmp_path / "f") == _losses(tmp_path / "full")
    a, b = _weights(tmp_path / "f" / "model"), _weights(tmp_path / "full" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], got["model.embed_tokens.weight"])


def test_a_lookahead_checkpoint_holds_the_slow_weights_as_the_export_does(data, tmp_path):
    """`eval --model <checkpoint>` scored the fast weights θ of a Lookahead run, its export the
    slow weights φ: two models for one step. The checkpoint now holds φ (θ is in the optimizer
    file, and a resume in the middle of a k-cycle stays exact: the test above)."""
    _train(train_args(data, tmp_path / "la", steps=4, save_every=4, optimizer="lookahead_adamw", lookahead_k=3))
    ckpt, export = _weights(tmp_path / "la" / "checkpoints" / "step-00000004"), _weights(tmp_path / "la" / "model")
    assert ckpt.keys() == export.keys() and all(torch.equal(ckpt[k], export[k]) for k in ckpt)


def test_eval_every_logs_the_validation_loss_and_leaves_training_alone(data, tmp_path):
    """--eval-every K adds val_loss/val_ppl to the metrics of every K-th step and the last: the
    loss of the model at that step on the validation split's first --eval-rows rows (here
    against the exported model scored by fastweights.eval); the training itself is unchanged."""
    from fastweights.data import Dataset
    from fastweights.eval import perplexity
    from fastweights.models.presets import load_model

    _train(train_args(data, tmp_path / "plain", steps=5))
    _train(train_args(data, tmp_path / "ev", steps=5, eval_every=2, eval_rows=3))
    recs = [json.loads(line) for line in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4, 5]
    assert _losses(tmp_path / "ev") == _losses(tmp_path / "plain")
    ref = perplexity(load_model(tmp_path / "ev" / "model"), Dataset(data).split("val"), 48, batch_size=2, max_rows=3,
                     progress=False)
    assert recs[-1]["val_loss"] == pytest.approx(ref["loss"], rel=1e-6) and recs[-1]["val_tokens"] == ref["tokens"]
    assert recs[-1]["val_ppl"] == pytest.approx(ref["perplexity"], rel=1e-6)
    for flag, value, match in (("eval_every", -1, "eval_every must be >= 0"), ("eval_rows", 0, "eval_rows must be")):
        with pytest.raises(FastWeightsError, match=match):
            _train(train_args(data, tmp_path / "bad", **{flag: value}))


def test_bad_optimizer_and_forgetting_are_rejected(data, tmp_path):
    with pytest.raises(FastWeightsError, match="optimizer must be one of adamw, sgd"):
        _train(train_args(data, tmp_path / "a", optimizer="adam"))
    with pytest.raises(FastWeightsError, match="temporary forgetting needs --forgetting-until"):
        _train(train_args(data, tmp_path / "b", forgetting="temporary"))


def test_train_with_a_fast_weight_layer(data, tmp_path):
    """``--fwl`` trains the preset with an FWL head; its inner loss scale defaults to the
    reference code's batch mean, 1/(batch_size·accum·seq_len), and survives save/load; a resumed
    run keeps the scale its checkpoint was trained with (runs with --accum > 1 from before the
    default counted the step's tokens had 1/(batch_size·seq_len))."""
    from fastweights.models import fwl_layer
    from fastweights.models.presets import load_model

    run = tmp_path / "fwl"
    args = train_args(data, run, steps=2, lr=1e-2) + ["--no-ttt", "--fwl"]
    _train(args)
    fw = fwl_layer(load_model(run / "model"))
    assert fw.grad_scale == 1.0 / (2 * 48)
    accum = tmp_path / "accum"
    _train(train_args(data, accum, steps=4, save_every=2, accum=3) + ["--no-ttt", "--fwl"])
    assert fwl_layer(load_model(accum / "model")).grad_scale == 1.0 / (2 * 3 * 48)
    shutil.rmtree(accum / "checkpoints" / "step-00000004")
    config = accum / "checkpoints" / "step-00000002" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "fwl_grad_scale": 1.0 / (2 * 48)}))
    _train(train_args(data, accum, steps=4, accum=3) + ["--no-ttt", "--fwl", "--resume"])
    assert fwl_layer(load_model(accum / "model")).grad_scale == 1.0 / (2 * 48)
    assert not torch.allclose(fw.step_sizes, torch.full((6,), 0.01))  # the step sizes are trained
    with pytest.raises(FastWeightsError, match="fwl_grad_scale"):
        _train(train_args(data, tmp_path / "bad", steps=1) + ["--no-ttt", "--fwl", "--fwl-grad-scale", "-1"])
    with pytest.raises(FastWeightsError, match="--fwl trains a Fast Weight Layer instead of In-Place TTT"):
        _train(train_args(data, tmp_path / "both", steps=1) + ["--fwl"])


def test_model_flops_per_token_counts_each_matrix_once():
    """MFU's FLOPs: the output head once whether tied or not, and attention over the window for
    SWA layers; the matmul part agrees with torch's FLOP counter (which leaves attention out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastweights.models.hybrid import HybridConfig, HybridForCausalLM
    from fastweights.train.trainer import model_flops_per_token

    T = 64

    def counted(model):
        with FlopCounterMode(display=False) as fc:
            model(torch.randint(0, 97, (1, T)), use_cache=False).logits.sum().backward()
        return fc.get_total_flops() / T

    kw = dict(num_hidden_layers=2, hidden_size=48, intermediate_size=80, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=97)
    for tied in (False, True):
        for mixers, window in (("attention", None), ("swa", 16)):
            torch.manual_seed(0)
            model = HybridForCausalLM(HybridConfig(**kw, mixers=mixers, sliding_window=window or 2048,
                                                   tie_word_embeddings=tied))
            attention = 2 * 12 * 4 * 16 * (window or T)  # layers x 12 x heads' width x keys
            dense = model_flops_per_token(model, T) - attention
            assert abs(dense - counted(model)) <= 0.01 * dense, (tied, mixers, dense, counted(model))


def test_rows_within_one_fast_weight_chunk_warn():
    """A row no longer than a chunk never reads a fast-weight update: the trainer says so."""
    from fastweights.models.hybrid import HybridConfig, HybridForCausalLM
    from fastweights.train.trainer import _warn_short_rows

    model = HybridForCausalLM(HybridConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=4, vocab_size=97,
                                           mixers=["lact", "swa"], mlps=["swiglu", "inplace_ttt"],
                                           lact_chunk_size=64, ttt_chunk=32, sliding_window=64))
    def said(n):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _warn_short_rows(model, n)
        return " ".join(str(w.message) for w in seen if w.category is FastWeightsWarning)

    err = said(64)
    assert "--seq-len 64 fits in one fast-weight chunk (InPlaceTTTMLP chunk 32" not in err
    assert "(LaCTLayer chunk 64)" in err and "do nothing" in err
    assert said(65) == ""
    assert "InPlaceTTTMLP chunk 32, LaCTLayer chunk 64" in said(32)


def test_two_identical_runs_write_identical_checkpoints(data, tmp_path):
    """Every file of the last checkpoint, RNG states included, is the same bytes in two runs."""
    import random

    import numpy as np

    for name, other in (("a", 1), ("b", 2)):  # whatever state the global generators are in
        random.seed(other)
        np.random.seed(other)
        _train(train_args(data, tmp_path / name, steps=2))
    last = Path("checkpoints") / "step-00000002"
    for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (tmp_path / "a" / last / f).read_bytes() == (tmp_path / "b" / last / f).read_bytes(), f


def test_causal_lm_loss_keeps_float64_and_scores_half_precision_in_float32():
    from fastweights.train import causal_lm_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 2] = -100
    keep = targets != -100
    exact = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    loss = causal_lm_loss(logits, targets)
    assert loss.dtype == torch.float64 and abs(loss.item() - exact[keep].mean().item()) < 1e-14
    per_token = causal_lm_loss(logits, targets, reduction="none")
    assert torch.allclose(per_token, torch.where(keep, exact, 0), rtol=0, atol=1e-14)
    half = causal_lm_loss(logits.to(torch.bfloat16), targets)
    assert half.dtype == torch.float32
    assert torch.equal(half, causal_lm_loss(logits.to(torch.bfloat16).float(), targets))


@pytest.mark.parametrize("fwl", [False, True])
def test_gradient_accumulation_takes_the_token_mean_of_the_whole_step(tmp_path, monkeypatch, fwl):
    """--batch-size 2 --accum 2 reads the rows of --batch-size 4 --accum 1 and must give the same
    step: the mean over all the step's targets, also when its micro-batches hold different
    numbers of ignored (-100) targets (before, the micro-batches' means were averaged). With an
    FWL head too: its default inner loss scale was per micro-batch, so --accum changed the model."""
    from fastweights.data.packing import PackedRows
    from fastweights.data.store import Dataset

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", docs=60, max_words=40)  # documents shorter than a few rows
    data = prepare(parse(PrepareConfig, prepare_args(corpus, tmp_path / "data"), "t", "")).path
    split = Dataset(data).split("train")
    for seed in range(200):
        rows = PackedRows(split, 48, seed=seed)
        ignored = [int((rows.batch(s, 2)["targets"] == -100).sum()) for s in (0, 2, 4, 6)]
        if ignored[0] != ignored[1] and ignored[2] != ignored[3]:
            break
    else:
        pytest.fail("no seed gives micro-batches with different numbers of ignored targets")
    flags = ["--no-ttt", "--fwl", "--clip", "0"] if fwl else []
    one = _train(train_args(data, tmp_path / "one", steps=2, seed=seed, batch_size=4, accum=1) + flags)
    two = _train(train_args(data, tmp_path / "two", steps=2, seed=seed, batch_size=2, accum=2) + flags)
    a, b = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("one", "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):  # step 2's loss also checks step 1's update
        for key in ("loss", "grad_norm"):
            assert abs(ra[key] - rb[key]) < 2e-6 * abs(ra[key]), (key, ra, rb)
    assert one["loss"] == a[-1]["loss"] and two["loss"] == b[-1]["loss"]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
                                       ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
                                       ("NVIDIA GeForce RTX 4090", 165e12)])
def test_peak_flops_by_whole_gpu_names(name, peak):
    """Substrings matched "L40S" as an L40, "A10G" as an A10 and an H100 PCIe as the SXM part."""
    from fastweights.train.trainer import peak_flops_of

    assert peak_flops_of(name) == peak


def test_the_training_bar_updates_sparingly_in_a_log_file(data, tmp_path, capsys):
    """With stderr redirected, the bar's loss/tokens postfix forced a redraw every step (42 lines
    for 40 steps), past the 30 s interval that the other bars keep there."""
    run = tmp_path / "bar"
    _train([a for a in train_args(data, run, steps=8, save_every=8) if a != "--no-progress"])
    err = capsys.readouterr().err
    assert 1 <= err.count(f"train {run.name}") <= 3, err
