"""RL trainer: one update equals the loss gradient computed on the plain right-padded layout, kill-and-resume gives
the same metrics, the CLI runs end to end, and bad runs fail with clear errors before compiling."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m1jax import cli
from m1jax.checkpoint.hf import save_pretrained
from m1jax.config import M1Config
from m1jax.model import M1ForCausalLM, init_params
from m1jax.rl import losses
from m1jax.rl.rollout import RolloutConfig
from m1jax.rl.trainer import LossConfig, RLConfig, make_update_step, mesh_shardings, train_rl
from m1jax.train.run_log import read_tensorboard_scalars
from m1jax.train.step import TrainState

PAD = 256
TIMING_KEYS = ("rollout_seconds", "step_seconds")


@pytest.fixture(scope="module")
def tiny():
    config = M1Config.from_preset("tiny", router_aux_loss_coef=0.0)
    return config, init_params(config, jax.random.key(3))


# ------------------------------------------------------------------------------------------------ the update
def right_padded_logprobs(model, params, prompts, responses, horizon, temperature):
    """The plain layout: each row's prompt + response from position 0, padding after it (a causal model never
    looks ahead, so it needs no segment ids), one forward. (B, T) log-probs of the response tokens, 0 after."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = np.array([p + r + [PAD] * (length - len(p) - len(r)) for p, r in zip(prompts, responses)], np.int32)
    where = np.array([[min(len(p) - 1 + t, length - 1) for t in range(horizon)] for p in prompts])
    targets = np.array([r + [0] * (horizon - len(r)) for r in responses], np.int32)
    mask = np.arange(horizon)[None] < np.array([len(r) for r in responses])[:, None]
    logits = model.apply({"params": params}, jnp.asarray(tokens)).logits
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = logp[np.arange(len(prompts))[:, None], where, targets]
    return jnp.where(mask, picked, 0.0)


@pytest.mark.parametrize("algo", ["cispo"])
def test_one_update_equals_the_loss_gradient_of_the_plain_layout(tiny, algo):
    config, params = tiny
    model = M1ForCausalLM(config)
    rng = np.random.default_rng(11)
    rows, width, horizon, temperature = 5, 6, 5, 0.7
    prompts = [list(rng.integers(0, 256, n)) for n in (6, 2, 4, 1, 5)]
    responses = [list(rng.integers(0, 260, n)) for n in (5, 3, 0, 1, 4)]  # one empty response
    tokens = np.full((rows, width + horizon), PAD, np.int32)
    segment_ids = np.zeros_like(tokens)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        tokens[b, width - len(p):width + len(r)] = p + r
        segment_ids[b, width - len(p):width + len(r)] = 1
    mask = (np.arange(horizon)[None] < np.array([len(r) for r in responses])[:, None]).astype(np.float32)
    current = right_padded_logprobs(model, params, prompts, responses, horizon, temperature)
    old = np.asarray(current) + rng.normal(0, 0.4, current.shape).astype(np.float32)  # ratios across the clip band
    ref = np.asarray(current) + rng.normal(0, 0.3, current.shape).astype(np.float32)
    advantages = rng.normal(0, 1, rows).astype(np.float32)
    loss_cfg = LossConfig(algo=algo)

    def direct_loss(p):
        logprobs = right_padded_logprobs(model, p, prompts, responses, horizon, temperature)
        if algo == "cispo":
            return losses.cispo_loss(logprobs, old, advantages, mask)[0]
        return losses.grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.04)[0]

    expected_loss, expected_grads = jax.jit(jax.value_and_grad(direct_loss))(params)
    batch = {"tokens": tokens, "segment_ids": segment_ids, "response_mask": mask, "old_logprobs": old,
             "advantages": advantages, **({"ref_logprobs": ref} if algo == "grpo" else {})}
    optimizer = optax.sgd(1.0)  # the parameters move by exactly -gradient
    before = jax.tree.map(np.asarray, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.array, params),
                       opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(0)))
    update = make_update_step(model, optimizer, loss_cfg, temperature=temperature)
    state, metrics = update(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5, atol=1e-7)
    moved = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(moved)) > 1e-4, "the update left params unchanged"
    jax.tree.map(lambda m, g: np.testing.assert_allclose(m, g, rtol=2e-4, atol=2e-7), moved, expected_grads)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(expected_grads), rtol=1e-4)


def test_the_update_on_a_mesh_equals_one_device(tiny):
    """Parameters and moments sharded by the pretraining rules, the minibatch over data x fsdp x expert."""
    config, params = tiny
    model = M1ForCausalLM(config)
    rng = np.random.default_rng(2)
    rows, width, horizon = 8, 4, 4
    tokens = rng.integers(0, 256, (rows, width + horizon)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    segment_ids[:3, :2] = 0  # left padding
    mask = (np.arange(horizon)[None] < rng.integers(0, horizon + 1, rows)[:, None]).astype(np.float32)
    batch = {"tokens": tokens, "segment_ids": segment_ids, "response_mask": mask,
             "old_logprobs": -rng.exponential(1.0, (rows, horizon)).astype(np.float32),
             "advantages": rng.normal(0, 1, rows).astype(np.float32)}
    optimizer = optax.adamw(1e-3)
    loss_cfg = LossConfig(algo="dapo")

    def fresh():
        return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.array, params),
                          opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(0)))

    single, single_metrics = make_update_step(model, optimizer, loss_cfg)(fresh(), {k: jnp.asarray(v)
                                                                                   for k, v in batch.items()})
    mesh, shardings, batch_shardings = mesh_shardings({"data": 2, "fsdp": 2, "expert": 2}, config,
                                                      jax.eval_shape(fresh), optimizer, rows)
    update = make_update_step(model.clone(mesh=mesh), optimizer, loss_cfg, state_shardings=shardings,
                              batch_shardings=batch_shardings)
    with jax.set_mesh(mesh):
        sharded, metrics = update(jax.device_put(fresh(), shardings),
                                  {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()})
    assert sharded.params["lm_head"]["kernel"].sharding.spec == shardings.params["lm_head"]["kernel"].spec
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded.params, single.params)


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class AsciiTask:
    """A verifiable task a random model scores on: the reward is the fraction of ASCII characters it writes."""
    seed: int = 0
    name = "ascii"
    max_prompt_len = 4  # 1-digit arith's prompts "a+b=": the CLI test's shapes, so they share compilations

    def examples(self, step, count):
        rng = np.random.default_rng([self.seed, step])
        return [{"prompt": "".join(chr(c) for c in rng.integers(97, 123, 4)), "answer": "0"} for _ in range(count)]

    @staticmethod
    def reward_fn(completion, example):
        return sum(c.isascii() for c in completion) / max(len(completion), 1)

    @staticmethod
    def is_correct(completion, example):
        return completion.isascii()

    def options(self):
        return {"seed": self.seed}


