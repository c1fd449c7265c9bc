"""M1's mixture-of-experts block: float32 softmax router, top-k, renormalise, SwiGLU experts, dropless dispatch.

Router: probs = softmax(x @ gate) in float32 over all E experts; keep the top k; renormalise the k weights to sum to 1.
Expert e: w2(silu(w1 x) * w3 x), weights stored stacked: w1, w3 (E, hidden, F), w2 (E, F, hidden).
Dispatch: the N*k (token, expert) pairs are sorted by expert, each expert multiplies its contiguous rows (a grouped
matmul), and the weighted results are gathered back to their tokens. Nothing is dropped by default.

Two runtime options (M1Config), both off in the exact model:
- expert_threshold (inference): after the top-k renormalisation, a token's lower-ranked choices whose weight is below
  the threshold are skipped and the kept weights renormalised; skipped pairs cost no expert work.
- capacity_factor: expert e processes at most C = ceil(cf * N * k / E) tokens of the batch (N tokens, padding
  included), its first C in batch order; the overflow is dropped (its contribution is zero, the residual carries the
  token) and counted. C is counted over the whole batch, so the result does not depend on how the batch is sharded.
A call that does no work (skipped, dropped, padding, or an expert living on another device) carries the sentinel
expert id E: it sorts after every real group and is left out of the group sizes.

`moe_dense_reference` is the slow, obviously-correct twin: every token through every expert, weighted by a dense
(N, E) gate matrix that is zero off the kept choices. Under a mesh with several devices the MoE module hands the
dispatch to `m1jax.layers.moe_parallel` (shard_map over the expert and data axes); the numbers are the same.
"""
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Routing(NamedTuple):
    """Router decisions for N tokens: weights (N, k) float32 summing to 1, experts (N, k) int32 (descending weight),
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


def skip_below_threshold(weights: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
    """weights (N, k) in descending order, summing to 1 -> (renormalised weights (N, k), skipped (N, k) bool).

    Choices after the first whose weight is below `threshold` are skipped (weight 0) and the kept weights renormalised
    to sum to 1. A threshold of 0 returns the weights untouched, bit for bit.
    """
    if threshold <= 0.0:
        return weights, jnp.zeros(weights.shape, bool)
    skipped = (weights < threshold) & (jnp.arange(weights.shape[-1]) > 0)
    kept = jnp.where(skipped, 0.0, weights)
    return kept / jnp.sum(kept, axis=-1, keepdims=True), skipped


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * k / E): the most tokens one expert processes in a batch of N tokens."""
    return max(1, math.ceil(round(capacity_factor * num_tokens * k / num_experts, 9)))


