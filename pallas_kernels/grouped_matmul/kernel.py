"""Pallas (Triton backend) kernels for the grouped matmul of a dropless MoE layer.

Rows are sorted by group (expert); group e owns rows [start_e, end_e). Two kernels cover the forward
pass and both gradients:

  grouped_matmul_kernel             out[r] = x[r] @ W[g(r)]           forward, and d_lhs (W transposed)
  transposed_grouped_matmul_kernel  dW[e]  = x_e^T @ y_e              d_rhs (a reduction over each group's rows)

Grouped kernel. The (M, P) output is cut into row tiles x column tiles, one program per tile, so every
output element is written exactly once. A row tile may straddle group boundaries: a schedule computed
before the launch gives each row tile the range of groups [lo, hi) that overlap it, and the program
visits them in turn, loading only the rows of the visited group (masked loads, zeros elsewhere) and
accumulating into one float32 accumulator. A tile inside one group (the common case) visits one group;
a straddling tile pays one extra pass over K per extra group; rows past the last group get zeros.

Transposed kernel. One program per (expert, K tile, N tile) of dW; it walks the expert's rows in steps
of the tiling's block_k, masking rows past the group's end. An empty group walks zero steps and writes
zeros.

Tiling names follow each kernel's own GEMM: the output tile is block_m x block_n and block_k is the
reduction step. So for the forward, (block_m, block_n, block_k) tile (M, N, K); for d_lhs = d_out @
W^T they tile (M, K, N); for d_rhs they tile (K, N, M).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_MAX_ELEMENTS = 2**31 - 1  # the kernels compute element offsets in int32


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes (powers of two, >= 16) and Triton launch options for one kernel."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Tiling.{name} must be a power of two >= 16 (Triton's dot needs it), got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tiling.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiling.num_stages must be a positive int, got {self.num_stages!r}")

    def fitted(self, m: int, n: int, k: int) -> "Tiling":
        """The same tiling with each block shrunk to the problem (next power of two, at least 16)."""
        def fit(block, size):
            return min(block, max(16, 1 << max(size - 1, 0).bit_length()))
        return dataclasses.replace(self, block_m=fit(self.block_m, m), block_n=fit(self.block_n, n),
                                   block_k=fit(self.block_k, k))


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(E,) int32 starts and ends of each group's rows, clamped to [0, num_rows] so that no load can
    leave the arrays even when group_sizes is invalid (negative, or summing past num_rows)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    starts = jnp.minimum(ends - sizes, num_rows)
    return starts, jnp.minimum(ends, num_rows)


def row_tile_schedule(starts: jax.Array, ends: jax.Array, num_rows: int, block_m: int
                      ) -> tuple[jax.Array, jax.Array]:
    """For each row tile t, the groups [lo[t], hi[t]) whose rows overlap the tile. Both (cdiv(M, bm),) int32.

    Groups are contiguous and sorted, so "ends at or before the tile starts" and "starts before the tile
    ends" are both prefixes of the group list; their lengths bound the range. An empty group strictly
    inside a tile falls in the range and is skipped by the kernel (zero K steps)."""
    tile_starts = jnp.arange(pl.cdiv(num_rows, block_m), dtype=jnp.int32) * block_m
    tile_ends = jnp.minimum(tile_starts + block_m, num_rows)
    lo = jnp.sum(ends[None, :] <= tile_starts[:, None], axis=1, dtype=jnp.int32)
    hi = jnp.sum(starts[None, :] < tile_ends[:, None], axis=1, dtype=jnp.int32)
    return lo, hi


def _dot_precision(dtype):
    # float32 inputs: full float32 products (Triton's "ieee"); 16-bit inputs: the tensor cores' only mode.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _check_sizes(*shapes):
    for shape in shapes:
        if math.prod(shape) > _MAX_ELEMENTS:
            raise ValueError(f"an operand of shape {shape} has more than 2**31 - 1 elements, past the "
                             "Pallas grouped matmul's int32 offsets; shard the experts or use impl='ragged_dot'")


def _grouped_kernel(lo_ref, hi_ref, starts_ref, ends_ref, x_ref, w_ref, out_ref, *, tiling, num_col_tiles,
                    transpose_w, num_rows, depth, width):
    """One (block_m, block_n) tile of out (M, P) = x (M, Q) @ W[g] (Q, P); W is stored (E, Q, P), or
    (E, P, Q) when transpose_w. depth = Q, width = P."""
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    tile = pl.program_id(0)
    row_tile, col_tile = tile // num_col_tiles, tile % num_col_tiles
    row0, col0 = row_tile * bm, col_tile * bn
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)
    cols_ok = cols < width
    num_k_steps = pl.cdiv(depth, bk)
    precision = _dot_precision(x_ref.dtype)

    def visit_group(group, acc):
        start, end = starts_ref[group], ends_ref[group]
        in_group = (rows >= start) & (rows < end)  # also keeps every load inside x's rows

        def k_step(step, acc):
            k0 = step * bk
            ks_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < depth
            x_mask = in_group[:, None] & ks_ok[None, :] if depth % bk else in_group[:, None]
            x = pltriton.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=x_mask, other=0)
            if transpose_w:
                w_mask = (cols_ok[:, None] & ks_ok[None, :]) if (width % bn or depth % bk) else None
                w = _load(w_ref.at[group, pl.ds(col0, bn), pl.ds(k0, bk)], w_mask)
                dims = (((1,), (1,)), ((), ()))
            else:
                w_mask = (ks_ok[:, None] & cols_ok[None, :]) if (width % bn or depth % bk) else None
                w = _load(w_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], w_mask)
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(x, w, dims, precision=precision, preferred_element_type=jnp.float32)

        # An empty group takes zero K steps. (Arithmetic, not jnp.where: the Triton lowering of a select
        # between two Python constants types them as the predicate.)
        steps = (end > start).astype(jnp.int32) * num_k_steps
        return jax.lax.fori_loop(0, steps, k_step, acc)

    acc = jnp.zeros((bm, bn), jnp.float32)
    acc = jax.lax.fori_loop(lo_ref[row_tile], hi_ref[row_tile], visit_group, acc)
    out_mask = None
    if num_rows % bm or width % bn:
        out_mask = (rows < num_rows)[:, None] & cols_ok[None, :]
    pltriton.store(out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], acc.astype(out_ref.dtype), mask=out_mask)


def _load(ref, mask):
    if mask is None:
        return pltriton.load(ref)
    return pltriton.load(ref, mask=mask, other=0)


@functools.partial(jax.jit, static_argnames=("transpose_w", "tiling", "interpret"))
def grouped_matmul_kernel(x, w, group_sizes, *, transpose_w: bool, tiling: Tiling, interpret: bool = False):
    """x (M, Q), w (E, Q, P) [or (E, P, Q) with transpose_w], group_sizes (E,) -> (M, P) in x.dtype.

    out[r] = x[r] @ w[g(r)] (or x[r] @ w[g(r)]^T); rows past sum(group_sizes) are 0."""
    _check_sizes(x.shape, w.shape)
    num_rows, depth = x.shape
    width = w.shape[1] if transpose_w else w.shape[2]
    tiling = tiling.fitted(num_rows, width, depth)
    starts, ends = group_bounds(group_sizes, num_rows)
    lo, hi = row_tile_schedule(starts, ends, num_rows, tiling.block_m)
    num_col_tiles = pl.cdiv(width, tiling.block_n)
    kernel = functools.partial(_grouped_kernel, tiling=tiling, num_col_tiles=num_col_tiles,
                               transpose_w=transpose_w, num_rows=num_rows, depth=depth, width=width)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, width), x.dtype),
        grid=(pl.cdiv(num_rows, tiling.block_m) * num_col_tiles,),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(lo, hi, starts, ends, x, w)


def _transposed_kernel(starts_ref, ends_ref, x_ref, y_ref, out_ref, *, tiling, num_k_tiles, num_n_tiles,
                       depth, width):
    """One (block_m, block_n) tile of out[e] (K, N) = x_e^T @ y_e; x (M, K), y (M, N), depth = K, width = N."""
    bkk, bn, br = tiling.block_m, tiling.block_n, tiling.block_k  # K tile, N tile, rows per step
    tile = pl.program_id(0)
    group = tile // (num_k_tiles * num_n_tiles)
    k_tile = (tile // num_n_tiles) % num_k_tiles
    n_tile = tile % num_n_tiles
    k0, n0 = k_tile * bkk, n_tile * bn
    ks_ok = (k0 + jnp.arange(bkk, dtype=jnp.int32)) < depth
    ns_ok = (n0 + jnp.arange(bn, dtype=jnp.int32)) < width
    start, end = starts_ref[group], ends_ref[group]
    precision = _dot_precision(x_ref.dtype)

    def row_step(step, acc):
        r0 = start + step * br
        rows_ok = (r0 + jnp.arange(br, dtype=jnp.int32)) < end
        x_mask = rows_ok[:, None] & ks_ok[None, :] if depth % bkk else rows_ok[:, None]
        y_mask = rows_ok[:, None] & ns_ok[None, :] if width % bn else rows_ok[:, None]
        x = pltriton.load(x_ref.at[pl.ds(r0, br), pl.ds(k0, bkk)], mask=x_mask, other=0)
        y = pltriton.load(y_ref.at[pl.ds(r0, br), pl.ds(n0, bn)], mask=y_mask, other=0)
        dims = (((0,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, br), row_step, jnp.zeros((bkk, bn), jnp.float32))
    out_mask = ks_ok[:, None] & ns_ok[None, :] if (depth % bkk or width % bn) else None
    pltriton.store(out_ref.at[group, pl.ds(k0, bkk), pl.ds(n0, bn)], acc.astype(out_ref.dtype), mask=out_mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "interpret"))
def transposed_grouped_matmul_kernel(x, y, group_sizes, *, out_dtype, tiling: Tiling, interpret: bool = False):
    """x (M, K), y (M, N), group_sizes (E,) -> (E, K, N) in out_dtype: out[e] = x_e^T @ y_e over group e's
    rows (float32 accumulation). Empty groups give zeros; rows past sum(group_sizes) are ignored."""
    num_rows, depth = x.shape
    width, num_groups = y.shape[1], group_sizes.shape[0]
    _check_sizes(x.shape, y.shape, (num_groups, depth, width))
    tiling = tiling.fitted(depth, width, num_rows)
    starts, ends = group_bounds(group_sizes, num_rows)
    num_k_tiles, num_n_tiles = pl.cdiv(depth, tiling.block_m), pl.cdiv(width, tiling.block_n)
    kernel = functools.partial(_transposed_kernel, tiling=tiling, num_k_tiles=num_k_tiles,
                               num_n_tiles=num_n_tiles, depth=depth, width=width)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, depth, width), out_dtype),
        grid=(num_groups * num_k_tiles * num_n_tiles,),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="transposed_grouped_matmul",
    )(starts, ends, x, y)
