"""The recurrence against a direct O(T^2) formula, and the chunked path against the recurrence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_attention import lightning_attention, lightning_decode
from pallas_kernels.lightning_attention.reference import reference_lightning_attention

BLOCK = 8


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def random_inputs(seed, batch, num_tokens, heads, head_dim, dtype=jnp.float32, packed=True):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v = (jax.random.normal(keys[i], (batch, num_tokens, heads, head_dim), jnp.float32).astype(dtype)
               for i in range(3))
    slopes = jax.random.uniform(keys[3], (heads,), jnp.float32, 0.01, 1.0)
    state0 = jax.random.normal(keys[4], (batch, heads, head_dim, head_dim), jnp.float32)
    segment_ids = None
    if packed:  # uneven segments, ids that need not increase, some of length one
        starts = jax.random.bernoulli(keys[5], 0.15, (batch, num_tokens))
        segment_ids = (jnp.cumsum(starts, axis=1) % 3).astype(jnp.int32)
    return q, k, v, slopes, state0, segment_ids


def quadratic_attention(q, k, v, slopes, state0, segment_ids):
    """o_i = sum_{j<=i, no reset in (j, i]} exp(-s (i-j)) (q_i.k_j) v_j + [no reset in [0, i]] exp(-s (i+1)) q_i S0."""
    q, k, v, state0 = (np.asarray(x, np.float64) for x in (q, k, v, state0))
    slopes = np.asarray(slopes, np.float64)
    batch, num_tokens, _, _ = q.shape
    ids = np.zeros((batch, num_tokens), np.int64) if segment_ids is None else np.asarray(segment_ids)
    starts = np.concatenate([np.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    runs = np.cumsum(starts, axis=1)
    pos = np.arange(num_tokens)
    distance = pos[:, None] - pos[None, :]
    decay = np.exp(-slopes[:, None, None] * np.maximum(distance, 0)) * (distance >= 0)  # (H, T, T)
    visible = runs[:, :, None] == runs[:, None, :]  # (B, T, T)
    weights = np.einsum("bihd,bjhd->bhij", q, k) * decay[None] * visible[:, None]
    o = np.einsum("bhij,bjhe->bihe", weights, v)
    first_run = (runs == 0)[:, :, None, None]
    o += first_run * np.exp(-slopes[None, None, :, None] * (pos[None, :, None, None] + 1)) * np.einsum(
        "bihd,bhde->bihe", q, state0)
    last = num_tokens - 1
    in_last = (runs == runs[:, -1:])[:, :, None, None]  # (B, T, 1, 1)
    key_decay = np.exp(-slopes[None, None, :, None] * (last - pos)[None, :, None, None]) * in_last
    final = np.einsum("bthd,bthe->bhde", k * key_decay, v)
    final += (runs[:, -1] == 0)[:, None, None, None] * np.exp(-slopes * num_tokens)[None, :, None, None] * state0
    return o, final


@pytest.mark.parametrize("num_tokens,packed", [(1, False), (7, False), (13, True), (30, True)])
def test_reference_matches_quadratic_formula(num_tokens, packed):
    q, k, v, slopes, state0, segment_ids = random_inputs(num_tokens, 2, num_tokens, 3, 4, packed=packed)
    o, final = reference_lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids)
    want_o, want_final = quadratic_attention(q, k, v, slopes, state0, segment_ids)
    assert rel_err(o, want_o) < 1e-5
    assert rel_err(final, want_final) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("heads,head_dim", [(1, 8), (3, 16)])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_reference(num_tokens, heads, head_dim, packed):
    q, k, v, slopes, state0, segment_ids = random_inputs(
        1000 * num_tokens + heads, 2, num_tokens, heads, head_dim, packed=packed)
    want_o, want_final = lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids,
                                             return_final_state=True, impl="naive")
    o, final = lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids,
                                   return_final_state=True, impl="chunked", block_size=BLOCK)
    assert rel_err(o, want_o) < 1e-5
    assert rel_err(final, want_final) < 1e-5


def test_chunked_without_initial_state_or_segments():
    q, k, v, slopes, _, _ = random_inputs(7, 1, 2 * BLOCK + 3, 2, 8, packed=False)
    o, final = lightning_attention(q, k, v, slopes, return_final_state=True, impl="chunked", block_size=BLOCK)
    want_o, want_final = quadratic_attention(q, k, v, slopes, np.zeros((1, 2, 8, 8)), None)
    assert rel_err(o, want_o) < 1e-5
    assert rel_err(final, want_final) < 1e-5
    assert lightning_attention(q, k, v, slopes).shape == q.shape  # auto, no final state


def test_segment_reset_isolates_documents():
    """A document packed after another gives the same output as on its own (with no initial state)."""
    q, k, v, slopes, state0, _ = random_inputs(3, 1, 2 * BLOCK + 5, 2, 8, packed=False)
    split = BLOCK + 2
    segment_ids = jnp.where(jnp.arange(q.shape[1]) < split, 4, 9)[None]
    o, final = lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids,
                                   return_final_state=True, impl="chunked", block_size=BLOCK)
    alone, alone_final = lightning_attention(q[:, split:], k[:, split:], v[:, split:], slopes,
                                             return_final_state=True, impl="chunked", block_size=BLOCK)
    first = lightning_attention(q[:, :split], k[:, :split], v[:, :split], slopes, initial_state=state0,
                                impl="chunked", block_size=BLOCK)
    assert rel_err(o[:, split:], alone) < 1e-6
    assert rel_err(o[:, :split], first) < 1e-6
    assert rel_err(final, alone_final) < 1e-6


@pytest.mark.parametrize("num_tokens", [BLOCK - 1, 3 * BLOCK + 5])
def test_chunked_gradients_match_reference(num_tokens):
    q, k, v, slopes, state0, segment_ids = random_inputs(50 + num_tokens, 2, num_tokens, 2, 8)
    keys = jax.random.split(jax.random.PRNGKey(num_tokens), 2)
    do = jax.random.normal(keys[0], q.shape)
    dfinal = jax.random.normal(keys[1], state0.shape)

    def loss(impl):
        def f(q, k, v, s0):
            o, final = lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=segment_ids,
                                           return_final_state=True, impl=impl, block_size=BLOCK)
            return jnp.sum(o * do) + jnp.sum(final * dfinal)
        return f

    want = jax.grad(loss("naive"), argnums=(0, 1, 2, 3))(q, k, v, state0)
    got = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, v, state0)
    for name, g, w in zip(("dq", "dk", "dv", "dstate0"), got, want):
        assert rel_err(g, w) < 1e-5, name


def test_chunked_bfloat16():
    q, k, v, slopes, state0, segment_ids = random_inputs(11, 2, 2 * BLOCK + 3, 2, 16, dtype=jnp.bfloat16)
    o, final = lightning_attention(q, k, v, slopes, initial_state=state0, segment_ids=segment_ids,
                                   return_final_state=True, impl="chunked", block_size=BLOCK)
    want_o, want_final = quadratic_attention(q, k, v, slopes, state0, segment_ids)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_err(o, want_o) < 1e-2
    assert rel_err(final, want_final) < 1e-2


def test_decode_continues_the_prefill():
    q, k, v, slopes, state0, _ = random_inputs(21, 2, 6, 3, 8, packed=False)
    want_o, want_final = lightning_attention(q, k, v, slopes, initial_state=state0, return_final_state=True,
                                             impl="naive")
    state = state0
    for t in range(q.shape[1]):
        o_t, state = lightning_decode(q[:, t], k[:, t], v[:, t], slopes, state)
        assert rel_err(o_t, want_o[:, t]) < 1e-5
    assert rel_err(state, want_final) < 1e-5


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, slopes, state0, segment_ids = random_inputs(0, 1, 5, 2, 8)
    cases = [
        (dict(k=k[:, :4]), "k must have q's shape"),
        (dict(v=v.astype(jnp.bfloat16)), "v must have q's dtype"),
        (dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)), "q must be float32"),
        (dict(q=q[0], k=k[0], v=v[0]), "q must be"),
        (dict(slopes=slopes[:1]), "slopes must have shape"),
        (dict(initial_state=state0[:, :, :4]), "initial_state must have shape"),
        (dict(segment_ids=segment_ids[:, :3]), "segment_ids must have shape"),
        (dict(segment_ids=segment_ids.astype(jnp.float32)), "segment_ids must be integers"),
        (dict(impl="fast"), "impl must be one of"),
        (dict(block_size=0), "block_size must be"),
    ]
    for override, message in cases:
        args = dict(q=q, k=k, v=v, slopes=slopes)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            lightning_attention(**args)
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state0[:1, :1])
    with pytest.raises(ValueError, match="slopes must have shape"):
        lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes[None], state0)
