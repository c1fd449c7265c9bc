"""RL losses against their written formulas, a hand-made CISPO-vs-PPO case, padding and bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import losses

LOSSES = {
    "cispo": losses.cispo_loss,
    "cispo_unified": functools.partial(losses.cispo_loss, eps_low=0.2, unified=True),
    "ppo": losses.ppo_clip_loss,
    "grpo": losses.grpo_loss,
    "dapo": losses.dapo_loss,
}


def random_batch(seed, batch=5, time=11, per_token_adv=False, spread=0.5):
    """Random log-probs, ratios spread well across the clip band, ragged response lengths, one empty row."""
    rng = np.random.default_rng(seed)
    logprobs = -rng.exponential(1.5, (batch, time)).astype(np.float32)
    old = (logprobs + rng.normal(0, spread, (batch, time))).astype(np.float32)
    adv_shape = (batch, time) if per_token_adv else (batch,)
    advantages = rng.normal(0, 1, adv_shape).astype(np.float32)
    lengths = rng.integers(1, time + 1, batch)
    lengths[1] = 0
    mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)
    return jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask)


# ------------------------------------------------------------------ formulas, written plainly from the papers
def surrogate(r, a, lo, hi):
    return jnp.minimum(r * a, jnp.clip(r, lo, hi) * a)


def cispo_formula(lp, old, adv, m, eps_low=None, eps_high=losses.CISPO_EPS_HIGH, unified=False):
    r = jnp.exp(lp - old)
    lo = 0.0 if eps_low is None else 1 - eps_low  # ratios are positive: a bound of 0 is no bound
    w = jax.lax.stop_gradient(jnp.clip(r, lo, 1 + eps_high))
    keep = 1.0
    if unified:
        keep = jnp.where(((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < lo)), 0.0, 1.0)
    return -jnp.sum(m * keep * w * adv * lp) / jnp.sum(m)


def ppo_formula(lp, old, adv, m, eps_low=0.2, eps_high=0.2):
    r = jnp.exp(lp - old)
    return -jnp.sum(m * surrogate(r, adv, 1 - eps_low, 1 + eps_high)) / jnp.sum(m)


def grpo_formula(lp, old, adv, m, eps=0.2, ref=None, beta=0.04):
    r = jnp.exp(lp - old)
    term = surrogate(r, adv, 1 - eps, 1 + eps)
    if ref is not None:
        term = term - beta * (jnp.exp(ref - lp) - (ref - lp) - 1)
    lengths = jnp.sum(m, axis=1)
    per_seq = jnp.sum(m * term, axis=1) / jnp.maximum(lengths, 1)
    return -jnp.sum(per_seq) / jnp.sum(lengths > 0)


FORMULAS = {
    "cispo": cispo_formula,
    "cispo_unified": functools.partial(cispo_formula, eps_low=0.2, unified=True),
    "ppo": ppo_formula,
    "grpo": grpo_formula,
    "dapo": functools.partial(ppo_formula, eps_low=0.2, eps_high=0.28),
}


def value_and_grad(fn, lp, *args, **kwargs):
    return jax.value_and_grad(lambda x: fn(x, *args, **kwargs)[0])(lp)


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_autodiff_of_written_formula(name, per_token_adv):
    lp, old, adv, m = random_batch(seed=len(name) + 10 * per_token_adv, per_token_adv=per_token_adv)
    value, grad = value_and_grad(LOSSES[name], lp, old, adv, m)
    adv_bt = adv if per_token_adv else adv[:, None]
    want_value, want_grad = jax.value_and_grad(FORMULAS[name])(lp, old, adv_bt, m)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps_low", [None, 0.1])
def test_cispo_variants_match_formula(eps_low):
    lp, old, adv, m = random_batch(seed=3, per_token_adv=True, spread=0.8)
    for unified in (False, True):
        fn = functools.partial(losses.cispo_loss, eps_low=eps_low, eps_high=0.5, unified=unified)
        value, grad = value_and_grad(fn, lp, old, adv, m)
        want = jax.value_and_grad(cispo_formula)(lp, old, adv, m, eps_low=eps_low, eps_high=0.5, unified=unified)
        np.testing.assert_allclose(value, want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, want[1], rtol=1e-5, atol=1e-6)


def test_grpo_kl_term_matches_formula():
    lp, old, adv, m = random_batch(seed=4)
    ref = lp + jax.random.normal(jax.random.key(0), lp.shape) * 0.3
    fn = functools.partial(losses.grpo_loss, ref_logprobs=ref, beta=0.1, eps=0.3)
    (value, metrics), grad = jax.value_and_grad(lambda x: fn(x, old, adv, m), has_aux=True)(lp)
    want_value, want_grad = jax.value_and_grad(grpo_formula)(lp, old, adv[:, None], m, eps=0.3, ref=ref, beta=0.1)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    k3 = jnp.exp(ref - lp) - (ref - lp) - 1
    np.testing.assert_allclose(metrics["kl_ref"], jnp.sum(k3 * m) / jnp.sum(m), rtol=1e-5)
    no_kl, _ = losses.grpo_loss(lp, old, adv, m, eps=0.3)
    assert not np.isclose(value, no_kl)


def test_hand_made_case_cispo_keeps_gradients_ppo_grpo_dapo_drop():
    # tokens: r = 1.5 with A = +1 (above the band), r = 1 with A = +1, r = 0.5 with A = -1 (below), padding.
    old = jnp.log(jnp.array([[1 / 1.5, 1.0, 2.0, 1.0]]))
    lp = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, 1.0, -1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    n = 3.0
    grads = {name: value_and_grad(fn, lp, old, adv, mask)[1][0] for name, fn in LOSSES.items()}
    # d(-J)/d logp_t = -w_t A_t / n for CISPO; PPO/GRPO/DAPO: -r_t A_t / n inside the band, 0 outside.
    np.testing.assert_allclose(grads["cispo"], [-1.28 / n, -1 / n, 0.5 / n, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["cispo_unified"], [0.0, -1 / n, 0.0, 0.0], atol=1e-7)
    for name in ("ppo", "grpo", "dapo"):
        np.testing.assert_allclose(grads[name], [0.0, -1 / n, 0.0, 0.0], atol=1e-7, err_msg=name)
    bounded = value_and_grad(functools.partial(losses.cispo_loss, eps_low=0.2), lp, old, adv, mask)[1][0]
    np.testing.assert_allclose(bounded, [-1.28 / n, -1 / n, 0.8 / n, 0.0], rtol=1e-6)
    _, metrics = losses.ppo_clip_loss(lp, old, adv, mask)
    np.testing.assert_allclose(
        [metrics["clip_high_frac"], metrics["clip_low_frac"], metrics["dropped_frac"]], [1 / 3, 1 / 3, 2 / 3], rtol=1e-6
    )
    _, metrics = losses.cispo_loss(lp, old, adv, mask)
    np.testing.assert_allclose([metrics["clip_low_frac"], metrics["dropped_frac"], metrics["num_tokens"]], [0, 0, 3])
    np.testing.assert_allclose(metrics["ratio_mean"], (1.5 + 1 + 0.5) / 3, rtol=1e-6)


def test_cispo_gives_every_token_a_gradient_where_ppo_drops_some():
    lp, old, adv, m = random_batch(seed=5, per_token_adv=True, spread=1.0)
    cispo_grad = value_and_grad(losses.cispo_loss, lp, old, adv, m)[1]
    ppo_grad = value_and_grad(losses.ppo_clip_loss, lp, old, adv, m)[1]
    live = np.asarray(m, bool)
    assert np.all(cispo_grad[live] != 0)
    dropped = np.asarray(losses.ppo_dropped_tokens(losses.token_terms(lp, old, adv, m), 0.2, 0.2))
    assert dropped.sum() >= 3
    np.testing.assert_array_equal(np.asarray(ppo_grad == 0)[live], dropped[live])


def test_no_lower_clip_when_eps_low_is_none():
    lp, old, adv, m = random_batch(seed=6, per_token_adv=True, spread=1.5)
    ratio = np.exp(np.asarray(lp - old))
    below = (ratio < 0.5) & np.asarray(m, bool)
    assert below.sum() >= 3
    grad = value_and_grad(functools.partial(losses.cispo_loss, eps_high=100.0), lp, old, adv, m)[1]
    np.testing.assert_allclose(np.asarray(grad)[below], (-ratio * np.asarray(adv) / m.sum())[below], rtol=1e-5)
    _, metrics = losses.cispo_loss(lp, old, adv, m)
    assert metrics["clip_low_frac"] == 0
    _, metrics = losses.cispo_loss(lp, old, adv, m, eps_low=0.5)
    np.testing.assert_allclose(metrics["clip_low_frac"], below.sum() / m.sum(), rtol=1e-6)


def test_metrics_match_plain_formulas():
    lp, old, adv, m = random_batch(seed=7)
    _, metrics = losses.dapo_loss(lp, old, adv, m)
    r = np.exp(np.asarray(lp - old, np.float64))
    live = np.asarray(m, bool)
    np.testing.assert_allclose(metrics["ratio_mean"], r[live].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["approx_kl"], (r - 1 - np.log(r))[live].mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["clip_high_frac"], (r > 1.28)[live].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_low_frac"], (r < 0.8)[live].mean(), rtol=1e-6)
    a = np.broadcast_to(np.asarray(adv)[:, None], r.shape)
    dropped = ((a > 0) & (r > 1.28)) | ((a < 0) & (r < 0.8))
    np.testing.assert_allclose(metrics["dropped_frac"], dropped[live].mean(), rtol=1e-6)
    _, unified = losses.cispo_loss(lp, old, adv, m, eps_low=0.2, eps_high=0.28, unified=True)
    np.testing.assert_allclose(unified["dropped_frac"], metrics["dropped_frac"])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_changes_nothing(name):
    lp, old, adv, m = random_batch(seed=8, per_token_adv=True)
    pad = ~np.asarray(m, bool)
    garbage = np.where(np.arange(pad.sum()) % 3 == 0, np.nan, np.where(np.arange(pad.sum()) % 3 == 1, np.inf, -1e4))

    def corrupt(x):
        x = np.array(x)
        x[pad] = garbage
        return jnp.asarray(x)

    fn = LOSSES[name]
    if name == "grpo":
        ref = lp - 0.1
        fn, corrupt_fn = functools.partial(fn, ref_logprobs=ref), functools.partial(fn, ref_logprobs=corrupt(ref))
    else:
        corrupt_fn = fn
    (clean, clean_metrics), clean_grad = jax.value_and_grad(lambda x: fn(x, old, adv, m), has_aux=True)(lp)
    (dirty, dirty_metrics), dirty_grad = jax.value_and_grad(
        lambda x: corrupt_fn(x, corrupt(old), corrupt(adv), m), has_aux=True
    )(corrupt(lp))
    assert np.isfinite(clean)
    np.testing.assert_array_equal(dirty, clean)
    np.testing.assert_array_equal(dirty_grad, clean_grad)
    assert np.all(np.asarray(dirty_grad)[pad] == 0)
    for key in clean_metrics:
        np.testing.assert_array_equal(dirty_metrics[key], clean_metrics[key], err_msg=key)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_batch_gives_zero_loss_and_finite_gradient(name):
    lp, old, adv, _ = random_batch(seed=9, batch=2, time=3)
    value, grad = value_and_grad(LOSSES[name], lp, old, adv, jnp.zeros((2, 3)))
    assert value == 0
    np.testing.assert_array_equal(grad, 0)


def test_losses_jit_like_eager():
    lp, old, adv, m = random_batch(seed=10)
    for name, fn in LOSSES.items():
        eager, _ = fn(lp, old, adv, m)
        jitted, metrics = jax.jit(fn)(lp, old, adv, m)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, err_msg=name)
        assert set(metrics) >= {"loss", "clip_high_frac", "clip_low_frac", "dropped_frac", "ratio_mean", "approx_kl"}


def test_bad_shapes_and_eps_raise_clear_errors():
    lp, old, adv, m = random_batch(seed=11, batch=3, time=4)
    with pytest.raises(ValueError, match="logprobs"):
        losses.cispo_loss(lp[0], old, adv, m)
    with pytest.raises(ValueError, match="old_logprobs"):
        losses.ppo_clip_loss(lp, old[:, :3], adv, m)
    with pytest.raises(ValueError, match="mask"):
        losses.dapo_loss(lp, old, adv, m[:2])
    with pytest.raises(ValueError, match="advantages"):
        losses.grpo_loss(lp, old, adv[:2], m)
    with pytest.raises(ValueError, match="advantages"):
        losses.cispo_loss(lp, old, jnp.zeros((4,)), m)
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(lp, old, adv, m, ref_logprobs=lp[:, :2])
    with pytest.raises(ValueError, match="eps_high"):
        losses.cispo_loss(lp, old, adv, m, eps_high=-0.1)
    with pytest.raises(ValueError, match="eps"):
        losses.ppo_clip_loss(lp, old, adv, m, eps=float("nan"))


def test_dynamic_sampling_filter_drops_groups_without_reward_spread():
    rewards = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    np.testing.assert_array_equal(losses.dynamic_sampling_filter(rewards), [False, True, False, True])
    with pytest.raises(ValueError, match="rewards"):
        losses.dynamic_sampling_filter(jnp.ones(6))


def test_overlong_penalty_follows_dapo_piecewise_rule():
    lengths = jnp.array([0, 10, 15, 16, 18, 20, 21, 400])
    want = [0, 0, 0, -0.2, -0.6, -1.0, -1.0, -1.0]
    np.testing.assert_allclose(losses.overlong_penalty(lengths, max_len=20, cache_len=5), want, rtol=1e-6)
    with pytest.raises(ValueError, match="cache_len"):
        losses.overlong_penalty(lengths, max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="cache_len"):
        losses.overlong_penalty(lengths, max_len=4, cache_len=5)
    with pytest.raises(ValueError, match="lengths"):
        losses.overlong_penalty(lengths[None], max_len=20, cache_len=5)
