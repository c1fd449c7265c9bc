"""MoE: sorted dropless dispatch against the dense all-experts twin, routing rules and statistics."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax.config import M1Config
from m1jax.layers.moe import MoE, moe_dense_reference, route, routing_stats, sorted_dispatch


def random_experts(rng, num_experts, hidden, width, scale=0.3):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
    return draw(hidden, num_experts), draw(num_experts, hidden, width), draw(num_experts, hidden, width), \
        draw(num_experts, width, hidden)


@pytest.mark.parametrize("tokens, experts, k", [(37, 4, 2), (5, 8, 1), (64, 6, 3), (1, 4, 4)])
def test_sorted_dispatch_equals_dense_reference(tokens, experts, k):
    rng = np.random.default_rng()
    gate, w1, w3, w2 = random_experts(rng, experts, 24, 40)
    x = jnp.asarray(rng.standard_normal((tokens, 24)), jnp.float32)
    got = sorted_dispatch(x, route(x, gate, k), w1, w3, w2)
    want = moe_dense_reference(x, gate, w1, w3, w2, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_uneven_and_empty_expert_groups_and_gradients():
    rng = np.random.default_rng()
    gate, w1, w3, w2 = random_experts(rng, 6, 16, 20)
    gate = gate.at[:, 0].add(5.0).at[:, 4].add(-50.0)  # expert 0 overloaded, expert 4 never chosen
    x = jnp.asarray(rng.standard_normal((29, 16)), jnp.float32) + 1.0
    counts = routing_stats(route(x, gate, 2))["tokens_per_expert"]
    assert counts[4] == 0 and counts[0] == 29 and counts.sum() == 58

    def loss(fn, x, gate, w1, w3, w2):
        return jnp.sum(jnp.sin(fn(x, gate, w1, w3, w2)))
    fast = lambda x, g, a, b, c: sorted_dispatch(x, route(x, g, 2), a, b, c)
    slow = lambda x, g, a, b, c: moe_dense_reference(x, g, a, b, c, 2)
    args = (x, gate, w1, w3, w2)
    np.testing.assert_allclose(loss(fast, *args), loss(slow, *args), rtol=1e-5)
    grads_fast = jax.grad(lambda *a: loss(fast, *a), argnums=(0, 1, 2, 3, 4))(*args)
    grads_slow = jax.grad(lambda *a: loss(slow, *a), argnums=(0, 1, 2, 3, 4))(*args)
    for gf, gs in zip(grads_fast, grads_slow):
        np.testing.assert_allclose(gf, gs, rtol=1e-4, atol=1e-5)
    assert not np.any(grads_fast[2][4]) and np.any(grads_fast[2][0])  # unused expert gets no gradient


def test_router_renormalises_top_k_in_float32():
    rng = np.random.default_rng()
    gate = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((11, 8)), jnp.bfloat16)
    r = route(x, gate, 2)
    assert r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32
    np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
    probs = np.asarray(jax.nn.softmax(np.asarray(x, np.float32) @ np.asarray(gate), axis=-1))
    top = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(r.experts, -1), np.sort(top, -1))


def test_routing_statistics():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
    probs = jax.nn.softmax(logits)
    top, experts = jax.lax.top_k(probs, 2)
    from m1jax.layers.moe import Routing
    r = Routing(top / top.sum(-1, keepdims=True), experts, probs, logits)
    mask = jnp.asarray(rng.random(50) > 0.3)
    stats = routing_stats(r, mask)
    n = int(mask.sum())
    np.testing.assert_allclose(stats["tokens_per_expert"].sum(), 2 * n)
    np.testing.assert_allclose(stats["load"].sum(), 1.0, rtol=1e-6)
    f = np.asarray(stats["load"]); p = np.asarray(probs)[np.asarray(mask)].mean(0)
    np.testing.assert_allclose(stats["load_balancing_loss"], 4 * (f * p).sum(), rtol=1e-5)
    z = np.log(np.exp(np.asarray(logits)).sum(-1))[np.asarray(mask)]
    np.testing.assert_allclose(stats["z_loss"], (z ** 2).mean(), rtol=1e-5)
    uniform = Routing(r.weights, jnp.asarray(np.stack([np.arange(50) % 4, (np.arange(50) + 1) % 4], 1)),
                      jnp.full((50, 4), 0.25), jnp.zeros((50, 4)))
    np.testing.assert_allclose(routing_stats(uniform)["load_balancing_loss"], 1.0, rtol=1e-6)


def test_moe_module_shapes_and_dtypes():
    cfg = M1Config.from_preset("tiny", param_dtype="bfloat16", compute_dtype="bfloat16")
    x = jnp.asarray(np.random.default_rng().standard_normal((2, 9, cfg.hidden_size)), jnp.bfloat16)
    params = MoE(cfg).init(jax.random.key(0), x)
    assert params["params"]["gate"].dtype == jnp.float32 and params["params"]["w1"].dtype == jnp.bfloat16
    out, stats = MoE(cfg).apply(params, x)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    assert stats["tokens_per_expert"].shape == (cfg.num_experts,)
