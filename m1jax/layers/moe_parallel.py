"""Expert-parallel MoE dispatch: shard_map over the batch axes (data, fsdp, expert) and the tensor axis.

Inside the shard_map, with D batch shards (data * fsdp * expert), P = size of "expert", S = size of "tensor":
  tokens x (B/D, T, hidden) and their calls (B/D, T, k): each device its own slice of the batch;
  w1, w3 (E/P, hidden, F/S), w2 (E/P, F/S, hidden): the device's experts, their width split over "tensor" (the hidden
  dim, sharded over "fsdp" at rest, is gathered by XLA on the way in, as FSDP does).
Steps:
  1. capacity (optional): each device's calls per expert are all-gathered over the batch shards, so a device knows how
     many calls the tokens before its slice made to each expert; its overflow is dropped exactly as on one device.
  2. dispatch: tokens and their (expert, weight) calls are all-gathered within the expert group (the P devices sharing
     a data and fsdp index); calls to experts held by another device become the no-call sentinel.
  3. compute: one grouped matmul over the device's E/P experts (sorted_dispatch), partial outputs for P*N_d tokens.
  4. combine: a reduce-scatter over "expert" returns each token's sum to the device that holds it; a psum over
     "tensor" adds the partial sums over the expert width.

Costs per device and layer, N_d tokens per device: the all-gather brings in (P-1) N_d hidden vectors and the
reduce-scatter sends as many back; the grouped matmul works only on real calls (the Pallas kernel skips the no-call
rows past the group sizes); the row buffer holds P N_d k rows (dropless) or E/P * C rows (capacity C). An all-to-all
would move (P-1)/P N_d k rows each way instead: the same at P = k = 2, less only when P > k, and dropless it needs a
worst-case receive buffer of P N_d k rows too. XLA:CPU has no ragged all-to-all, so this path is testable everywhere.
Meshes with Auto axes (create_mesh) let XLA move the inputs into the shard_map's layout; with Explicit axes
(jax.make_mesh's default) the inputs are resharded to it first.
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from m1jax.layers.moe import GroupedMatmul, over_capacity, sorted_dispatch
from m1jax.sharding import BATCH_AXES, MESH_AXES, ambient_mesh, axis_size, check_mesh


def expert_parallel_mesh() -> jax.sharding.AbstractMesh | None:
    """The ambient mesh (jax.set_mesh) when it spreads the MoE over more than one device, else None (local path).

    A mesh without any of the project's axes (data, fsdp, expert, tensor) is left to XLA's own partitioning, and so
    is one inside a shard_map already (manual axes)."""
    mesh = ambient_mesh()
    if mesh is None or not set(MESH_AXES) & set(mesh.axis_names):
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    if math.prod(axis_size(mesh, a) for a in MESH_AXES) == 1:
        return None
    return mesh


def dispatch_expert_parallel(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                             w2: jax.Array, *, mesh, grouped_matmul: GroupedMatmul, capacity: int | None = None):
    """x (B, T, hidden) (any dims between B and hidden); weights (N, k) float32 and experts (N, k) int32 in [0, E]
    (E = no call) for the N = B*T tokens in order; w1, w3 (E, hidden, F), w2 (E, F, hidden).
    Returns (out (N, hidden) in x.dtype, dropped (N, k) bool), equal to `dispatch_locally` on the whole batch (the
    partial outputs are combined across devices in x.dtype, the compute dtype)."""
    batch, hidden = x.shape[0], x.shape[-1]
    num_experts, _, width = w1.shape
    num_tokens, k = experts.shape
    check_mesh(mesh, num_experts=num_experts, batch_size=batch)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    num_shards = math.prod(axis_size(mesh, a) for a in batch_axes)
    expert_axis = "expert" if "expert" in mesh.axis_names else None
    experts_here = num_experts // axis_size(mesh, "expert")
    tensor = axis_size(mesh, "tensor")
    width_axis = "tensor" if tensor > 1 and width % tensor == 0 else None  # else every tensor shard does all of it

    def local(x, weights, experts, w1, w3, w2):
        x = x.reshape(-1, hidden)
        weights, experts = weights.reshape(-1, k), experts.reshape(-1, k)
        if capacity is None:
            dropped = jnp.zeros(experts.shape, bool)
        else:
            earlier_counts = None
            if batch_axes:
                counts = jnp.bincount(experts.reshape(-1), length=num_experts + 1)[:num_experts]
                every_shard = jax.lax.all_gather(counts, batch_axes)  # (D, E), in batch order
                before = jnp.arange(num_shards)[:, None] < jax.lax.axis_index(batch_axes)
                earlier_counts = jnp.sum(jnp.where(before, every_shard, 0), axis=0)
            dropped = over_capacity(experts, capacity, num_experts, earlier_counts)
        calls = jnp.where(dropped, num_experts, experts)
        first_expert = 0
        if expert_axis is not None:
            x, weights, calls = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, weights, calls))
            first_expert = jax.lax.axis_index(expert_axis) * experts_here
        local_ids = calls - first_expert
        local_ids = jnp.where((calls < num_experts) & (local_ids >= 0) & (local_ids < experts_here),
                              local_ids, experts_here)
        max_rows = None if capacity is None else experts_here * capacity
        out = sorted_dispatch(x, weights, local_ids, w1, w3, w2, grouped_matmul, max_rows).astype(x.dtype)
        if expert_axis is not None:
            out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
        if width_axis is not None:
            out = jax.lax.psum(out, width_axis)
        return out, dropped

    tokens = PartitionSpec(batch_axes or None)
    in_specs = (tokens, tokens, tokens, PartitionSpec(expert_axis, None, width_axis),
                PartitionSpec(expert_axis, None, width_axis), PartitionSpec(expert_axis, width_axis, None))
    per_row = num_tokens // batch
    args = (x.reshape(batch, per_row, hidden), weights.reshape(batch, per_row * k),
            experts.reshape(batch, per_row * k), w1, w3, w2)
    if any(t == AxisType.Explicit for t in mesh.axis_types):  # explicit shardings must match the specs exactly
        args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, in_specs))
    # check_vma=False: Pallas kernels (the grouped matmul on GPU) do not declare how their outputs vary over the
    # manual axes; the specs above say it.
    out, dropped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(tokens, tokens),
                                 check_vma=False)(*args)
    return out.reshape(num_tokens, hidden), dropped.reshape(num_tokens, k)
