"""The grouped matmul's forward and d_lhs as a Mosaic GPU kernel (Hopper): persistent, warp-specialised, TMA.

    out[r] = x[r] @ W[g(r)]          x (M, Q) rows sorted by group, W (E, Q, P) -> out (M, P)     forward
    out[r] = x[r] @ W[g(r)]^T        W stored (E, P, Q) (transpose_w)                              d_lhs

Work items follow kernel.py's "group" schedule, with each group's tiles starting at its first row rounded down to
a multiple of 8 (TMA loads into the swizzled 8-row tiles of shared memory need 8-row-aligned sources): tiles of
block_m rows, none storing rows of two groups; then tiles of the padding rows past the last group (written as
zeros); at most cdiv(M + 7 (E + 1), block_m) + E items, the idle ones empty. One CTA per SM walks
(item, N tile):

    memory warpgroup     TMA-loads the item's block_m rows of x and W[g]'s (block_k x 2 block_n) blocks, `stages`
                         K steps ahead, and on into the next item while the epilogue stores
    2 compute warpgroups each owns half of the N columns: WGMMA into a float32 (block_m, block_n) accumulator, then
                         store the item's rows through shared memory. A TMA store writes a fixed number of rows, and
                         the rows around the item's belong to other groups' items: so the store is a ladder of
                         power-of-two row counts (block_m, block_m / 2, ..., 1), one TMA store per set bit of the
                         row count; the ladder's reads of shared memory overlap the next item's K steps.

Rows of a tile outside its group (up to 7 before, and past the end of a group's last, partial tile) are multiplied
and never stored: the group schedule's waste, about half a tile per group (kernel.py; RESULTS.md "K passes per
tile"). The last tiles near row M load the block_m rows ending at the (8-aligned) end of x, padded to a multiple
of 8 rows and at least block_m (a copy of x only when M is not such a multiple), so no load leaves x.

Status: tested against the reference in Mosaic GPU's interpret mode on the CPU (race detector on) and lowered for
CUDA at M1's shapes (tests/pallas_kernels/test_mosaic_kernels.py). On an H200 it equals the Triton kernels and runs
1.03-1.19x (forward) and 1.10-1.25x (d_lhs) faster (benchmarks/RESULTS.md); opt-in: `TilingPlan(forward=
MosaicTiling(...), d_lhs=MosaicTiling(...), ...)`, or ops.MOSAIC_BY_DEFAULT. Tiles follow this GEMM (M, P, Q): block_m
rows, block_n of P per warpgroup, block_k of Q a step.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.kernel import group_bounds, group_schedule
from pallas_kernels.grouped_matmul.mosaic_common import (COMPUTE_WARPGROUPS, MosaicTiling, check_divides,
                                                         check_operands, launch, swizzled)


def row_tiles(group_sizes, num_rows: int, block_m: int):
    """The work items, kernel.py's group schedule with 8-row aligned tiles: (5, items) int32 rows of (first row of
    the tile, first row to store, rows to store, group, 1 for a group's tile / 0 for padding or idle)."""
    starts, ends = group_bounds(group_sizes, num_rows)
    row_start, row_stop, lo, hi = group_schedule(starts, ends, num_rows, block_m, align=8)
    first = jnp.maximum(row_start, jnp.where(hi > lo, starts[lo], ends[-1]))  # padding starts after the last group
    rows = jnp.maximum(row_stop - first, 0)
    return jnp.stack([row_start, first, rows, lo, (hi > lo).astype(jnp.int32)])


def required_multiples(depth: int, width: int, tiling: MosaicTiling) -> dict:
    """{name: (size, the tile it must be a multiple of)} for a GEMM of reduction Q = depth and output width P."""
    return {f"Q = {depth}": (depth, tiling.block_k), f"P = {width}": (width, 2 * tiling.block_n)}


