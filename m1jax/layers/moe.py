"""M1's mixture-of-experts block: float32 softmax router, top-k, renormalise, SwiGLU experts, dropless dispatch.

Router: probs = softmax(x @ gate) in float32 over all E experts; keep the top k; renormalise the k weights to sum to 1.
Expert e: w2(silu(w1 x) * w3 x), weights stored stacked: w1, w3 (E, hidden, F), w2 (E, F, hidden).
Dispatch: the N*k (token, expert) pairs are sorted by expert, each expert multiplies its contiguous rows (a grouped
matmul), and the weighted results are gathered back to their tokens. Nothing is dropped.
`moe_dense_reference` is the slow, obviously-correct twin: every token through every expert, weighted by a dense
(N, E) gate matrix that is zero off the top k.
"""
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Routing(NamedTuple):
    """Router decisions for N tokens: weights (N, k) float32 summing to 1, experts (N, k) int32,
    probs (N, E) float32 softmax over all experts, logits (N, E) float32."""
    weights: jax.Array
    experts: jax.Array
    probs: jax.Array
    logits: jax.Array


def route(x: jax.Array, gate: jax.Array, k: int) -> Routing:
    """x: (N, hidden); gate: (hidden, E). Float32 softmax over all experts, top-k, renormalised."""
    logits = jnp.dot(x.astype(jnp.float32), gate.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, k)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def routing_stats(routing: Routing, token_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-layer routing statistics over real tokens (token_mask (N,), 1 = real, 0 = padding).

    tokens_per_expert (E,): (token, expert) assignments; load (E,): their fraction; importance (E,): mean router
    probability; load_balancing_loss: Switch's E * sum_e load_e * importance_e (1.0 when perfectly balanced);
    z_loss: mean logsumexp(logits)^2; router_entropy: mean entropy of the softmax (nats).
    """
    num_tokens, k = routing.experts.shape
    num_experts = routing.probs.shape[-1]
    mask = jnp.ones((num_tokens,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    assignments = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32).sum(axis=1)  # (N, E)
    tokens_per_expert = jnp.sum(assignments * mask[:, None], axis=0)
    load = tokens_per_expert / (count * k)
    importance = jnp.sum(routing.probs * mask[:, None], axis=0) / count
    log_probs = jax.nn.log_softmax(routing.logits, axis=-1)
    entropy = -jnp.sum(routing.probs * log_probs, axis=-1)
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    return {
        "tokens_per_expert": tokens_per_expert,
        "load": load,
        "importance": importance,
        "load_balancing_loss": num_experts * jnp.sum(load * importance),
        "z_loss": jnp.sum(mask * z * z) / count,
        "router_entropy": jnp.sum(mask * entropy) / count,
    }


def ragged_dot_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """(M, K) rows sorted by group, (E, K, N) weights, (E,) sizes -> (M, N) through XLA's ragged_dot."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def default_grouped_matmul() -> GroupedMatmul:
    """The Pallas grouped matmul on GPU when available, XLA's ragged_dot elsewhere."""
    try:
        from pallas_kernels.grouped_matmul import grouped_matmul
    except ImportError:
        return ragged_dot_grouped_matmul
    return lambda lhs, rhs, group_sizes: grouped_matmul(lhs, rhs, group_sizes, impl="auto")


def sorted_dispatch(x: jax.Array, routing: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                    grouped_matmul: GroupedMatmul = ragged_dot_grouped_matmul) -> jax.Array:
    """Dropless expert computation. x: (N, hidden); w1, w3: (E, hidden, F); w2: (E, F, hidden). Returns (N, hidden).

    Rows are the N*k (token, expert) pairs sorted by expert (stable, so each expert sees its tokens in order).
    """
    num_tokens, k = routing.experts.shape
    num_experts = w1.shape[0]
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)  # sorted row r holds pair order[r]
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    rows = x[order // k]
    hidden = jax.nn.silu(grouped_matmul(rows, w1, group_sizes)) * grouped_matmul(rows, w3, group_sizes)
    out_rows = grouped_matmul(hidden, w2, group_sizes)
    pair_of_row = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    per_pair = out_rows[pair_of_row].reshape(num_tokens, k, -1)  # back to (token, choice) order
    weighted = per_pair.astype(jnp.float32) * routing.weights[..., None]
    return jnp.sum(weighted.astype(x.dtype), axis=1)


def moe_dense_reference(x: jax.Array, gate: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                        k: int) -> jax.Array:
    """Slow twin of `route` + `sorted_dispatch`: every token through every expert. x: (N, hidden) -> (N, hidden)."""
    routing = route(x, gate, k)
    dense_gate = jnp.zeros(routing.probs.shape, jnp.float32)
    dense_gate = dense_gate.at[jnp.arange(x.shape[0])[:, None], routing.experts].set(routing.weights)
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w1)) * jnp.einsum("nd,edf->nef", x, w3)
    outputs = jnp.einsum("nef,efd->ned", hidden, w2)
    return jnp.einsum("ne,ned->nd", dense_gate, outputs.astype(jnp.float32)).astype(x.dtype)


class MoE(nn.Module):
    """x: (B, T, hidden) -> ((B, T, hidden), routing statistics). Parameters: gate (hidden, E) float32 router,
    w1, w3 (E, hidden, F), w2 (E, F, hidden)."""

    config: M1Config
    grouped_matmul: GroupedMatmul | None = None

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        pdtype, cdtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        hidden, experts, width = cfg.hidden_size, cfg.num_experts, cfg.expert_size
        gate = self.param("gate", init, (hidden, experts), jnp.float32)  # the router stays float32
        w1 = self.param("w1", init, (experts, hidden, width), pdtype).astype(cdtype)
        w3 = self.param("w3", init, (experts, hidden, width), pdtype).astype(cdtype)
        w2 = self.param("w2", init, (experts, width, hidden), pdtype).astype(cdtype)
        flat = x.reshape(-1, hidden)
        routing = route(flat, gate, cfg.experts_per_token)
        matmul = self.grouped_matmul or default_grouped_matmul()
        out = sorted_dispatch(flat, routing, w1, w3, w2, matmul)
        mask = None if token_mask is None else token_mask.reshape(-1)
        return out.reshape(x.shape), routing_stats(routing, mask)
