"""Pallas (Triton backend) kernels for the grouped matmul of a dropless MoE layer.

Rows are sorted by group (expert); group e owns rows [start_e, end_e). Two kernels cover the forward
pass and both gradients:

  grouped_matmul_kernel             out[r] = x[r] @ W[g(r)]           forward, and d_lhs (W transposed);
                                    with a second weight U, out[r] = silu(x[r] @ W[g(r)]) * (x[r] @ U[g(r)]):
                                    an expert's gate and up matmuls in one pass over x (SwiGLU)
  transposed_grouped_matmul_kernel  dW[e]  = x_e^T @ y_e              d_rhs (a reduction over each group's rows)

Grouped kernel. The (M, P) output is cut into row tiles x column tiles, one program per tile, so every
output element is written exactly once. A schedule computed before the launch lists the row tiles as
work items (first row, last row + 1, range of groups [lo, hi)); the program visits each listed group,
loading only that group's rows (masked loads, zeros elsewhere) into one float32 accumulator, and stores
the item's rows. Two schedules:
  "group" (default): each group's rows are cut into tiles starting at the group's first row, so no tile
    straddles two groups; a group's last tile is partial (half empty on average), rows past the last
    group form zero-only tiles, and idle items pad the grid to its static bound cdiv(M, bm) + E.
  "aligned": tiles at multiples of block_m; a tile that straddles a boundary visits both groups, a full
    pass over K each (about one wasted tile per boundary instead of half a tile per group).

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
    schedule: str = "group"  # row tiles of the grouped kernel (forward, d_lhs): "group" or "aligned"
    split_k: int = 1  # grouped kernel: programs per output tile, each summing a slice of the K steps (few rows)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Tiling.{name} must be a power of two >= 16 (Triton's dot needs it), got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tiling.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiling.num_stages must be a positive int, got {self.num_stages!r}")
        if self.schedule not in ("group", "aligned"):
            raise ValueError(f"Tiling.schedule must be 'group' or 'aligned', got {self.schedule!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"Tiling.split_k must be a positive int, got {self.split_k!r}")

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


def aligned_schedule(starts, ends, num_rows: int, block_m: int):
    """Work items = row tiles at multiples of block_m; item t lists the groups [lo, hi) overlapping it.

    Groups are contiguous and sorted, so "ends at or before the tile starts" and "starts before the tile
    ends" are both prefixes of the group list; their lengths bound the range. An empty group strictly
    inside a tile falls in the range and is skipped by the kernel (zero K steps).
    Returns (row_start, row_stop, lo, hi), each (cdiv(M, bm),) int32."""
    row_start = jnp.arange(pl.cdiv(num_rows, block_m), dtype=jnp.int32) * block_m
    row_stop = jnp.minimum(row_start + block_m, num_rows)
    lo = jnp.sum(ends[None, :] <= row_start[:, None], axis=1, dtype=jnp.int32)
    hi = jnp.sum(starts[None, :] < row_stop[:, None], axis=1, dtype=jnp.int32)
    return row_start, row_stop, lo, hi


def group_schedule(starts, ends, num_rows: int, block_m: int, align: int = 1):
    """Work items = tiles of at most block_m rows inside one group, starting at each group's first row,
    then tiles of the padding rows past the last group (no group: zeros), then idle items (no rows).

    Segment s < E is group s; segment E is the padding [sum, M). The tiles of all segments number at most
    cdiv(M, bm) + E (each segment adds less than one tile to M / bm), the static grid size.
    align > 1 (the Mosaic GPU kernel's 8-row TMA tiles): a segment's tiles start at its first row rounded down to a
    multiple of align, so a first tile's row_start may lie in the segment before (its own rows start at
    max(row_start, the segment's first row)); each segment then adds up to align - 1 rows.
    Returns (row_start, row_stop, lo, hi), each (cdiv(M + (align - 1) (E + 1), bm) + E,) int32; lo = hi for
    padding and idle."""
    num_groups = starts.shape[0]
    seg_firsts = jnp.concatenate([starts, ends[-1:]])
    seg_starts = seg_firsts // align * align
    seg_ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    tiles = jnp.where(seg_ends > seg_firsts, pl.cdiv(seg_ends - seg_starts, block_m), 0)
    tiles_before = jnp.cumsum(tiles) - tiles
    item = jnp.arange(pl.cdiv(num_rows + (align - 1) * (num_groups + 1), block_m) + num_groups, dtype=jnp.int32)
    seg = jnp.sum((tiles_before + tiles)[None, :] <= item[:, None], axis=1, dtype=jnp.int32)
    in_use = seg <= num_groups
    seg = jnp.minimum(seg, num_groups)
    row_start = jnp.where(in_use, seg_starts[seg] + (item - tiles_before[seg]) * block_m, 0)
    row_stop = jnp.where(in_use, jnp.minimum(row_start + block_m, seg_ends[seg]), 0)
    is_group = seg < num_groups
    return row_start, row_stop, jnp.where(is_group, seg, 0), jnp.where(is_group, seg + 1, 0)


SCHEDULES = {"group": group_schedule, "aligned": aligned_schedule}


def _dot_precision(dtype):
    # float32 inputs: full float32 products (Triton's "ieee"); 16-bit inputs: the tensor cores' only mode.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _check_sizes(*shapes):
    for shape in shapes:
        if math.prod(shape) > _MAX_ELEMENTS:
            raise ValueError(f"an operand of shape {shape} has more than 2**31 - 1 elements, past the "
                             "Pallas grouped matmul's int32 offsets; shard the experts or use impl='ragged_dot'")


def _grouped_kernel(row_start_ref, row_stop_ref, lo_ref, hi_ref, starts_ref, ends_ref, x_ref, *refs,
                    tiling, num_col_tiles, transpose_w, depth, width, num_rows):
    """Rows [row_start, row_stop) of one work item x one block_n column tile of out (M, P) = x (M, Q) @ W[g]
    (Q, P); W is stored (E, Q, P), or (E, P, Q) when transpose_w. depth = Q, width = P. refs: (w, out), or
    (w, u, out) for out = silu(x @ W[g]) * (x @ U[g]) (each product rounded to x's dtype first, as two separate
    calls would round it). With split_k = S > 1, program (item, column tile, part) sums part's slice of the K
    steps into rows part * M + r of a float32 (S * M, P) output, which the caller sums over the S parts."""
    *w_refs, out_ref = refs
    bm, bn, bk, split = tiling.block_m, tiling.block_n, tiling.block_k, tiling.split_k
    tile = pl.program_id(0)
    item, col_tile, part = tile // (num_col_tiles * split), (tile // split) % num_col_tiles, tile % split
    row0, row_stop, col0 = row_start_ref[item], row_stop_ref[item], col_tile * bn
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)
    cols_ok = cols < width
    num_k_steps = pl.cdiv(depth, bk)
    part_steps = pl.cdiv(num_k_steps, split)
    first_step = part * part_steps
    last_step = jnp.minimum(first_step + part_steps, num_k_steps)
    precision = _dot_precision(x_ref.dtype)

    def visit_group(group, accs):
        start, end = starts_ref[group], ends_ref[group]
        in_group = (rows >= start) & (rows < end)  # also keeps every load inside x's rows

        def k_step(step, accs):
            k0 = step * bk
            ks_ok = (k0 + jnp.arange(bk, dtype=jnp.int32)) < depth
            x_mask = in_group[:, None] & ks_ok[None, :] if depth % bk else in_group[:, None]
            x = pltriton.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=x_mask, other=0)
            if transpose_w:
                w_mask = (cols_ok[:, None] & ks_ok[None, :]) if (width % bn or depth % bk) else None
                window = (group, pl.ds(col0, bn), pl.ds(k0, bk))
                dims = (((1,), (1,)), ((), ()))
            else:
                w_mask = (ks_ok[:, None] & cols_ok[None, :]) if (width % bn or depth % bk) else None
                window = (group, pl.ds(k0, bk), pl.ds(col0, bn))
                dims = (((1,), (0,)), ((), ()))
            return tuple(acc + jax.lax.dot_general(x, _load(w_ref.at[window], w_mask), dims, precision=precision,
                                                   preferred_element_type=jnp.float32)
                         for acc, w_ref in zip(accs, w_refs))

        # An empty group takes zero K steps. (Arithmetic, not jnp.where: the Triton lowering of a select
        # between two Python constants types them as the predicate.)
        steps = (end > start).astype(jnp.int32) * (last_step - first_step)
        return jax.lax.fori_loop(first_step, first_step + steps, k_step, accs)

    accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
    accs = jax.lax.fori_loop(lo_ref[item], hi_ref[item], visit_group, accs)
    if len(accs) == 1:
        acc = accs[0]
    else:  # SwiGLU: the gate and up products rounded as separate calls would store them, then combined
        gate, up = (a.astype(x_ref.dtype).astype(jnp.float32) for a in accs)
        acc = gate / (1.0 + jnp.exp(-gate)) * up
    out_mask = (rows < row_stop)[:, None] & cols_ok[None, :] if width % bn else (rows < row_stop)[:, None]
    out_row0 = row0 if split == 1 else part * num_rows + row0
    pltriton.store(out_ref.at[pl.ds(out_row0, bm), pl.ds(col0, bn)], acc.astype(out_ref.dtype), mask=out_mask)


def _load(ref, mask):
    if mask is None:
        return pltriton.load(ref)
    return pltriton.load(ref, mask=mask, other=0)


@functools.partial(jax.jit, static_argnames=("transpose_w", "tiling", "interpret"))
def grouped_matmul_kernel(x, w, group_sizes, *, transpose_w: bool, tiling: Tiling, interpret: bool = False,
                          up=None):
    """x (M, Q), w (E, Q, P) [or (E, P, Q) with transpose_w], group_sizes (E,) -> (M, P) in x.dtype.

    out[r] = x[r] @ w[g(r)] (or x[r] @ w[g(r)]^T); rows past sum(group_sizes) are 0. With tiling.split_k = S > 1
    the K steps are split over S programs per output tile (more programs for a few rows), whose float32 partial
    sums are added here. up (E, Q, P): out[r] = silu(x[r] @ w[g(r)]) * (x[r] @ up[g(r)]) (no transpose, no split:
    the product of two sums is not a sum of parts)."""
    num_rows, depth = x.shape
    width = w.shape[1] if transpose_w else w.shape[2]
    split = tiling.split_k
    if up is not None and (transpose_w or split != 1 or up.shape != w.shape):
        raise ValueError(f"the gated kernel takes up of w's shape {w.shape} (got {up.shape}), no transpose_w "
                         f"(got {transpose_w}) and no split_k (got {split})")
    _check_sizes((split * num_rows, depth), w.shape, (split * num_rows, width))
    tiling = tiling.fitted(num_rows, width, depth)
    starts, ends = group_bounds(group_sizes, num_rows)
    schedule = SCHEDULES[tiling.schedule](starts, ends, num_rows, tiling.block_m)
    num_col_tiles = pl.cdiv(width, tiling.block_n)
    kernel = functools.partial(_grouped_kernel, tiling=tiling, num_col_tiles=num_col_tiles,
                               transpose_w=transpose_w, depth=depth, width=width, num_rows=num_rows)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split * num_rows, width), x.dtype if split == 1 else jnp.float32),
        grid=(schedule[0].shape[0] * num_col_tiles * split,),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="grouped_matmul" if up is None else "grouped_swiglu",
    )(*schedule, starts, ends, x, w, *([] if up is None else [up]))
    return out if split == 1 else out.reshape(split, num_rows, width).sum(axis=0).astype(x.dtype)


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
