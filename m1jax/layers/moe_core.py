"""The MoE's pure functions: routing, expert_threshold, capacity, routing statistics and sorted dispatch.

Router: probs = softmax(x @ gate) in float32 over all E experts; keep the top k; renormalise the k weights to sum to 1.
Expert e: w2(silu(w1 x) * w3 x), weights stored stacked: w1, w3 (E, hidden, F), w2 (E, F, hidden).
Sorted dispatch: the N*k (token, expert) calls are sorted by expert, each expert multiplies its contiguous rows (a
grouped matmul), and the weighted results are gathered back to their tokens.

Two runtime options, both off in the exact model:
- expert_threshold (inference): after the top-k renormalisation, a token's lower-ranked choices whose weight is below
  the threshold are skipped and the kept weights renormalised; skipped calls cost no expert work.
- capacity_factor: expert e processes at most C = ceil(cf * N * k / E) calls of the batch (N tokens, padding
  included), its first C in batch order; the overflow is dropped (its contribution is zero, the residual carries the
  token) and counted. C is counted over the whole batch, so the result does not depend on how the batch is sharded.
A call that does no work (skipped, dropped, padding, or an expert living on another device) carries the sentinel
expert id E: it sorts after every real group and is left out of the group sizes.

Nothing here knows about meshes or Flax: `m1jax.layers.moe_parallel` runs the dispatch on one device or a mesh, and
`m1jax.layers.moe` is the Flax layer.
"""
import importlib.util
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Routing(NamedTuple):
    """Router decisions for N tokens: weights (N, k) float32 summing to 1, experts (N, k) int32 (descending weight),
    probs (N, E) float32 softmax over all experts, logits (N, E) float32."""
    weights: jax.Array
    experts: jax.Array
    probs: jax.Array
    logits: jax.Array


def route(x: jax.Array, gate: jax.Array, k: int) -> Routing:
    """Float32 softmax over all experts, top-k, renormalised.

    Args:
      x: (N, hidden) tokens.
      gate: (hidden, E) router weights.
      k: experts per token.
    Returns:
      Routing with weights, experts (N, k) and probs, logits (N, E).
    """
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
    """C = ceil(capacity_factor * N * k / E): the most calls one expert processes in a batch of N tokens."""
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


class PallasGroupedMatmul:
    """The default grouped matmul: pallas_kernels' op (Pallas kernels on GPU, a tiled pure-JAX path elsewhere),
    and `swiglu`: an expert's silu(x W1) * (x W3), from one kernel for decode-sized calls (pallas_kernels'
    grouped_swiglu: hf-bench batch-1 decode 1.03-1.10x faster than two calls in three H200 runs,
    benchmarks/RESULTS.md "Decode at batch 1"), from two calls otherwise."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        from pallas_kernels.grouped_matmul import grouped_matmul
        return grouped_matmul(lhs, rhs, group_sizes, impl="auto")

    def swiglu(self, lhs: jax.Array, w1: jax.Array, w3: jax.Array, group_sizes: jax.Array) -> jax.Array:
        from pallas_kernels.grouped_matmul import grouped_swiglu
        return grouped_swiglu(lhs, w1, w3, group_sizes, impl="auto")


def default_grouped_matmul() -> GroupedMatmul:
    """The Pallas grouped matmul on GPU when available, XLA's ragged_dot elsewhere."""
    if importlib.util.find_spec("pallas_kernels") is None:
        return ragged_dot_grouped_matmul
    return PallasGroupedMatmul()


def expert_hidden(rows: jax.Array, w1: jax.Array, w3: jax.Array, group_sizes: jax.Array,
                  grouped_matmul: GroupedMatmul) -> jax.Array:
    """silu(rows @ w1[g]) * (rows @ w3[g]) for rows sorted by expert: the grouped matmul's fused `swiglu` when it
    has one, else two calls and the element-wise product."""
    fused = getattr(grouped_matmul, "swiglu", None)
    if fused is not None:
        return fused(rows, w1, w3, group_sizes)
    return jax.nn.silu(grouped_matmul(rows, w1, group_sizes)) * grouped_matmul(rows, w3, group_sizes)


