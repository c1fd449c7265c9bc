"""The blocked (online-softmax) causal attention against its slow twins: a float64 NumPy softmax written here and
XLA's dense path, forward and gradients, at lengths that are not multiples of the block, GQA/MQA/MHA, packed
segments; and proof that it never holds a (T, T) matrix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers.softmax_attention import (DENSE_SCORES_MAX_BYTES, attention_impl, attention_workspace_bytes,
                                            blocked_causal_attention, causal_attention)


def reference(q, k, v, segment_ids):
    """float64: out[b, i, h] = sum_j softmax_j(q_i . k_j / sqrt(D) over j <= i, seg_j == seg_i) v_j."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    v = np.repeat(v, heads // v.shape[2], axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dim)
    visible = np.tril(np.ones((length, length), bool))[None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible = visible & (seg[:, :, None] == seg[:, None, :])
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", probs, v)


CASES = [  # batch, length, heads, kv_heads, dim, block, packed
    (2, 37, 6, 2, 8, 16, True),  # GQA, length not a multiple of the block
    (1, 1, 2, 1, 4, 16, False),  # one token, MQA
    (3, 49, 4, 4, 8, 7, True),  # MHA, an odd block dividing the length
    (1, 29, 3, 3, 8, 64, False),  # one block shorter than the requested one
]


def _inputs(rng, batch, length, heads, kv_heads, dim, packed, dtype=np.float32):
    q = rng.standard_normal((batch, length, heads, dim)) * 1.5
    k = rng.standard_normal((batch, length, kv_heads, dim)) * 1.5
    v = rng.standard_normal((batch, length, kv_heads, dim))
    seg = None
    if packed:  # packed documents of random lengths, trailing padding as segment 0
        seg = np.cumsum(rng.random((batch, length)) < 0.15, axis=1) + 1
        seg[:, length - length // 5:] = 0
        seg = jnp.asarray(seg, jnp.int32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), seg


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_slow_twins(rng, case):
    batch, length, heads, kv_heads, dim, block, packed = case
    q, k, v, seg = _inputs(rng, batch, length, heads, kv_heads, dim, packed)
    want = reference(q, k, v, seg)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    @jax.jit  # one compilation for both paths, forward and backward
    def both(q, k, v, seg, cotangent):
        blocked, vjp_blocked = jax.vjp(lambda *x: blocked_causal_attention(*x, seg, block=block), q, k, v)
        dense, vjp_dense = jax.vjp(lambda *x: causal_attention(*x, seg, impl="dense"), q, k, v)
        return blocked, dense, vjp_blocked(cotangent), vjp_dense(cotangent)

    blocked, dense, grads_blocked, grads_dense = both(q, k, v, seg, cotangent)
    # float32: each output is a convex combination of |v| <~ 5 values; scores ~ 10 carry 1e-6 relative error
    np.testing.assert_allclose(np.asarray(blocked), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dense), want, atol=2e-5, rtol=1e-5)
    for name, got, expected in zip("qkv", grads_blocked, grads_dense):
        scale = float(jnp.max(jnp.abs(expected))) + 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=5e-5 * scale, rtol=0, err_msg=name)


def test_bfloat16_inputs(rng):
    q, k, v, seg = _inputs(rng, 2, 45, 4, 2, 16, True, dtype=jnp.bfloat16)
    got = blocked_causal_attention(q, k, v, seg, block=16)
    assert got.dtype == jnp.bfloat16
    # bf16 keeps 8 bits: the output rounding alone is 2^-8 relative; probabilities cast to bf16 add as much
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(q, k, v, seg), atol=4e-2, rtol=2e-2)


def test_auto_picks_blocked_beyond_the_dense_budget_and_never_builds_t_by_t():
    length, heads = 8192, 4
    assert attention_impl(1, 512, heads, jnp.float32, False, platform="cpu") == "dense"
    assert attention_impl(1, length, heads, jnp.float32, False, platform="cpu") == "blocked"
    assert attention_impl(1, length, heads, jnp.bfloat16, False, platform="gpu") == "cudnn"
    assert attention_impl(1, length, heads, jnp.bfloat16, True, platform="gpu") == "cudnn"  # packed rows too
    # cuDNN refuses a bias (the packing mask) at an odd training length (seen on an H200: "Unsupported sequence
    # length Q 4099, KV 4099"): those rows keep the XLA paths
    assert attention_impl(1, length + 1, heads, jnp.bfloat16, True, platform="gpu") == "blocked"
    assert attention_impl(1, 511, heads, jnp.bfloat16, True, platform="gpu") == "dense"
    assert attention_impl(1, length + 1, heads, jnp.bfloat16, False, platform="gpu") == "cudnn"
    assert attention_impl(1, length, heads, jnp.float32, True, platform="gpu") == "blocked"
    q = jax.ShapeDtypeStruct((1, length, heads, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v) ** 2)
    t_by_t = heads * length * length * 4
    assert t_by_t > DENSE_SCORES_MAX_BYTES
    for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
        temp = jax.jit(fn).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
        assert temp < t_by_t / 16, temp  # measured: a few MiB against 1 GiB of scores
        assert temp < 4 * attention_workspace_bytes("blocked", 1, length, heads, 16)


def test_bad_block_is_an_error(rng):
    q, k, v, _ = _inputs(rng, 1, 4, 2, 1, 4, False)
    with pytest.raises(ValueError, match="block=0"):
        blocked_causal_attention(q, k, v, block=0)
    with pytest.raises(ValueError, match="impl='flash'"):
        causal_attention(q, k, v, impl="flash")
