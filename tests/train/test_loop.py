"""Training: accumulation equals the large batch, kill-and-resume is bit-exact, torn checkpoints are skipped, the
loss falls on mqar, and bad runs fail before compiling."""
import json
import os
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from m1jax.config import M1Config, RunPolicy
from m1jax.model import M1ForCausalLM
from m1jax.train.loop import TrainConfig, train
from m1jax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer
from m1jax.train.run_log import read_tensorboard_scalars
from m1jax.train.step import init_state, make_train_step
from m1jax.train.data import make_data


def tiny_run(out, **changes):
    base = dict(out=str(out), preset="tiny", data="mqar", steps=6, batch_size=4, seq_len=48, checkpoint_every=2,
                progress=False, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2))
    base.update(changes)
    return TrainConfig(**base)


def test_gradient_accumulation_equals_the_large_batch():
    cfg = M1Config.from_preset("tiny", router_aux_loss_coef=0.0)
    model = M1ForCausalLM(cfg)
    optimizer = optax.sgd(1.0)  # params move by exactly -grad: Adam's first step would amplify rounding (g/|g|)
    batch = {k: jnp.asarray(v) for k, v in
             make_data("copy", batch_size=4, seq_len=40, seed=3, vocab_size=cfg.vocab_size).batch(0).items()}
    results = []
    for micro in (1, 4):
        state = init_state(model, optimizer, seed=0)
        state, metrics = make_train_step(model, optimizer, microbatches=micro)(state, batch)
        results.append((state, metrics))
    (big, big_metrics), rest = results[0], results[1:]
    for state, metrics in rest:
        np.testing.assert_allclose(metrics["loss"], big_metrics["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], big_metrics["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, big.params)
    with pytest.raises(ValueError, match="microbatches"):
        make_train_step(model, optimizer, microbatches=3)(init_state(model, optimizer, 0), batch)


def test_weight_decay_skips_norms_and_embedding():
    params = jax.eval_shape(lambda: M1ForCausalLM(M1Config.from_preset("tiny")).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    mask = decay_mask(params)
    assert mask["lm_head"]["kernel"] and mask["groups"]["layer_0"]["moe"]["w1"]
    assert not mask["embed"]["embedding"] and not mask["final_norm"]["scale"]
    assert not mask["groups"]["layer_0"]["attn"]["norm"]["scale"]


class Crash(Exception):
    pass


def test_kill_and_resume_is_bit_exact_and_torn_checkpoints_are_skipped(tmp_path, capsys):
    uninterrupted = train(tiny_run(tmp_path / "a"))
    losses = [r["loss"] for r in uninterrupted.history]
    assert len(losses) == 6

    def crash_at_5(step, _):
        if step == 5:
            raise Crash
    with pytest.raises(Crash):
        train(tiny_run(tmp_path / "b", tensorboard=True), callback=crash_at_5)
    resumed = train(tiny_run(tmp_path / "b", tensorboard=True))
    assert resumed.resumed_from == 4
    assert [r["loss"] for r in resumed.history] == losses[4:]
    lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert [l["loss"] for l in lines] == losses
    # TensorBoard, as its reader sees it: the crashed run's step 5 purged, each step once, the same losses.
    board = read_tensorboard_scalars(tmp_path / "b" / "tensorboard")
    assert [step for step, _ in board["loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([value for _, value in board["loss"]], np.float32(losses))
    assert {"grad_norm", "lr", "tokens_per_s"} <= set(board)

    # Tear the newest checkpoint (6): a resume must warn, fall back to 4, and recompute 5 and 6 identically.
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    newest = tmp_path / "c" / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(newest):
        for name in files:
            if not name.startswith("_"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"torn")
    capsys.readouterr()
    again = train(tiny_run(tmp_path / "c", steps=6))
    notice = [line for line in capsys.readouterr().err.split("\n") if "step 6" in line]
    assert len(notice) == 1 and "falling back to step 4" in notice[0]  # one line, no traceback
    assert again.resumed_from == 4
    assert [r["loss"] for r in again.history] == losses[4:]


def test_loss_falls_on_mqar(tmp_path):
    result = train(tiny_run(tmp_path, steps=40, checkpoint_every=0, batch_size=8, seq_len=64, log_every=5,
                            optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=5)))
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert "eval_accuracy" in result.final_eval
    # checkpoint_every=0 still saves the final step, and run_config.json records the schedule really used.
    assert os.listdir(tmp_path / "checkpoints") == ["40"]
    with open(tmp_path / "run_config.json") as f:
        assert json.load(f)["optimizer"]["total_steps"] == 40


def test_bad_runs_fail_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        train(tiny_run(tmp_path / "a", seq_len=10 ** 6, model_overrides={"max_position_embeddings": 4096}))
    with pytest.raises(ValueError, match="vocab"):
        train(tiny_run(tmp_path / "b", model_overrides={"vocab_size": 64}))
    with pytest.raises(ValueError, match="neither a built-in task"):
        train(tiny_run(tmp_path / "c", data=str(tmp_path / "missing.bin")))
    train(tiny_run(tmp_path / "d", steps=1, checkpoint_every=0))
    with pytest.raises(ValueError, match="another model"):
        train(tiny_run(tmp_path / "d", steps=1, model_overrides={"expert_size": 32}))


def test_a_run_resumes_under_another_run_policy(tmp_path):
    """The run policy is not the model: 2 steps computed in float32, resumed in bfloat16 (with remat), trains on from
    the float32 run's checkpoint; model_config.json is the same file either way, and the policy used is recorded."""
    first = train(tiny_run(tmp_path, steps=2, checkpoint_every=2))
    config_json = (tmp_path / "model_config.json").read_text()
    bf16 = RunPolicy(compute_dtype="bfloat16", remat="full")
    resumed = train(tiny_run(tmp_path, steps=4, checkpoint_every=2, policy=bf16))
    assert resumed.resumed_from == 2 and [r["step"] for r in resumed.history] == [3, 4]
    assert np.isfinite([r["loss"] for r in resumed.history]).all()
    assert abs(resumed.history[0]["loss"] - first.history[-1]["loss"]) < 1.0  # trains on from the restored state
    assert (tmp_path / "model_config.json").read_text() == config_json
    with open(tmp_path / "run_config.json") as f:
        assert json.load(f)["policy"]["compute_dtype"] == "bfloat16"
