"""Token embedding, and its gradient for small vocabularies.

Lookup: out[b, t] = table[ids[b, t]] (an id outside [0, V) embeds as NaN: `jnp.take`'s fill).
Gradient: d_table[v] = sum over positions with ids == v of d_out. Autodiff writes it as a scatter-add of B*T rows into
V rows; on a GPU that is atomics, serialised when many positions share an id. With a small vocabulary most positions
do (the recall tasks: 256 ids, half of every row the filler id): the scatter-add took 53 of the 63 ms of the hybrid
ablation's training step on an H200. For V <= ONE_HOT_MAX_VOCAB the gradient is instead the matmul
one_hot(ids)^T @ d_out, (V, B*T) x (B*T, hidden): 2 * B*T * V * hidden FLOPs, float32 accumulation, no atomics. Larger
vocabularies keep the scatter-add (a one-hot matmul over 32K ids would cost more than the lm_head's).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.layers.partitioning import Module, named
from m1jax.sharding import constrain

ONE_HOT_MAX_VOCAB = 4096


@jax.custom_vjp
def one_hot_grad_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table (V, hidden), ids (...) int -> (..., hidden): jnp.take(table, ids, axis=0); backward one-hot matmul."""
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
    return one_hot_grad_lookup(table, ids), (ids, jnp.zeros((table.shape[0], 0), table.dtype))  # (V, 0): V, dtype


def _lookup_bwd(residuals, d_out):
    ids, like = residuals
    vocab, dtype = like.shape[0], like.dtype
    one_hot = jax.nn.one_hot(ids.reshape(-1), vocab, dtype=d_out.dtype)  # an id outside [0, V): a zero row
    d_table = jax.lax.dot_general(one_hot, d_out.reshape(-1, d_out.shape[-1]), (((0,), (0,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return d_table.astype(dtype), None


one_hot_grad_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embed(Module):
    """Token embedding: ids (B, T) -> (B, T, hidden) in the compute dtype; parameter `embedding` (V, hidden).

    Under a mesh the table's hidden dim is FSDP-sharded; it is gathered (constrained to ("vocab", None)) before the
    lookup, as FSDP gathers every weight just in time. Gathering rows from the sharded table instead leaves the output
    split over hidden, and XLA can only reach the activations' batch sharding from there by replicating the whole
    activation (its "[SPMD] Involuntary full rematerialization" warnings, forward and backward).
    """

    vocab_size: int
    hidden_size: int
    dtype: Any
    param_dtype: Any
    init: Any

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        table = self.param("embedding", named(self.init, "vocab", "embed"), (self.vocab_size, self.hidden_size),
                           self.param_dtype)
        table = constrain(table.astype(self.dtype), "vocab", None)
        if self.vocab_size <= ONE_HOT_MAX_VOCAB:
            out = one_hot_grad_lookup(table, input_ids)
        else:
            out = jnp.take(table, input_ids, axis=0)
        return constrain(out, "batch", "length", "act_embed")
