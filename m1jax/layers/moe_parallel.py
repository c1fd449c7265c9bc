"""MoE dispatch on one device or expert-parallel over a mesh: one per-device computation, shard_mapped when needed.

With D batch shards (data * fsdp * expert), P = size of "expert", S = size of "tensor", each device holds
  tokens x (B/D, T, hidden) and their calls (B/D, T, k): its own slice of the batch;
  w1, w3 (E/P, hidden, F/S), w2 (E/P, F/S, hidden): its experts, their width split over "tensor" (the hidden dim,
  sharded over "fsdp" at rest, is gathered by XLA on the way in, as FSDP does).
and runs `_dispatch_shard`:
  1. capacity (optional): each device's calls per expert are all-gathered over the batch shards, so a device knows how
     many calls the tokens before its slice made to each expert; its overflow is dropped exactly as on one device.
  2. dispatch: tokens and their (expert, weight) calls are all-gathered within the expert group (the P devices sharing
     a data and fsdp index); calls to experts held by another device become the no-call sentinel.
  3. compute: one grouped matmul over the device's E/P experts (sorted_dispatch), partial outputs for P*N_d tokens.
  4. combine: a reduce-scatter over "expert" returns each token's sum to the device that holds it; a psum over
     "tensor" adds the partial sums over the expert width. Partial sums travel in the compute dtype (x.dtype).
One device is the case D = P = S = 1: no collectives, all E experts local, the output stays float32. That is what
`dispatch` runs when `mesh` is None or does not spread the layer (see `parallel_axes`).

Costs per device and layer, N_d tokens per device: the all-gather brings in (P-1) N_d hidden vectors and the
reduce-scatter sends as many back; the grouped matmul works only on real calls (the Pallas kernel skips the no-call
rows past the group sizes); the row buffer holds P N_d k rows (dropless) or E/P * C rows (capacity C). An all-to-all
would move (P-1)/P N_d k rows each way instead: the same at P = k = 2, less only when P > k, and dropless it needs a
worst-case receive buffer of P N_d k rows too. XLA:CPU has no ragged all-to-all, so this path is testable everywhere.
Meshes with Auto axes (create_mesh) let XLA move the inputs into the shard_map's layout; with Explicit axes
(jax.make_mesh's default) the inputs are resharded to it first.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from m1jax.layers.moe_core import GroupedMatmul, over_capacity, sorted_dispatch
from m1jax.sharding import BATCH_AXES, MESH_AXES, axis_size, check_mesh


@dataclasses.dataclass(frozen=True)
class ParallelAxes:
    """How one layer's dispatch is spread: the batch axes (their shard count), the expert axis (None: every expert
    is local) with the experts per device, and the axis splitting the expert width (None: whole on every device)."""
    batch: tuple[str, ...] = ()
    num_shards: int = 1
    expert: str | None = None
    experts_here: int | None = None  # None: all of them
    width: str | None = None

    @property
    def combines(self) -> bool:
        return self.expert is not None or self.width is not None


def spreads(mesh) -> bool:
    """Whether `mesh` spreads the MoE over more than one device: it has some of the project's axes (data, fsdp,
    expert, tensor) with more than one device among them, and is not inside a shard_map already (manual axes).
    A mesh without those axes is left to XLA's own partitioning of the one-device computation."""
    if mesh is None or not set(MESH_AXES) & set(mesh.axis_names):
        return False
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return False
    return math.prod(axis_size(mesh, a) for a in MESH_AXES) > 1


def parallel_axes(mesh, num_experts: int, width: int) -> ParallelAxes:
    """The ParallelAxes of a mesh that `spreads` (the one-device ParallelAxes() otherwise)."""
    if not spreads(mesh):
        return ParallelAxes()
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    tensor = axis_size(mesh, "tensor")
    return ParallelAxes(
        batch=batch,
        num_shards=math.prod(axis_size(mesh, a) for a in batch),
        expert="expert" if "expert" in mesh.axis_names else None,
        experts_here=num_experts // axis_size(mesh, "expert"),
        width="tensor" if tensor > 1 and width % tensor == 0 else None,  # else every tensor shard does all of it
    )


