"""The obviously-correct grouped matmul that the kernels are tested against.

Rows of `lhs` are sorted by group: group e owns rows [offset_e, offset_e + group_sizes[e]) with
offset_e = group_sizes[0] + ... + group_sizes[e-1]. Each group is multiplied by its own matrix:

    out[r] = lhs[r] @ rhs[e]   for r in group e,        out[r] = 0 for rows past sum(group_sizes).

This version does one full dense matmul per group and keeps the group's rows with a mask: E times the
work of the real thing, and plain JAX autodiff gives the reference gradients.
"""
import jax
import jax.numpy as jnp


def group_row_masks(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """(E, M) bool: masks[e, r] is True where row r belongs to group e."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(num_rows)
    return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs (M, K), rhs (E, K, N), group_sizes (E,) int32 -> (M, N) in lhs.dtype, accumulated in float32."""
    masks = group_row_masks(group_sizes, lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for e in range(rhs.shape[0]):
        product = jnp.dot(lhs, rhs[e], precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
        out = out + jnp.where(masks[e][:, None], product, 0.0)
    return out.astype(lhs.dtype)
