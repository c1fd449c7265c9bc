"""MoE: sorted dispatch against the dense all-experts twin, routing rules and statistics, expert_threshold, capacity;
the dispatch's gather-backward moves against autodiff's scatter-adds."""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers import moe_core
from m1jax.layers.moe import MoE, moe_dense_reference
from m1jax.layers.moe_core import (Routing, expert_capacity, over_capacity, route, routing_stats, skip_below_threshold,
                                   sorted_dispatch)
from m1jax.layers.moe_parallel import dispatch as dispatch_calls


def assert_allclose(actual, desired, **tolerances):
    """np.testing.assert_allclose where NaN never counts as equal to NaN."""
    np.testing.assert_allclose(actual, desired, equal_nan=False, **tolerances)


def random_experts(rng, num_experts, hidden, width, scale=0.3):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
    return draw(hidden, num_experts), draw(num_experts, hidden, width), draw(num_experts, hidden, width), \
        draw(num_experts, width, hidden)


def init_moe(cfg, key, x, policy=RunPolicy()):
    return jax.jit(MoE(cfg, policy=policy).init)(key, x)


def dispatch(x, gate, w1, w3, w2, k):
    r = route(x, gate, k)
    return sorted_dispatch(x, r.weights, r.experts, w1, w3, w2)


@pytest.mark.parametrize("tokens, experts, k", [(37, 4, 2), (5, 8, 1), (64, 6, 3), (1, 4, 4)])
def test_sorted_dispatch_equals_dense_reference(tokens, experts, k, rng):
    gate, w1, w3, w2 = random_experts(rng, experts, 24, 40)
    x = jnp.asarray(rng.standard_normal((tokens, 24)), jnp.float32)
    got = jax.jit(dispatch, static_argnums=5)(x, gate, w1, w3, w2, k)
    want = moe_dense_reference(x, gate, w1, w3, w2, k)
    assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pairs, experts", [(1, 4), (2, 8), (7, 3), (64, 6), (130, 32)])
