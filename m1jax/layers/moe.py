"""M1's mixture-of-experts layer: float32 softmax router, top-k, renormalise, SwiGLU experts, dropless dispatch.

    probs = softmax(x @ gate) (float32, over all E experts);  w = top-k of probs, renormalised to sum to 1
    MoE(x) = sum over kept choices (e, w_e) of  w_e * w2_e(silu(w1_e x) * w3_e x)

The pieces live in `m1jax.layers.moe_core` (routing, expert_threshold, capacity, statistics, sorted dispatch) and
`m1jax.layers.moe_parallel` (the dispatch on one device or expert-parallel over a mesh); this module is the Flax
layer that owns the parameters, and `moe_dense_reference`, the slow, obviously-correct twin: every token through
every expert, weighted by a dense (N, E) gate matrix that is zero off the kept choices, written without the code
under test.

The mesh is passed explicitly (MoE(config, mesh=mesh), or M1ForCausalLM(config, mesh=mesh)); the layer never picks
one up from `jax.set_mesh`, and refuses to run on one device's path under an ambient mesh that would spread it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers.moe_core import (GroupedMatmul, default_grouped_matmul, expert_capacity, route, routing_stats,
                                   skip_below_threshold)
from m1jax.layers.moe_parallel import dispatch, spreads
from m1jax.layers.partitioning import Module, named
from m1jax.sharding import ambient_mesh


def moe_dense_reference(x: jax.Array, gate: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, k: int,
                        expert_threshold: float = 0.0, capacity: int | None = None) -> jax.Array:
    """Slow twin of the MoE layer: every token through every expert. x: (N, hidden) -> (N, hidden).

    The dense (N, E) gate holds each token's kept weights: top-k of the float32 softmax, renormalised; choices after
    the first below expert_threshold removed and the rest renormalised; with a capacity, expert e keeps only its
    first `capacity` tokens in batch order (a running count down the token axis).
    """
    probs = jax.nn.softmax(x.astype(jnp.float32) @ gate.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    kept_choice = (jnp.arange(k)[None, :] == 0) | (top >= expert_threshold)
    top = jnp.where(kept_choice, top, 0.0)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    dense_gate = jnp.zeros(probs.shape, jnp.float32).at[jnp.arange(x.shape[0])[:, None], chosen].set(top)
    if capacity is not None:
        calls = (dense_gate > 0).astype(jnp.int32)
        tokens_before = jnp.cumsum(calls, axis=0) - calls
        dense_gate = jnp.where(tokens_before < capacity, dense_gate, 0.0)
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w1)) * jnp.einsum("nd,edf->nef", x, w3)
    outputs = jnp.einsum("nef,efd->ned", hidden, w2)
    return jnp.einsum("ne,ned->nd", dense_gate, outputs.astype(jnp.float32)).astype(x.dtype)


class MoE(Module):
    """x: (B, T, hidden) -> ((B, T, hidden), routing statistics). Parameters: gate (hidden, E) float32 router,
    w1, w3 (E, hidden, F), w2 (E, F, hidden). token_mask (B, T): padding (0) makes no expert call.

    mesh: run the dispatch expert-parallel over it (m1jax.layers.moe_parallel); None: one device. Initialisation
    always runs one device's dispatch: parameter shapes do not depend on the mesh (and init's dummy batch of one
    row would not split over it).
    """

    config: M1Config
    grouped_matmul: GroupedMatmul | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    policy: RunPolicy = RunPolicy()  # dtypes, expert_threshold, capacity_factor

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
        cfg, policy = self.config, self.policy
        if self.mesh is None and spreads(ambient_mesh()):
            raise ValueError("MoE: an ambient mesh (jax.set_mesh) spreads this layer over several devices but no mesh "
                             "was passed, so it would run one device's dispatch under XLA's partitioning; build the "
                             "model with M1ForCausalLM(config, mesh=mesh) (or MoE(config, mesh=mesh))")
        init = nn.initializers.normal(cfg.initializer_range)
        pdtype, cdtype = jnp.dtype(policy.param_dtype), jnp.dtype(policy.compute_dtype)
        hidden, num_experts, width, k = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.experts_per_token
        gate = self.param("gate", named(init, "embed", "router"), (hidden, num_experts),
                          jnp.float32)  # the router stays float32
        w1 = self.param("w1", named(init, "experts", "embed", "expert_mlp"), (num_experts, hidden, width), pdtype)
        w3 = self.param("w3", named(init, "experts", "embed", "expert_mlp"), (num_experts, hidden, width), pdtype)
        w2 = self.param("w2", named(init, "experts", "expert_mlp", "embed"), (num_experts, width, hidden), pdtype)
        w1, w3, w2 = (w.astype(cdtype) for w in (w1, w3, w2))
        flat = x.reshape(-1, hidden)
        with jax.named_scope("moe_routing"):
            routing = route(flat, gate, k)
            weights, skipped = skip_below_threshold(routing.weights, policy.expert_threshold)
        mask = None if token_mask is None else token_mask.reshape(-1).astype(bool)
        no_call = skipped if mask is None else skipped | ~mask[:, None]
        calls = jnp.where(no_call, num_experts, routing.experts)
        capacity = (None if policy.capacity_factor is None
                    else expert_capacity(flat.shape[0], k, num_experts, policy.capacity_factor))
        mesh = None if self.is_initializing() else self.mesh
        with jax.named_scope("moe_dispatch"):
            out, dropped = dispatch(x.astype(cdtype), weights, calls, w1, w3, w2, mesh=mesh, capacity=capacity,
                                    grouped_matmul=self.grouped_matmul or default_grouped_matmul())
        return out.astype(x.dtype).reshape(x.shape), routing_stats(routing, mask, skipped, dropped)
