"""A pure-JAX grouped matmul for backends without the Pallas kernel (the CPU).

XLA's CPU ragged_dot multiplies every row by every group's weights and masks (E times the work). Here each group's
rows are padded to whole tiles of `tile_rows` rows, so a tile belongs to one group, and the tiles are multiplied as
one batched matmul against their groups' weights: work is (M + E * tile_rows) * K * N instead of E * M * K * N.
Differentiable by autodiff (the weight gather's transpose sums each group's tiles).
"""
import jax
import jax.numpy as jnp


def tiled_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile_rows: int = 64) -> jax.Array:
    """lhs (M, K) rows sorted by group, rhs (E, K, N), group_sizes (E,) int32 (sum <= M) -> (M, N) in lhs.dtype."""
    rows, groups = lhs.shape[0], rhs.shape[0]
    num_tiles = -(-rows // tile_rows) + groups  # padding adds < tile_rows rows per group
    sizes = jnp.maximum(group_sizes, 0)
    starts = jnp.cumsum(sizes) - sizes
    padded = -(-sizes // tile_rows) * tile_rows
    padded_starts = jnp.cumsum(padded) - padded

    row = jnp.arange(rows, dtype=jnp.int32)
    group_of_row = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), 0, groups - 1)
    valid = row < jnp.sum(sizes)
    slot = jnp.where(valid, padded_starts[group_of_row] + row - starts[group_of_row], num_tiles * tile_rows)

    tiles = jnp.zeros((num_tiles * tile_rows + 1, lhs.shape[1]), lhs.dtype).at[slot].set(lhs)[:-1]
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile_rows
    group_of_tile = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), 0, groups - 1)
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    out_tiles = jnp.einsum("tmk,tkn->tmn", tiles.reshape(num_tiles, tile_rows, -1), rhs[group_of_tile],
                           precision=precision, preferred_element_type=jnp.float32)
    out = out_tiles.reshape(num_tiles * tile_rows, -1)
    out = jnp.concatenate([out, jnp.zeros((1, out.shape[1]), out.dtype)])[slot]
    return out.astype(lhs.dtype)