def test_compare_sort_is_the_stable_sort(pairs, experts, rng, monkeypatch):
    """sort_by_expert by comparisons (decode-sized calls) gives the stable argsort's permutation, its inverse and the
    group sizes exactly: repeated ids, the sentinel E, empty and overloaded experts; the dispatch through it equals
    the dense twin."""
    ids = rng.integers(0, experts + 1, pairs)
    ids[: pairs // 2] = min(1, experts - 1)  # one expert takes half the pairs; most others few or none
    ids = jnp.asarray(rng.permutation(ids), jnp.int32)
    sort = lambda: jax.jit(lambda ids: moe_core.sort_by_expert(ids, experts))(ids)  # a new trace at each call
    monkeypatch.setattr(moe_core, "COMPARE_SORT_MAX_PAIRS", None)  # the argsort path
    want = sort()
    monkeypatch.setattr(moe_core, "COMPARE_SORT_MAX_PAIRS", pairs)
    got = sort()
    for name, a, b in zip(("order", "row_of_pair", "group_sizes"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(want[0], np.argsort(np.asarray(ids), kind="stable"))  # the twin is the sort
    gate, w1, w3, w2 = random_experts(rng, experts, 24, 40)
    x = jnp.asarray(rng.standard_normal((max(1, pairs // 2), 24)), jnp.float32)
    monkeypatch.setattr(moe_core, "COMPARE_SORT_MAX_PAIRS", 2 * x.shape[0])
    got = jax.jit(lambda *args: dispatch(*args, 2))(x, gate, w1, w3, w2)
    assert_allclose(got, moe_dense_reference(x, gate, w1, w3, w2, 2), rtol=1e-5, atol=1e-5)


def test_uneven_and_empty_expert_groups_and_gradients(rng):
    gate, w1, w3, w2 = random_experts(rng, 6, 16, 20)
    gate = gate.at[:, 0].add(5.0).at[:, 4].add(-50.0)  # expert 0 overloaded, expert 4 never chosen
    # sum(x) ~ N(16, 4^2) would come within reach of 0 about once in 1000 runs, letting expert 4 in or expert 0 out;
    # at N(16, 2^2) the +5 / -50 gate offsets (5 * sum(x) against logits of std ~1) decide every token
    x = jnp.asarray(rng.standard_normal((29, 16)) * 0.5, jnp.float32) + 1.0
    counts = routing_stats(route(x, gate, 2))["tokens_per_expert"]
    assert counts[4] == 0 and counts[0] == 29 and counts.sum() == 58

    def loss(fn, x, gate, w1, w3, w2):
        return jnp.sum(jnp.sin(fn(x, gate, w1, w3, w2)))
    fast = lambda x, g, a, b, c: dispatch(x, g, a, b, c, 2)
    slow = lambda x, g, a, b, c: moe_dense_reference(x, g, a, b, c, 2)
    args = (x, gate, w1, w3, w2)
    grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3, 4)))(*args)
    (value_fast, grads_fast), (value_slow, grads_slow) = grad(fast), grad(slow)
    assert_allclose(value_fast, value_slow, rtol=1e-5, atol=1e-4)
    for gf, gs in zip(grads_fast, grads_slow):  # float32 sums of ~30 terms of size ~10: tolerance by scale
        assert_allclose(gf, gs, rtol=1e-4, atol=1e-5 * np.abs(gs).max())
    assert not np.any(grads_fast[2][4]) and np.any(grads_fast[2][0])  # unused expert gets no gradient


def test_router_renormalises_top_k_in_float32(rng):
    gate = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((11, 8)), jnp.bfloat16)
    r = route(x, gate, 2)
    assert r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32
    assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
    probs = np.asarray(jax.nn.softmax(np.asarray(x, np.float32) @ np.asarray(gate), axis=-1))
    top = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(r.experts, -1), np.sort(top, -1))


def test_routing_statistics(rng):
    logits = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
    probs = jax.nn.softmax(logits)
    top, experts = jax.lax.top_k(probs, 2)
    r = Routing(top / top.sum(-1, keepdims=True), experts, probs, logits)
    mask = jnp.asarray(rng.random(50) > 0.3)
    skipped = jnp.asarray(rng.random((50, 2)) > 0.7).at[:, 0].set(False)
    dropped = jnp.asarray(rng.random((50, 2)) > 0.8) & ~skipped
    stats = routing_stats(r, mask, skipped, dropped)
    n = int(mask.sum())
    m = np.asarray(mask)[:, None]
    assert_allclose(stats["tokens_per_expert"].sum(), 2 * n)
    assert_allclose(stats["load"].sum(), 1.0, rtol=1e-6)
    f = np.asarray(stats["load"]); p = np.asarray(probs)[np.asarray(mask)].mean(0)
    assert_allclose(stats["load_balancing_loss"], 4 * (f * p).sum(), rtol=1e-5)
    z = np.log(np.exp(np.asarray(logits)).sum(-1))[np.asarray(mask)]
    assert_allclose(stats["z_loss"], (z ** 2).mean(), rtol=1e-5)
    entropy = -(np.asarray(probs) * np.log(np.asarray(probs))).sum(-1)[np.asarray(mask)]
    assert_allclose(stats["router_entropy"], entropy.mean(), rtol=1e-5)
    computed = m & ~np.asarray(skipped) & ~np.asarray(dropped)
    want_calls = np.bincount(np.asarray(experts)[computed], minlength=4)
    np.testing.assert_array_equal(stats["expert_calls"], want_calls)
    assert_allclose(stats["skipped_fraction"], (m & np.asarray(skipped)).sum() / (2 * n), rtol=1e-6)
    assert_allclose(stats["dropped_fraction"], (m & np.asarray(dropped)).sum() / (2 * n), rtol=1e-6)
    uniform = Routing(r.weights, jnp.asarray(np.stack([np.arange(50) % 4, (np.arange(50) + 1) % 4], 1)),
                      jnp.full((50, 4), 0.25), jnp.zeros((50, 4)))
    assert_allclose(routing_stats(uniform)["load_balancing_loss"], 1.0, rtol=1e-6)


def test_moe_module_shapes_and_dtypes(rng):
    cfg, bf16 = M1Config.from_preset("tiny"), RunPolicy(param_dtype="bfloat16", compute_dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)), jnp.bfloat16)
    params = init_moe(cfg, jax.random.key(0), x, bf16)
    assert params["params"]["gate"].dtype == jnp.float32 and params["params"]["w1"].dtype == jnp.bfloat16
    out, stats = jax.jit(MoE(cfg, policy=bf16).apply)(params, x)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    assert stats["tokens_per_expert"].shape == (cfg.num_experts,)
    assert all(stats[name].shape == () for name in ("skipped_fraction", "dropped_fraction", "z_loss"))