def small_run(out, **changes):
    """GRPO (its KL term brings in the reference model) with DAPO's dynamic sampling, 2 generation batches."""
    base = dict(out=str(out), steps=2, prompts_per_step=2, updates_per_batch=2, checkpoint_every=1, eval_prompts=0,
                rollout=RolloutConfig(group_size=2, max_new_tokens=4), progress=False,
                loss=LossConfig(algo="grpo"), dynamic_sampling=True)
    return RLConfig(**{**base, **changes})


class Crash(Exception):
    pass


def test_kill_and_resume_gives_the_same_metrics(tiny, tmp_path):
    whole = train_rl(small_run(tmp_path / "a"), policy=tiny, task=AsciiTask())
    assert [r["step"] for r in whole.history] == [1, 2] and whole.resumed_from is None
    assert all(r["loss"] != 0 and r["kl_ref"] >= 0 and 0 <= r["kept_groups_frac"] <= 1 for r in whole.history)

    def crash_after_1(step, _):
        if step == 1:
            raise Crash
    with pytest.raises(Crash):
        train_rl(small_run(tmp_path / "b"), policy=tiny, task=AsciiTask(), callback=crash_after_1)
    resumed = train_rl(small_run(tmp_path / "b"), policy=tiny, task=AsciiTask())
    assert resumed.resumed_from == 1 and int(resumed.state.step) == 4
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
    assert [strip(r) for r in resumed.history] == [strip(whole.history[-1])]
    lines = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [strip(r) for r in lines] == [strip(r) for r in whole.history]
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, whole.state.params)
    with pytest.raises(ValueError, match="other prompts"):
        train_rl(small_run(tmp_path / "b", steps=3), policy=tiny, task=AsciiTask(seed=1))


def run_cli(argv, **extra):
    """`m1jax rl ...` as the top-level CLI parses it, plus options its parser may not define (read with getattr)."""
    args = cli.build_parser().parse_args(argv)
    for name, value in extra.items():
        setattr(args, name, value)
    args.run_config = args.check(args)  # what cli.parse_args does next: check, and build the RLConfig once
    assert args.func(args) == 0


def test_cli_runs_two_steps_end_to_end(tiny, tmp_path, capsys):
    config, params = tiny
    save_pretrained(tmp_path / "init", config, params)
    argv = ["rl", "--init", str(tmp_path / "init"), "--task", "arith", "--algo", "grpo", "--steps", "2",
            "--out", str(tmp_path / "run"), "--group-size", "2", "--prompts-per-step", "2",
            "--updates-per-batch", "2", "--max-new-tokens", "4", "--checkpoint-every", "1", "--tensorboard"]
    run_cli(argv, digits=1, eval_prompts=4, dynamic_sampling="on")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["algo"] == "grpo" and "eval_accuracy" in summary
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("reward_mean", "accuracy", "response_length", "clip_high_frac", "clip_low_frac", "dropped_frac",
                "entropy", "mismatch_corr", "mismatch_max_gap", "approx_kl", "loss", "grad_norm", "lr"):
        assert all(np.isfinite(r[key]) or key == "mismatch_corr" for r in lines), key
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    board = read_tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in board["reward_mean"]] == [1, 2]
    np.testing.assert_array_equal([v for _, v in board["loss"]], np.float32([r["loss"] for r in lines]))
    run_cli(argv, digits=1, eval_prompts=4, dynamic_sampling="on")  # finished: a rerun resumes at the end
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


def test_bad_runs_fail_with_clear_errors(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match="algo='reinforce'"):
        LossConfig(algo="reinforce")
    with pytest.raises(ValueError, match="kl_beta"):
        LossConfig(algo="cispo", kl_beta=0.1)
    with pytest.raises(ValueError, match="group_size=1"):
        small_run(tmp_path, rollout=RolloutConfig(group_size=1))
    with pytest.raises(ValueError, match="updates_per_batch=3"):
        small_run(tmp_path, updates_per_batch=3)
    with pytest.raises(ValueError, match="no verifiable answer"):
        train_rl(small_run(tmp_path, task="copy"), policy=tiny)
    with pytest.raises(ValueError, match="tokenizer has 260 ids"):
        config, params = tiny
        small = config.replace(vocab_size=128)
        train_rl(small_run(tmp_path), policy=(small, params))
    with pytest.raises(ValueError, match="no initial policy"):
        train_rl(small_run(tmp_path))
    argv = ["rl", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--group-size", "1"]
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser, the flag and its range named
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "--group-size: expected an integer >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["rl", "--init", "x", "--out", "y", "--algo", "reinforce"])
