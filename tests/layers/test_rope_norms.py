"""Partial rotate-half RoPE against an explicit rotation matrix; RMSNorm against its formula; packed positions."""
import numpy as np
import pytest

import jax.numpy as jnp

from m1jax.layers.norms import RMSNorm
from m1jax.layers.rope import apply_rope, rope_inverse_frequencies, segment_positions


def assert_allclose(actual, desired, **tolerances):
    """np.testing.assert_allclose where NaN never counts as equal to NaN."""
    np.testing.assert_allclose(actual, desired, equal_nan=False, **tolerances)


def explicit_rotation(positions, head_dim, rotary_dim, freqs):
    """(B, T, D, D) float64 matrices: pair (i, i + r/2) rotated by the float32 angle pos * freqs[i]; others identity.

    The angle is formed in float32, as the released code does: at positions in the thousands one ulp of a frequency
    moves the angle by ~1e-4 rad, so a float64 angle would measure float32 rounding, not the rotation.
    """
    half = rotary_dim // 2
    mats = np.broadcast_to(np.eye(head_dim), positions.shape + (head_dim, head_dim)).copy()
    for i in range(half):
        angle = (positions.astype(np.float32) * np.float32(freqs[i])).astype(np.float64)
        c, s = np.cos(angle), np.sin(angle)
        mats[..., i, i], mats[..., i, i + half] = c, -s
        mats[..., i + half, i], mats[..., i + half, i + half] = s, c
    return mats


@pytest.mark.parametrize("head_dim, rotary_dim, theta", [(16, 8, 1e4), (32, 32, 1e7), (24, 4, 500.0)])
def test_partial_rope_is_a_rotation_of_the_first_dims(head_dim, rotary_dim, theta, rng):
    x = rng.standard_normal((2, 13, 3, head_dim)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(2, 13))
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), rotary_dim, theta))
    freqs = np.asarray(rope_inverse_frequencies(rotary_dim, theta))
    want = np.einsum("btij,btnj->btni", explicit_rotation(positions, head_dim, rotary_dim, freqs), x)
    assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("rotary_dim, theta", [(8, 1e4), (32, 1e7), (64, 1e7), (4, 500.0)])
def test_inverse_frequencies_are_theta_to_the_minus_2i_over_r(rotary_dim, theta):
    want = theta ** (-np.arange(rotary_dim // 2) * 2.0 / rotary_dim)
    assert_allclose(np.asarray(rope_inverse_frequencies(rotary_dim, theta)), want, rtol=3e-7, atol=0)


def test_rope_preserves_relative_positions(rng):
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))
    def score(pq, pk):
        rq = apply_rope(q, jnp.full((1, 1), pq), 8, 1e4)
        rk = apply_rope(k, jnp.full((1, 1), pk), 8, 1e4)
        return float(jnp.sum(rq * rk))
    # The score is a dot product that may cancel to near zero, so the tolerance is set by its scale |q||k|
    # (float32 angles at position ~100 are good to ~1e-5 rad), not relative to the score itself.
    scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
    for pq, pk in [(10, 3), (3, 10), (0, 0)]:
        assert score(pq, pk) == pytest.approx(score(pq + 100, pk + 100), abs=1e-5 * scale)


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3], [0, 0, 5, 5, 5, 5, 5, 6, 6]])
    np.testing.assert_array_equal(segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 1]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_formula(dtype, rng):
    x = rng.standard_normal((3, 5, 24)).astype(np.float32) * 3
    scale = rng.standard_normal(24).astype(np.float32)
    norm = RMSNorm(eps=1e-5)
    out = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x, dtype))
    x32 = np.asarray(jnp.asarray(x, dtype), np.float64)
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-5) * scale
    assert out.dtype == dtype
    assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                               atol=1e-5 if dtype == jnp.float32 else 5e-2)