def test_float32_input_with_bfloat16_compute_feeds_the_experts_in_bfloat16(rng):
    from pallas_kernels.grouped_matmul import grouped_matmul  # checks that both operands share a dtype
    cfg = M1Config.from_preset("tiny")
    x = jnp.asarray(rng.standard_normal((2, 5, cfg.hidden_size)), jnp.float32)
    moe = MoE(cfg, lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, impl="reference"),
              policy=RunPolicy(compute_dtype="bfloat16"))
    params = jax.jit(moe.init)(jax.random.key(0), x)
    out, _ = jax.jit(moe.apply)(params, x)
    p = params["params"]
    want = moe_dense_reference(x.reshape(-1, cfg.hidden_size), p["gate"], p["w1"], p["w3"], p["w2"], 2)
    assert out.dtype == jnp.float32
    assert_allclose(out.reshape(want.shape), want, rtol=5e-2, atol=5e-3)


# ----- expert_threshold -----

def test_skip_below_threshold_rule():
    weights = jnp.asarray([[0.5, 0.3, 0.2], [0.9, 0.06, 0.04], [0.34, 0.33, 0.33]], jnp.float32)
    kept, skipped = skip_below_threshold(weights, 0.25)
    np.testing.assert_array_equal(skipped, [[False, False, True], [False, True, True], [False, False, False]])
    assert_allclose(kept, [[0.625, 0.375, 0.0], [1.0, 0.0, 0.0], [0.34, 0.33, 0.33]], rtol=1e-6)
    _, first_only = skip_below_threshold(jnp.asarray([[0.4, 0.3, 0.3]]), 0.9)  # the first choice is always kept
    np.testing.assert_array_equal(first_only, [[False, True, True]])
    same, none = skip_below_threshold(weights, 0.0)
    assert same is weights and not np.any(none)


def test_threshold_zero_is_exact_and_raising_it_never_adds_expert_calls(rng):
    cfg = M1Config.from_preset("tiny", num_experts=6, experts_per_token=3)
    x = jnp.asarray(rng.standard_normal((3, 17, cfg.hidden_size)), jnp.float32)
    params = init_moe(cfg, jax.random.key(1), x)
    params = jax.tree.map(lambda a: a, params)
    params["params"]["gate"] = params["params"]["gate"] * 40  # spread the router's weights
    p, flat = params["params"], x.reshape(-1, cfg.hidden_size)
    exact, exact_stats = jax.jit(MoE(cfg).apply)(params, x)
    assert_allclose(exact.reshape(flat.shape), moe_dense_reference(flat, p["gate"], p["w1"], p["w3"],
                                                                              p["w2"], 3), rtol=1e-5, atol=1e-6)
    assert exact_stats["skipped_fraction"] == 0
    previous_calls, previous_kept = exact_stats["expert_calls"].sum(), None
    for threshold in (0.1, 0.3, 0.45):
        moe = MoE(cfg, policy=RunPolicy(expert_threshold=threshold))
        out, stats = jax.jit(moe.apply)(params, x)
        want = moe_dense_reference(flat, p["gate"], p["w1"], p["w3"], p["w2"], 3, expert_threshold=threshold)
        assert_allclose(out.reshape(flat.shape), want, rtol=1e-5, atol=1e-6)
        calls = stats["expert_calls"].sum()
        assert calls <= previous_calls
        assert_allclose(stats["skipped_fraction"], 1 - calls / (flat.shape[0] * 3), rtol=1e-6)
        kept = ~skip_below_threshold(route(flat, p["gate"], 3).weights, threshold)[1]
        assert previous_kept is None or not np.any(kept & ~previous_kept)  # a skipped call never comes back
        previous_calls, previous_kept = calls, np.asarray(kept)
    assert previous_calls < exact_stats["expert_calls"].sum()  # the thresholds did skip something