def _dispatch_shard(x, weights, experts, w1, w3, w2, *, axes: ParallelAxes, num_experts: int,
                    grouped_matmul: GroupedMatmul, capacity: int | None):
    """One device's part (steps 1-4 of the module docstring). x (N_d, hidden), weights / experts (N_d, k) (E = no
    call), w1, w3 (E_d, hidden, F_d), w2 (E_d, F_d, hidden) -> (out (N_d, hidden), dropped (N_d, k) bool); out is
    float32, or x.dtype when partial sums were combined across devices."""
    if capacity is None:
        dropped = jnp.zeros(experts.shape, bool)
    else:
        earlier_counts = None
        if axes.batch:
            counts = jnp.bincount(experts.reshape(-1), length=num_experts + 1)[:num_experts]
            every_shard = jax.lax.all_gather(counts, axes.batch)  # (D, E), in batch order
            before = jnp.arange(axes.num_shards)[:, None] < jax.lax.axis_index(axes.batch)
            earlier_counts = jnp.sum(jnp.where(before, every_shard, 0), axis=0)
        dropped = over_capacity(experts, capacity, num_experts, earlier_counts)
    calls = jnp.where(dropped, num_experts, experts)
    experts_here = num_experts if axes.experts_here is None else axes.experts_here
    if axes.expert is not None:
        x, weights, calls = (jax.lax.all_gather(a, axes.expert, tiled=True) for a in (x, weights, calls))
        local_ids = calls - jax.lax.axis_index(axes.expert) * experts_here
        calls = jnp.where((calls < num_experts) & (local_ids >= 0) & (local_ids < experts_here),
                          local_ids, experts_here)
    max_rows = None if capacity is None else experts_here * capacity
    out = sorted_dispatch(x, weights, calls, w1, w3, w2, grouped_matmul, max_rows)
    if axes.combines:
        out = out.astype(x.dtype)
    if axes.expert is not None:
        out = jax.lax.psum_scatter(out, axes.expert, scatter_dimension=0, tiled=True)
    if axes.width is not None:
        out = jax.lax.psum(out, axes.width)
    return out, dropped


def dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
             *, grouped_matmul: GroupedMatmul, capacity: int | None = None, mesh=None):
    """The experts' work for the kept calls, on one device or expert-parallel over `mesh`.

    Args:
      x: (B, T, hidden) tokens (any dims between B and hidden), in the compute dtype.
      weights: (N, k) float32 and experts: (N, k) int32 in [0, E] (E = no call), for the N = B*T tokens in order.
      w1, w3: (E, hidden, F); w2: (E, F, hidden).
      grouped_matmul: the grouped matmul (see moe_core.sorted_dispatch).
      capacity: (static) the most calls an expert takes, counted over the whole batch in batch order; None: dropless.
      mesh: a jax Mesh (or AbstractMesh) to run expert-parallel on; None (or a mesh that does not `spread` the layer)
        runs on one device.
    Returns:
      (out (N, hidden), dropped (N, k) bool): the same numbers on any mesh; out is float32 on one device and x.dtype
      when combined across devices.
    """
    batch, hidden = x.shape[0], x.shape[-1]
    num_experts, _, width = w1.shape
    num_tokens, k = experts.shape
    axes = parallel_axes(mesh, num_experts, width)
    shard = lambda x, weights, experts, w1, w3, w2: _dispatch_shard(
        x.reshape(-1, hidden), weights.reshape(-1, k), experts.reshape(-1, k), w1, w3, w2, axes=axes,
        num_experts=num_experts, grouped_matmul=grouped_matmul, capacity=capacity)
    if axes == ParallelAxes():
        return shard(x, weights, experts, w1, w3, w2)
    check_mesh(mesh, num_experts=num_experts, batch_size=batch)
    tokens = PartitionSpec(axes.batch or None)
    in_specs = (tokens, tokens, tokens, PartitionSpec(axes.expert, None, axes.width),
                PartitionSpec(axes.expert, None, axes.width), PartitionSpec(axes.expert, axes.width, None))
    per_row = num_tokens // batch
    args = (x.reshape(batch, per_row, hidden), weights.reshape(batch, per_row * k),
            experts.reshape(batch, per_row * k), w1, w3, w2)
    if any(t == AxisType.Explicit for t in mesh.axis_types):  # explicit shardings must match the specs exactly
        args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, in_specs))
    # check_vma=False: Pallas kernels (the grouped matmul on GPU) do not declare how their outputs vary over the
    # manual axes; the specs above say it.
    out, dropped = jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=(tokens, tokens),
                                 check_vma=False)(*args)
    return out.reshape(num_tokens, hidden), dropped.reshape(num_tokens, k)
