"""`make demo`, shortened to a few steps: each step line prints once, the answers are shown, a checkpoint lands in
the output directory (a rerun resumes from it: tests/test_cli.py), and the last line reads `accuracy: X% (chance: Y%)`."""
import os
import re

from m1jax import demo


def test_demo_prints_each_step_once_and_ends_with_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "OUT", str(tmp_path / "demo"))
    monkeypatch.setattr(demo, "STEPS", 4)
    monkeypatch.setattr(demo, "LOG_EVERY", 2)
    assert demo.main() == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().split("\n")
    step_lines = [line.split()[1] for line in lines if line.startswith("step ")]
    assert step_lines == ["2", "4"], lines  # once each, never again after training
    assert "step " not in captured.err
    assert re.fullmatch(r"accuracy: \d{1,3}\.\d% \(chance: 6\.25%\)", lines[-1]), lines[-1]
    assert sum(line.startswith("stored ") for line in lines) == 4
    assert "4" in os.listdir(tmp_path / "demo" / "checkpoints")