def test_no_call_pairs_cost_no_grouped_matmul_rows(rng):
    gate, w1, w3, w2 = random_experts(rng, 5, 12, 16)
    x = jnp.asarray(rng.standard_normal((23, 12)), jnp.float32)
    r = route(x, gate, 2)
    calls = r.experts.at[::3, 1].set(5).at[4].set(5)  # sentinel 5 = no call
    seen = []

    def recording_matmul(lhs, rhs, group_sizes):
        seen.append((lhs.shape[0], int(group_sizes.sum())))
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    out = sorted_dispatch(x, r.weights, calls, w1, w3, w2, recording_matmul)
    real = int((np.asarray(calls) < 5).sum())
    assert seen and all(total == real for _, total in seen)
    dense_gate = np.zeros((23, 5), np.float32)
    for n in range(23):
        for j in range(2):
            if calls[n, j] < 5:
                dense_gate[n, int(calls[n, j])] = r.weights[n, j]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w1)) * jnp.einsum("nd,edf->nef", x, w3)
    want = jnp.einsum("ne,ned->nd", dense_gate, jnp.einsum("nef,efd->ned", hidden, w2))
    assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_padding_tokens_make_no_expert_calls(rng):
    cfg = M1Config.from_preset("tiny")
    x = jnp.asarray(rng.standard_normal((2, 11, cfg.hidden_size)), jnp.float32)
    mask = jnp.asarray(np.arange(11)[None, :] < np.array([[11], [6]]))
    params = init_moe(cfg, jax.random.key(2), x)
    out, stats = jax.jit(MoE(cfg).apply)(params, x, mask)
    full, _ = jax.jit(MoE(cfg).apply)(params, x)
    assert stats["expert_calls"].sum() == 17 * 2 and stats["tokens_per_expert"].sum() == 17 * 2
    assert_allclose(out[mask], full[mask], rtol=1e-6, atol=1e-7)
    assert not np.any(out[~mask])


# ----- capacity -----