# jitted: call sites of one shape share one lowered kernel (mosaic_common's docstring says why)
@functools.partial(jax.jit, static_argnames=("transpose_w", "tiling", "num_sms", "interpret"))
def mosaic_grouped_matmul(x, w, group_sizes, *, transpose_w=False, tiling=MosaicTiling(), num_sms=None,
                          interpret=False):
    """out[r] = x[r] @ W[g(r)] (or W[g(r)]^T with transpose_w), float32 accumulation, rows past the groups 0.

    Args:
      x: (M, Q) rows sorted by group; w: (E, Q, P), or (E, P, Q) with transpose_w; bfloat16 or float16.
      group_sizes: (E,) int32, sum <= M (negative sizes count as 0; rows past M are dropped).
      tiling: MosaicTiling of this GEMM (M, P, Q): block_k divides Q and 2 block_n divides P.
      num_sms, interpret: as mosaic_transposed_grouped_matmul's.
    Returns:
      (M, P) in x.dtype.
    """
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be (M, Q) and w (E, Q, P) or (E, P, Q), got {x.shape} and {w.shape}")
    depth, width = (w.shape[2], w.shape[1]) if transpose_w else w.shape[1:]
    if x.shape[1] != depth:
        raise ValueError(f"x (M, Q) and w share Q: x {x.shape}, w {w.shape} (transpose_w={transpose_w})")
    if group_sizes.shape != (w.shape[0],) or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be ({w.shape[0]},) int32 to match w, got {group_sizes.shape} "
                         f"{group_sizes.dtype}")
    check_operands(x, w, "x", "w")
    check_divides(required_multiples(depth, width, tiling), tiling)
    num_rows = x.shape[0]
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    padded_rows = max(-(-num_rows // 8) * 8, bm)
    if padded_rows > num_rows:  # whole 8-row tiles, and a whole item of rows, must exist to load
        x = jnp.pad(x, ((0, padded_rows - num_rows), (0, 0)))
    schedule = row_tiles(group_sizes, num_rows, bm)
    num_items = schedule.shape[1]
    n_tiles = width // (2 * bn)
    transforms = swizzled(x.dtype)
    w_block = (2 * bn, bk) if transpose_w else (bk, 2 * bn)

    def body(schedule_gmem, x_gmem, w_gmem, out_gmem):
        def pipeline(step_body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                step_body, grid=(depth // bk,), memory_registers=40, wg_axis="wg",
                num_compute_wgs=COMPUTE_WARPGROUPS, max_concurrent_steps=tiling.stages, compute_context=compute_context,
                in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=transforms),
                          plgpu.BlockSpec(w_block, (lambda k: (0, k)) if transpose_w else (lambda k: (k, 0)),
                                          transforms=transforms)])

        ignore = lambda *_, **__: None
        w_view = w_gmem.at[0, pl.ds(0, 2 * bn), :] if transpose_w else w_gmem.at[0, :, pl.ds(0, 2 * bn)]
        allocations = pipeline(ignore, ignore).get_allocations(x_gmem.at[pl.ds(0, bm), :], w_view)

        @functools.partial(pl.run_scoped, allocations=allocations,
                           out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, bm, bn), x.dtype), collective_axes="wg")
        def scope(allocations, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((num_items * n_tiles,), collective_axes="sm")
            def tiles(loop_info):
                (index,) = loop_info.index
                item, n_tile = index // n_tiles, index % n_tiles
                tile_row, first, rows = schedule_gmem[0, item], schedule_gmem[1, item], schedule_gmem[2, item]
                group, real = schedule_gmem[3, item], schedule_gmem[4, item]
                load_from = pl.multiple_of(jnp.minimum(tile_row, padded_rows - bm), 8)  # item rows: first - load_from
                cols = pl.ds(pl.multiple_of(wg * bn, bn), bn)

                def store(values):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores have read the buffer
                    for w in range(COMPUTE_WARPGROUPS):  # a static buffer index: layout inference needs one
                        @pl.when(wg == w)
                        def _(w=w):
                            out_smem[w] = values
                            plgpu.commit_smem()
                            out_cols = pl.ds(n_tile * 2 * bn + w * bn, bn)
                            done, size = jnp.int32(0), bm
                            while size:  # one TMA store per set bit of `rows`, largest first
                                @pl.when((rows & size) != 0)
                                def _(done=done, size=size):
                                    plgpu.copy_smem_to_gmem(out_smem.at[w, pl.ds(first - load_from + done, size)],
                                                            out_gmem.at[pl.ds(first + done, size), out_cols])
                                done, size = done + (rows & size), size // 2

                def compute_context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.float32))
                    def _(acc):
                        run(acc)
                        store(acc[...].astype(x.dtype))

                def step(indices, x_smem, w_smem, acc):
                    rhs = w_smem.at[cols, :].transpose((1, 0)) if transpose_w else w_smem.at[:, cols]
                    plgpu.wgmma(acc, x_smem, rhs)
                    plgpu.wgmma_wait(0)  # done reading this step's buffers, which the pipeline then releases
                    return acc

                @pl.when(real != 0)
                def _():
                    w_group = (w_gmem.at[group, pl.ds(n_tile * 2 * bn, 2 * bn), :] if transpose_w
                               else w_gmem.at[group, :, pl.ds(n_tile * 2 * bn, 2 * bn)])
                    pipeline(step, compute_context)(x_gmem.at[pl.ds(load_from, bm), :], w_group,
                                                    allocations=allocations)

                @pl.when((real == 0) & (rows > 0) & (wg < COMPUTE_WARPGROUPS))
                def _():  # padding rows past the last group: zeros
                    store(jnp.zeros((bm, bn), x.dtype))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = launch(body, jax.ShapeDtypeStruct((padded_rows, width), x.dtype), num_sms, interpret)
    return kernel(schedule, x, w)[:num_rows]
