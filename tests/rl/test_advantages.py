"""Group-relative advantages: std conventions, flat input, equal groups, bad input."""
import numpy as np
import pytest

from m1jax.rl.advantages import group_advantages, sequence_advantages


def random_rewards(seed, groups=4, samples=5):
    return np.random.default_rng(seed).normal(0, 2, (groups, samples)).astype(np.float32)


@pytest.mark.parametrize("std, ddof", [("unbiased", 1), ("population", 0)])
def test_std_conventions_match_numpy(std, ddof):
    rewards = random_rewards(0)
    want = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=ddof, keepdims=True) + 1e-6)
    np.testing.assert_allclose(group_advantages(rewards, std=std), want, rtol=1e-5, atol=1e-6)
    normalised = np.asarray(group_advantages(rewards, std=std, eps=0.0))
    np.testing.assert_allclose(normalised.mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(normalised.std(1, ddof=ddof), 1, rtol=1e-5)


def test_mean_centring_only_and_affine_invariance():
    rewards = random_rewards(1, groups=3, samples=7)
    np.testing.assert_allclose(
        group_advantages(rewards, std=None), rewards - rewards.mean(1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        group_advantages(3.0 * rewards + 11.0, eps=0.0), group_advantages(rewards, eps=0.0), rtol=1e-4, atol=1e-5
    )


def test_flat_rewards_group_prompt_major():
    rewards = random_rewards(2, groups=3, samples=4)
    np.testing.assert_array_equal(group_advantages(rewards.reshape(-1), group_size=4), group_advantages(rewards))
    np.testing.assert_array_equal(sequence_advantages(rewards), np.asarray(group_advantages(rewards)).reshape(-1))
    # each group is normalised on its own: changing group 2 leaves groups 0 and 1 untouched
    changed = rewards.copy()
    changed[2] = [5.0, -1.0, 0.0, 9.0]
    np.testing.assert_array_equal(group_advantages(changed)[:2], group_advantages(rewards)[:2])


@pytest.mark.parametrize("std", ["unbiased", "population", None])
def test_all_equal_groups_give_exactly_zero(std):
    rewards = np.array([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [0.7, 0.7, 0.7]], np.float32)
    advantages = np.asarray(group_advantages(rewards, std=std))
    np.testing.assert_array_equal(advantages[[0, 2]], 0.0)
    assert advantages[1, 0] > 0 > advantages[1, 1]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="G = 1"):
        group_advantages(np.ones((4, 1)))
    with pytest.raises(ValueError, match="G = 1"):
        group_advantages(np.ones(4), group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.ones(6))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.ones(7), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.ones((2, 3)), group_size=2)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="std"):
        group_advantages(np.ones((2, 3)), std="sample")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(np.ones((2, 3)), eps=-1.0)
