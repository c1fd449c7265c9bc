"""Rollouts: shapes and masks around a stop mid-completion, sampler vs trainer log-probabilities (equal under one
configuration, apart under a bf16 lm_head), the mismatch metric against a plain formula, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.config import M1Config, RunPolicy
from m1jax.model import M1ForCausalLM, init_params
from m1jax.rl.rollout import (ArithPrompts, RolloutConfig, collect_rollout, decode_completion, get_rl_task,
                              probability_mismatch)
from m1jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
STOPS = tuple(range(48, 128))  # a random model draws one of these ~1 time in 6: stops land mid-completion


def length_reward(completion, example):
    return float(len(completion))


length_reward.check_example = lambda example: None


@pytest.fixture(scope="module")
def policy():
    config = M1Config.from_preset("tiny")
    return M1ForCausalLM(config), init_params(config, jax.random.key(7))


@pytest.fixture(scope="module")
def examples():
    return [{"prompt": "7+5=", "answer": "12"}, {"prompt": "31-4=", "answer": "27"},
            {"prompt": "60+25=", "answer": "85"}]


@pytest.fixture(scope="module")
def rollout(policy, examples):
    model, params = policy
    config = RolloutConfig(group_size=3, max_new_tokens=7, sampler_logprobs="decode")
    return collect_rollout(model, params, examples, config=config, seed=3, reward_fn=length_reward,
                           prompt_width=8, stop_ids=STOPS)


def test_rollout_shapes_masks_and_groups(rollout, examples):
    rows, width, horizon = 9, 8, 7
    assert rollout.tokens.shape == (rows, width + horizon) and rollout.prompt_width == width
    for name in ("response_mask", "trainer_logprobs", "sampler_logprobs", "old_logprobs", "entropy"):
        assert getattr(rollout, name).shape == (rows, horizon), name
    np.testing.assert_array_equal(rollout.group_ids, np.repeat([0, 1, 2], 3))
    lengths = rollout.response_lengths
    assert ((lengths > 0) & (lengths < horizon)).any(), "no row stopped mid-completion: pick another seed"
    for b in range(rows):
        prompt = TOK.encode(examples[b // 3]["prompt"])
        np.testing.assert_array_equal(rollout.tokens[b, width - len(prompt):width], prompt)
        assert (rollout.tokens[b, :width - len(prompt)] == TOK.pad_id).all()
        response = rollout.tokens[b, width:]
        n = lengths[b]
        # the mask is 1 up to and including the first stop token, 0 after it; padding follows the stop
        stops = np.flatnonzero(np.isin(response, STOPS))
        assert n == (stops[0] + 1 if stops.size else horizon)
        np.testing.assert_array_equal(rollout.response_mask[b], np.arange(horizon) < n)
        assert (response[n:] == TOK.pad_id).all() and (response[:n] != TOK.pad_id).all()
        np.testing.assert_array_equal(rollout.segment_ids[b], np.r_[np.zeros(width - len(prompt)),
                                                                    np.ones(len(prompt) + n), np.zeros(horizon - n)])
        assert rollout.completions[b] == decode_completion(TOK, response[:n])
        assert rollout.rewards[b] == len(rollout.completions[b])
        assert (rollout.trainer_logprobs[b, n:] == 0).all() and (rollout.trainer_logprobs[b, :n] < 0).all()
    grouped = rollout.rewards.reshape(3, 3)
    expected = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-6)
    expected = np.where(grouped.max(1, keepdims=True) == grouped.min(1, keepdims=True), 0.0, expected)
    np.testing.assert_allclose(rollout.advantages, expected.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rollout.old_logprobs, rollout.trainer_logprobs)


def test_trainer_logprobs_equal_the_plain_layout(policy, rollout):
    """The left-padded, segment-masked scoring against the plain layout: each row from position 0, padded after its
    end (a causal model never looks ahead), no segment ids."""
    model, params = policy
    rows = [row[ids > 0] for row, ids in zip(rollout.tokens, rollout.segment_ids)]
    length = max(map(len, rows))
    plain = np.stack([np.r_[row, np.full(length - len(row), TOK.pad_id)] for row in rows]).astype(np.int32)
    logp = np.asarray(jax.jit(lambda p, x: jax.nn.log_softmax(model.apply({"params": p}, x).logits, -1))(
        params, jnp.asarray(plain)))
    for b, row in enumerate(rows):
        n = int(rollout.response_lengths[b])
        start = len(row) - n
        expected = [logp[b, start - 1 + t, row[start + t]] for t in range(n)]
        np.testing.assert_allclose(rollout.trainer_logprobs[b, :n], expected, rtol=1e-5, atol=1e-5)


def test_sampler_and_trainer_agree_under_one_configuration(policy, examples, rollout):
    # decode path: the engine's cached one-token steps vs one full forward, both float32: equal to rounding
    np.testing.assert_allclose(rollout.sampler_logprobs, rollout.trainer_logprobs, atol=2e-5)
    assert rollout.mismatch["mismatch_corr"] > 1 - 1e-6 and rollout.mismatch["mismatch_max_gap"] < 1e-5
    # forward path with the same configuration: the same computation, bit for bit
    model, params = policy
    again = collect_rollout(model, params, examples, seed=3, reward_fn=length_reward, prompt_width=8,
                            stop_ids=STOPS, config=RolloutConfig(group_size=3, max_new_tokens=7,
                                                                 sampler_logprobs="forward", old_logprobs="sampler"))
    np.testing.assert_array_equal(again.tokens, rollout.tokens)  # same seed, same draws
    np.testing.assert_array_equal(again.sampler_logprobs, again.trainer_logprobs)
    np.testing.assert_array_equal(again.old_logprobs, again.sampler_logprobs)
    assert again.mismatch == {"mismatch_corr": 1.0, "mismatch_max_gap": 0.0}


def test_float32_lm_head_narrows_the_mismatch_of_a_bf16_engine(examples):
    """bf16 weights with large logits (the paper blamed high-magnitude activations at the lm_head). The trainer
    computes in float32; the engine computes in bf16 with a bf16 or a float32 lm_head, samples, and replays its
    draws through its own cached path. The float32 head brings the two sides' probabilities closer."""
    config = M1Config.from_preset("tiny")
    params = init_params(config, jax.random.key(3), policy=RunPolicy(param_dtype="bfloat16"))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30  # logits of order 10
    model = M1ForCausalLM(config)
    mismatch = {}
    for head in (False, True):
        rollout = collect_rollout(model, params, examples, seed=3, prompt_width=8, stop_ids=(), config=RolloutConfig(
            group_size=4, max_new_tokens=8, sampler_compute_dtype="bfloat16", sampler_float32_lm_head=head))
        mismatch[head] = rollout.mismatch
        assert 0 < rollout.mismatch["mismatch_max_gap"] < 0.2
    assert mismatch[False]["mismatch_corr"] < mismatch[True]["mismatch_corr"] < 1.0