def over_capacity(experts: jax.Array, capacity: int, num_experts: int,
                  earlier_counts: jax.Array | None = None) -> jax.Array:
    """experts (N, k) int32 in [0, E] (E: no call) -> dropped (N, k) bool.

    A call to expert e is dropped when e already has `capacity` calls from earlier tokens: those before it here plus
    earlier_counts[e] (E,) made by tokens that come before these in the batch (other devices' shards).
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts + 1)
    group_start = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(flat.shape[0]) - group_start[flat[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    if earlier_counts is not None:
        rank = rank + jnp.concatenate([earlier_counts, jnp.zeros((1,), earlier_counts.dtype)])[flat]
    return ((flat < num_experts) & (rank >= capacity)).reshape(experts.shape)


def routing_stats(routing: Routing, token_mask: jax.Array | None = None, skipped: jax.Array | None = None,
                  dropped: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-layer routing statistics over real tokens (token_mask (N,), 1 = real, 0 = padding).

    tokens_per_expert (E,): the router's top-k (token, expert) assignments; load (E,): their fraction; importance
    (E,): mean router probability; load_balancing_loss: Switch's E * sum_e load_e * importance_e (1.0 when perfectly
    balanced); z_loss: mean logsumexp(logits)^2; router_entropy: mean entropy of the softmax (nats);
    expert_calls (E,): assignments actually computed (neither skipped by expert_threshold nor dropped over capacity);
    skipped_fraction, dropped_fraction: the real tokens' skipped (N, k) and dropped (N, k) assignments over all of
    their assignments.
    """
    num_tokens, k = routing.experts.shape
    num_experts = routing.probs.shape[-1]
    mask = jnp.ones((num_tokens,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    skipped = jnp.zeros((num_tokens, k), bool) if skipped is None else skipped
    dropped = jnp.zeros((num_tokens, k), bool) if dropped is None else dropped
    one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32) * mask[:, None, None]  # (N, k, E)
    tokens_per_expert = jnp.sum(one_hot, axis=(0, 1))
    computed = (~skipped & ~dropped).astype(jnp.float32)
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
        "expert_calls": jnp.sum(one_hot * computed[..., None], axis=(0, 1)),
        "skipped_fraction": jnp.sum(mask[:, None] * skipped) / (count * k),
        "dropped_fraction": jnp.sum(mask[:, None] * dropped) / (count * k),
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


def sorted_dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                    w2: jax.Array, grouped_matmul: GroupedMatmul = ragged_dot_grouped_matmul,
                    max_rows: int | None = None) -> jax.Array:
    """Expert computation of the kept calls. x: (N, hidden); weights (N, k) float32; experts (N, k) int32 in [0, E],
    E meaning "no call"; w1, w3: (E, hidden, F); w2: (E, F, hidden). Returns (N, hidden) float32.

    Rows are the N*k (token, expert) pairs sorted by expert (stable, so each expert sees its tokens in order); the
    no-call pairs sort last and are left out of the group sizes, so they cost no grouped-matmul work. max_rows (static)
    keeps only the first rows of the sorted order: it must be at least the number of real calls.
    """
    num_tokens, k = experts.shape
    num_experts = w1.shape[0]
    flat_experts = experts.reshape(-1)
    num_rows = num_tokens * k if max_rows is None else min(max_rows, num_tokens * k)
    order = jnp.argsort(flat_experts, stable=True)  # sorted row r holds pair order[r]
    group_sizes = jnp.bincount(flat_experts, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    rows = x[order[:num_rows] // k]
    hidden = jax.nn.silu(grouped_matmul(rows, w1, group_sizes)) * grouped_matmul(rows, w3, group_sizes)
    out_rows = grouped_matmul(hidden, w2, group_sizes)
    row_of_pair = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    per_pair = jnp.take(out_rows, row_of_pair, axis=0, mode="fill", fill_value=0)  # back to (token, choice) order
    kept = (flat_experts < num_experts)[:, None]
    weighted = jnp.where(kept, per_pair.astype(jnp.float32) * weights.reshape(-1, 1), 0.0)
    return jnp.sum(weighted.reshape(num_tokens, k, -1), axis=1)


def dispatch_locally(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                     w2: jax.Array, grouped_matmul: GroupedMatmul, capacity: int | None = None):
    """One device: x (N, hidden), weights / experts (N, k) (E = no call) -> (out (N, hidden) float32,
    dropped (N, k) bool)."""
    num_tokens, k = experts.shape
    num_experts = w1.shape[0]
    if capacity is None:
        dropped = jnp.zeros(experts.shape, bool)
        max_rows = None
    else:
        dropped = over_capacity(experts, capacity, num_experts)
        max_rows = num_experts * capacity
    calls = jnp.where(dropped, num_experts, experts)
    return sorted_dispatch(x, weights, calls, w1, w3, w2, grouped_matmul, max_rows), dropped


def moe_dense_reference(x: jax.Array, gate: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, k: int,
                        expert_threshold: float = 0.0, capacity: int | None = None) -> jax.Array:
    """Slow twin of the MoE layer: every token through every expert. x: (N, hidden) -> (N, hidden).

    The dense (N, E) gate holds each token's kept weights: top-k renormalised; choices after the first below
    expert_threshold removed and the rest renormalised; with a capacity, expert e keeps only its first `capacity`
    tokens in batch order (a running count down the token axis).
    """
    routing = route(x, gate, k)
    rank = jnp.arange(k)[None, :]
    kept_choice = (rank == 0) | (routing.weights >= expert_threshold)
    weights = jnp.where(kept_choice, routing.weights, 0.0)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    dense_gate = jnp.zeros(routing.probs.shape, jnp.float32)
    dense_gate = dense_gate.at[jnp.arange(x.shape[0])[:, None], routing.experts].set(weights)
    if capacity is not None:
        calls = (dense_gate > 0).astype(jnp.int32)
        tokens_before = jnp.cumsum(calls, axis=0) - calls
        dense_gate = jnp.where(tokens_before < capacity, dense_gate, 0.0)
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w1)) * jnp.einsum("nd,edf->nef", x, w3)
    outputs = jnp.einsum("nef,efd->ned", hidden, w2)
    return jnp.einsum("ne,ned->nd", dense_gate, outputs.astype(jnp.float32)).astype(x.dtype)


class MoE(nn.Module):
    """x: (B, T, hidden) -> ((B, T, hidden), routing statistics). Parameters: gate (hidden, E) float32 router,
    w1, w3 (E, hidden, F), w2 (E, F, hidden). token_mask (B, T): padding (0) makes no expert call.

    Under `jax.set_mesh(mesh)` with more than one device on the mesh's data/fsdp/expert/tensor axes, the dispatch runs
    expert-parallel (m1jax.layers.moe_parallel); otherwise on one device as below.
    """

    config: M1Config
    grouped_matmul: GroupedMatmul | None = None

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
        from m1jax.layers import moe_parallel  # imported here: moe_parallel builds on this module's functions

        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        pdtype, cdtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        hidden, num_experts, width, k = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.experts_per_token
        gate = self.param("gate", init, (hidden, num_experts), jnp.float32)  # the router stays float32
        w1 = self.param("w1", init, (num_experts, hidden, width), pdtype).astype(cdtype)
        w3 = self.param("w3", init, (num_experts, hidden, width), pdtype).astype(cdtype)
        w2 = self.param("w2", init, (num_experts, width, hidden), pdtype).astype(cdtype)
        flat = x.reshape(-1, hidden)
        routing = route(flat, gate, k)
        weights, skipped = skip_below_threshold(routing.weights, cfg.expert_threshold)
        mask = None if token_mask is None else token_mask.reshape(-1).astype(bool)
        no_call = skipped if mask is None else skipped | ~mask[:, None]
        calls = jnp.where(no_call, num_experts, routing.experts)
        capacity = (None if cfg.capacity_factor is None
                    else expert_capacity(flat.shape[0], k, num_experts, cfg.capacity_factor))
        matmul = self.grouped_matmul or default_grouped_matmul()
        mesh = moe_parallel.expert_parallel_mesh()
        if mesh is None:
            out, dropped = dispatch_locally(flat.astype(cdtype), weights, calls, w1, w3, w2, matmul, capacity)
        else:
            out, dropped = moe_parallel.dispatch_expert_parallel(
                x.astype(cdtype), weights, calls, w1, w3, w2, mesh=mesh, grouped_matmul=matmul, capacity=capacity)
        return out.astype(x.dtype).reshape(x.shape), routing_stats(routing, mask, skipped, dropped)
