"""The embedding's one-hot gradient (small vocabularies) against autodiff's scatter-add, and the switch between them."""
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.layers import embedding
from m1jax.layers.embedding import ONE_HOT_MAX_VOCAB, Embed, one_hot_grad_lookup


def take_twin(table, ids):
    return jnp.take(table, ids, axis=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("vocab,shape", [(7, (3, 11)), (256, (5, 129)), (1, (2, 3))])
def test_one_hot_gradient_equals_scatter_add(rng, dtype, vocab, shape):
    """Forward identical; d_table equal to autodiff's (float32: to summation order; bf16: one rounding of a float32
    sum against bf16 accumulation, so the one-hot side is compared to the float64 sum). Ids repeat heavily (a
    filler id at half of the positions, as in the recall tasks), some ids never occur, some are out of range."""
    hidden = 13
    table = jnp.asarray(rng.normal(size=(vocab, hidden)), dtype)
    ids = rng.integers(0, vocab, size=shape)
    ids[:, ::2] = 0  # the filler id
    ids[0, 0] = vocab  # out of range: NaN out, no gradient
    ids = jnp.asarray(ids, jnp.int32)
    d_out = jnp.asarray(rng.normal(size=shape + (hidden,)), dtype)
    out, pullback = jax.vjp(jax.jit(one_hot_grad_lookup), table, ids)
    twin_out, twin_pullback = jax.vjp(take_twin, table, ids)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(twin_out, np.float32))
    assert np.isnan(np.asarray(out[0, 0], np.float32)).all()
    d_table = np.asarray(pullback(d_out)[0], np.float64)
    flat_ids, flat_d = np.asarray(ids).reshape(-1), np.asarray(d_out, np.float64).reshape(-1, hidden)
    exact = np.zeros((vocab, hidden))
    np.add.at(exact, flat_ids[flat_ids < vocab], flat_d[flat_ids < vocab])
    if dtype == jnp.float32:
        np.testing.assert_allclose(d_table, np.asarray(twin_pullback(d_out)[0], np.float64), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_table, exact, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of the exact sum
        np.testing.assert_allclose(d_table, exact, rtol=2 ** -8, atol=1e-6)


def test_embed_uses_one_hot_gradient_only_for_small_vocabularies(monkeypatch):
    """The model's Embed routes small vocabularies through the one-hot gradient and large ones through jnp.take
    (whose autodiff is a scatter-add): counted in the compiled backward."""
    calls = []
    original = embedding.one_hot_grad_lookup
    monkeypatch.setattr(embedding, "one_hot_grad_lookup", lambda t, i: calls.append(t.shape[0]) or original(t, i))
    ids = jnp.zeros((2, 5), jnp.int32)
    for vocab, expected in ((ONE_HOT_MAX_VOCAB, [ONE_HOT_MAX_VOCAB]), (ONE_HOT_MAX_VOCAB + 1, [])):
        calls.clear()
        module = Embed(vocab, 8, jnp.float32, jnp.float32, jax.nn.initializers.normal(0.02))
        params = nn.Module.init(module, jax.random.key(0), ids)  # Embed's own field `init` shadows the method
        text = jax.jit(jax.grad(lambda p: module.apply(p, ids).sum())).lower(params).compile().as_text()
        assert set(calls) == set(expected)
        assert ("scatter" in text) == (not expected), f"vocab {vocab}: scatter in the backward = {'scatter' in text}"