def test_probability_mismatch_against_the_formula():
    rng = np.random.default_rng(5)
    a, b = -rng.exponential(1.0, (4, 9)), -rng.exponential(1.0, (4, 9))
    mask = (rng.random((4, 9)) < 0.6).astype(np.float32)
    p, q = np.exp(a[mask > 0]), np.exp(b[mask > 0])
    got = probability_mismatch(a, np.where(mask > 0, b, np.nan), mask)  # masked entries never matter
    expected_corr = np.mean((p - p.mean()) * (q - q.mean())) / (p.std() * q.std())
    np.testing.assert_allclose(got["mismatch_corr"], expected_corr, rtol=1e-12)
    np.testing.assert_allclose(got["mismatch_max_gap"], np.max(np.abs(p - q)), rtol=1e-12)
    assert np.isnan(probability_mismatch(a, b, np.zeros_like(mask))["mismatch_corr"])
    with pytest.raises(ValueError, match="one shape"):
        probability_mismatch(a, b[:, :5], mask)


def test_arith_prompts_are_a_pure_function_of_seed_and_step():
    task = get_rl_task("arith", digits=3, ops="+-*", seed=4)
    assert task.examples(5, 6) == task.examples(5, 6) and task.examples(5, 6) != task.examples(6, 6)
    for example in task.examples(2, 20):
        assert len(example["prompt"]) <= task.max_prompt_len and example["prompt"].endswith("=")
        assert str(eval(example["prompt"][:-1])) == example["answer"]
        assert task.reward_fn(example["answer"] + "\n", example) == 1.0
        assert task.is_correct(example["answer"] + "\nxyz", example) and not task.is_correct("x\n", example)


def test_bad_input_raises_clear_errors(policy, examples):
    model, params = policy
    with pytest.raises(ValueError, match="group_size=1.*G >= 2"):
        RolloutConfig(group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        RolloutConfig(sampler_logprobs="engine")
    with pytest.raises(ValueError, match=r"examples\[1\].*answer"):
        collect_rollout(model, params, [examples[0], {"prompt": "1+1="}])
    with pytest.raises(ValueError, match=r"examples\[0\].*prompt"):
        collect_rollout(model, params, [{"answer": "2"}])
    with pytest.raises(ValueError, match="prompt_width=3"):
        collect_rollout(model, params, examples, prompt_width=3)
    with pytest.raises(ValueError, match="no verifiable answer"):
        get_rl_task("mqar")
    with pytest.raises(ValueError, match="unknown RL task"):
        get_rl_task("chess")
    with pytest.raises(ValueError, match="no option"):
        get_rl_task("arith", width=3)
    with pytest.raises(ValueError, match="digits"):
        ArithPrompts(digits=0)
