"""The `m1jax` command line as a new user meets it: help with defaults, presets and tasks; every number checked with
its range; checkpoints by default so train -> resume -> generate -> convert chain; one-line errors; progress."""
import io
import json
import os

import pytest

from m1jax.cli import main, parse_args
from m1jax.config import PRESETS
from m1jax.progress import ProgressBar, progress_bar, status
from m1jax.tasks import TASKS


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["train", "plan", "params", "generate", "convert", "rl"])
def test_help_lists_defaults_presets_and_tasks(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS) and all(name in text for name in TASKS)
    expected = {"train": "(default: 100)", "plan": "(default: 8192)", "params": "(default: minimax-m1-80k)",
                "generate": "(default: 64)", "convert": "(default: 5.0)", "rl": "(default: cispo)"}[command]
    assert expected in " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return str(path)


def test_bad_numbers_name_the_flag_and_range(capsys, tmp_path, a_file):
    out = str(tmp_path / "run")
    train = ["train", "--out", out]
    cases = [
        (train + ["--checkpoint-every", "-1"], "argument --checkpoint-every: expected an integer >= 0, got -1"),
        (train + ["--keep", "0"], "argument --keep: expected an integer >= 1, got 0"),
        (train + ["--steps", "0"], "argument --steps: expected an integer >= 1"),
        (train + ["--batch-size", "-3"], "argument --batch-size: expected an integer >= 1"),
        (train + ["--lr", "0"], "argument --lr: expected a number > 0"),
        (train + ["--lr", "nan"], "argument --lr: expected a finite number"),
        (train + ["--warmup", "2.5"], "argument --warmup: expected an integer >= 0, got '2.5'"),
        (train + ["--seq-len", "70000"], "--seq-len 70000 exceeds the model's limit of 65536"),
        (train + ["--batch-size", "6", "--microbatches", "4"], "--batch-size 6 does not split into --microbatches 4"),
        (train + ["--mesh", "data=2,gpu=4"], "argument --mesh: part 'gpu=4'"),
        (train + ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["train", "--out", a_file], f"--out {a_file!r} is a file"),
        (["plan", "--preset", "tiny", "--seq-len", "100000"], "--seq-len 100000 exceeds the model's limit"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--top-p", "1.5"], "argument --top-p"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--temperature", "-1"], "argument --temperature"),
        (["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "--checkpoint"),
        (["convert", "--checkpoint", str(tmp_path), "--out", a_file], "--out"),
        (["rl", "--init", str(tmp_path), "--out", out, "--group-size", "1"], "argument --group-size: expected an "
                                                                             "integer >= 2"),
        (["rl", "--init", str(tmp_path), "--out", out, "--digits", "50"], "--digits 50"),
        (["rl", "--init", str(tmp_path), "--out", out, "--prompts-per-step", "3", "--group-size", "3"],
         "--updates-per-batch 4"),
    ]
    for argv, message in cases:
        assert message in _usage_error(capsys, argv), argv


def test_library_edges_refuse_what_the_cli_refuses(tmp_path, a_file):
    from m1jax.train.loop import TrainConfig
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        TrainConfig(out=str(tmp_path), checkpoint_every=-1)
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        TrainConfig(out=str(tmp_path), keep_checkpoints=0)
    with pytest.raises(ValueError, match="is a file"):
        TrainConfig(out=a_file)


def test_run_errors_are_one_line_unless_verbose(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["generate", "--checkpoint", str(empty), "--prompt", "x", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("m1jax generate: error: ")
    assert len(err.strip().splitlines()) == 2 and "--verbose" in err  # the error, then the hint
    assert main(argv + ["--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_run_the_machine_cannot_hold_fails_in_one_line_before_compiling(capsys, tmp_path, monkeypatch):
    # The case: --seq-len 65536 died with a signal (exit 136). Now: exit 2 and a line naming the fix.
    monkeypatch.delenv("M1JAX_VERBOSE", raising=False)
    argv = ["train", "--preset", "tiny", "--seq-len", "65536", "--batch-size", "64", "--steps", "2",
            "--out", str(tmp_path / "big"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "GiB" in err and "lower the batch size or sequence length" in err
    assert not (tmp_path / "big" / "checkpoints").exists()


def test_train_checkpoints_by_default_resumes_and_chains(capsys, tmp_path):
    out = str(tmp_path / "run")
    train = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--out", out]
    assert main(train) == 0
    captured = capsys.readouterr()
    assert "compiling the train step" in captured.err and "resuming" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["resumed_from"] is None
    assert os.listdir(os.path.join(out, "checkpoints")) == ["2"]  # no --checkpoint-every: the final step is saved
    with open(os.path.join(out, "run_config.json")) as f:
        assert json.load(f)["optimizer"]["total_steps"] == 2  # what the schedule really used

    # a rerun resumes (here: nothing left to train), also under another run-time policy: it is not another model
    assert main(train + ["--compute-dtype", "bfloat16", "--remat", "full"]) == 0
    captured = capsys.readouterr()
    assert f"resuming from step 2 of {out}" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["resumed_from"] == 2

    assert main(["generate", "--checkpoint", out, "--prompt", "ab", "--max-new-tokens", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completion_ids"]) <= 2
    hf = str(tmp_path / "hf")
    assert main(["convert", "--checkpoint", out, "--out", hf, "--quiet"]) == 0
    assert "config.json" in os.listdir(hf) and capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_only_on_a_terminal_and_not_when_quiet():
    log = io.StringIO()
    with progress_bar(5, desc="train", stream=log) as bar:  # not a terminal, no plain lines asked
        bar.update(5, loss="1.0")
        bar.write("hidden?")
    assert not bar.drawing and log.getvalue() == "hidden?\n"

    plain = io.StringIO()
    with progress_bar(10, desc="rl", initial=2, plain_every=4, stream=plain) as bar:
        for _ in range(8):
            bar.update(1, acc="0.5")
    assert [line.split(" eta")[0] for line in plain.getvalue().splitlines()] == [
        "rl 4/10 acc 0.5", "rl 8/10 acc 0.5", "rl 10/10 acc 0.5"]

    terminal = _Terminal()
    with ProgressBar(6, desc="generate", unit="tok", initial=1, stream=terminal) as bar:
        bar.update(2)
        assert bar.drawing
    assert "generate" in terminal.getvalue() and "3/6" in terminal.getvalue()
    quiet = _Terminal()
    with ProgressBar(6, desc="generate", quiet=True, stream=quiet) as bar:
        bar.update(6)
        bar.write("x")
    status("resuming", quiet=True, stream=quiet)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="initial"):
        ProgressBar(3, desc="x", initial=4)


def test_rl_announces_resuming_and_draws_its_bar_through_the_trainer_callback(tmp_path, monkeypatch, capsys):
    from m1jax.rl import cli as rl_cli
    from m1jax.rl.trainer import RLResult
    out = tmp_path / "rl"
    (out / "checkpoints" / "2").mkdir(parents=True)
    seen = {}

    def fake_train_rl(cfg, callback=None):  # the trainer's contract: it says where it resumes (unless told to be
        seen["progress"] = cfg.progress  # quiet), then callback(step, record) after each batch
        status(f"resuming from step 2 of {cfg.out}; training on to step {cfg.steps}", quiet=not cfg.progress)
        history = []
        for step in (3, 4):
            history.append({"step": step, "reward_mean": 0.5, "accuracy": 0.25})
            callback(step, history[-1])
        return RLResult(None, None, history, {}, 2)

    monkeypatch.setattr(rl_cli, "train_rl", fake_train_rl)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    argv = ["rl", "--init", str(tmp_path), "--out", str(out), "--steps", "4"]
    assert main(argv) == 0
    drawn = terminal.getvalue()
    assert f"resuming from step 2 of {out}" in drawn and "rl cispo" in drawn and "4/4" in drawn
    assert seen["progress"] is True  # the trainer's notices; its per-step lines give way to the callback's bar
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 2

    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert main(argv + ["--quiet"]) == 0
    assert quiet.getvalue() == "" and seen["progress"] is False


def test_convert_draws_a_bar_over_the_tensors(tmp_path, monkeypatch):
    from m1jax import M1Config, save_pretrained
    from m1jax.checkpoint.names import tensor_maps
    from m1jax.params import draw_params
    config = M1Config.from_preset("tiny")
    save_pretrained(tmp_path / "src", config, draw_params(config, 0))
    seen = []
    save_pretrained(tmp_path / "again", config, draw_params(config, 0), on_tensor=lambda *a: seen.append(a))
    count = len(tensor_maps(config))
    assert [index for _, index, _ in seen] == list(range(1, count + 1)) and {c for *_, c in seen} == {count}
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert f"{count}/{count}" in terminal.getvalue() and "tensor" in terminal.getvalue()
