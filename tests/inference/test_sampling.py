"""Sampling: top-k and top-p filters against numpy twins (ties included), draw frequencies, seeds, greedy."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax.inference.sampling import SamplingParams, filtered_logits, sample_tokens, top_k_filter, top_p_filter


def numpy_top_k(logits, k):
    out = np.full_like(logits, -np.inf)
    for b, row in enumerate(logits):
        kth = np.sort(row)[::-1][min(k, row.size) - 1]
        out[b, row >= kth] = row[row >= kth]
    return out


def numpy_top_p(logits, p, with_borderline=False):
    """Walk the tokens from most to least probable, keeping them until the kept mass reaches p; keep ties.
    p = 1 keeps every token (as transformers): in float64 a dominant token's mass can round to 1 before the tail.
    with_borderline also returns the tokens whose more-likely mass lies within 1e-6 of p, where float32 rounding
    may decide either way."""
    out = np.full_like(logits, -np.inf)
    borderline = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        mass, last = 0.0, None
        for i in np.argsort(-probs, kind="stable"):
            borderline[b, i] = abs(mass - p) < 1e-6
            if mass >= p:
                break
            mass, last = mass + probs[i], probs[i]
        keep = probs >= last * (1 - 1e-6)
        out[b, keep] = logits[b, keep]
    if p >= 1:
        out, borderline = logits.copy(), np.zeros(logits.shape, bool)
    return (out, borderline) if with_borderline else out


def awkward_logits(rng, batch=7, vocab=37):
    logits = rng.standard_normal((batch, vocab)).astype(np.float32) * 2
    logits[0, 3:6] = logits[0].max() + 1  # a three-way tie at the top
    logits[1, :] = 0.5  # all equal
    logits[2, 10] = 30.0  # one token holds nearly all the mass
    return logits


@pytest.mark.parametrize("k", [1, 2, 5, 37, 100])
def test_top_k_matches_numpy(k, rng):
    logits = awkward_logits(rng)
    np.testing.assert_array_equal(top_k_filter(jnp.asarray(logits), k), numpy_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_numpy(p, rng):
    logits = awkward_logits(rng)
    got = np.asarray(top_p_filter(jnp.asarray(logits), p))
    want, borderline = numpy_top_p(logits, p, with_borderline=True)
    decided = ~borderline
    np.testing.assert_array_equal(np.isfinite(got)[decided], np.isfinite(want)[decided])
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_draws_follow_the_filtered_distribution(rng):
    row = rng.standard_normal(12).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.8)
    draws = 40_000
    logits = jnp.broadcast_to(jnp.asarray(row), (draws, 12))
    key = jax.random.key(int(rng.integers(1e9)))
    tokens = np.asarray(jax.jit(sample_tokens, static_argnums=1)(logits, params, key))
    kept = numpy_top_p(numpy_top_k(row[None] / 0.7, 8), 0.8)[0]
    probs = np.where(np.isfinite(kept), np.exp(kept - kept[np.isfinite(kept)].max()), 0.0)
    probs /= probs.sum()
    freq = np.bincount(tokens, minlength=12) / draws
    assert np.all(freq[probs == 0] == 0), "a filtered-out token was drawn"
    sigma = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-9), (freq, probs)


def test_seeds_greedy_and_temperature_scaling(rng):
    logits = jnp.asarray(awkward_logits(rng, batch=64, vocab=50))
    params = SamplingParams(temperature=1.3)
    a, b = sample_tokens(logits, params, jax.random.key(1)), sample_tokens(logits, params, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.any(sample_tokens(logits, params, jax.random.key(2)) != a)
    greedy = sample_tokens(logits, SamplingParams(), jax.random.key(3))
    assert greedy[0] == 3 and greedy[1] == 0  # ties go to the first maximum, as torch.argmax
    np.testing.assert_array_equal(greedy[2:], np.argmax(np.asarray(logits)[2:], axis=-1))
    np.testing.assert_allclose(filtered_logits(logits, params), logits / 1.3, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(temperature="hot")])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