def simulate_capacity(experts: np.ndarray, capacity: int, num_experts: int) -> np.ndarray:
    """Walk the (token, choice) calls in batch order; an expert that has `capacity` calls already drops the rest."""
    taken = np.zeros(num_experts, int)
    dropped = np.zeros(experts.shape, bool)
    for n in range(experts.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[n, j]
            if e == num_experts:
                continue
            dropped[n, j] = taken[e] >= capacity
            taken[e] += 1
    return dropped


def test_expert_capacity_formula():
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(101, 2, 8, 1.0) == 26
    assert expert_capacity(48, 2, 32, 1.25) == 4  # 3.75 rounds up
    assert expert_capacity(64, 2, 32, 1.25) == 5  # exactly 5: no float fuzz past it
    assert expert_capacity(1, 1, 32, 0.1) == 1


@pytest.mark.parametrize("capacity", [1, 3, 7])
def test_over_capacity_matches_a_sequential_simulation(capacity, rng):
    experts = np.stack([rng.choice(5, size=2, replace=False, p=[0.5, 0.2, 0.1, 0.1, 0.1]) for _ in range(31)])
    experts[rng.random(31) < 0.2, 1] = 5  # some no-call pairs
    got = jax.jit(over_capacity, static_argnums=(1, 2))(jnp.asarray(experts, jnp.int32), capacity, 5)
    np.testing.assert_array_equal(got, simulate_capacity(experts, capacity, 5))
    earlier = np.array([0, capacity, 1, 0, capacity - 1])  # calls made by tokens before these
    got = over_capacity(jnp.asarray(experts, jnp.int32), capacity, 5, jnp.asarray(earlier, jnp.int32))
    prefix = np.concatenate([np.repeat(np.arange(5), earlier)[:, None], np.full((earlier.sum(), 1), 5)], 1)
    np.testing.assert_array_equal(got, simulate_capacity(np.concatenate([prefix, experts]), capacity, 5)[len(prefix):])


def test_capacity_mode_drops_exactly_the_overflow_and_counts_it(rng):
    cfg, capped = M1Config.from_preset("tiny", num_experts=4), RunPolicy(capacity_factor=0.75)
    x = jnp.asarray(rng.standard_normal((2, 15, cfg.hidden_size)), jnp.float32) + 0.5
    params = init_moe(cfg, jax.random.key(3), x)
    params = jax.tree.map(lambda a: a, params)
    params["params"]["gate"] = params["params"]["gate"].at[:, 1].add(0.3)  # expert 1 overloaded
    p, flat = params["params"], x.reshape(-1, cfg.hidden_size)
    capacity = expert_capacity(30, 2, 4, 0.75)
    experts = np.asarray(route(flat, p["gate"], 2).experts)
    want_dropped = simulate_capacity(experts, capacity, 4)
    assert want_dropped.sum() > 0 and np.bincount(experts.ravel(), minlength=4).min() < capacity

    def loss(params, x):
        out, stats = MoE(cfg, policy=capped).apply(params, x)
        return jnp.sum(jnp.sin(out)), (out, stats)
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    assert_allclose(stats["dropped_fraction"], want_dropped.mean(), rtol=1e-6)
    np.testing.assert_array_equal(stats["expert_calls"], np.bincount(experts[~want_dropped], minlength=4))

    def dense_loss(p, x):
        return jnp.sum(jnp.sin(moe_dense_reference(x.reshape(flat.shape), p["gate"], p["w1"], p["w3"], p["w2"], 2,
                                                   capacity=capacity)))
    want_out = moe_dense_reference(flat, p["gate"], p["w1"], p["w3"], p["w2"], 2, capacity=capacity)
    assert_allclose(out.reshape(flat.shape), want_out, rtol=1e-5, atol=1e-6)
    want_grads = jax.jit(jax.grad(dense_loss))(p, x)
    jax.tree.map(lambda a, b: assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads["params"], want_grads)
    fully_dropped = want_dropped.all(axis=1)
    assert not np.any(out.reshape(flat.shape)[fully_dropped])  # only the residual carries these tokens


def test_one_device_dispatch_without_capacity_drops_nothing(rng):
    gate, w1, w3, w2 = random_experts(rng, 3, 8, 8)
    x = jnp.asarray(rng.standard_normal((9, 8)), jnp.float32)
    r = route(x, gate + jnp.asarray([[4.0, 0.0, 0.0]]), 2)
    out, dropped = dispatch_calls(x, r.weights, r.experts, w1, w3, w2, grouped_matmul=jax.lax.ragged_dot)
    assert not np.any(dropped)
    assert_allclose(out, moe_dense_reference(x, gate + jnp.asarray([[4.0, 0.0, 0.0]]), w1, w3, w2, 2),
                               rtol=1e-5, atol=1e-6)


# ----- sort_rows / unsort_rows: the dispatch's moves with gather backward passes -----

def autodiff_moves(monkeypatch):
    """Swap sorted_dispatch's moves for plain gathers, whose autodiff transposes are scatter-adds (the slow twin)."""
    monkeypatch.setattr(moe_core, "sort_rows", lambda x, pairs, row_of_pair: x[pairs // row_of_pair.shape[1]])
    monkeypatch.setattr(moe_core, "unsort_rows", lambda rows, pairs, row_of_pair: jnp.take(
        rows, row_of_pair, axis=0, mode="fill", fill_value=0))


def dispatch_value_and_grads(x, weights, calls, w1, w3, w2, probe, max_rows):
    """Jitted (traced afresh) sorted_dispatch output and the gradients of sum(sin(out) * probe) wrt x, weights, w1,
    w3, w2; also the compiled HLO text."""
    def loss(x, weights, w1, w3, w2, calls):
        out = sorted_dispatch(x, weights, calls, w1, w3, w2, max_rows=max_rows)
        return jnp.sum(jnp.sin(out) * probe), out
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, out), grads = step(x, weights, w1, w3, w2, calls)
    return out, grads, step.lower(x, weights, w1, w3, w2, calls).compile().as_text()


def float_scatters(hlo: str) -> int:
    return len(re.findall(r"= (?:f32|bf16)\[[^\]]*\]\S* scatter\(", hlo))


@pytest.mark.parametrize("tokens, experts, k, dtype, skip, capacity_factor", [
    (29, 6, 2, jnp.float32, 0.0, None),  # uneven loads, an unused expert, every row real
    (29, 6, 2, jnp.float32, 0.3, 0.8),  # skipped and dropped calls, max_rows < N*k
    (23, 5, 3, jnp.float32, 0.3, 0.9),  # k = 3: d_x sums three terms in another order
    (13, 4, 1, jnp.float32, 0.0, 0.5),
    (1, 5, 4, jnp.float32, 0.0, None),
    (29, 6, 2, jnp.bfloat16, 0.3, 0.8),
    (23, 5, 3, jnp.bfloat16, 0.3, 0.9),
])
def test_dispatch_moves_backward_equals_autodiff(tokens, experts, k, dtype, skip, capacity_factor, rng, monkeypatch):
    hidden, width = 12, 20
    _, w1, w3, w2 = random_experts(rng, experts, hidden, width)
    load = np.arange(experts - 1, 0, -1) ** 2.0  # uneven; the last expert is never called
    calls = np.stack([rng.choice(experts - 1, size=k, replace=False, p=load / load.sum()) for _ in range(tokens)])
    calls[:, 1:][rng.random((tokens, k - 1)) < skip] = experts  # lower choices skipped (as by expert_threshold)
    calls = jnp.asarray(calls, jnp.int32)
    max_rows = None
    if capacity_factor is not None:
        capacity = expert_capacity(tokens, k, experts, capacity_factor)
        calls = jnp.where(over_capacity(calls, capacity, experts), experts, calls)
        max_rows = experts * capacity
        assert int((calls < experts).sum()) <= max_rows < tokens * k  # so some calls were dropped
    weights = jnp.asarray(rng.random((tokens, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    x, w1, w3, w2 = (a.astype(dtype) for a in (x, w1, w3, w2))
    probe = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    out, grads, hlo = dispatch_value_and_grads(x, weights, calls, w1, w3, w2, probe, max_rows)
    with monkeypatch.context() as patch:
        autodiff_moves(patch)
        want_out, want_grads, want_hlo = dispatch_value_and_grads(x, weights, calls, w1, w3, w2, probe, max_rows)

    np.testing.assert_array_equal(out, want_out)  # the forward is the same gathers
    assert float_scatters(hlo) == 0 and float_scatters(want_hlo) == 2  # the twin's backward scatter-adds are gone
    for name, got, want in zip(("x", "weights", "w1", "w3", "w2"), grads, want_grads):
        assert got.dtype == want.dtype, name
        if name == "x" and k > 2:  # the same k terms per token, summed in another order: a few ulps
            ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -7
            scale = np.abs(np.asarray(want, np.float32)).max()
            assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=4 * ulp * scale)
        else:  # every row's gradient moves to one place: exact
            np.testing.assert_array_equal(got, want, err_msg=name)
    calls = np.asarray(calls)
    real = (calls < experts).sum(axis=1)
    assert k == 1 or np.any(real > 1)  # some tokens sum several calls' gradients
    assert capacity_factor is not None or skip > 0 or np.all(real == k)
    assert np.all(np.asarray(grads[0], np.float32)[real > 0].any(axis=1))
    assert not np.any(np.asarray(grads[0])[real == 0])  # tokens without a call get no gradient
    assert not np.any(grads[2][experts - 1])  # nor does the unused expert


def test_sort_and_unsort_rows_vjp_without_jit(rng):
    """The moves alone, eagerly: rows past R (left-out pairs) read 0 and get no gradient; index arrays get float0."""
    tokens, k, hidden, kept_rows = 5, 3, 4, 11
    order = jnp.asarray(rng.permutation(tokens * k), jnp.int32)
    row_of_pair = jnp.zeros_like(order).at[order].set(jnp.arange(tokens * k, dtype=jnp.int32)).reshape(tokens, k)
    pairs = order[:kept_rows]
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    rows, sort_vjp = jax.vjp(moe_core.sort_rows, x, pairs, row_of_pair)
    np.testing.assert_array_equal(rows, np.asarray(x)[np.asarray(pairs) // k])
    d_rows = jnp.asarray(rng.standard_normal(rows.shape), jnp.float32)
    d_x, d_pairs, d_row_of_pair = sort_vjp(d_rows)
    want = np.zeros((tokens, hidden), np.float32)
    np.add.at(want, np.asarray(pairs) // k, np.asarray(d_rows))
    assert_allclose(d_x, want, rtol=1e-6, atol=1e-6)
    assert d_pairs.dtype == jax.dtypes.float0 and d_row_of_pair.dtype == jax.dtypes.float0

    back, unsort_vjp = jax.vjp(moe_core.unsort_rows, rows, pairs, row_of_pair)
    kept = np.asarray(row_of_pair) < kept_rows
    np.testing.assert_array_equal(np.asarray(back)[kept], np.asarray(x)[np.nonzero(kept)[0]])
    assert not np.any(np.asarray(back)[~kept])
    d_back = jnp.asarray(rng.standard_normal(back.shape), jnp.float32)
    d_rows_back = unsort_vjp(d_back)[0]
    np.testing.assert_array_equal(d_rows_back, np.asarray(d_back).reshape(tokens * k, hidden)[np.asarray(pairs)])


class _InterpretedPallas(moe_core.PallasGroupedMatmul):
    """PallasGroupedMatmul, its Pallas kernels in interpret mode (the CPU's "auto" picks the tiled path)."""

    def __call__(self, lhs, rhs, group_sizes):
        from pallas_kernels.grouped_matmul import grouped_matmul
        return grouped_matmul(lhs, rhs, group_sizes, impl="pallas", interpret=True)

    def swiglu(self, lhs, w1, w3, group_sizes):
        from pallas_kernels.grouped_matmul import grouped_swiglu
        return grouped_swiglu(lhs, w1, w3, group_sizes, impl="pallas", interpret=True)


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_sized_dispatch_through_the_fused_swiglu_equals_dense_reference(tokens, rng, monkeypatch):
    """A decode step's few tokens go through grouped_swiglu's gated kernel (spied), and the layer still equals the
    dense twin; a grouped matmul without `swiglu` (a plain function) runs the two calls."""
    from pallas_kernels.grouped_matmul import ops
    gated = []
    kernel = ops.grouped_matmul_kernel
    monkeypatch.setattr(ops, "grouped_matmul_kernel",
                        lambda *a, up=None, **kw: gated.append(up is not None) or kernel(*a, up=up, **kw))
    gate, w1, w3, w2 = random_experts(rng, 8, 24, 40)
    x = jnp.asarray(rng.standard_normal((tokens, 24)), jnp.float32)
    r = route(x, gate, 2)
    got = sorted_dispatch(x, r.weights, r.experts, w1, w3, w2, _InterpretedPallas())
    assert gated == [True, False]  # gate and up in one kernel, then the down projection
    assert_allclose(got, moe_dense_reference(x, gate, w1, w3, w2, 2), rtol=1e-5, atol=1e-5)
    gated.clear()
    plain = _InterpretedPallas()
    sorted_dispatch(x, r.weights, r.experts, w1, w3, w2, lambda *args: plain(*args))
    assert gated == [False, False, False]