@jax.custom_vjp
def sort_rows(x: jax.Array, pairs: jax.Array, row_of_pair: jax.Array) -> jax.Array:
    """Tokens into expert-sorted rows: x (N, hidden) -> rows (R, hidden), rows[r] = x[pairs[r] // k].

    pairs (R,) int: the (token, choice) pair n*k + j held by sorted row r (the first R entries of a permutation of
    the N*k pairs); row_of_pair (N, k) int: its inverse, the row holding pair (n, j), >= R for pairs left out.
    Backward: autodiff transposes the gather into a scatter-add into (N, hidden). Each pair sits in at most one row,
    so instead d_x[n] = sum_j d_rows[row_of_pair[n, j]] (0 for pairs left out): a gather of N*k rows and a sum over
    k, the same bytes moved with no atomics (for k > 2 summed in choice order, not autodiff's row order: rounding
    may differ). The index arrays get no gradient.
    """
    return x[pairs // row_of_pair.shape[1]]


def _sort_rows_fwd(x, pairs, row_of_pair):
    return sort_rows(x, pairs, row_of_pair), row_of_pair


def _sort_rows_bwd(row_of_pair, d_rows):
    per_pair = jnp.take(d_rows, row_of_pair, axis=0, mode="fill", fill_value=0)  # (N, k, hidden)
    return jnp.sum(per_pair, axis=1), None, None


sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


@jax.custom_vjp
def unsort_rows(rows: jax.Array, pairs: jax.Array, row_of_pair: jax.Array) -> jax.Array:
    """Expert-sorted rows back to (token, choice) order: rows (R, hidden) -> (N, k, hidden), out[n, j] =
    rows[row_of_pair[n, j]], 0 where row_of_pair[n, j] >= R (pairs, row_of_pair as in `sort_rows`).

    Backward: autodiff transposes the gather into a scatter-add into (R, hidden). Row r feeds exactly one pair, so
    instead d_rows[r] = d_out.reshape(N*k, hidden)[pairs[r]]: a gather of R rows, exact (no sums), no atomics.
    """
    return jnp.take(rows, row_of_pair, axis=0, mode="fill", fill_value=0)


def _unsort_rows_fwd(rows, pairs, row_of_pair):
    return unsort_rows(rows, pairs, row_of_pair), (pairs, row_of_pair)


def _unsort_rows_bwd(residuals, d_out):
    pairs, row_of_pair = residuals
    return d_out.reshape(row_of_pair.size, -1)[pairs], None, None


unsort_rows.defvjp(_unsort_rows_fwd, _unsort_rows_bwd)


# Decode-sized calls (at most this many pairs) sort by comparing every pair with every other, in a few fused
# element-wise ops, instead of a sort, a bincount and a scatter (separate kernels each, for a handful of pairs at
# batch-1 decode): hf-bench batch-1 decode 0.594 -> 0.529 ms/token on an H200 (benchmarks/decode_flags.py, variant
# moe-compare-sort; RESULTS.md "Decode at batch 1"). 256 pairs: batch-64 decode at top-2 still fits (a 256 x 256
# comparison); prefill chunks and training batches take the sort. None: always the sort.
COMPARE_SORT_MAX_PAIRS: int | None = 256


def sort_by_expert(flat_experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stable sort of P (token, choice) pairs by expert id. flat_experts (P,) int32 in [0, E] ->
    (order (P,): sorted row r holds pair order[r]; row_of_pair (P,): its inverse; group_sizes (E,) int32: the pairs
    per expert, the sentinel E left out).

    For P <= COMPARE_SORT_MAX_PAIRS, by comparisons: pair p's row is the number of pairs q with a smaller expert id,
    or the same id and q < p; (P, P) booleans, exactly the stable sort's permutation."""
    size = flat_experts.shape[0]
    if COMPARE_SORT_MAX_PAIRS is not None and size <= COMPARE_SORT_MAX_PAIRS:
        index = jnp.arange(size, dtype=jnp.int32)
        mine, other = flat_experts[:, None], flat_experts[None, :]
        before = (other < mine) | ((other == mine) & (index[None, :] < index[:, None]))  # [p, q]: q sorts first
        row_of_pair = jnp.sum(before, axis=1, dtype=jnp.int32)
        order = jnp.sum(jnp.where(row_of_pair[None, :] == index[:, None], index[None, :], 0), axis=1)
        group_sizes = jnp.sum(flat_experts[None, :] == jnp.arange(num_experts, dtype=flat_experts.dtype)[:, None],
                              axis=1, dtype=jnp.int32)
        return order, row_of_pair, group_sizes
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    row_of_pair = jnp.zeros_like(order).at[order].set(jnp.arange(size, dtype=order.dtype))
    return order, row_of_pair, group_sizes


def sorted_dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                    w2: jax.Array, grouped_matmul: GroupedMatmul = ragged_dot_grouped_matmul,
                    max_rows: int | None = None) -> jax.Array:
    """Expert computation of the kept calls, sorted by expert.

    Rows are the N*k (token, expert) calls sorted by expert (stable, so each expert sees its tokens in order); the
    no-call pairs sort last and are left out of the group sizes, so they cost no grouped-matmul work. The moves into
    and out of the sorted order are `sort_rows` / `unsort_rows`, whose backward passes are gathers, not scatter-adds.

    Args:
      x: (N, hidden) tokens.
      weights: (N, k) float32 combine weights.
      experts: (N, k) int32 in [0, E]; E means "no call".
      w1, w3: (E, hidden, F); w2: (E, F, hidden) expert weights.
      grouped_matmul: (M, K) rows, (E, K, N) weights, (E,) group sizes -> (M, N).
      max_rows: (static) keep only the first rows of the sorted order; at least the number of real calls.
    Returns:
      (N, hidden) float32: each token's weighted sum over its kept calls.
    """
    num_tokens, k = experts.shape
    num_experts = w1.shape[0]
    num_rows = num_tokens * k if max_rows is None else min(max_rows, num_tokens * k)
    order, row_of_pair, group_sizes = sort_by_expert(experts.reshape(-1), num_experts)
    pairs, row_of_pair = order[:num_rows], row_of_pair.reshape(num_tokens, k)
    rows = sort_rows(x, pairs, row_of_pair)
    with jax.named_scope("moe_experts"):
        hidden = expert_hidden(rows, w1, w3, group_sizes, grouped_matmul)
        out_rows = grouped_matmul(hidden, w2, group_sizes)
    per_pair = unsort_rows(out_rows, pairs, row_of_pair)  # (N, k, hidden), back to (token, choice) order
    kept = (experts < num_experts)[..., None]
    weighted = jnp.where(kept, per_pair.astype(jnp.float32) * weights[..., None], 0.0)
    return jnp.sum(weighted, axis=1)
