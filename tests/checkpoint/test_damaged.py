"""Damaged checkpoints: every loader names the step and file in one line, falls back to the newest readable
checkpoint, reads only the parameters for generation, and prints no library traceback."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.checkpoint import CheckpointError
from m1jax.checkpoint.load import load_any
from m1jax.checkpoint.state import TrainCheckpoints, abstract_like, load_training_output
from m1jax.config import M1Config


def _state(rng, scale):
    """The moment is a quarter of w's size: were they equal, the largest data file (the one the tests truncate) would
    be the parameters' or the optimizer's by a few bytes of compression, and loaders that read only the parameters
    would pass over a damaged moment."""
    return {"params": {"w": jnp.asarray(rng.standard_normal((64, 96)) * scale, jnp.float32),
                       "b": jnp.full((7,), scale, jnp.float32)},
            "opt_state": {"mu": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)},
            "step": jnp.asarray(scale, jnp.int32)}


def _biggest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


@pytest.fixture
def run_dir(tmp_path, rng):
    """A training output with checkpoints at steps 1 and 2; step 2's largest data file truncated to 100 bytes."""
    out = tmp_path / "run"
    M1Config.from_preset("tiny").save_hf(out)
    os.replace(out / "config.json", out / "model_config.json")
    checkpoints = TrainCheckpoints(out / "checkpoints", async_save=False)
    states = {step: _state(rng, float(step)) for step in (1, 2)}
    for step, state in states.items():
        checkpoints.save(step, state, {"step": step})
    checkpoints.close()
    damaged = _biggest_file(out / "checkpoints" / "2" / "state")
    os.truncate(damaged, 100)
    return out, states, damaged


def _one_line_about(err_text, damaged):
    lines = [line for line in err_text.splitlines() if line.strip()]
    assert len(lines) == 1, err_text[:2000]
    assert "step 2" in lines[0] and damaged in lines[0] and "step 1" in lines[0]
    assert "Traceback" not in err_text


def test_resume_falls_back_quietly(run_dir, capfd):
    out, states, damaged = run_dir
    checkpoints = TrainCheckpoints(out / "checkpoints")
    step, state, meta = checkpoints.restore_latest(abstract_like(states[1]))
    checkpoints.close()
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(state["params"]["w"], states[1]["params"]["w"])
    _one_line_about(capfd.readouterr().err, damaged)


def test_generate_and_convert_loader_falls_back_reading_params_only(run_dir, capfd):
    out, states, damaged = run_dir
    config, params = load_any(out)
    assert config == M1Config.from_preset("tiny")
    assert set(params) == {"w", "b"}  # the optimizer state is not read
    np.testing.assert_array_equal(params["w"], states[1]["params"]["w"])
    _one_line_about(capfd.readouterr().err, damaged)


def test_params_only_ignores_damaged_optimizer_state(tmp_path, rng, capfd):
    """Generation reads the parameters only: a damaged optimizer moment does not matter to it."""
    out = tmp_path / "run"
    M1Config.from_preset("tiny").save_hf(out)
    os.replace(out / "config.json", out / "model_config.json")
    state = _state(rng, 1.0)
    state["params"]["w"] = state["params"]["w"][:2, :2]  # the optimizer moment is now the biggest array
    checkpoints = TrainCheckpoints(out / "checkpoints", async_save=False)
    checkpoints.save(1, state, {"step": 1})
    checkpoints.close()
    os.truncate(_biggest_file(out / "checkpoints" / "1" / "state"), 100)
    _, params = load_training_output(out)
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
    assert capfd.readouterr().err == ""


def test_nothing_readable_is_one_clear_error(run_dir, capfd):
    out, _, _ = run_dir
    os.truncate(_biggest_file(out / "checkpoints" / "1" / "state"), 100)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: step 2: .*; step 1: "):
        load_training_output(out)
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        load_training_output(out, step=7)
    assert "Traceback" not in capfd.readouterr().err


def test_truncated_safetensors_names_the_file(tmp_path):
    from safetensors.numpy import save_file

    from m1jax.checkpoint.hf import load_pretrained
    M1Config.from_preset("tiny").save_hf(tmp_path)
    path = str(tmp_path / "model.safetensors")
    save_file({"model.embed_tokens.weight": np.zeros((512, 64), np.float32)}, path)
    for size in (os.path.getsize(path) - 1000, 5):
        os.truncate(path, size)
        with pytest.raises(CheckpointError, match=f"safetensors file {path} is damaged"):
            load_pretrained(tmp_path)


def test_broken_index_names_the_file(tmp_path):
    from m1jax.checkpoint.hf import load_pretrained
    M1Config.from_preset("tiny").save_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a safetensors index"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weights": {}}))
    with pytest.raises(CheckpointError, match="with a 'weight_map'"):
        load_pretrained(tmp_path)


def test_keep_must_be_positive(tmp_path):
    for keep in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"keep={keep!r}"):
            TrainCheckpoints(tmp_path / "c", keep=keep)
